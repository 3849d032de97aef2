"""Checkpoints in, parameter archives out: safetensors / Hugging Face hub <-> .irpa.

`import_checkpoint` validates every tensor of a diffusers UNet checkpoint
against its config.json, then writes an IREE parameter archive (.irpa)
holding each tensor under its diffusers key, plus one metadata entry with
the config and provenance, so later stages need only the .irpa.

Memory: tensors are streamed. A tensor already in the target dtype is not
read into memory at all: the archive entry points into the safetensors file
and IREE copies it across. A tensor that needs a dtype change is converted
one at a time into a staging file beside the output.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import ConfigError, UNetConfig
from .errors import PunetError
from .fileio import atomic_path, check_output
from .signature import DTYPES, dtype_from_name

METADATA_KEY = "__punet__"
METADATA_FORMAT = "punet-irpa-1"
# iree-turbine's ParameterArchive reads tensors back from this metadata form.
TENSOR_METADATA_PREFIX = "PYTORCH:"

WEIGHTS_NAME = "diffusion_pytorch_model"
_ST_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
_ST_NONFLOAT = {"I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL", "F8_E4M3", "F8_E5M2"}
_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}
# Tensor dtypes an archive may hold: the model dtypes, and a quantized model's int8 weights and zero points.
ARCHIVE_DTYPES: dict[str, torch.dtype] = {**DTYPES, "float64": torch.float64, "int8": torch.int8}


# ---- safetensors reading ------------------------------------------------------


@dataclass(frozen=True)
class TensorRecord:
    """Where one tensor lies inside a safetensors file."""

    key: str
    file: Path
    dtype: str  # float16 | bfloat16 | float32 | float64
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in `file`
    nbytes: int


def read_safetensors_index(path: Path) -> list[TensorRecord]:
    """Parse a safetensors header (no tensor data is read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise PunetError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, 100 << 20):
                raise PunetError(f"{path}: not a safetensors file (header length {n} exceeds the file size {size})")
            raw = f.read(n)
    except FileNotFoundError:
        raise PunetError(f"{path}: file not found") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError):
        raise PunetError(f"{path}: not a safetensors file (header is not a JSON object)") from None
    base = 8 + n
    records = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            st_dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise PunetError(f"{path}: malformed safetensors header entry for {key!r}") from None
        if st_dtype in _ST_NONFLOAT:
            raise PunetError(f"{path}: tensor {key!r} has non-float dtype {st_dtype} (expected F16, BF16 or F32)")
        if st_dtype not in _ST_DTYPES:
            raise PunetError(f"{path}: tensor {key!r} has unsupported dtype {st_dtype} (expected F16, BF16 or F32)")
        dtype = _ST_DTYPES[st_dtype]
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * _ITEMSIZE[dtype]:
            raise PunetError(f"{path}: tensor {key!r} byte range does not match its shape {list(shape)} {dtype}")
        if base + end > size:
            raise PunetError(
                f"{path}: truncated: tensor {key!r} ends at byte {base + end} but the file has {size} bytes"
            )
        records.append(TensorRecord(key, path, dtype, shape, base + start, end - start))
    return records


def find_weight_files(unet_dir: Path, variant: str | None = None) -> list[Path]:
    """The safetensors file(s) of a diffusers model folder, sharded or not."""
    suffix = f".{variant}" if variant else ""
    single = unet_dir / f"{WEIGHTS_NAME}{suffix}.safetensors"
    index = unet_dir / f"{WEIGHTS_NAME}{suffix}.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise PunetError(f"{index}: malformed shard index (expected a JSON object with 'weight_map')") from None
        paths = [unet_dir / f for f in files]
        for p in paths:
            if not p.is_file():
                raise PunetError(f"{index}: shard {p.name} is missing from {unet_dir}")
        return paths
    found = sorted(p.name for p in unet_dir.glob("*.safetensors"))
    hint = f" (found: {', '.join(found)}; pass --variant?)" if found else ""
    raise PunetError(f"{unet_dir}: no {single.name} or {index.name}{hint}")


# ---- sources --------------------------------------------------------------


@dataclass(frozen=True)
class Source:
    """A resolved import source: a local folder with config.json + safetensors."""

    unet_dir: Path
    spec: str  # what the user asked for
    revision: str | None = None  # resolved commit hash for hub sources


def resolve_source(
    spec: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> Source:
    """Local model folder, pipeline folder (with unet/), `builtin:NAME`, or a Hugging Face repo id."""
    from . import builtin

    if spec.startswith(builtin.PREFIX):
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "punet" / "builtin"
        return Source(builtin.materialize(spec, cache), spec)
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PunetError(f"{path}: expected a folder with config.json and safetensors, got a file")
        for d in (path, path / "unet"):
            if (d / "config.json").is_file():
                return Source(d.resolve(), spec)
        raise PunetError(f"{path}: no config.json here or in {path / 'unet'} (expected a diffusers UNet folder)")
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise PunetError(f"{spec}: no such folder, and not a Hugging Face repo id (expected 'org/name')")
    return _download(spec, revision=revision, variant=variant, progress=progress)


def _download(repo_id: str, *, revision: str | None, variant: str | None, progress) -> Source:
    """Fetch only the UNet's files of a hub repo (honours the HF cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    v = f".{variant}" if variant else ""
    patterns = []
    for sub in ("unet/", ""):
        patterns += [
            f"{sub}config.json",
            f"{sub}{WEIGHTS_NAME}{v}.safetensors",
            f"{sub}{WEIGHTS_NAME}{v}.safetensors.index.json",
            f"{sub}{WEIGHTS_NAME}{v}-*.safetensors",
        ]
    if progress:
        progress(f"downloading the UNet of {repo_id} (revision {revision or 'main'}) from the Hugging Face hub")
    try:
        snap = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PunetError(f"{repo_id}: download failed: {first}") from None
    # The snapshot folder is named by the resolved commit hash.
    commit = snap.name
    for d in (snap / "unet", snap):
        if (d / "config.json").is_file():
            return Source(d, repo_id, commit)
    raise PunetError(f"{repo_id}@{commit}: no unet/config.json or config.json in the repo")


# ---- validation --------------------------------------------------------------


def expected_shapes(config: UNetConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key and shape the config implies (model built on meta)."""
    from .model import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def validate_records(records: list[TensorRecord], config: UNetConfig, where: str) -> None:
    expected = expected_shapes(config)
    seen: dict[str, TensorRecord] = {}
    for r in records:
        if r.key in seen:
            raise PunetError(f"{where}: tensor {r.key!r} appears twice ({seen[r.key].file.name} and {r.file.name})")
        seen[r.key] = r
    missing = [k for k in expected if k not in seen]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise PunetError(f"{where}: missing tensor {missing[0]!r}{more} (required by config.json)")
    unexpected = [k for k in seen if k not in expected]
    if unexpected:
        more = f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else ""
        raise PunetError(f"{where}: unexpected tensor {unexpected[0]!r}{more} (not in the model config.json describes)")
    for k, shape in expected.items():
        if seen[k].shape != shape:
            raise PunetError(
                f"{seen[k].file}: tensor {k!r} has shape {list(seen[k].shape)}, config.json implies {list(shape)}"
            )


# ---- import ------------------------------------------------------------------


def _tensor_metadata(dtype: str, shape: tuple[int, ...]) -> str:
    return TENSOR_METADATA_PREFIX + json.dumps({"type": "Tensor", "dtype": dtype, "shape": list(shape)})


def _checkpoint_dtype(records: list[TensorRecord], where: str) -> str:
    dtypes = sorted({r.dtype for r in records})
    if len(dtypes) != 1 or dtypes[0] not in DTYPES:
        raise PunetError(f"{where}: tensors have dtypes {dtypes}; choose one with --dtype")
    return dtypes[0]


def import_checkpoint(
    source: str,
    output: str | Path,
    *,
    dtype: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    progress: Callable[[str], None] | None = None,
    on_tensor: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Import a diffusers UNet checkpoint into `output` (.irpa); return its metadata."""
    import iree.runtime as rt

    src = resolve_source(source, revision=revision, variant=variant, progress=progress)
    from .quant.brevitas import is_brevitas_folder

    if is_brevitas_folder(src.unet_dir):
        return import_brevitas(src, output, dtype=dtype, variant=variant, progress=progress)
    config = UNetConfig.from_json(src.unet_dir / "config.json")
    files = find_weight_files(src.unet_dir, variant)
    records = [r for f in files for r in read_safetensors_index(f)]
    validate_records(records, config, str(src.unet_dir))
    target = dtype or _checkpoint_dtype(records, str(src.unet_dir))
    target_torch = dtype_from_name(target)

    output = Path(output)
    digest = hashlib.sha256()
    index = rt.ParameterIndex()
    handles: dict[Path, Any] = {}
    fds: list[int] = []
    with atomic_path(output) as tmp:
        staging = tmp.with_name(tmp.name + ".staging")
        try:
            with open(staging, "wb") as stage:
                for i, r in enumerate(sorted(records, key=lambda r: r.key)):
                    with open(r.file, "rb") as f:
                        f.seek(r.offset)
                        data = f.read(r.nbytes)
                    if r.dtype == target:
                        digest.update(data)
                        if r.file not in handles:
                            fd = os.open(r.file, os.O_RDONLY)
                            fds.append(fd)
                            handles[r.file] = rt.FileHandle.wrap_fd(fd, readable=True, writable=False)
                        index.add_from_file_handle(
                            r.key, handles[r.file], r.nbytes, r.offset, _tensor_metadata(target, r.shape)
                        )
                    else:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore")  # read-only buffer
                            t = torch.frombuffer(bytearray(data), dtype=DTYPES.get(r.dtype, torch.float64))
                        out = t.to(target_torch).view(torch.uint8).numpy().tobytes()
                        digest.update(out)
                        offset = stage.tell()
                        stage.write(out)
                        stage.flush()
                        if staging not in handles:
                            fd = os.open(staging, os.O_RDONLY)
                            fds.append(fd)
                            handles[staging] = rt.FileHandle.wrap_fd(fd, readable=True, writable=False)
                        index.add_from_file_handle(
                            r.key, handles[staging], len(out), offset, _tensor_metadata(target, r.shape)
                        )
                    del data
                    if on_tensor:
                        on_tensor(i + 1, len(records))
            meta = _stamped({
                "source": src.spec,
                "source_dir": str(src.unet_dir),
                "revision": src.revision,
                "variant": variant,
                "dtype": target,
                "num_tensors": len(records),
                "num_parameters": sum(_numel(r.shape) for r in records),
                "weights_sha256": digest.hexdigest(),
                "config": config.to_dict(),
                # As found on disk: diffusers rebuilds its reference model from this.
                "config_json": json.loads((src.unet_dir / "config.json").read_text()),
            })
            _add_metadata(index, meta)
            if progress:
                progress(f"writing {output}")
            index.create_archive_file(str(tmp))
        finally:
            del index, handles
            for fd in fds:
                os.close(fd)
            staging.unlink(missing_ok=True)
    return meta


def import_brevitas(
    src: Source, output: str | Path, *, dtype: str | None, variant: str | None, progress=None
) -> dict[str, Any]:
    """A Brevitas folder (quant_params.json beside params.safetensors) -> a quantized .irpa."""
    from .quant import cast_state
    from .quant.brevitas import QUANT_PARAMS, read_folder

    check_output(output)
    if progress:
        progress(f"reading {src.unet_dir} (Brevitas format: {QUANT_PARAMS})")
    config, config_json, state, quantization = read_folder(src.unet_dir)
    floats = sorted({str(v.dtype).removeprefix("torch.") for k, v in state.items() if v.is_floating_point() and k.endswith((".weight", ".bias"))})
    target = dtype or floats[0]
    state = cast_state(state, dtype_from_name(target))
    meta = {
        "source": src.spec,
        "source_dir": str(src.unet_dir),
        "revision": src.revision,
        "variant": variant,
        "dtype": target,
        "config": config.to_dict(),
        "config_json": config_json,
        "quantization": quantization,
    }
    return write_irpa(output, state, meta, progress)


def _stamped(meta: dict[str, Any]) -> dict[str, Any]:
    """`meta` with the format, punet's version and the creation time every archive's metadata starts with (these
    three always new, whatever `meta` holds)."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    stamp = {"format": METADATA_FORMAT, "punet_version": __version__, "created": now}
    return {**stamp, **{k: v for k, v in meta.items() if k not in stamp}}


def _add_metadata(index, meta: dict[str, Any]) -> None:
    """The punet metadata entry of an archive being written."""
    import numpy as np

    blob = json.dumps(meta).encode()
    index.add_buffer(METADATA_KEY, np.frombuffer(blob, dtype=np.uint8).copy(), metadata="punet-metadata")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---- reading archives ---------------------------------------------------------


def _open_index(path: Path):
    import iree.runtime as rt

    if not path.is_file():
        raise PunetError(f"{path}: file not found")
    index = rt.ParameterIndex()
    try:
        index.load(str(path), mmap=True)
    except Exception as e:  # the runtime raises plain ValueError/RuntimeError
        raise PunetError(f"{path}: not an IREE parameter archive ({str(e).splitlines()[0]})") from None
    return index


def _entries(index) -> dict[str, Any]:
    return dict(index.items())


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The punet metadata (config, provenance, digest) of an .irpa."""
    path = Path(path)
    entries = _entries(_open_index(path))
    if METADATA_KEY not in entries:
        raise PunetError(f"{path}: no {METADATA_KEY!r} entry (not written by `punet import`)")
    try:
        meta = json.loads(bytes(entries[METADATA_KEY].file_view))
        if meta.get("format") != METADATA_FORMAT:
            raise ValueError
    except (ValueError, AttributeError):
        raise PunetError(f"{path}: unreadable punet metadata (expected format {METADATA_FORMAT})") from None
    return meta


def load_irpa(path: str | Path) -> tuple[UNetConfig, dict[str, torch.Tensor]]:
    """(config, state_dict) of an .irpa; tensors are views of the memory-mapped file."""
    path = Path(path)
    meta = read_metadata(path)
    try:
        config = UNetConfig.from_dict(meta["config"])
    except ConfigError as e:
        raise PunetError(f"{path}: embedded config: {e}") from None
    state = read_tensors(path)
    if "sharding" in meta:  # a `punet shard` archive: its rank files' slices, put back together
        from .sharded.archive import unsharded_state

        state = unsharded_state(path, meta, state)
    return config, state


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of an archive (not the punet metadata entries): views of the memory-mapped file."""
    state: dict[str, torch.Tensor] = {}
    for key, (dtype, shape, e) in tensor_entries(path).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the mapping is read-only; tensors must not be written
            flat = torch.frombuffer(e.file_view, dtype=torch.uint8)
        state[key] = flat.view(dtype).view(shape)
    return state


def tensor_entries(path: str | Path) -> dict[str, tuple[torch.dtype, list[int], Any]]:
    """Every tensor entry of an archive (not the punet metadata): its dtype, shape and IREE index entry."""
    path = Path(path)
    out = {}
    for key, e in _entries(_open_index(path)).items():
        if key.startswith(METADATA_KEY):
            continue
        md = e.metadata.decode() if isinstance(e.metadata, bytes) else str(e.metadata)
        if not md.startswith(TENSOR_METADATA_PREFIX):
            raise PunetError(f"{path}: entry {key!r} has no tensor metadata")
        info = json.loads(md[len(TENSOR_METADATA_PREFIX) :])
        out[key] = (ARCHIVE_DTYPES[info["dtype"]], info["shape"], e)
    return out


def build_model(config: UNetConfig, quantization: dict[str, Any] | None = None) -> torch.nn.Module:
    """The float UNet, or (with an archive's `quantization` metadata) its quantized twin, on the current device."""
    from .model import UNet2DConditionModel

    model = UNet2DConditionModel(config)
    if quantization:
        from .quant import quantize_from_metadata

        quantize_from_metadata(model, config, quantization)
    return model


def load_model(path: str | Path, dtype: str | None = None, device: str = "cpu"):
    """Build punet's model from an .irpa (weights copied to `device` in `dtype`).

    A quantized archive gives the quantized model: its int8 tensors stay
    int8 and its scales float32 (float64 when `dtype` is float64). A `punet
    shard` archive gives its ranks simulated side by side.
    """
    if "sharding" in read_metadata(path):
        from .sharded.archive import load_sharded_model

        return load_sharded_model(path, dtype, device)
    config, state = load_irpa(path)
    quantization = read_metadata(path).get("quantization")
    with torch.device("meta"):
        model = build_model(config, quantization)
    if dtype is not None:
        from .quant import cast_state

        state = cast_state(state, dtype_from_name(dtype) if dtype != "float64" else torch.float64)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval(), config


def write_irpa(
    output: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any], progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Write `state` (tensors held in memory) and punet metadata to `output`, atomically; return the metadata.

    `meta` is completed with the digest, the tensor and parameter counts and the creation time.
    """
    import iree.runtime as rt

    index = rt.ParameterIndex()
    digest = hashlib.sha256()
    names = {v: k for k, v in ARCHIVE_DTYPES.items()}
    for key in sorted(state):
        t = state[key].detach().contiguous().cpu()
        raw = t.reshape(-1).view(torch.uint8).numpy()
        digest.update(raw.data)
        index.add_buffer(key, raw.copy(), metadata=_tensor_metadata(names[t.dtype], tuple(t.shape)))
    meta = _stamped({
        **meta,
        "num_tensors": len(state),
        "num_parameters": sum(t.numel() for t in state.values()),
        "weights_sha256": digest.hexdigest(),
    })
    _add_metadata(index, meta)
    if progress:
        progress(f"writing {output}")
    with atomic_path(output) as tmp:
        index.create_archive_file(str(tmp))
    return meta
