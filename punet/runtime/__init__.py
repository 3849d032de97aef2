"""A thin iree.runtime driver: load a .vmfb with its .irpa, call the entry, time it.

Parameters are served from the memory-mapped .irpa through the io-parameters
module (scope "model"), never copied into Python; or, with weights="memory"
on a CPU device, from one read of the archive into the process's memory,
which the device uses in place (fileio.WEIGHTS). Before anything runs, the
.vmfb's build record is checked against the archive's digest and the
inputs' shapes, so a mismatch is a one-line error rather than a crash
inside the runtime.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..artifacts import build_info_path
from ..config import UNetConfig
from ..errors import PunetError
from ..fileio import WEIGHTS, read_into_memory
from ..signature import SCOPE, Signature, TensorSpec, check_inputs

__all__ = ["Session", "device_buffer", "host_tensor", "load_build_info", "run_vmfb", "DEVICES"]

DEVICES = ("local-task", "local-sync", "hip", "vulkan", "cuda")


_ELEMENT_TYPES = {
    torch.float32: "FLOAT_32",
    torch.float16: "FLOAT_16",
    torch.bfloat16: "BFLOAT_16",
    torch.int64: "SINT_64",
}


def device_buffer(device: Any, t: torch.Tensor) -> Any:
    """A copy of tensor `t` (float32, float16, bfloat16 or int64) in a buffer of IREE `device`."""
    import iree.runtime as rt

    t = t.contiguous()
    host = t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()
    return device.allocator.allocate_buffer_copy(
        memory_type=rt.MemoryType.DEVICE_LOCAL,
        allowed_usage=rt.BufferUsage.DEFAULT,
        device=device,
        buffer=host,
        element_type=getattr(rt.HalElementType, _ELEMENT_TYPES[t.dtype]),
    )


def host_tensor(result: Any) -> torch.Tensor:
    """A device result as a torch tensor (a copy: the host mapping dies with `result`)."""
    host = np.array(result.to_host())
    if host.dtype.name == "bfloat16":  # numpy holds it as ml_dtypes.bfloat16
        return torch.from_numpy(host.view(np.uint16)).view(torch.bfloat16)
    return torch.from_numpy(host)


def load_build_info(vmfb: str | Path) -> dict[str, Any]:
    vmfb = Path(vmfb)
    if not vmfb.is_file():
        raise PunetError(f"{vmfb}: file not found")
    info_path = build_info_path(vmfb)
    if not info_path.is_file():
        raise PunetError(f"{vmfb}: no build record {info_path.name} beside it (compile it with `punet compile`)")
    try:
        return json.loads(info_path.read_text())
    except ValueError:
        raise PunetError(f"{info_path}: malformed JSON") from None


def check_archive_fits(info: dict[str, Any], meta: dict[str, Any], vmfb: Path, irpa: Path) -> None:
    """Refuse an archive whose architecture or dtype is not the one the module was exported for.

    punet's import checks every tensor against the archive's config, so an
    equal config and dtype mean equal keys, shapes and dtypes.
    """
    if meta["dtype"] != info["signature"]["dtype"]:
        raise PunetError(f"{irpa}: weights are {meta['dtype']}, {vmfb.name} takes {info['signature']['dtype']}")
    if UNetConfig.from_dict(meta["config"]) != UNetConfig.from_dict(info["config"]):
        mine, theirs = UNetConfig.from_dict(meta["config"]).to_dict(), UNetConfig.from_dict(info["config"]).to_dict()
        diff = [k for k in theirs if mine.get(k) != theirs.get(k)]
        raise PunetError(
            f"{irpa}: another architecture than {vmfb.name} was exported for (config differs in: {', '.join(diff)})"
        )


def set_threads(threads: int | None) -> None:
    """Worker threads of the local-task device (process wide; before the first Session)."""
    if threads:
        import iree.runtime as rt

        rt.flags.parse_flags(f"--task_topology_max_group_count={threads}")


@dataclass
class Session:
    """A loaded module ready to call: `session(tensors) -> torch.Tensor`."""

    vmfb: Path
    irpa: Path
    device: str
    config: UNetConfig
    signature: Signature
    info: dict[str, Any]

    @classmethod
    def load(
        cls,
        vmfb: str | Path,
        irpa: str | Path,
        device: str = "local-task",
        exact_weights: bool = False,
        progress: Callable[[str], None] | None = None,
        weights: str = "mapped",
    ) -> "Session":
        """Load `vmfb` with parameters from `irpa` on `device`.

        The archive must hold the architecture and dtype the module was
        exported for (its config and every tensor's shape); its weights may
        differ from the ones at export (a fine-tune, weights regenerated
        elsewhere): that is reported through `progress`, and refused only
        with `exact_weights`. `weights` (WEIGHTS): "mapped" maps the archive
        from its file; "memory" reads it into this process's memory first
        (local-task/local-sync only: the device uses it in place).
        """
        import iree.runtime as rt

        from ..weights import read_metadata

        vmfb, irpa = Path(vmfb), Path(irpa)
        info = load_build_info(vmfb)
        meta = read_metadata(irpa)
        check_archive_fits(info, meta, vmfb, irpa)
        from .pack import check_packed

        scope = check_packed(info, meta, vmfb, irpa) or SCOPE
        want = info["irpa"]["weights_sha256"]
        if meta["weights_sha256"] != want:
            msg = (
                f"{irpa.name}: weights digest {meta['weights_sha256'][:12]} differs from the archive "
                f"{vmfb.name} was exported from ({want[:12]}, {info['irpa']['path']})"
            )
            if exact_weights:
                raise PunetError(msg + " and --exact-weights was given")
            if progress:
                progress(msg + ": same architecture, running with these weights")
        if device not in DEVICES:
            raise PunetError(f"unknown device {device!r} (expected one of: {', '.join(DEVICES)})")
        if weights not in WEIGHTS:
            raise PunetError(f"unknown weights mode {weights!r} (expected one of: {', '.join(WEIGHTS)})")
        if weights == "memory" and not device.startswith("local-"):
            raise PunetError(f"weights in memory is for CPU devices (local-task, local-sync), not {device}: "
                             "a GPU copies the archive into its own memory either way")
        expected_driver = info.get("driver")
        if expected_driver and device.split("-")[0] != expected_driver.split("-")[0]:
            raise PunetError(
                f"{vmfb.name} was compiled for target {info['target']} (device {expected_driver}), not {device}"
            )
        devices = Signature(**info["signature"]).devices
        files = [irpa]
        if devices > 1 or "sharding" in meta:  # several devices, several archive files (punet/sharded)
            from ..sharded.runtime import multi_device_config, parameter_files

            files = parameter_files(irpa, meta, info, vmfb)
            rt_config = multi_device_config(device, devices)
        else:
            try:
                rt_config = rt.Config(device)
            except (ValueError, RuntimeError) as e:
                raise PunetError(f"device {device!r} is not available here: {str(e).splitlines()[0]}") from None
        session = cls(vmfb, irpa, device, UNetConfig.from_dict(info["config"]), Signature(**info["signature"]), info)
        session._rt_config = rt_config
        index = rt.ParameterIndex()
        session._buffers = []
        for path in files:
            if weights == "memory":
                t0 = time.perf_counter()
                buf = read_into_memory(Path(path))
                session._buffers.append(buf)  # the device reads the weights from it: keep it for the session
                index.load_from_file_handle(rt.FileHandle.wrap_memory(buf, readable=True, writable=False), "irpa")
                if progress:
                    progress(f"read {Path(path).name} into memory ({len(buf) / 2**30:.2f} GiB) in "
                             f"{time.perf_counter() - t0:.1f} s")
            else:
                index.load(str(path), mmap=True)
        providers = [index.create_provider(scope=scope)]
        packed_from = Path(meta["packed"]["source"]) if "packed" in meta else None
        if packed_from is not None and packed_from.is_file():
            # Some packed modules still read a few weights as they are (those their encoder leaves alone).
            source = rt.ParameterIndex()
            source.load(str(packed_from), mmap=True)
            providers.append(source.create_provider(scope=SCOPE))
        params = rt.create_io_parameters_module(rt_config.vm_instance, *providers)
        module = rt.VmModule.mmap(rt_config.vm_instance, str(vmfb))
        try:
            session._modules = rt.load_vm_modules(params, module, config=rt_config)
        except ValueError as e:
            if packed_from is None or f"scopes like '{SCOPE}'" not in str(e):
                raise
            raise PunetError(
                f"{vmfb.name} also reads unpacked weights from the archive {irpa.name} was packed from "
                f"({packed_from}), which is gone"
            ) from None
        session.entries = {e.name: e for e in session.signature.entries(session.config)}
        session._fns = {name: getattr(session._modules[-1], name) for name in session.entries}
        session._fn = None if session.signature.scheduled else session._fns[info["entry"]]
        session._index = index
        session.packed_from = packed_from
        session.weights = weights
        # (scope, file) as iree-run-module's --parameters takes them: the archive (and a tensor-parallel
        # module's rank files), and a packed archive's source
        session.parameters = [(scope, p) for p in files] + ([(SCOPE, packed_from)] if len(providers) > 1 else [])
        return session

    def eager_archive(self) -> Path:
        """The archive torch eager loads for this session's weights: a packed archive's source."""
        if self.packed_from is None:
            return self.irpa
        if not self.packed_from.is_file():
            raise PunetError(
                f"{self.irpa.name} holds packed weights, which torch eager cannot read, and the archive it was "
                f"packed from ({self.packed_from}) is gone"
            )
        return self.packed_from

    def upload(self, spec: TensorSpec, t: torch.Tensor) -> Any:
        """One tensor as a device buffer (shape and dtype checked against `spec`)."""
        if tuple(t.shape) != spec.shape or t.dtype != spec.torch_dtype:
            raise PunetError(
                f"input {spec.name!r}: expected {list(spec.shape)} {spec.dtype}, got {list(t.shape)} {t.dtype}"
            )
        return device_buffer(self._rt_config.device, t)

    def to_device(self, tensors: dict[str, torch.Tensor]) -> list:
        """Inputs of the single entry as device buffers, in argument order (checked first)."""
        check_inputs(self.config, self.signature, tensors, "inputs")
        return [self.upload(spec, tensors[spec.name]) for spec in self.signature.inputs(self.config)]

    def call(self, args: list) -> Any:
        """Run the single entry on device buffers; returns the raw result (synchronised)."""
        result = self._fn(*args)
        return result

    def invoke(self, name: str, args: list) -> tuple:
        """Run entry `name` on device arrays (buffers or earlier results); its results stay on the device."""
        result = self._fns[name](*args)
        return result if isinstance(result, tuple) else (result,)

    @staticmethod
    def download(result: Any, spec: TensorSpec) -> torch.Tensor:
        """A device result as a torch tensor of `spec`'s shape and dtype."""
        return host_tensor(result).reshape(spec.shape)

    def to_torch(self, result: Any) -> torch.Tensor:
        return self.download(result, self.signature.output(self.config))

    def __call__(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.to_torch(self.call(self.to_device(tensors)))


def run_vmfb(
    vmfb: str | Path,
    irpa: str | Path,
    output: str | Path,
    *,
    inputs: str | Path | None = None,
    seed: int = 0,
    save_inputs: str | Path | None = None,
    device: str = "local-task",
    exact_weights: bool = False,
    progress: Callable[[str], None] | None = None,
    weights: str = "mapped",
) -> dict[str, Any]:
    """One call of a compiled module; writes {"sample": noise} to `output`."""
    from ..eager import prepare_inputs
    from ..tensors import save_tensors

    session = Session.load(vmfb, irpa, device, exact_weights=exact_weights, progress=progress, weights=weights)
    if session.signature.scheduled:
        raise PunetError(f"{Path(vmfb).name} is a scheduled module (a whole denoising step): run it with `punet generate`")
    if inputs is not None:
        from ..tensors import load_tensors

        tensors = load_tensors(inputs)
        check_inputs(session.config, session.signature, tensors, str(inputs))
        sig = session.signature
    else:
        sig, tensors = prepare_inputs(session.config, inputs=None, sig=session.signature, seed=seed)
    if save_inputs is not None:
        save_tensors(save_inputs, tensors)
    t0 = time.perf_counter()
    out = session(tensors)
    ms = (time.perf_counter() - t0) * 1e3
    save_tensors(output, {"sample": out}, metadata={"producer": "punet-iree", "device": device})
    return {"signature": sig, "dtype": sig.dtype, "device": device, "ms": ms, "threads": os.cpu_count()}
