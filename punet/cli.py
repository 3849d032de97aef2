"""`punet <verb>`: each verb parses its arguments and calls one stage function."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from .errors import PunetError, UsageError
from .fileio import WEIGHTS

WEIGHTS_HELP = ("how a CPU module reads its weights: mapped from the archive's file (default; nothing read at load) "
                "or read into memory first (seconds at load, the same resident size; measured in docs/cpu-tuning.md)")

DTYPE_CHOICES = ("float32", "float16", "bfloat16")
TORCH_DEVICES = ("cpu", "cuda")
DEFAULT_SHAPE = {"batch": 1, "height": 1024, "width": 1024, "tokens": 77}


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {v}")
        return v

    return parse


def _pixels(text: str) -> int:
    from .signature import LATENT_SCALE

    v = _int_at_least(LATENT_SCALE)(text)
    if v % LATENT_SCALE:
        raise argparse.ArgumentTypeError(f"expected a multiple of {LATENT_SCALE} pixels, got {v}")
    return v


def _non_negative_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return v


def _versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    parts = []
    for dist in ("iree-base-compiler", "iree-base-runtime", "iree-turbine", "torch"):
        try:
            parts.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            parts.append(f"{dist} not installed")
    return f"punet {__version__} ({', '.join(parts)})"


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
    _console().print(f"[dim]·[/dim] {msg}", soft_wrap=True)


@contextlib.contextmanager
def _working(text: str):
    """A spinner with the elapsed time while a long step runs (nothing when stderr is not a terminal)."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(SpinnerColumn(), TextColumn(text), TimeElapsedColumn(), console=_console(), transient=True) as bar:
        bar.add_task(text, total=None)
        yield


@contextlib.contextmanager
def _counting(text: str):
    """A bar counting items (tensors, calibration samples) with the elapsed time; yields `update(i, n)`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(text), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=_console(), transient=True
    ) as bar:
        task = bar.add_task(text, total=None)
        yield lambda i, n: bar.update(task, completed=i, total=n)


def _stdout_console():
    """Tables on stdout; off a terminal, wide enough that paths and commands are never cut."""
    from rich.console import Console

    return Console(highlight=False, width=None if sys.stdout.isatty() else 240)


# ---- verbs ---------------------------------------------------------------------


def cmd_import(args) -> int:
    from .fileio import check_output
    from .weights import import_checkpoint

    if Path(args.output).suffix != ".irpa":
        raise UsageError(f"-o {args.output}: expected a .irpa file name (an IREE parameter archive)")
    check_output(args.output)
    t0 = time.perf_counter()
    with _counting("importing") as on_tensor:
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


def _signature_from_args(args, dtype: str, quant: str = "", fp8: str = ""):
    from .signature import Signature

    shape = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in DEFAULT_SHAPE.items()}
    return Signature(
        dtype=dtype,
        cfg=getattr(args, "cfg", False),
        serving=getattr(args, "serving", False),
        scheduled=getattr(args, "scheduled", False),
        module_name=getattr(args, "module_name", None) or "",
        quant=quant,
        fp8=fp8,
        dp=getattr(args, "dp", None) or 1,
        **shape,
    )


def _check_shape_args_match(args, module_sig) -> None:
    """A compiled module has static shapes: a shape flag that disagrees with them is an error, not ignored."""
    wanted = {k: getattr(args, k) for k in DEFAULT_SHAPE if getattr(args, k) is not None}
    if args.dtype is not None:
        wanted["dtype"] = args.dtype
    if args.cfg:
        wanted["cfg"] = True
    for key, value in wanted.items():
        have = getattr(module_sig, key)
        if value != have:
            flag = f"--{key}" if key != "cfg" else "--cfg"
            raise UsageError(
                f"{flag} {value if key != 'cfg' else ''}".rstrip()
                + f": {args.artifact} was compiled for {key} {have} (a compiled module has static shapes; "
                "export and compile again for other ones)"
            )


def _torch_device(device: str | None) -> str:
    from .runtime import DEVICES

    device = device or "cpu"
    if device.split(":")[0] not in TORCH_DEVICES and device in DEVICES:
        raise UsageError(f"--device {device}: an IREE device; an .irpa runs in torch eager (--device cpu or cuda)")
    if device.split(":")[0] not in TORCH_DEVICES:
        raise UsageError(f"--device {device}: expected a torch device for an .irpa (cpu, cuda or cuda:N)")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise PunetError(f"--device {device}: this torch has no usable CUDA device (torch {torch.__version__})")
    return device


def cmd_run(args) -> int:
    from .fileio import check_output

    artifact = Path(args.artifact)
    check_output(args.output)
    if args.save_inputs:
        check_output(args.save_inputs, "--save-inputs")
    if artifact.suffix == ".vmfb":
        from .runtime import DEVICES, load_build_info, run_vmfb
        from .signature import Signature

        if args.irpa is None:
            raise UsageError("a .vmfb needs --irpa PARAMS.irpa")
        device = args.device or "local-task"
        if device not in DEVICES:
            raise UsageError(f"--device {device}: expected an IREE device for a .vmfb ({', '.join(DEVICES)})")
        module_sig = Signature(**load_build_info(artifact)["signature"])
        if module_sig.scheduled:
            raise UsageError(f"{artifact} is a scheduled module (a whole denoising step): run it with `punet generate`")
        _check_shape_args_match(args, module_sig)
        info = run_vmfb(
            artifact,
            args.irpa,
            args.output,
            inputs=args.inputs,
            seed=args.seed,
            save_inputs=args.save_inputs,
            device=device,
            exact_weights=args.exact_weights,
            progress=_say,
            weights=args.weights or "mapped",
        )
    elif artifact.suffix == ".irpa":
        for flag, given in (("--weights", args.weights), ("--exact-weights", args.exact_weights)):
            if given:  # options of IREE's archive reader: an .irpa run in torch loads the model whole
                raise UsageError(f"{flag}: applies to a .vmfb run (how IREE reads --irpa); "
                                 f"{artifact} runs in torch eager, which reads the archive into memory")
        from .eager import run_eager
        from .weights import read_metadata

        device = _torch_device(args.device)
        # float64 runs on float32 inputs made float64 (the exact reference of a quantized model).
        sig_dtype = "float32" if args.dtype == "float64" else args.dtype or read_metadata(artifact)["dtype"]
        sig = None if args.inputs else _signature_from_args(args, sig_dtype)
        info = run_eager(
            artifact,
            args.output,
            inputs=args.inputs,
            sig=sig,
            seed=args.seed,
            save_inputs=args.save_inputs,
            dtype=args.dtype,
            device=device,
        )
    else:
        raise UsageError(f"{artifact}: expected a .irpa (torch eager) or a .vmfb (IREE)")
    sig = info["signature"]
    print(
        f"wrote {args.output}: batch {sig.batch}, {sig.height}x{sig.width}, {info['dtype']}, "
        f"device {info['device']}" + (f", {info['ms']:.1f} ms" if "ms" in info else "")
    )
    return 0


def cmd_reference(args) -> int:
    from .eager import run_reference
    from .fileio import check_output

    check_output(args.output)
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


def cmd_quantize(args) -> int:
    from .quant.calibrate import quantize_archive

    if args.format == "irpa" and Path(args.output).suffix != ".irpa":
        raise UsageError(f"-o {args.output}: expected a .irpa file name (or --format brevitas and a folder)")
    if args.calibration_inputs and args.calibration_samples is not None:
        raise UsageError("--calibration-inputs and --calibration-samples: give one or the other")
    t0 = time.perf_counter()
    with _counting("calibrating") as on_sample:
        meta = quantize_archive(
            args.irpa,
            args.output,
            scheme=args.scheme,
            alpha=args.smoothquant_alpha,
            calibration_inputs_file=args.calibration_inputs,
            samples=args.calibration_samples or 4,
            seed=args.seed,
            height=args.height,
            width=args.width,
            fmt=args.format,
            fp8_dtype=args.fp8_dtype,
            progress=_say,
            on_sample=on_sample,
        )
    q = meta["quantization"]
    print(
        f"wrote {args.output}: {q['scheme']}, {q['layers']} quantized layers, SmoothQuant alpha {q['smoothquant_alpha']}, "
        f"{meta['dtype']} elsewhere, in {time.perf_counter() - t0:.1f} s"
    )
    return 0


def cmd_export(args) -> int:
    from .export import export_mlir
    from .weights import read_metadata

    meta = read_metadata(args.irpa)
    dtype = args.dtype or meta["dtype"]
    q = meta.get("quantization") or {}
    with _working("exporting with iree-turbine"):
        res = export_mlir(
            args.irpa,
            args.output,
            sig=_signature_from_args(args, dtype, q.get("scheme", ""), q.get("fp8_dtype", "")),
            decompose_attention=args.decompose_attention,
            scheduler=args.scheduler_config,
            force=args.force,
            progress=_say,
        )
    if res.reused:
        print(f"{res.mlir} is up to date (reused; --force rebuilds)")
    else:
        print(f"wrote {res.mlir} ({res.mlir.stat().st_size / 2**20:.1f} MiB) and {res.signature.name} in {res.seconds:.1f} s")
    return 0


def cmd_shard(args) -> int:
    from .artifacts import rank_irpa_path, sharded_irpa_name
    from .sharded.archive import shard_archive

    output = Path(args.output) if args.output else Path(args.irpa).parent / sharded_irpa_name(args.irpa, args.tp)
    if output.suffix != ".irpa":
        raise UsageError(f"-o {output}: expected a .irpa file name (an IREE parameter archive)")
    t0 = time.perf_counter()
    with _counting("sharding") as on_tensor:
        meta = shard_archive(args.irpa, args.tp, output, progress=_say, on_tensor=on_tensor)
    print_plan(meta)
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB"
                      for p in [output] + [rank_irpa_path(output, r) for r in range(args.tp)])
    print(f"wrote {sizes} in {time.perf_counter() - t0:.1f} s")
    return 0


def print_plan(meta) -> None:
    """The plan of a sharded archive's metadata: per layer kind, split, communication, bytes per rank."""
    from rich.table import Table

    from .config import UNetConfig
    from .sharded.archive import plan_of
    from .weights import expected_shapes

    plan = plan_of(meta)
    shapes = expected_shapes(UNetConfig.from_dict(meta["config"]))
    itemsize = {"float32": 4, "float16": 2, "bfloat16": 2}[meta["dtype"]]
    table = Table(title=f"tensor-parallel plan, {plan.tp} ranks ({meta['dtype']})")
    for col in ("layer kind", "split", "communication", "all-reduces", "MiB", "MiB per rank"):
        table.add_column(col, overflow="fold")
    for row in plan.rows(shapes, itemsize):
        table.add_row(row["kind"], row["split"], row["communication"], str(row["all_reduces"]),
                      f"{row['bytes'] / 2**20:.1f}", f"{row['bytes_per_rank'] / 2**20:.1f}")
    _stdout_console().print(table)


def cmd_generate(args) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .fileio import check_output
    from .scheduled.generate import generate

    artifact = Path(args.artifact)
    check_output(args.output)
    if args.save_inputs:
        check_output(args.save_inputs, "--save-inputs")
    sig = None
    given = [f"--{k}" for k in (*DEFAULT_SHAPE, "dtype") if getattr(args, k) is not None]
    if artifact.suffix == ".vmfb":
        from .runtime import DEVICES

        device = args.device or "local-task"
        if device not in DEVICES:
            raise UsageError(f"--device {device}: expected an IREE device for a .vmfb ({', '.join(DEVICES)})")
        if given:
            raise UsageError(f"{given[0]}: a compiled module runs at the shapes it was exported for")
    elif artifact.suffix == ".irpa":
        from .weights import read_metadata

        device = _torch_device(args.device)
        if args.inputs and given:
            raise UsageError(f"{given[0]}: with --inputs, the loop runs at the shapes and dtype of its tensors")
        if not args.inputs:
            sig = _signature_from_args(args, args.dtype or read_metadata(artifact)["dtype"])
            sig = type(sig)(**{**sig.to_dict(), "scheduled": True, "module_name": ""})
    else:
        raise UsageError(f"{artifact}: expected a scheduled .vmfb or an .irpa")
    steps_ms: list[float] = []
    with Progress(
        TextColumn("denoising"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[last]}"),
        TimeElapsedColumn(), console=_console(), transient=True,
    ) as bar:
        task = bar.add_task("steps", total=args.steps, last="")

        def on_step(i: int, ms: float) -> None:
            steps_ms.append(ms)
            bar.update(task, completed=i + 1, last=f"{ms:.1f} ms/step")

        res = generate(
            artifact,
            args.output,
            steps=args.steps,
            guidance=args.guidance,
            irpa=args.irpa,
            inputs=args.inputs,
            seed=args.seed,
            save_inputs=args.save_inputs,
            sig=sig,
            scheduler=args.scheduler_config,
            device=device,
            exact_weights=args.exact_weights,
            progress=_say,
            on_step=on_step,
        )
    import statistics

    sig = res.signature
    print(
        f"wrote {args.output}: {res.steps} steps, guidance {res.guidance:g}, batch {sig.batch}, "
        f"{sig.height}x{sig.width}, {sig.dtype}, {res.runner}: median {statistics.median(res.step_ms):.1f} ms/step "
        f"(min {min(res.step_ms):.1f}), initialize {res.initialize_ms:.1f} ms"
    )
    return 0


def cmd_compile(args) -> int:
    from .compile import compile_vmfb

    if args.list_targets:
        print_targets()
        return 0
    if not args.mlir:
        raise UsageError("needs an exported .mlir (or --list-targets)")
    with _working(f"iree-compile for {args.target}"):
        res = compile_vmfb(
            args.mlir,
            args.target,
            args.output,
            tuned=not args.plain,
            extra_flags=args.flags_extra,
            force=args.force,
            pack_weights=args.pack_weights,
            progress=_say,
        )
    if res.reused:
        print(f"{res.vmfb} is up to date (reused; --force rebuilds)")
    else:
        print(f"wrote {res.vmfb} ({res.vmfb.stat().st_size / 2**20:.1f} MiB) in {res.seconds:.1f} s")
    if args.pack_weights:
        print(f"next: punet pack {res.vmfb} IRPA   (once per archive; then run it with the packed archive)")
    return 0


def cmd_pack(args) -> int:
    from .runtime.pack import pack_weights

    if args.output and Path(args.output).suffix != ".irpa":
        raise UsageError(f"-o {args.output}: expected a .irpa file name (an IREE parameter archive)")
    with _working("packing weights"):
        res = pack_weights(args.vmfb, args.irpa, args.output, force=args.force, progress=_say)
    if res.reused:
        print(f"{res.path} is up to date (reused; --force packs again)")
    else:
        print(f"wrote {res.path} ({res.bytes / 2**30:.2f} GiB) in {res.seconds:.1f} s")
    return 0


def print_targets() -> None:
    """The target table: per target, the device, the dtypes it takes, attention form and the tuned set."""
    from rich.table import Table

    from .compile import TARGETS, compile_flags

    short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
    table = Table(title="punet compile targets (IREE 3.13): `punet compile X.mlir --target NAME [--plain]`")
    for col in ("target", "device", "dtypes", "tuned set for", "attention (tuned / plain)", "description"):
        table.add_column(col, overflow="fold")
    for t in TARGETS.values():
        table.add_row(
            t.name,
            t.driver,
            " ".join(short[d] for d in t.dtypes),
            " ".join(short[d] for d in t.tuned_dtypes),
            f"{'decomposed' if t.decompose_attention else 'as exported'} / "
            f"{'decomposed' if t.decompose_attention_plain else 'as exported'}",
            t.description,
        )
    out = _stdout_console()
    out.print(table)
    out.print("flags (plain set; the tuned set adds the second line):")
    for t in TARGETS.values():
        out.print(f"  {t.name}: {' '.join(compile_flags(t, tuned=False))}", soft_wrap=True)
        out.print(f"  {'':{len(t.name)}}  + {' '.join(t.tuned_flags) or '(nothing)'}", soft_wrap=True)
        for dtype, flags in t.tuned_dtype_flags:
            out.print(f"  {'':{len(t.name)}}  + {' '.join(flags)} ({short[dtype]} modules; those of two or more batch rows are exported with their convolutions one row at a time)", soft_wrap=True)


def cmd_bench(args) -> int:
    from .runtime.bench import benchmark

    from .runtime import DEVICES

    if args.device not in DEVICES:
        raise UsageError(f"--device {args.device}: expected an IREE device ({', '.join(DEVICES)})")
    if args.json:
        from .fileio import check_output

        check_output(args.json, "--json")
    with _console().status("benchmarking") as status:
        res = benchmark(
            args.vmfb,
            args.irpa,
            device=args.device,
            warmup=args.warmup,
            repeat=args.repeat,
            threads=args.threads,
            vs_eager=args.vs_eager,
            exact_weights=args.exact_weights,
            progress=lambda m: status.update(f"benchmarking: {m}"),
            say=_say,
            weights=args.weights,
        )
    print_bench(res)
    if args.json:
        from .fileio import write_json_atomic

        write_json_atomic(args.json, res.to_dict())
    return 0


def print_bench(res) -> None:
    from rich.table import Table

    from .host import describe

    shapes = ", ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in res.inputs)
    table = Table(title=f"{Path(res.vmfb).name} on {res.device}, {res.threads} threads, weights {res.weights}")
    for col in ("runner", "min ms", "median ms", "p90 ms", "mean ms", "calls"):
        table.add_column(col, justify="right" if col != "runner" else "left")
    rows = [("IREE " + res.target, res.iree)] + ([("torch eager", res.eager)] if res.eager else [])
    for name, s in rows:
        table.add_row(name, f"{s.min:.1f}", f"{s.median:.1f}", f"{s.p90:.1f}", f"{s.mean:.1f}", str(len(s.samples_ms)))
    out = _stdout_console()
    out.print(table)
    out.print(f"inputs: {shapes}; dtype {res.dtype}; host {describe(res.host)}, {res.host.get('cores')} cores",
              soft_wrap=True)
    if res.eager:
        out.print(f"IREE / torch eager speed: {res.speedup_vs_eager:.2f}x (median, >1 means IREE is faster)")
    print(f"equivalent: {res.command}", flush=True)


def cmd_demo(args) -> int:
    from rich.table import Table

    from .pipeline import DEFAULT_SOURCE, demo

    res = demo(
        args.source or DEFAULT_SOURCE,
        target=args.target,
        out_dir=args.out_dir,
        batch=args.batch or 1,
        height=args.height,
        width=args.width,
        dtype=args.dtype,
        cfg=args.cfg,
        force=args.force,
        repeat=args.repeat,
        threads=args.threads,
        progress=_say,
        working=_working,
    )
    out = _stdout_console()
    stages = Table(title="punet demo: stages")
    for col in ("stage", "seconds", "artifact", "size", "note"):
        stages.add_column(col, overflow="fold")
    for r in res.stages:
        size = f"{r.size_bytes / 2**20:.1f} MiB" if r.size_bytes is not None else ""
        stages.add_row(r.stage, f"{r.seconds:.1f}", r.artifact, size, r.note)
    out.print(stages)
    if res.checks:
        checks = Table(title="numerics")
        for col in ("check", "max abs error", "max |ref|", "relative L2", "tolerance", "result"):
            checks.add_column(col)
        for name, c, tol in res.checks:
            checks.add_row(
                name, f"{c.max_abs_error:.2e}", f"{c.max_abs_ref:.2e}", f"{c.rel_l2:.2e}", f"{tol:g}",
                "ok" if c.ok(tol) else "FAIL",
            )
        out.print(checks)
    if res.bench is not None:
        print_bench(res.bench)
    if res.compile_only:
        print(f"only compilation was checked: {res.compile_only}", flush=True)
    if not res.ok:
        print("punet demo: error: a numerical check failed (see the table above)", file=sys.stderr)
        return 1
    return 0


# ---- parser --------------------------------------------------------------------


def _add_shape_args(p, *, height: int | None = None, width: int | None = None) -> None:
    """Shape flags; None means "not given" (a .vmfb's own shapes, else DEFAULT_SHAPE)."""
    h = height or DEFAULT_SHAPE["height"]
    w = width or DEFAULT_SHAPE["width"]
    p.add_argument("--batch", type=_int_at_least(1), default=None, help="batch size (default 1)")
    p.add_argument("--height", type=_pixels, default=height, help=f"image height in pixels, a multiple of 8 (default {h})")
    p.add_argument("--width", type=_pixels, default=width, help=f"image width in pixels, a multiple of 8 (default {w})")
    p.add_argument("--tokens", type=_int_at_least(1), default=None, help="text tokens (default 77)")
    p.add_argument("--cfg", action="store_true", help="classifier-free guidance step (2B text rows, guided noise)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="punet",
        description="The SD-family UNet from a Hugging Face checkpoint to a verified IREE binary.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `punet VERB --help` for each verb's options and an example.",
    )
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=_versions())
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=_Parser)

    def verb(name: str, help: str, example: str):
        p = sub.add_parser(
            name,
            help=help,
            description=help,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        # SUPPRESS: a --verbose given before the verb is not reset here.
        p.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
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
    p.add_argument("-o", "--output", required=True, help="output .irpa (an IREE parameter archive)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="convert weights (default: keep the checkpoint's)")
    p.add_argument("--revision", help="hub branch, tag or commit (recorded as the resolved commit)")
    p.add_argument("--variant", help="weights variant, e.g. fp16 for diffusion_pytorch_model.fp16.safetensors")
    p.set_defaults(func=cmd_import)

    p = verb(
        "quantize",
        "post-training quantization of a float .irpa: SmoothQuant, static int8 scales from calibration inputs",
        "punet quantize unet_f32.irpa -o unet_int8.irpa --scheme int8 --smoothquant-alpha 0.5 --calibration-samples 8",
    )
    p.add_argument("irpa", help="float parameter archive (from punet import)")
    p.add_argument("-o", "--output", required=True, help="output .irpa, or a folder with --format brevitas")
    p.add_argument("--scheme", default="int8", help="int8 (default) or int8-fp8attn (also Q, K, V, softmax in fp8)")
    p.add_argument("--fp8-dtype", default="float8_e4m3fn",
                   help="fp8 type of int8-fp8attn: float8_e4m3fn (default: CPU, NVIDIA, gfx950) or float8_e4m3fnuz (gfx942)")
    p.add_argument("--smoothquant-alpha", type=float, default=0.5, help="SmoothQuant migration strength in [0, 1] (default 0.5)")
    p.add_argument("--calibration-inputs", help="inputs safetensors to calibrate on (as punet run --save-inputs writes)")
    p.add_argument("--calibration-samples", type=int, help="random SDXL-like inputs, timesteps 999..0 (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random calibration inputs (default 0)")
    p.add_argument("--height", type=int, default=256, help="calibration image height in pixels (default 256)")
    p.add_argument("--width", type=int, default=256, help="calibration image width in pixels (default 256)")
    p.add_argument("--format", choices=("irpa", "brevitas"), default="irpa",
                   help="irpa (default), or a Brevitas folder (config.json, params.safetensors, quant_params.json)")
    p.set_defaults(func=cmd_quantize)

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
    p.add_argument("--device", help="an .irpa: torch device (cpu, cuda; default cpu); a .vmfb: IREE device "
                   "(local-task, local-sync, hip, vulkan, cuda; default local-task)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES + ("float64",),
                   help="compute dtype for eager (default: the .irpa's; float64: a quantized model's exact reference)")
    p.add_argument("--exact-weights", action="store_true",
                   help="a .vmfb: refuse an archive whose weights differ from the one it was exported from")
    p.add_argument("--weights", choices=WEIGHTS, help="a .vmfb: " + WEIGHTS_HELP)
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
    p.add_argument("--rtol", type=_non_negative_float, default=1e-4, help="relative L2 tolerance (default 1e-4)")
    p.set_defaults(func=cmd_compare)

    p = verb(
        "export",
        "export an .irpa's UNet to MLIR with iree-turbine (static shapes, every weight external)",
        "punet export unet.irpa -o unet.mlir --batch 1 --height 1024 --width 1024",
    )
    p.add_argument("irpa", help="parameter archive from `punet import`")
    p.add_argument("-o", "--output", help="output .mlir (default: named by shape and dtype beside the .irpa)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="must equal the .irpa's dtype (default: the .irpa's)")
    p.add_argument(
        "--decompose-attention",
        action="store_true",
        help="attention as matmul + fp32 softmax (not needed: `punet compile` derives it for targets that want it)",
    )
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date artifact exists")
    p.add_argument(
        "--scheduled",
        action="store_true",
        help="the scheduled UNet: run_initialize + run_forward (CFG UNet call and Euler step), "
        "as shark-ai's SDXL server calls them",
    )
    p.add_argument(
        "--serving",
        action="store_true",
        help="the CFG step as shark-ai's server calls it: `main`, timestep and conditioning in the model dtype",
    )
    p.add_argument("--module-name", help="MLIR module name (default: module; compiled_punet with --serving; "
                   "compiled_spunet with --scheduled)")
    p.add_argument("--scheduler-config", help="a diffusers scheduler_config.json for --scheduled "
                   "(EulerDiscreteScheduler; default SDXL base's)")
    p.add_argument("--dp", type=int, choices=(1, 2), default=None,
                   help="2: the CFG step's negative and positive rows on two devices, weights replicated (needs --cfg)")
    _add_shape_args(p)
    p.set_defaults(func=cmd_export)

    p = verb(
        "shard",
        "split an .irpa over N tensor-parallel ranks: replicated tensors + plan, and one rank file per rank",
        "punet shard unet.irpa --tp 2 -o unet.tp2.irpa   # also writes unet.tp2.rank0.irpa, unet.tp2.rank1.irpa",
    )
    p.add_argument("irpa", help="parameter archive from `punet import`")
    p.add_argument("--tp", type=int, choices=(2, 4, 8), required=True, help="tensor-parallel ranks (devices)")
    p.add_argument("-o", "--output", help="output .irpa (default: <name>.tp<N>.irpa beside the input); "
                   "the rank files go beside it as <output stem>.rank<r>.irpa")
    p.set_defaults(func=cmd_shard)

    p = verb(
        "generate",
        "run a whole denoising loop: a scheduled .vmfb (IREE) or an .irpa (torch eager); writes the final latents",
        "punet generate unet_b1_1024x1024_f16_t64_scheduled.cpu.vmfb --irpa unet_f16.irpa --steps 20 "
        "--guidance 7.5 -o latents.safetensors",
    )
    p.add_argument("artifact", help="scheduled .vmfb (from `punet export --scheduled`) or .irpa (torch eager)")
    p.add_argument("-o", "--output", required=True, help="output safetensors (key 'sample': the final latents)")
    p.add_argument("--irpa", help="parameter archive for a .vmfb")
    p.add_argument("--steps", type=_int_at_least(1), default=20, help="denoising steps, 1 to 99 (default 20)")
    p.add_argument("--guidance", type=_non_negative_float, default=7.5, help="guidance scale (default 7.5)")
    p.add_argument("--inputs", help="safetensors with sample (initial noise), encoder_hidden_states and text_embeds "
                   "(2B rows: negative, then positive) and optionally time_ids")
    p.add_argument("--save-inputs", help="also write the inputs used")
    p.add_argument("--seed", type=int, default=0, help="seed for generated inputs (default 0)")
    p.add_argument("--device", help="an .irpa: torch device (default cpu); a .vmfb: IREE device (default local-task)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="an .irpa: must equal its dtype (default: the .irpa's)")
    p.add_argument("--scheduler-config", help="an .irpa: a diffusers scheduler_config.json (default SDXL base's)")
    p.add_argument("--exact-weights", action="store_true",
                   help="a .vmfb: refuse an archive whose weights differ from the one it was exported from")
    p.add_argument("--batch", type=_int_at_least(1), default=None, help="an .irpa: batch size (default 1)")
    p.add_argument("--height", type=_pixels, default=None, help="an .irpa: image height in pixels (default 1024)")
    p.add_argument("--width", type=_pixels, default=None, help="an .irpa: image width in pixels (default 1024)")
    p.add_argument("--tokens", type=_int_at_least(1), default=None, help="an .irpa: text tokens (default 77)")
    p.set_defaults(func=cmd_generate)

    p = verb(
        "compile",
        "compile an exported .mlir for one target with iree-compile",
        "punet compile unet_b1_1024x1024_f16.mlir --target gfx942",
    )
    p.add_argument("mlir", nargs="?", help="exported .mlir (with its .signature.json beside it)")
    p.add_argument("--target", default="cpu", help="target name (default cpu; see --list-targets)")
    p.add_argument("-o", "--output", help="output .vmfb (default: <mlir stem>.<target>.vmfb)")
    p.add_argument("--plain", action="store_true", help="the target's plain flags, without the tuned set")
    p.add_argument("--flags-extra", action="append", default=[], metavar="FLAG", help="extra iree-compile flag")
    p.add_argument("--list-targets", action="store_true", help="print the target table and exit")
    p.add_argument("--force", action="store_true", help="rebuild even if an up-to-date artifact exists")
    p.add_argument("--pack-weights", action="store_true",
                   help="CPU: read weights packed ahead of time by `punet pack` instead of repacking them at each "
                        "load (writes <output stem>.encoder.vmfb too)")
    p.set_defaults(func=cmd_compile)

    p = verb(
        "pack",
        "pack an archive's weights once for a module compiled with --pack-weights (its data-tiled layout)",
        "punet pack unet_b1_512x512_f32.cpu-packed.vmfb unet_f32.irpa   # writes unet_b1_512x512_f32.cpu-packed.irpa",
    )
    p.add_argument("vmfb", help="module compiled with `punet compile --pack-weights` (its encoder beside it)")
    p.add_argument("irpa", help="the unpacked archive from `punet import`")
    p.add_argument("-o", "--output", help="output .irpa (default: the module's name with .irpa)")
    p.add_argument("--force", action="store_true", help="pack again even if an up-to-date packed archive exists")
    p.set_defaults(func=cmd_pack)

    p = verb(
        "bench",
        "time a compiled step (min, median, p90, mean), optionally beside torch eager",
        "punet bench unet_b1_512x512_f32.cpu.vmfb --irpa unet_f32.irpa --repeat 5 --vs-eager",
    )
    p.add_argument("vmfb", help="compiled module")
    p.add_argument("--irpa", required=True, help="its parameter archive")
    p.add_argument("--device", default="local-task", help="IREE device (default local-task)")
    p.add_argument("--warmup", type=_int_at_least(0), default=1, help="untimed calls first (default 1)")
    p.add_argument("--repeat", type=_int_at_least(1), default=5, help="timed calls (default 5)")
    p.add_argument("--threads", type=_int_at_least(1), help="CPU threads for IREE and torch (default: all cores)")
    p.add_argument("--exact-weights", action="store_true",
                   help="refuse an archive whose weights differ from the one the module was exported from")
    p.add_argument("--weights", choices=WEIGHTS, default="mapped", help=WEIGHTS_HELP)
    p.add_argument("--vs-eager", action="store_true", help="alternate with torch eager on the same inputs")
    p.add_argument("--json", help="also write the figures to this JSON file")
    p.set_defaults(func=cmd_bench)

    p = verb(
        "demo",
        "the whole pipeline in one command: import, export, compile, run, compare, bench",
        "punet demo                      # built-in small SDXL-architecture model, CPU, offline",
    )
    p.add_argument("source", nargs="?", default=None, help="import source (default builtin:tiny-sdxl)")
    p.add_argument("--target", default="cpu", help="compile target (default cpu)")
    p.add_argument("--out-dir", default="artifacts/demo", help="artifact folder (default artifacts/demo)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32", help="weights and compute dtype")
    p.add_argument("--repeat", type=_int_at_least(1), default=3, help="timed calls in the bench stage (default 3)")
    p.add_argument("--threads", type=_int_at_least(1), help="CPU threads (default: all cores)")
    p.add_argument("--force", action="store_true", help="rebuild every artifact")
    _add_shape_args(p, height=256, width=256)
    p.set_defaults(func=cmd_demo)
    return parser


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
    except BrokenPipeError:  # `punet compile --list-targets | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as e:  # a file-system failure no stage anticipated: still one line
        if args.verbose:
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"punet {args.verb}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
