"""Sharded parameter archives: `punet shard unet.irpa --tp N -o unet.tpN.irpa`, and reading them back.

`unet.tpN.irpa` holds the replicated tensors under their diffusers keys, and the punet metadata with
the plan; `unet.tpN.rank<r>.irpa` beside it holds rank r's slice of every split tensor under
`<key>.rank<r>`. Every file uses the one parameter scope ("model"), so IREE can be handed all of them
(`--parameters=model=unet.tp2.irpa --parameters=model=unet.tp2.rank0.irpa ...`). Each rank file carries
its own metadata entry (`__punet__.rank<r>`: rank, rank count, the weights' digest) so that a missing,
foreign or stale rank file is refused in one line naming it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..artifacts import rank_irpa_path
from ..config import UNetConfig
from ..errors import PunetError
from ..fileio import atomic_path, check_output
from .plan import Plan, make_plan, split_tensor

RANK_FORMAT = "punet-irpa-rank-1"


def rank_key(key: str, rank: int) -> str:
    """The parameter name of rank `rank`'s slice of `key`."""
    return f"{key}.rank{rank}"


def rank_metadata_key(rank: int) -> str:
    from ..weights import METADATA_KEY

    return f"{METADATA_KEY}.rank{rank}"


class _ArchiveWriter:
    """Tensors streamed one at a time into a staging file beside `tmp`, then one .irpa written at `tmp`."""

    def __init__(self, tmp: Path):
        import iree.runtime as rt

        self.tmp, self.staging = tmp, tmp.with_name(tmp.name + ".staging")
        self.index = rt.ParameterIndex()
        self.digest = hashlib.sha256()
        self.stage = open(self.staging, "wb")
        self.fd = os.open(self.staging, os.O_RDONLY)
        self.handle = rt.FileHandle.wrap_fd(self.fd, readable=True, writable=False)

    def add(self, key: str, t: torch.Tensor) -> None:
        from ..signature import dtype_name
        from ..weights import _tensor_metadata

        data = t.contiguous().view(torch.uint8).numpy().tobytes()
        self.digest.update(data)
        offset = self.stage.tell()
        self.stage.write(data)
        self.stage.flush()
        self.index.add_from_file_handle(
            key, self.handle, len(data), offset=offset, metadata=_tensor_metadata(dtype_name(t.dtype), tuple(t.shape))
        )

    def write(self, metadata_key: str, meta: dict[str, Any]) -> None:
        import numpy as np

        blob = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy()
        self.index.add_buffer(metadata_key, blob, metadata="punet-metadata")
        self.index.create_archive_file(str(self.tmp))

    def close(self) -> None:
        self.stage.close()
        del self.index, self.handle
        os.close(self.fd)
        self.staging.unlink(missing_ok=True)


def shard_archive(
    irpa: str | Path,
    tp: int,
    output: str | Path,
    *,
    progress: Callable[[str], None] | None = None,
    on_tensor: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Split `irpa` over `tp` ranks: `output` (replicated tensors, config, plan) and its rank files beside it."""
    from ..weights import METADATA_KEY, read_metadata, tensor_entries

    irpa, output = Path(irpa), Path(output)
    meta = read_metadata(irpa)
    if "sharding" in meta:
        raise PunetError(f"{irpa}: already sharded (--tp {meta['sharding']['tp']}); shard the unsharded archive")
    if output.suffix != ".irpa":
        raise PunetError(f"-o {output}: expected a .irpa file name")
    ranks = [rank_irpa_path(output, r) for r in range(tp)]
    if irpa.resolve() in {p.resolve() for p in (output, *ranks)}:
        raise PunetError(f"-o {output}: would overwrite the input {irpa}")
    for p in (output, *ranks):
        check_output(p)
    config = UNetConfig.from_dict(meta["config"])
    plan = make_plan(config, tp)
    entries = tensor_entries(irpa)
    missing = sorted(set(plan.splits) - set(entries))
    if missing:
        raise PunetError(f"{irpa}: missing tensor {missing[0]!r} (required by its config)")
    unknown = sorted(set(entries) - set(plan.splits))
    if unknown:  # e.g. a quantized archive's scales: the plan has no rule for them yet
        raise PunetError(f"{irpa}: tensor {unknown[0]!r} is not in the float model's plan; only float archives shard")
    keys = sorted(entries)
    n_sharded = sum(plan.is_sharded(k) for k in keys)
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    # One pass over the input, one tensor in memory at a time (read, not mapped: the RSS stays small);
    # every file under a temporary name until all are written, the rank files renamed first.
    with contextlib.ExitStack() as stack:
        main = _ArchiveWriter(stack.enter_context(atomic_path(output)))
        stack.callback(main.close)
        writers = []
        for path in ranks:
            writers.append(_ArchiveWriter(stack.enter_context(atomic_path(path))))
            stack.callback(writers[-1].close)
        fd = os.open(irpa, os.O_RDONLY)
        stack.callback(os.close, fd)
        if progress:
            progress(f"splitting {irpa.name}: {n_sharded} tensors over {tp} ranks, {len(keys) - n_sharded} replicated")
        for i, key in enumerate(keys):
            dtype, shape, entry = entries[key]
            _, offset = entry.file_storage
            t = torch.frombuffer(bytearray(os.pread(fd, entry.length, offset)), dtype=dtype).view(shape)
            if plan.is_sharded(key):
                for r, writer in enumerate(writers):
                    writer.add(rank_key(key, r), split_tensor(t, plan.splits[key], tp, r))
            else:
                main.add(key, t)
            if on_tensor:
                on_tensor(i + 1, len(keys))
        rank_info = []
        for r, (path, writer) in enumerate(zip(ranks, writers)):
            if progress:
                progress(f"writing {path.name}")
            rank_meta = {"format": RANK_FORMAT, "punet_version": __version__, "created": created, "rank": r,
                         "tp": tp, "weights_sha256": meta["weights_sha256"], "slices_sha256": writer.digest.hexdigest()}
            writer.write(rank_metadata_key(r), rank_meta)
            rank_info.append({"file": path.name, "slices_sha256": rank_meta["slices_sha256"]})
        if progress:
            progress(f"writing {output.name}: the replicated tensors, the config and the plan")
        sharded_meta = {**meta, "created": created, "source": str(irpa),
                        "sharding": {"tp": tp, "plan": plan.to_dict(), "ranks": rank_info}}
        main.write(METADATA_KEY, sharded_meta)
    return sharded_meta


def plan_of(meta: dict[str, Any]) -> Plan:
    return Plan.from_dict(meta["sharding"]["plan"])


def rank_files(irpa: str | Path, meta: dict[str, Any]) -> list[Path]:
    """The rank files of sharded archive `irpa`, each checked: present, the right rank, the same weights."""
    from ..weights import _entries, _open_index

    irpa = Path(irpa)
    tp = meta["sharding"]["tp"]
    paths = []
    for r, info in enumerate(meta["sharding"]["ranks"]):
        path = irpa.parent / info["file"]  # as written beside it (the main file may have been renamed since)
        if not path.is_file():
            raise PunetError(f"{path}: rank file {r} of {tp} of {irpa.name} is missing (expected beside it)")
        entries = _entries(_open_index(path))
        try:
            rmeta = json.loads(bytes(entries[rank_metadata_key(r)].file_view))
        except KeyError:
            raise PunetError(f"{path}: not rank {r} of a punet sharded archive (no {rank_metadata_key(r)!r} entry)") from None
        if rmeta.get("format") != RANK_FORMAT or rmeta.get("tp") != tp:
            raise PunetError(f"{path}: rank file of a --tp {rmeta.get('tp')} archive, {irpa.name} is --tp {tp}")
        if rmeta.get("slices_sha256") != info["slices_sha256"] or rmeta.get("weights_sha256") != meta["weights_sha256"]:
            raise PunetError(f"{path}: holds other weights than {irpa.name} (written by another `punet shard` run)")
        paths.append(path)
    return paths


def rank_states(irpa: str | Path, meta: dict[str, Any], replicated: dict[str, torch.Tensor]) -> list[dict]:
    """Each rank's state dict under the float model's keys: the replicated tensors and the rank's slices."""
    from ..weights import read_tensors

    plan = plan_of(meta)
    out = []
    for r, path in enumerate(rank_files(irpa, meta)):
        slices = {}
        for key, t in read_tensors(path).items():
            base = key.removesuffix(f".rank{r}")
            if base == key or base not in plan.splits or not plan.is_sharded(base):
                raise PunetError(f"{path}: unexpected tensor {key!r} (not a rank {r} slice of the plan)")
            slices[base] = t
        out.append({**replicated, **slices})
    return out


def unsharded_state(irpa: str | Path, meta: dict[str, Any], replicated: dict[str, torch.Tensor]) -> dict:
    """The whole state dict of a sharded archive: every split tensor put back together (a copy)."""
    plan = plan_of(meta)
    ranks = rank_states(irpa, meta, replicated)
    state = dict(replicated)
    for key, split in plan.splits.items():
        if split.dim is None:
            continue
        parts = [r[key] for r in ranks]
        halves = [torch.cat([p.chunk(split.halves, dim=split.dim)[h] for p in parts], dim=split.dim)
                  for h in range(split.halves)]
        state[key] = torch.cat(halves, dim=split.dim)
    return state


def load_sharded_model(irpa: str | Path, dtype: str | None = None, device: str = "cpu"):
    """The eager `ShardedUNet` of a sharded archive: its ranks simulated side by side on `device`."""
    from ..signature import dtype_from_name
    from ..weights import read_metadata, read_tensors
    from .model import EagerComm, ShardedUNet

    meta = read_metadata(irpa)
    config = UNetConfig.from_dict(meta["config"])
    plan = plan_of(meta)
    with torch.device("meta"):
        model = ShardedUNet(config, plan, EagerComm(plan.tp))
    for local, state in zip(model.ranks, rank_states(irpa, meta, read_tensors(irpa))):
        if dtype is not None:
            state = {k: v.to(dtype_from_name(dtype)) for k, v in state.items()}
        local.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval(), config


def check_export_signature(irpa: str | Path, meta: dict[str, Any], config: UNetConfig, sig):
    """`sig` over the archive's rank count (a plain archive cannot take --tp); its plan must be this punet's."""
    import dataclasses

    if "sharding" not in meta:
        raise PunetError(f"{irpa}: not a sharded archive; split it first: punet shard {irpa} --tp {sig.tp}")
    tp = meta["sharding"]["tp"]
    if sig.tp not in (1, tp):
        raise PunetError(f"{irpa}: sharded for --tp {tp}, not {sig.tp}")
    if sig.dp > 1:
        raise PunetError(f"{irpa}: --dp {sig.dp} replicates the weights: export the unsharded archive")
    if plan_of(meta).to_dict() != make_plan(config, tp).to_dict():
        raise PunetError(f"{irpa}: its plan differs from this punet's; shard the unsharded archive again")
    return dataclasses.replace(sig, tp=tp)
