"""One function names every artifact; sidecars record how each was built."""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from .signature import DTYPE_SHORT, Signature


def irpa_name(dtype: str) -> str:
    return f"unet_{DTYPE_SHORT[dtype]}.irpa"


def stem(sig: Signature, decomposed: bool = False) -> str:
    """e.g. unet_b1_1024x1024_f16, unet_b2_1024x1024_f16_cfg_decomposed, unet_b1_1024x1024_f16_t64_scheduled, unet_b1_512x512_f32_int8."""
    s = f"unet_b{sig.batch}_{sig.height}x{sig.width}_{DTYPE_SHORT[sig.dtype]}"
    if sig.quant:
        s += f"_{sig.quant}" + ("-fnuz" if sig.fp8.endswith("fnuz") else "")
    if sig.tokens != 77:
        s += f"_t{sig.tokens}"
    s += "_scheduled" if sig.scheduled else "_serving" if sig.serving else "_cfg" if sig.cfg else ""
    if sig.tp > 1:
        s += f"_tp{sig.tp}"
    if sig.dp > 1:
        s += f"_dp{sig.dp}"
    if decomposed:
        s += "_decomposed"
    return s


def mlir_name(sig: Signature, decomposed: bool = False) -> str:
    return f"{stem(sig, decomposed)}.mlir"


def vmfb_name(mlir: str | Path, target: str, tuned: bool = True, packed: bool = False) -> str:
    """e.g. unet_b1_1024x1024_f16.gfx942.vmfb (plain flags: .gfx942-plain.vmfb; packed weights: .cpu-packed.vmfb)."""
    return f"{Path(mlir).stem}.{target}{'' if tuned else '-plain'}{'-packed' if packed else ''}.vmfb"


def encoder_path(vmfb: str | Path) -> Path:
    """The parameter encoder beside a module compiled with --pack-weights: X.cpu-packed.encoder.vmfb."""
    vmfb = Path(vmfb)
    return vmfb.with_name(vmfb.stem + ".encoder.vmfb")


def signature_path(mlir: str | Path) -> Path:
    """The JSON beside an .mlir: entry, inputs, outputs, scope, config, irpa digest."""
    return Path(mlir).with_suffix(".signature.json")


def build_info_path(vmfb: str | Path) -> Path:
    """The JSON beside a .vmfb: compile command, compiler version, signature."""
    return Path(str(vmfb) + ".json")


def compile_script_path(vmfb: str | Path) -> Path:
    return Path(str(vmfb) + ".compile.sh")


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@functools.cache
def source_digest() -> str:
    """A digest of punet's own Python source. An export is traced from the model's code, which changes
    between commits of one punet version: a key without it reused exports of the old code."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def build_key(**parts: Any) -> str:
    """A digest of everything a stage's output depends on."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def up_to_date(artifact: Path, sidecar: Path, key: str) -> bool:
    """True when `artifact` exists and its sidecar records the same build key."""
    if not artifact.is_file() or not sidecar.is_file():
        return False
    try:
        return json.loads(sidecar.read_text()).get("build_key") == key
    except (OSError, ValueError):
        return False


def sharded_irpa_name(irpa: str | Path, tp: int) -> str:
    """`punet shard`'s default output: unet.irpa -> unet.tp2.irpa (its rank files: `rank_irpa_path`)."""
    return f"{Path(irpa).stem}.tp{tp}.irpa"


def rank_irpa_path(sharded: str | Path, rank: int) -> Path:
    """Rank `rank`'s slices beside a sharded archive: unet.tp2.irpa -> unet.tp2.rank0.irpa."""
    sharded = Path(sharded)
    return sharded.with_name(f"{sharded.stem}.rank{rank}{sharded.suffix}")
