"""Run a scheduled UNet module through shortfin's program API, the way shortfin's SD server does.

Runs in the shortfin environment (tests/shortfin/setup_env.sh), not in punet's: it needs only
shortfin and numpy. It follows `shortfin_apps/sd/components/service.py` of shortfin 3.9.0:

- a local-task CPU system (`sf.host.CPUSystemBuilder`, the server's `--device local-task`);
- the .irpa as `sf.StaticProgramParameters(system, parameter_scope="model")`, put first in the
  program as `sf.ProgramModule.parameter_provider`, then the .vmfb as `sf.ProgramModule.load`;
- functions looked up as "<module name>.<function name>" (`program["compiled_spunet.run_forward"]`);
- `run_initialize(sample, num_steps)` once, then `run_forward(latents, prompt_embeds, text_embeds,
  time_ids, guidance_scale, step_index, timesteps, sigmas)` per step, each awaited on one fiber;
  latents, time_ids, timesteps and sigmas go from call to call as device arrays;
- every float input (sample, prompt_embeds, text_embeds, guidance_scale [1]) in the module's
  I/O dtype (the server's `unet_dtype`), `num_steps` and `step_index` int64 of shape [1]
  (the server passes `steps_arr.view(i)` of an int64 [100] array holding 0..99).

    python drive.py --vmfb m.vmfb --irpa m.irpa --inputs in.safetensors --steps 3 --guidance 7.5 -o out.safetensors

Inputs: a safetensors file with `punet generate`'s keys: sample (initial noise, before
scaling), encoder_hidden_states and text_embeds (2B rows, negative then positive); other keys
are ignored (time_ids come from run_initialize, as in the server). Output: key `sample`, the
latents after the last step, as `punet generate` writes it, so `punet compare` reads both.
--save-all also writes run_initialize's outputs and the latents after every step.
Exit 1 with one line on stderr on failure.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np
import shortfin as sf
import shortfin.array as sfnp
import shortfin.host

DTYPES = {"float32": (np.float32, sfnp.float32), "float16": (np.float16, sfnp.float16)}
# safetensors dtype names <-> numpy (bf16 has no numpy dtype; shortfin's SD server takes fp16 only).
ST_DTYPES = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32}


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file (8-byte header size, JSON header, raw data), numpy only."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        if info["dtype"] not in ST_DTYPES:
            raise ValueError(f"{path}: {key}: dtype {info['dtype']} not readable here (use F32 or F16)")
        begin, end = info["data_offsets"]
        dt = ST_DTYPES[info["dtype"]]
        out[key] = np.frombuffer(raw[8 + n + begin : 8 + n + end], dtype=dt).reshape(info["shape"]).copy()
    return out


def save_safetensors(tensors: dict[str, np.ndarray], path: str | Path) -> None:
    names = {np.dtype(v): k for k, v in ST_DTYPES.items()}
    header, blobs, offset = {}, [], 0
    for key, arr in tensors.items():
        data = np.ascontiguousarray(arr).tobytes()
        header[key] = {"dtype": names[arr.dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def to_device(device, values: np.ndarray, sf_dtype) -> sfnp.device_array:
    """A device array holding `values` (staged through a host array, as the SD server does)."""
    values = np.ascontiguousarray(values)
    arr = sfnp.device_array.for_device(device, list(values.shape), sf_dtype)
    host = arr.for_transfer()
    with host.map(discard=True) as m:
        m.fill(values.tobytes())
    arr.copy_from(host)
    return arr


async def to_numpy(device, arr: sfnp.device_array) -> np.ndarray:
    host = arr.for_transfer()
    host.copy_from(arr)
    await device  # wait for the device-to-host copy before reading
    return np.array(host)  # a copy: device_array exposes __array_interface__


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vmfb", required=True, help="module compiled by an iree-compile whose VM this shortfin reads")
    p.add_argument("--irpa", required=True, help="parameter archive of the module's external weights")
    p.add_argument("--inputs", required=True, help="safetensors: sample, encoder_hidden_states, text_embeds")
    p.add_argument("--steps", type=int, required=True, help="denoising steps (1..99)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default 7.5)")
    p.add_argument("-o", "--output", required=True, help="output safetensors (key 'sample')")
    p.add_argument("--save-all", help="also write time_ids, timesteps, sigmas and latents_<i> here")
    p.add_argument("--module-name", default="compiled_spunet")
    p.add_argument("--initialize", default="run_initialize", help="function name (default run_initialize)")
    p.add_argument("--forward", default="run_forward", help="function name (default run_forward)")
    p.add_argument("--scope", default="model", help="parameter scope of the external weights (default model)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the module's float I/O dtype")
    args = p.parse_args(argv)
    if not 1 <= args.steps < 100:
        p.error(f"--steps {args.steps}: the module's tables hold 1..99 steps")
    return args


def run(args: argparse.Namespace) -> dict[str, np.ndarray]:
    np_dtype, sf_dtype = DTYPES[args.dtype]
    inputs = load_safetensors(args.inputs)
    missing = {"sample", "encoder_hidden_states", "text_embeds"} - set(inputs)
    if missing:
        raise ValueError(f"{args.inputs}: missing keys {sorted(missing)}")

    system = sf.host.CPUSystemBuilder().create_system()
    try:
        params = sf.StaticProgramParameters(system, parameter_scope=args.scope)
        params.load(args.irpa)
        module = sf.ProgramModule.load(system, args.vmfb)
        fiber = system.create_fiber()
        program = sf.Program(
            modules=[sf.ProgramModule.parameter_provider(system, params), module],
            devices=fiber.raw_devices,
        )
        initialize = program[f"{args.module_name}.{args.initialize}"]
        forward = program[f"{args.module_name}.{args.forward}"]
        device = fiber.device(0)
        out: dict[str, np.ndarray] = {}

        async def main():
            def dev(name: str):
                return to_device(device, inputs[name].astype(np_dtype), sf_dtype)

            num_steps = to_device(device, np.array([args.steps], np.int64), sfnp.sint64)
            latents, time_ids, timesteps, sigmas = await initialize(dev("sample"), num_steps, fiber=fiber)
            for name, arr in [("time_ids", time_ids), ("timesteps", timesteps), ("sigmas", sigmas)]:
                out[name] = await to_numpy(device, arr)
            prompt_embeds, text_embeds = dev("encoder_hidden_states"), dev("text_embeds")
            guidance = to_device(device, np.array([args.guidance], np_dtype), sf_dtype)
            steps_arr = to_device(device, np.arange(100, dtype=np.int64), sfnp.sint64)
            for i in range(args.steps):
                t0 = time.perf_counter()
                (latents,) = await forward(
                    latents, prompt_embeds, text_embeds, time_ids, guidance, steps_arr.view(i), timesteps, sigmas,
                    fiber=fiber,
                )
                out[f"latents_{i}"] = await to_numpy(device, latents)
                print(f"step {i + 1}/{args.steps}: {1e3 * (time.perf_counter() - t0):.1f} ms", file=sys.stderr)

        system.run(main())
        return out
    finally:
        system.shutdown()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        out = run(args)
        save_safetensors({"sample": out[f"latents_{args.steps - 1}"]}, args.output)
        if args.save_all:
            save_safetensors(out, args.save_all)
    except Exception as e:  # noqa: BLE001  (shortfin raises ValueError/RuntimeError: one line, as punet's CLI)
        print(f"drive.py: {type(e).__name__}: {e}".replace("\n", " "), file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({args.steps} steps of {args.module_name}.{args.forward})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
