"""Export: .irpa -> .mlir through iree-turbine, every weight external.

The model is built on the meta device, so exporting the full SDXL UNet
needs no weight memory: each parameter becomes
`#flow.parameter.named<"model"::"<diffusers key>">` and one .irpa serves
every MLIR and every target.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import __version__
from ..artifacts import build_key, mlir_name, signature_path, source_digest, up_to_date
from ..config import UNetConfig
from ..errors import PunetError
from ..fileio import atomic_path, check_output, write_json_atomic
from ..signature import SCOPE, Signature, check_fits, dtype_from_name

__all__ = ["ExportResult", "conv_rows", "derive_decomposed", "export_mlir", "export_module"]


class _Entry(nn.Module):
    """Positional entry point in signature order (torch.export keeps argument order)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, args)))


@dataclass(frozen=True)
class ExportResult:
    mlir: Path
    signature: Path
    reused: bool
    seconds: float


def conv_rows(sig: Signature, sliced: bool) -> bool:
    """Whether the module writes its convolutions one batch row at a time (`RowwiseConv2d`): the CPU's form
    (`sliced` attention) of a bf16 module with two or more rows, whose convolutions iree-compile 3.13 turns
    into im2col matmuls only one row at a time (`punet.compile.targets.compile_flags`)."""
    return sliced and sig.dtype == "bfloat16" and sig.rows > 1 and sig.devices == 1 and not sig.quant


def _meta_unet(
    config: UNetConfig,
    sig: Signature,
    decompose_attention: bool,
    quantization: dict[str, Any] | None = None,
    attention_slices: bool = True,
) -> nn.Module:
    """The UNet (float, or quantized as `quantization` says) on the meta device, weights external under SCOPE."""
    from iree.turbine import aot

    from ..weights import build_model

    with torch.device("meta"):
        unet = build_model(config).to(dtype_from_name(sig.dtype))
        if quantization:  # after the dtype cast: int8 weights and float32 scales keep their dtypes
            from ..quant import quantize_from_metadata

            quantize_from_metadata(unet, config, quantization)
    unet.eval().set_decomposed_attention(decompose_attention, attention_slices)
    unet.set_conv_rows(conv_rows(sig, decompose_attention and attention_slices))
    aot.externalize_module_parameters(unet, external_scope=SCOPE)
    return unet


def build_export_model(
    config: UNetConfig,
    sig: Signature,
    decompose_attention: bool,
    scheduler: dict[str, Any] | None = None,
    quantization: dict[str, Any] | None = None,
    attention_slices: bool = True,
) -> nn.Module:
    """The module to export: the UNet, its CFG step, the serving CFG step or the scheduled UNet.

    `attention_slices`: decomposed attention by slices of (batch row, head) pairs (the CPU's form), or all
    pairs in one batched matmul (False: the GPUs' form)."""
    from ..model import GuidedUNet

    if sig.devices > 1:  # tensor- or data-parallel over several devices (punet/sharded)
        from ..sharded.export import multi_device_model

        model = multi_device_model(config, sig, decompose_attention, attention_slices)
        return _Entry(model, [s.name for s in sig.inputs(config)])
    unet = _meta_unet(config, sig, decompose_attention, quantization, attention_slices)
    if sig.scheduled:
        from ..scheduled import ScheduledUNet, SchedulerConfig
        from ..signature import default_time_ids

        cfg = SchedulerConfig.from_dict(scheduler) if scheduler else SchedulerConfig.sdxl()
        time_ids = default_time_ids(sig, 2 * sig.batch, sig.entries(config)[0].outputs[1].shape[1])
        # The step tables are real float32 constants; only the UNet's weights live on the meta device.
        return ScheduledUNet(unet, cfg, time_ids)
    if sig.serving:
        from ..scheduled import ServingUNet

        return _Entry(ServingUNet(unet), [s.name for s in sig.inputs(config)])
    model = GuidedUNet(unet) if sig.cfg else unet
    return _Entry(model, [s.name for s in sig.inputs(config)])


def export_module(
    config: UNetConfig,
    sig: Signature,
    decompose_attention: bool = False,
    scheduler: dict[str, Any] | None = None,
    quantization: dict[str, Any] | None = None,
    attention_slices: bool = True,
):
    """iree-turbine ExportOutput of every entry of `sig`, in a module named `sig.module_name`."""
    from iree.turbine import aot

    model = build_export_model(config, sig, decompose_attention, scheduler, quantization, attention_slices)

    def meta_args(entry) -> tuple[torch.Tensor, ...]:
        return tuple(torch.empty(s.shape, dtype=s.torch_dtype, device="meta") for s in entry.inputs)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        # Non-strict export is deliberate: it traces the keyword-only forward as plain Python.
        warnings.filterwarnings("ignore", message="When strict_export == False")
        if not sig.scheduled:
            (entry,) = sig.entries(config)
            # Several devices: every input arrives on device 0 (the module moves what each device needs).
            arg_device = {i: aot.DeviceAffinity(0) for i in range(len(entry.inputs))} if sig.devices > 1 else None
            return aot.export(
                model, args=meta_args(entry), function_name=entry.name, module_name=sig.module_name, strict_export=False,
                arg_device=arg_device,
            )
        init, fwd = sig.entries(config)
        fxb = aot.FxProgramsBuilder(model)

        @fxb.export_program(name=init.name, args=meta_args(init), strict=False)
        def _initialize(module, *args):
            return module.initialize(*args)

        @fxb.export_program(name=fwd.name, args=meta_args(fwd), strict=False)
        def _forward(module, *args):
            return module.forward(*args)

        return aot.export(fxb, module_name=sig.module_name)


def export_mlir(
    irpa: str | Path,
    output: str | Path | None = None,
    *,
    sig: Signature,
    decompose_attention: bool = False,
    scheduler: str | Path | None = None,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> ExportResult:
    """Export the UNet described by `irpa` at the static shapes of `sig`.

    A scheduled signature builds its step tables from `scheduler` (a
    diffusers scheduler_config.json; default SDXL base's, shipped with punet).

    Only the archive's config and dtype matter: the weights stay external, so
    the build key (and the cache) ignores them, and an archive of the same
    architecture with other weights (a fine-tune) reuses the same MLIR.
    """
    from ..weights import read_metadata

    irpa = Path(irpa)
    meta = read_metadata(irpa)
    if sig.dtype != meta["dtype"]:
        raise PunetError(
            f"{irpa}: weights are {meta['dtype']}, export asked for {sig.dtype}; "
            f"re-import with `punet import ... --dtype {sig.dtype}` (one archive per dtype)"
        )
    quantization = meta.get("quantization")
    scheme = quantization["scheme"] if quantization else ""
    fp8 = quantization.get("fp8_dtype", "") if quantization else ""
    if (sig.quant, sig.fp8) != (scheme, fp8):
        raise PunetError(
            f"{irpa}: weights are {scheme or 'float (not quantized)'}{' ' + fp8 if fp8 else ''}, "
            f"export asked for {sig.quant or 'float'}{' ' + sig.fp8 if sig.fp8 else ''}"
        )
    if quantization and sig.devices > 1:
        raise PunetError(f"{irpa}: a quantized archive exports on one device (tensor and data parallel take float archives)")
    config = UNetConfig.from_dict(meta["config"])
    if "sharding" in meta or sig.tp > 1:  # a `punet shard` archive exports over its rank count
        from ..sharded.archive import check_export_signature

        sig = check_export_signature(irpa, meta, config, sig)
    check_fits(config, sig)
    sched = None
    if sig.scheduled:
        from ..scheduled import SchedulerConfig

        sched = (SchedulerConfig.from_json(scheduler) if scheduler else SchedulerConfig.sdxl()).to_dict()
        sig.entries(config)  # refuses a config the scheduled module cannot take, before any work
    elif scheduler:
        raise PunetError(f"--scheduler-config {scheduler}: only a scheduled export (--scheduled) uses a scheduler")
    output = Path(output) if output else irpa.parent / mlir_name(sig, decompose_attention)
    check_output(output)
    provenance = {"path": str(irpa), "weights_sha256": meta["weights_sha256"], "source": meta["source"]}
    return _export(
        meta["config"], sig, decompose_attention, output, provenance, scheduler=sched, quantization=quantization,
        force=force, progress=progress,
    )


def derive_decomposed(mlir: str | Path, signature: dict[str, Any], sliced: bool = True, progress=None) -> ExportResult:
    """The decomposed-attention twin of an exported module, re-exported from its signature file.

    Needs no weights: the signature holds the config, the shapes and the
    archive's provenance. Written beside `mlir` as `<stem>_decomposed.mlir`
    (attention by slices of (row, head) pairs: the CPU's form) or
    `<stem>_decomposed_unsliced.mlir` (`sliced=False`: the GPUs' form), and
    reused while up to date.
    """
    mlir = Path(mlir)
    sig = Signature(**signature["signature"])
    output = mlir.with_name(f"{mlir.stem}_decomposed{'' if sliced else '_unsliced'}.mlir")
    return _export(
        signature["config"], sig, True, output, signature["irpa"], scheduler=signature.get("scheduler"),
        quantization=signature.get("quantization"), attention_slices=sliced, force=False, progress=progress,
    )


def _export(
    config_dict: dict[str, Any],
    sig: Signature,
    decompose_attention: bool,
    output: Path,
    provenance: dict[str, Any],
    *,
    scheduler: dict[str, Any] | None = None,
    quantization: dict[str, Any] | None = None,
    attention_slices: bool = True,
    force: bool,
    progress: Callable[[str], None] | None,
) -> ExportResult:
    config = UNetConfig.from_dict(config_dict)
    sig_path = signature_path(output)
    sliced = decompose_attention and attention_slices
    key = build_key(
        config=config.to_dict(), sig=sig.to_dict(), decomposed=decompose_attention, sliced=sliced, scheduler=scheduler,
        quantization=_structure(quantization), punet=__version__, source=source_digest(), torch=torch.__version__,
        turbine=_turbine_version(),
    )
    if not force and up_to_date(output, sig_path, key):
        return ExportResult(output, sig_path, True, 0.0)

    t0 = time.perf_counter()
    entries = sig.entries(config)
    main = entries[-1]  # the step a benchmark times: run_forward in a scheduled module
    if progress:
        names = ", ".join(f"{sig.module_name}.{e.name}" for e in entries)
        progress(
            f"exporting {names} (batch {sig.batch}, {sig.height}x{sig.width}, {sig.dtype}, {sig.tokens} tokens"
            f"{(', attention decomposed' + ('' if sliced else ', unsliced')) if decompose_attention else ''}) with iree-turbine"
        )
    exported = export_module(config, sig, decompose_attention, scheduler, quantization, attention_slices)
    with atomic_path(output) as tmp:
        exported.save_mlir(str(tmp))
    write_json_atomic(
        sig_path,
        {
            "format": "punet-signature-1",
            "punet_version": __version__,
            "module_name": sig.module_name,
            "entry": main.name,
            "signature": sig.to_dict(),
            "inputs": _specs(main.inputs),
            "outputs": _specs(main.outputs),
            "entries": [{"name": e.name, "inputs": _specs(e.inputs), "outputs": _specs(e.outputs)} for e in entries],
            "parameter_scope": SCOPE,
            "decompose_attention": decompose_attention,
            "attention_slices": sliced,
            "conv_rows": conv_rows(sig, sliced),
            "irpa": provenance,
            "config": config_dict,
            "scheduler": scheduler,
            "quantization": quantization,
            "build_key": key,
        },
    )
    return ExportResult(output, sig_path, False, time.perf_counter() - t0)


def _structure(quantization: dict[str, Any] | None) -> dict[str, Any] | None:
    """What of a quantization's metadata shapes the module: its scheme and asymmetric layers, not its calibration."""
    if not quantization:
        return None
    return {
        "scheme": quantization["scheme"],
        "asymmetric": sorted(quantization.get("asymmetric", ())),
        "fp8_dtype": quantization.get("fp8_dtype", ""),
    }


def _specs(specs) -> list[dict[str, Any]]:
    return [{"name": s.name, "shape": list(s.shape), "dtype": s.dtype} for s in specs]


def _turbine_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iree-turbine")
    except PackageNotFoundError:
        return "unknown"
