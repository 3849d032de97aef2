"""Loading a multi-device module: N devices of one driver in one HAL module, and every archive file it reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import PunetError


def multi_device_config(device: str, n: int):
    """An `iree.runtime.Config` whose HAL module holds `n` devices of `device`'s driver (local-task: n task pools).

    Inputs are allocated on the first; the module's logical devices __device_0 ... __device_{n-1} are these, in order.
    """
    import iree.runtime as rt

    try:
        driver = rt.get_driver(device)
        if device.startswith("local"):
            devices = [driver.create_default_device() for _ in range(n)]
        else:
            found = driver.query_available_devices()
            if len(found) < n:
                raise PunetError(f"the module runs on {n} {device} devices; this machine has {len(found)}")
            devices = [driver.create_device(found[i]["device_id"]) for i in range(n)]
    except (ValueError, RuntimeError) as e:
        raise PunetError(f"device {device!r} is not available here: {str(e).splitlines()[0]}") from None
    config = rt.Config(device=devices[0])
    config.default_vm_modules = (rt.create_hal_module(config.vm_instance, devices=devices),)
    config.devices = devices
    return config


def parameter_files(irpa: str | Path, meta: dict[str, Any], info: dict[str, Any], vmfb: Path) -> list[Path]:
    """The archive files a module reads: the archive, and its rank files when the module is tensor-parallel."""
    from .archive import rank_files

    tp_module = info["signature"].get("tp", 1)
    tp_archive = meta["sharding"]["tp"] if "sharding" in meta else 1
    if tp_module != tp_archive:
        have = f"sharded for --tp {tp_archive}" if tp_archive > 1 else "not sharded"
        want = f"a `punet shard --tp {tp_module}` archive" if tp_module > 1 else "an unsharded archive"
        raise PunetError(f"{irpa}: {have}; {vmfb.name} takes {want}")
    return [Path(irpa)] + (rank_files(irpa, meta) if tp_archive > 1 else [])
