"""Shared fixtures: tiny random-weight diffusers UNets and their checkpoints."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from punet.builtin import TINY_CONFIGS, config_dict, random_state_dict

FAMILIES = list(TINY_CONFIGS)
CONFIG_DIR = Path(__file__).parent / "data" / "configs"

# Two levels, one layer each: every op kind of SDXL's UNet at the lowest export and compile cost.
MICRO_SDXL = {
    "addition_embed_type": "text_time",
    "use_linear_projection": True,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "attention_head_dim": [1, 2],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}

# One torch thread per process in a mutation run (mutmut sets MUTANT_UNDER_TEST before it
# starts pytest): its --max-children processes share the cores, and two threads in each on a
# busy 2-core machine wait for each other at every op (8 ms a tiny convolution, not 20 us).
# Likewise under pytest-xdist (the README's `-n 2`): the workers share the cores, so each gets its share.
_SHARERS = 1 if "MUTANT_UNDER_TEST" in os.environ else int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(1 if "MUTANT_UNDER_TEST" in os.environ else max(1, min(2, (os.cpu_count() or 1) // _SHARERS)))


def diffusers_kwargs(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def diffusers_tiny(name: str, seed: int = 0):
    """diffusers UNet2DConditionModel of a tiny family config, weights re-randomised."""
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(**diffusers_kwargs(config_dict(name))).eval()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    model.load_state_dict(random_state_dict(shapes, seed), strict=True)
    return model


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def eager_fp32(irpa: Path, tensors: dict) -> torch.Tensor:
    """torch eager fp32 on `irpa`'s weights (whatever their dtype) and `tensors` cast to fp32: the reference."""
    from punet.eager import call_model
    from punet.weights import load_model

    model, _ = load_model(irpa, dtype="float32")
    return call_model(model, {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()})


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """save_pretrained folders (real config.json + safetensors) of every tiny family."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name in FAMILIES:
        diffusers_tiny(name).save_pretrained(root / name)
        out[name] = root / name
    return out


# Mutation testing (docs/testing.md): mutmut runs each mutant's tests in a process whose
# MUTANT_UNDER_TEST names the mutant, and stops at the first failure.
# A mutant of punet/model runs only test_model_units.py (every layer and the whole UNet against
# diffusers in float64, under a second in all): the other model tests build bigger models and
# export them, minutes per surviving mutant.
MUTATION_TESTS = {
    "punet.model.": "tests/test_model_units.py",
    "punet.scheduled.": "tests/test_scheduled.py",
    "punet.sharded.": "tests/test_sharded.py",
}


@functools.lru_cache
def _mutmut_durations() -> dict[str, float]:
    try:
        return json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        return {}


def pytest_collection_modifyitems(config, items):
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if "__mutmut_" not in mutant:
        return
    for prefix, path in MUTATION_TESTS.items():
        if mutant.startswith(prefix):
            config.hook.pytest_deselected(items=[i for i in items if not i.nodeid.startswith(path + "::")])
            items[:] = [i for i in items if i.nodeid.startswith(path + "::")]
    # Fastest first, as mutmut's fork runner orders them (its forkserver runner keeps mutmut's set
    # order): a killed mutant then costs its cheapest failing test, not a 4 s export.
    durations = _mutmut_durations()
    items.sort(key=lambda i: durations.get(i.nodeid, 0.0))


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`punet ARGS` in a subprocess, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "punet.cli", *args], capture_output=True, text=True, cwd=cwd, check=False
    )
