"""What a compiled .vmfb must hold, checked without the device it targets."""

from __future__ import annotations

import re
from pathlib import Path

# The executable format iree-compile embeds per backend (`#hal.executable.target<backend, FORMAT>`).
EXECUTABLE_FORMATS = {
    "llvm-cpu": b"embedded-elf-",
    "rocm": b"rocm-hsaco-fb",
    "cuda": b"cuda-nvptx-fb",
    "vulkan-spirv": b"vulkan-spirv-fb",
}


def check_vmfb(vmfb: Path, target, entry: str, n_inputs: int) -> None:
    """Assert that `vmfb` is a loadable VM module exporting `entry` (n_inputs buffers in, one out)
    with the executables of `target` (a punet.compile.targets.Target) in it.
    """
    import iree.runtime as rt

    module = rt.VmModule.mmap(rt.VmInstance(), str(vmfb))  # parses the flatbuffer; needs no device
    assert entry in module.function_names, (vmfb.name, module.function_names)
    # The calling convention: `main(0rrrrr_r)` is five refs (buffer views) in, one out.
    cconv = re.search(r"\((\w*)_(\w*)\)", repr(module.lookup_function(entry)))
    assert cconv and cconv.group(1) == "0" + "r" * n_inputs and cconv.group(2) == "r", repr(
        module.lookup_function(entry)
    )
    data = vmfb.read_bytes()
    assert EXECUTABLE_FORMATS[target.backend] in data, f"{vmfb.name}: no {target.backend} executable"
    for flag in target.flags:  # the architecture the flags ask for is the one compiled for
        m = re.fullmatch(r"--iree-(?:rocm|cuda)-target=(\w+)", flag)
        if m:
            assert m.group(1).encode() in data, f"{vmfb.name}: no {m.group(1)} code object"
