"""`punet pack`: run a module's parameter encoder once, so the module loads its weights packed, in place.

A module compiled with `punet compile --pack-weights` reads its parameters
already laid out for its matmul microkernels (data tiling) from one archive
entry, instead of repacking every weight into fresh memory at each load.
iree-compile splits the transformations out into an encoder module
(`--iree-parameter-encoder-output-file`); this runs it, as IREE's
`iree-encode-parameters` tool does (not in the 3.13 wheels):

1. the encoder's `indices` function lists the output entries (scope, key, length, alignment);
2. an archive with those entries is written, zero-filled, under a temporary name;
3. its entries are mapped writable and served as the output scope beside the source archive;
4. the `encode` function reads each weight, packs it, and scatters it into its place;
5. the archive is flushed and renamed onto the output.

The packed archive also carries the source's punet metadata (config, dtype,
weights digest) and the digest of the module it was packed for: a packed
archive fits that module only, and the module refuses any other archive.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..artifacts import sha256_file
from ..errors import PunetError
from ..fileio import atomic_path, check_output

__all__ = ["pack_weights", "packed_name", "check_packed", "PackResult"]

# The reflection attribute naming each encoder function's role (IREE's iree-encode-parameters protocol).
_ROLE = "iree.encode.function"
_DATA_ENTRY = 1  # entry type: 0 = splat, 1 = data


@dataclass(frozen=True)
class PackResult:
    path: Path
    seconds: float
    bytes: int
    reused: bool = False


def packed_name(vmfb: str | Path) -> Path:
    """X.cpu-packed.vmfb -> X.cpu-packed.irpa beside it: a packed archive belongs to one module."""
    vmfb = Path(vmfb)
    return vmfb.with_suffix(".irpa")


def check_packed(info: dict[str, Any], meta: dict[str, Any], vmfb: Path, irpa: Path) -> str | None:
    """The parameter scope to serve `irpa` under for `vmfb`, or a one-line refusal.

    A module compiled with --pack-weights takes only an archive `punet pack`
    wrote for it; any other module takes only unpacked archives.
    """
    packed = info.get("packed")
    mine = meta.get("packed")
    if packed and not mine:
        raise PunetError(
            f"{vmfb.name} was compiled with --pack-weights and reads packed weights: pack {irpa.name} for it "
            f"first (punet pack {vmfb} {irpa}), then run it with the packed archive"
        )
    if mine and not packed:
        raise PunetError(
            f"{irpa.name} holds weights packed for {mine['vmfb']}; {vmfb.name} takes the unpacked archive "
            f"({mine['source']})"
        )
    if not packed:
        return None
    if mine["vmfb_sha256"] != sha256_file(vmfb):
        raise PunetError(
            f"{irpa.name} was packed for another build of {mine['vmfb']} (module digest "
            f"{mine['vmfb_sha256'][:12]}); pack again: punet pack {vmfb} {mine['source']}"
        )
    return packed["scope"]


def _up_to_date(output: Path, vmfb_digest: str, weights_digest: str) -> bool:
    from ..weights import read_metadata

    if not output.is_file():
        return False
    try:
        meta = read_metadata(output)
    except PunetError:
        return False
    packed = meta.get("packed") or {}
    return packed.get("vmfb_sha256") == vmfb_digest and meta.get("weights_sha256") == weights_digest


def _text(lst, i: int) -> str:
    import iree.runtime as rt

    return bytes(memoryview(lst.get_as_object(i, rt.VmBuffer))).decode()


def _encoder_entries(module, instance, device, source_provider) -> list[tuple[str, str, int, int]]:
    """(scope, key, length, alignment) of every output entry, from the encoder's `indices` function."""
    import iree.runtime as rt

    ctx = rt.VmContext(
        instance, modules=[rt.create_io_parameters_module(instance, source_provider), rt.create_hal_module(instance, device), module]
    )
    out = rt.VmVariantList(1)
    ctx.invoke(_function(module, "indices"), rt.VmVariantList(0), out)
    scopes = out.get_as_list(0)
    entries = []
    for i in range(scopes.size):
        scope = scopes.get_as_list(i)
        name, items = _text(scope, 0), scope.get_as_list(1)
        for j in range(items.size):
            e = items.get_as_list(j)
            if e.get_variant(0) != _DATA_ENTRY:
                raise PunetError(f"encoder entry {_text(e, 1)!r} is a splat: not supported by punet pack")
            entries.append((name, _text(e, 1), e.get_variant(3), e.get_variant(4)))
    return entries


def _function(module, role: str):
    for name in module.function_names:
        f = module.lookup_function(name)
        if f.reflection.get(_ROLE) == role:
            return f
    raise PunetError(f"the encoder module has no {role!r} function (was it written by --iree-parameter-encoder-output-file?)")


def pack_weights(
    vmfb: str | Path,
    irpa: str | Path,
    output: str | Path | None = None,
    *,
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> PackResult:
    """Write the archive `vmfb` (compiled with --pack-weights) loads: `irpa`'s weights, packed by its encoder.

    An existing output packed from the same weights for this very module is reused unless `force`.
    """
    import numpy as np
    import iree.runtime as rt

    from ..weights import _add_metadata, _stamped, read_metadata
    from . import check_archive_fits, load_build_info

    vmfb, irpa = Path(vmfb), Path(irpa)
    info = load_build_info(vmfb)
    packed = info.get("packed")
    if not packed:
        raise PunetError(
            f"{vmfb.name} was not compiled with --pack-weights: it packs its weights at load, nothing to pack "
            f"(recompile: punet compile {info['mlir']['path']} --target {info['target']} --pack-weights)"
        )
    encoder = vmfb.parent / packed["encoder"]
    if not encoder.is_file():
        raise PunetError(f"{vmfb.name}: its encoder module {encoder.name} is missing (recompile with --pack-weights)")
    meta = read_metadata(irpa)
    if "packed" in meta:
        raise PunetError(f"{irpa}: already packed (for {meta['packed']['vmfb']}); give the unpacked archive")
    check_archive_fits(info, meta, vmfb, irpa)
    output = Path(output) if output else packed_name(vmfb)
    check_output(output)
    vmfb_digest = sha256_file(vmfb)
    if not force and _up_to_date(output, vmfb_digest, meta["weights_sha256"]):
        return PackResult(output, 0.0, output.stat().st_size, reused=True)

    t0 = time.perf_counter()
    config = rt.Config("local-task")
    instance, device = config.vm_instance, config.device
    module = rt.VmModule.mmap(instance, str(encoder))
    source = rt.ParameterIndex()
    source.load(str(irpa), mmap=True)
    source_provider = source.create_provider(scope=info["parameter_scope"])
    entries = _encoder_entries(module, instance, device, source_provider)
    scopes = {scope for scope, *_ in entries}
    if scopes != {packed["scope"]}:
        raise PunetError(f"{encoder.name} writes scopes {sorted(scopes)}, the module reads {packed['scope']!r}")
    total = sum(n for _, _, n, _ in entries)
    if progress:
        progress(f"packing {irpa.name} for {vmfb.name}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
                 f"{total / 2**30:.2f} GiB")
    stamp = {  # _stamped renews the format, version and creation time
        **meta,
        "packed": {
            "vmfb": vmfb.name,
            "vmfb_sha256": vmfb_digest,
            "target": info["target"],
            "flags": info["flags"],
            "source": str(irpa),
            "scope": packed["scope"],
        },
    }
    with atomic_path(output) as tmp:
        layout = rt.ParameterIndex()
        for _, key, n, _ in entries:
            layout.add_buffer(key, np.zeros(n, np.uint8))  # untouched pages: nothing is allocated
        _add_metadata(layout, _stamped(stamp))
        layout.create_archive_file(str(tmp))
        del layout
        written = rt.ParameterIndex()
        written.load(str(tmp), format="irpa", mmap=True)
        offsets = {k: e.file_storage[1] for k, e in written.items()}
        del written
        mapped = np.memmap(tmp, dtype=np.uint8, mode="r+")
        target = rt.ParameterIndex()
        for _, key, n, _ in entries:
            view = mapped[offsets[key]:offsets[key] + n]
            target.add_from_file_handle(key, rt.FileHandle.wrap_memory(view, readable=True, writable=True), n)
        params = rt.create_io_parameters_module(instance, source_provider, target.create_provider(scope=packed["scope"]))
        ctx = rt.VmContext(instance, modules=[params, rt.create_hal_module(instance, device), module])
        steps = rt.VmVariantList(1)
        ctx.invoke(_function(module, "steps"), rt.VmVariantList(0), steps)
        args = rt.VmVariantList(3)
        args.push_list(steps.get_as_list(0))
        args.push_ref(rt.HalFence(1))  # nothing to wait for
        done = rt.HalFence.create_at(device.create_semaphore(0), 1)
        args.push_ref(done)
        try:
            ctx.invoke(_function(module, "encode"), args, rt.VmVariantList(0))
            done.wait()
        except RuntimeError as e:
            raise PunetError(f"packing {irpa.name} for {vmfb.name} failed: {str(e).splitlines()[0]}") from None
        del ctx, params, target
        mapped.flush()
        del mapped
    return PackResult(output, time.perf_counter() - t0, output.stat().st_size)
