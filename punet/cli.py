"""`punet <verb>`: each verb parses its arguments and calls one stage function."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import PunetError, UsageError

DTYPE_CHOICES = ("float32", "float16", "bfloat16")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (exit code 2)."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


_CONSOLE = None


def _console():
    global _CONSOLE
    if _CONSOLE is None:
        from rich.console import Console

        _CONSOLE = Console(stderr=True, highlight=False)
    return _CONSOLE


def _say(msg: str) -> None:
    _console().print(f"[dim]·[/dim] {msg}")


# ---- verbs ---------------------------------------------------------------------


def cmd_import(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .weights import import_checkpoint

    t0 = time.perf_counter()
    with Progress(
        TextColumn("importing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=_console()
    ) as bar:
        task = bar.add_task("import", total=None)

        def on_tensor(i: int, n: int) -> None:
            bar.update(task, completed=i, total=n)

        meta = import_checkpoint(
            args.source,
            args.output,
            dtype=args.dtype,
            revision=args.revision,
            variant=args.variant,
            progress=_say,
            on_tensor=on_tensor,
        )
    size = Path(args.output).stat().st_size
    print(
        f"wrote {args.output}: {meta['num_tensors']} tensors, {meta['num_parameters']:,} parameters, "
        f"{meta['dtype']}, {size / 2**20:.1f} MiB in {time.perf_counter() - t0:.1f} s"
        + (f" (revision {meta['revision']})" if meta["revision"] else "")
    )
    return 0


def _signature_from_args(args):
    from .signature import Signature

    return Signature(
        batch=args.batch,
        height=args.height,
        width=args.width,
        dtype=args.dtype or "float32",
        tokens=args.tokens,
        cfg=args.cfg,
    )


def cmd_run(args) -> int:
    artifact = Path(args.artifact)
    if artifact.suffix == ".vmfb":
        from .runtime import run_vmfb

        if args.irpa is None:
            raise UsageError("punet run: a .vmfb needs --irpa PARAMS.irpa")
        info = run_vmfb(
            artifact,
            args.irpa,
            args.output,
            inputs=args.inputs,
            seed=args.seed,
            save_inputs=args.save_inputs,
            device=args.device or "local-task",
        )
    elif artifact.suffix == ".irpa":
        from .eager import run_eager

        sig = None if args.inputs else _signature_from_args(args)
        if sig is not None and args.dtype is None:
            from .weights import read_metadata

            sig = type(sig)(sig.batch, sig.height, sig.width, read_metadata(artifact)["dtype"], sig.tokens, sig.cfg)
        info = run_eager(
            artifact,
            args.output,
            inputs=args.inputs,
            sig=sig,
            seed=args.seed,
            save_inputs=args.save_inputs,
            dtype=args.dtype,
            device=args.device or "cpu",
        )
    else:
        raise UsageError(f"punet run: {artifact}: expected a .irpa (torch eager) or a .vmfb (IREE)")
    sig = info["signature"]
    print(
        f"wrote {args.output}: batch {sig.batch}, {sig.height}x{sig.width}, {info['dtype']}, "
        f"device {info['device']}" + (f", {info['ms']:.1f} ms" if "ms" in info else "")
    )
    return 0


def cmd_reference(args) -> int:
    from .eager import run_reference

    run_reference(args.source, args.output, inputs=args.inputs, dtype=args.dtype, progress=_say)
    print(f"wrote {args.output} (diffusers, {args.dtype})")
    return 0


def cmd_compare(args) -> int:
    from .compare import compare_files

    ok = True
    for c in compare_files(args.a, args.b):
        good = c.ok(args.rtol)
        ok &= good
        print(
            f"{c.key} {list(c.shape)}: max abs error {c.max_abs_error:.3e} (max |ref| {c.max_abs_ref:.3e}), "
            f"relative L2 {c.rel_l2:.3e}, NaN {c.nan_a}/{c.nan_b} -> {'ok' if good else 'FAIL'} (rtol {args.rtol:g})"
        )
    return 0 if ok else 1


# ---- parser --------------------------------------------------------------------


def _add_shape_args(p, *, height: int = 1024, width: int = 1024) -> None:
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--height", type=int, default=height, help=f"image height in pixels (default {height})")
    p.add_argument("--width", type=int, default=width, help=f"image width in pixels (default {width})")
    p.add_argument("--tokens", type=int, default=77, help="text tokens (default 77)")
    p.add_argument("--cfg", action="store_true", help="classifier-free guidance step (2B text rows, guided noise)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="punet",
        description="The SD-family UNet from a Hugging Face checkpoint to a verified IREE binary.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `punet VERB --help` for each verb's options and an example.",
    )
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)

    def verb(name: str, help: str, example: str):
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        p.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
        return p

    p = verb(
        "import",
        "import a diffusers UNet checkpoint into an IREE parameter archive (.irpa)",
        "punet import stabilityai/stable-diffusion-xl-base-1.0 --variant fp16 -o unet.irpa",
    )
    p.add_argument(
        "source",
        help="local UNet folder, pipeline folder with unet/, Hugging Face repo id, or builtin:tiny-sdxl",
    )
    p.add_argument("-o", "--output", required=True, help="output .irpa")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="convert weights (default: keep the checkpoint's)")
    p.add_argument("--revision", help="hub branch, tag or commit (recorded as the resolved commit)")
    p.add_argument("--variant", help="weights variant, e.g. fp16 for diffusion_pytorch_model.fp16.safetensors")
    p.set_defaults(func=cmd_import)

    p = verb(
        "run",
        "run one UNet step: torch eager on an .irpa, or a compiled .vmfb with --irpa",
        "punet run unet.irpa --seed 0 --height 512 --width 512 --save-inputs in.safetensors -o out.safetensors",
    )
    p.add_argument("artifact", help=".irpa (torch eager) or .vmfb (IREE runtime)")
    p.add_argument("-o", "--output", required=True, help="output safetensors (key 'sample')")
    p.add_argument("--irpa", help="parameter archive for a .vmfb")
    p.add_argument("--inputs", help="inputs safetensors (keys from punet/signature.py)")
    p.add_argument("--save-inputs", help="also write the inputs used")
    p.add_argument("--seed", type=int, default=0, help="seed for generated inputs (default 0)")
    p.add_argument("--device", help="torch device (cpu) or IREE device (local-task, local-sync, hip, vulkan, cuda)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="compute dtype for eager (default: the .irpa's)")
    _add_shape_args(p)
    p.set_defaults(func=cmd_run)

    p = verb(
        "reference",
        "run diffusers' UNet2DConditionModel on an inputs file (needs the test extra)",
        "punet reference ./sdxl-unet --inputs in.safetensors -o ref.safetensors",
    )
    p.add_argument("source", help="import source (folder, repo id, builtin:NAME) or an .irpa")
    p.add_argument("--inputs", required=True, help="inputs safetensors")
    p.add_argument("-o", "--output", required=True, help="output safetensors")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="compute dtype (default float32)")
    p.set_defaults(func=cmd_reference)

    p = verb(
        "compare",
        "compare two output files: max abs error, relative L2, NaNs; exit 1 above tolerance",
        "punet compare out.safetensors ref.safetensors --rtol 1e-4",
    )
    p.add_argument("a", help="output to check")
    p.add_argument("b", help="reference output")
    p.add_argument("--rtol", type=float, default=1e-4, help="relative L2 tolerance (default 1e-4)")
    p.set_defaults(func=cmd_compare)

    _add_pipeline_verbs(verb)
    return parser


def _add_pipeline_verbs(verb) -> None:
    """export / compile / bench / demo: the IREE stages."""
    try:
        from .pipeline_cli import add_verbs
    except ImportError:
        return
    add_verbs(verb, _add_shape_args, DTYPE_CHOICES)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        if args.verbose:
            raise
        print(f"punet {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except PunetError as e:
        if args.verbose:
            raise
        print(f"punet {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"punet {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
