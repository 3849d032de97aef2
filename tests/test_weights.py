"""Import: diffusers checkpoints -> .irpa, validated, streamed, round-tripped."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from punet.errors import PunetError
from punet.weights import import_checkpoint, load_irpa, read_metadata

from .conftest import diffusers_tiny


def _state(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def test_import_round_trip_exact(checkpoints, tmp_path):
    src = checkpoints["tiny-sdxl"]
    meta = import_checkpoint(str(src), tmp_path / "u.irpa")
    config, state = load_irpa(tmp_path / "u.irpa")
    expected = _state(src)
    assert set(state) == set(expected)
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    assert meta["dtype"] == "float32" and meta["num_tensors"] == len(expected)
    assert read_metadata(tmp_path / "u.irpa")["config"] == config.to_dict()
    assert meta["config_json"] == json.loads((src / "config.json").read_text())
    assert meta["punet_version"] and meta["source"] == str(src)
    # The digest covers every tensor's bytes, in key order (what Session.load checks a .vmfb against).
    digest = hashlib.sha256()
    for k in sorted(expected):
        digest.update(expected[k].contiguous().view(torch.uint8).numpy().tobytes())
    assert meta["weights_sha256"] == digest.hexdigest()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_import_converts_dtype(checkpoints, tmp_path, dtype):
    src = checkpoints["tiny-sd15"]
    import_checkpoint(str(src), tmp_path / "u.irpa", dtype=dtype)
    _, state = load_irpa(tmp_path / "u.irpa")
    for k, v in _state(src).items():
        assert state[k].dtype == getattr(torch, dtype)
        assert torch.equal(state[k], v.to(getattr(torch, dtype))), k
    assert not list(tmp_path.glob("*.staging")) and not list(tmp_path.glob(".*tmp*"))


def test_iree_turbine_reads_the_archive(checkpoints, tmp_path):
    """The per-tensor metadata is iree-turbine's, so its ParameterArchive reads our files."""
    from iree.turbine.aot import ParameterArchive

    import_checkpoint(str(checkpoints["tiny-sd2"]), tmp_path / "u.irpa")
    archive = ParameterArchive(tmp_path / "u.irpa")
    items = dict(archive.items())
    expected = _state(checkpoints["tiny-sd2"])
    assert torch.equal(items["conv_in.weight"].as_tensor(), expected["conv_in.weight"])


def test_pipeline_folder_and_sharded(checkpoints, tmp_path):
    """A pipeline folder with unet/, holding a sharded checkpoint with an index."""
    model = diffusers_tiny("tiny-sdxl-refiner")
    model.save_pretrained(tmp_path / "pipe" / "unet", max_shard_size="200KB")
    assert (tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    meta = import_checkpoint(str(tmp_path / "pipe"), tmp_path / "u.irpa")
    _, state = load_irpa(tmp_path / "u.irpa")
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v), k
    assert meta["num_tensors"] == len(model.state_dict())


def test_variant(checkpoints, tmp_path):
    model = diffusers_tiny("tiny-sd15")
    model.to(torch.float16).save_pretrained(tmp_path / "m", variant="fp16")
    with pytest.raises(PunetError, match="pass --variant"):
        import_checkpoint(str(tmp_path / "m"), tmp_path / "u.irpa")
    meta = import_checkpoint(str(tmp_path / "m"), tmp_path / "u.irpa", variant="fp16")
    assert meta["dtype"] == "float16" and meta["variant"] == "fp16"


def test_hub_download_uses_the_cache_and_records_the_commit(checkpoints, tmp_path, monkeypatch):
    """A repo id goes through huggingface_hub (offline here, from a populated cache)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-xl"
    snap = repo / "snapshots" / commit
    shutil.copytree(checkpoints["tiny-sdxl"], snap / "unet")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    meta = import_checkpoint("org/tiny-xl", tmp_path / "u.irpa")
    assert meta["revision"] == commit and meta["source"] == "org/tiny-xl"
    with pytest.raises(PunetError, match="org/absent: download failed"):
        import_checkpoint("org/absent", tmp_path / "v.irpa")
    assert not (tmp_path / "v.irpa").exists()


# ---- bad checkpoints: each refused before anything is written -------------------


def _broken(checkpoints, tmp_path, mutate) -> Path:
    folder = tmp_path / "broken"
    shutil.copytree(checkpoints["tiny-sd15"], folder)
    mutate(folder)
    return folder


def _edit_state(fn):
    def mutate(folder: Path):
        path = folder / "diffusion_pytorch_model.safetensors"
        state = load_file(str(path))
        fn(state)
        save_file(state, str(path))

    return mutate


def _truncate(folder: Path):
    path = folder / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _set_config(key, value):
    def mutate(folder: Path):
        d = json.loads((folder / "config.json").read_text())
        d[key] = value
        (folder / "config.json").write_text(json.dumps(d))

    return mutate


BAD = {
    "missing tensor": (_edit_state(lambda s: s.pop("conv_in.weight")), r"missing tensor 'conv_in.weight'"),
    "unexpected tensor": (
        _edit_state(lambda s: s.__setitem__("extra.weight", torch.ones(2))),
        r"unexpected tensor 'extra.weight'",
    ),
    "wrong shape": (
        _edit_state(lambda s: s.__setitem__("conv_in.bias", torch.ones(3))),
        r"tensor 'conv_in.bias' has shape \[3\], config.json implies \[32\]",
    ),
    "non-float dtype": (
        _edit_state(lambda s: s.__setitem__("conv_in.bias", torch.ones(32, dtype=torch.int64))),
        r"tensor 'conv_in.bias' has non-float dtype I64",
    ),
    "truncated": (_truncate, r"truncated: tensor"),
    "not safetensors": (
        lambda f: (f / "diffusion_pytorch_model.safetensors").write_text("hello, world"),
        r"not a safetensors file",
    ),
    "malformed json": (lambda f: (f / "config.json").write_text("{"), r"config.json: malformed JSON"),
    "unsupported value": (_set_config("class_embed_type", "timestep"), r"class_embed_type='timestep'"),
    "typo key": (_set_config("layers_per_blok", 2), r"unknown config key 'layers_per_blok'"),
    "no weights": (
        lambda f: (f / "diffusion_pytorch_model.safetensors").unlink(),
        r"no diffusion_pytorch_model.safetensors",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoint(checkpoints, tmp_path, case):
    mutate, pattern = BAD[case]
    folder = _broken(checkpoints, tmp_path, mutate)
    out = tmp_path / "out" / "u.irpa"
    out.parent.mkdir()
    out.write_bytes(b"an earlier archive")  # so that "nothing written" is observable
    with pytest.raises(PunetError, match=pattern):
        import_checkpoint(str(folder), out)
    assert out.read_bytes() == b"an earlier archive"
    assert os.listdir(out.parent) == ["u.irpa"]  # no temporary or staging file left beside it


def test_missing_source(tmp_path):
    with pytest.raises(PunetError, match="no such folder, and not a Hugging Face repo id"):
        import_checkpoint(str(tmp_path / "nope"), tmp_path / "u.irpa")
    with pytest.raises(PunetError, match="no config.json"):
        import_checkpoint(str(tmp_path), tmp_path / "u.irpa")


def test_not_an_irpa(tmp_path):
    (tmp_path / "x.irpa").write_text("not an archive")
    with pytest.raises(PunetError, match="not an IREE parameter archive"):
        load_irpa(tmp_path / "x.irpa")
