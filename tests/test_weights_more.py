"""punet.weights beyond the import round trip: what is asked of the hub, and reading archives back."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from punet.errors import PunetError
from punet.weights import Source, import_checkpoint, load_irpa, load_model, read_metadata, resolve_source


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """huggingface_hub.snapshot_download replaced: records its arguments, returns a prepared snapshot."""
    import huggingface_hub

    calls = []
    state = {"snapshot": None, "error": None}

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        if state["error"]:
            raise state["error"]
        return str(state["snapshot"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls, state


def _patterns(variant: str = "") -> list[str]:
    v = f".{variant}" if variant else ""
    out = []
    for sub in ("unet/", ""):
        w = f"{sub}diffusion_pytorch_model{v}"
        out += [f"{sub}config.json", f"{w}.safetensors", f"{w}.safetensors.index.json", f"{w}-*.safetensors"]
    return out


def test_hub_download_asks_only_for_the_unet(checkpoints, tmp_path, fake_hub):
    calls, state = fake_hub
    state["snapshot"] = snap = tmp_path / "snapshots" / "abc123"
    shutil.copytree(checkpoints["tiny-sd15"], snap / "unet")  # a pipeline repo: the UNet under unet/
    said = []
    src = resolve_source("org/pipe", revision="v1", variant="fp16", progress=said.append)
    assert src == Source(snap / "unet", "org/pipe", "abc123")
    assert calls == [("org/pipe", "v1", _patterns("fp16"))]
    assert calls[0][2][:2] == ["unet/config.json", "unet/diffusion_pytorch_model.fp16.safetensors"]
    assert said == ["downloading the UNet of org/pipe (revision v1) from the Hugging Face hub"]


def test_hub_download_of_a_bare_unet_repo(checkpoints, tmp_path, fake_hub):
    calls, state = fake_hub
    state["snapshot"] = snap = tmp_path / "snapshots" / "def456"
    shutil.copytree(checkpoints["tiny-sd15"], snap)  # config.json at the top
    said = []
    assert resolve_source("org/unet", progress=said.append) == Source(snap, "org/unet", "def456")
    assert calls == [("org/unet", None, _patterns())]
    assert said == ["downloading the UNet of org/unet (revision main) from the Hugging Face hub"]
    assert resolve_source("org/unet") == Source(snap, "org/unet", "def456")  # no progress callback: silent


def test_hub_download_errors(tmp_path, fake_hub):
    from huggingface_hub.errors import HfHubHTTPError

    class NotFound(HfHubHTTPError):
        def __init__(self, message: str):  # without the HTTP response the real one needs
            Exception.__init__(self, message)

    _, state = fake_hub
    state["error"] = NotFound("404 Client Error: Not Found\nRepository Not Found")
    with pytest.raises(PunetError, match=r"^org/x: download failed: 404 Client Error: Not Found$"):
        resolve_source("org/x")
    state["error"] = OSError()
    with pytest.raises(PunetError, match=r"^org/x: download failed: OSError$"):
        resolve_source("org/x")
    state["error"] = ValueError("  \n")
    with pytest.raises(PunetError, match=r"^org/x: download failed: ValueError$"):
        resolve_source("org/x")
    state["error"] = None
    state["snapshot"] = empty = tmp_path / "snapshots" / "0f0f"
    empty.mkdir(parents=True)
    with pytest.raises(PunetError, match=r"^org/empty@0f0f: no unet/config.json or config.json in the repo$"):
        resolve_source("org/empty")


def test_local_sources(checkpoints, tmp_path):
    src = checkpoints["tiny-sd15"]
    assert resolve_source(str(src)) == Source(src.resolve(), str(src))
    pipe = tmp_path / "pipe"
    shutil.copytree(src, pipe / "unet")
    assert resolve_source(str(pipe)) == Source((pipe / "unet").resolve(), str(pipe))
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(PunetError, match=r"file.txt: expected a folder with config.json and safetensors, got a file"):
        resolve_source(str(f))
    for spec in ("./org/name", "org/name/extra", "noslash"):
        with pytest.raises(PunetError, match=r"no such folder, and not a Hugging Face repo id \(expected 'org/name'\)"):
            resolve_source(spec)


def test_checkpoint_of_mixed_dtypes_needs_a_dtype(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "mixed"
    shutil.copytree(checkpoints["tiny-sd15"], folder)
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state["conv_in.bias"] = state["conv_in.bias"].half()
    save_file(state, str(path))
    with pytest.raises(PunetError, match=r"tensors have dtypes \['float16', 'float32'\]; choose one with --dtype"):
        import_checkpoint(str(folder), tmp_path / "u.irpa")
    meta = import_checkpoint(str(folder), tmp_path / "u.irpa", dtype="float32")
    _, got = load_irpa(tmp_path / "u.irpa")
    assert got["conv_in.bias"].dtype == torch.float32
    assert torch.equal(got["conv_in.bias"], state["conv_in.bias"].float())
    assert meta["num_parameters"] == sum(v.numel() for v in state.values())


def test_float64_checkpoint_is_converted(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "f64"
    shutil.copytree(checkpoints["tiny-sd15"], folder)
    path = folder / "diffusion_pytorch_model.safetensors"
    state = {k: v.double() for k, v in load_file(str(path)).items()}
    save_file(state, str(path))
    with pytest.raises(PunetError, match=r"tensors have dtypes \['float64'\]; choose one with --dtype"):
        import_checkpoint(str(folder), tmp_path / "u.irpa")
    import_checkpoint(str(folder), tmp_path / "u.irpa", dtype="float32")
    _, got = load_irpa(tmp_path / "u.irpa")
    assert all(torch.equal(got[k], v.float()) for k, v in state.items())


def test_load_model_dtype_and_values(checkpoints, tmp_path):
    from safetensors.torch import load_file

    import_checkpoint(str(checkpoints["tiny-sd15"]), tmp_path / "u.irpa")
    expected = load_file(str(checkpoints["tiny-sd15"] / "diffusion_pytorch_model.safetensors"))
    model, config = load_model(tmp_path / "u.irpa")
    assert not model.training and config == model.config
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())
    half, _ = load_model(tmp_path / "u.irpa", dtype="float16")
    assert all(v.dtype == torch.float16 and torch.equal(v, expected[k].half()) for k, v in half.state_dict().items())
    _, state = load_irpa(tmp_path / "u.irpa")
    assert state["conv_in.weight"].shape == (32, 4, 3, 3) and state["conv_in.weight"].dtype == torch.float32
    # Bug: the device argument ignored (the model left on the CPU when another device is asked for); the
    # meta device stands in for a GPU on a CPU-only machine.
    meta, _ = load_model(tmp_path / "u.irpa", device="meta")
    assert {p.device.type for p in meta.parameters()} == {"meta"}


def test_archives_not_written_by_punet(tmp_path):
    import iree.runtime as rt
    import numpy as np

    index = rt.ParameterIndex()
    index.add_buffer("w", np.ones(4, dtype=np.float32))
    index.create_archive_file(str(tmp_path / "foreign.irpa"))
    with pytest.raises(PunetError, match=r"foreign.irpa: no '__punet__' entry \(not written by `punet import`\)"):
        read_metadata(tmp_path / "foreign.irpa")
    index = rt.ParameterIndex()
    index.add_buffer("__punet__", np.frombuffer(json.dumps({"format": "other"}).encode(), dtype=np.uint8).copy())
    index.create_archive_file(str(tmp_path / "other.irpa"))
    with pytest.raises(PunetError, match=r"other.irpa: unreadable punet metadata \(expected format punet-irpa-1\)"):
        read_metadata(tmp_path / "other.irpa")
    with pytest.raises(PunetError, match=r"absent.irpa: file not found"):
        read_metadata(tmp_path / "absent.irpa")
    (tmp_path / "junk.irpa").write_bytes(b"\0" * 64)
    with pytest.raises(PunetError, match=r"junk.irpa: not an IREE parameter archive \((?!None\))\S"):  # the reason
        read_metadata(tmp_path / "junk.irpa")


def test_tensor_without_metadata_is_refused(checkpoints, tmp_path):
    import iree.runtime as rt
    import numpy as np

    import_checkpoint(str(checkpoints["tiny-sd15"]), tmp_path / "u.irpa")
    meta = read_metadata(tmp_path / "u.irpa")
    index = rt.ParameterIndex()
    index.add_buffer("__punet__", np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy(), metadata="punet")
    index.add_buffer("conv_in.bias", np.ones(32, dtype=np.float32), metadata="raw")
    index.create_archive_file(str(tmp_path / "bare.irpa"))
    with pytest.raises(PunetError, match=r"bare.irpa: entry 'conv_in.bias' has no tensor metadata"):
        load_irpa(tmp_path / "bare.irpa")
    meta["config"]["act_fn"] = "gelu"
    index = rt.ParameterIndex()
    index.add_buffer("__punet__", np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy(), metadata="punet")
    index.create_archive_file(str(tmp_path / "badcfg.irpa"))
    with pytest.raises(PunetError, match=r"badcfg.irpa: embedded config: unsupported config: act_fn='gelu'"):
        load_irpa(tmp_path / "badcfg.irpa")


def test_load_model_refuses_an_archive_missing_a_tensor(checkpoints, tmp_path):
    """load_model is strict: an archive short of one tensor is an error, not a model with a hole."""
    import iree.runtime as rt
    import numpy as np

    from punet.weights import METADATA_KEY, _tensor_metadata

    import_checkpoint(str(checkpoints["tiny-sd15"]), tmp_path / "u.irpa")
    meta = read_metadata(tmp_path / "u.irpa")
    _, state = load_irpa(tmp_path / "u.irpa")
    index = rt.ParameterIndex()
    for k, v in state.items():
        if k != "conv_in.bias":
            index.add_buffer(k, v.numpy().copy(), metadata=_tensor_metadata("float32", tuple(v.shape)))
    index.add_buffer(METADATA_KEY, np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8).copy(), metadata="punet")
    index.create_archive_file(str(tmp_path / "short.irpa"))
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"conv_in.bias\""):
        load_model(tmp_path / "short.irpa")


# ---- safetensors headers, shard indexes, records: each refusal's exact message ----------------


def _st(path, header: dict, data: bytes = b"", length: int | None = None):
    import struct

    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def test_safetensors_header_refusals(tmp_path):
    from punet.weights import read_safetensors_index

    p = tmp_path / "x.safetensors"
    cases = [
        (lambda: p.write_bytes(b"abc"), "not a safetensors file (shorter than its 8-byte header length)"),
        (lambda: _st(p, {}, length=2**64 - 16),
         f"not a safetensors file (header length {2**64 - 16} exceeds the file size 10)"),
        (lambda: _st(p, {"a": 1}, length=len(b'{"a": 1}') + 1),
         "not a safetensors file (header length 9 exceeds the file size 16)"),
        (lambda: _st(p, []), "not a safetensors file (header is not a JSON object)"),
        (lambda: _st(p, {"a": {"dtype": "F32"}}), "malformed safetensors header entry for 'a'"),
        (lambda: _st(p, {"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8),
         "tensor 'a' has unsupported dtype C64 (expected F16, BF16 or F32)"),
        (lambda: _st(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
         "tensor 'a' byte range does not match its shape [2] float32"),
    ]
    for write, message in cases:
        write()
        with pytest.raises(PunetError) as info:
            read_safetensors_index(p)
        assert str(info.value) == f"{p}: {message}"
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    n = len(json.dumps(header).encode())
    _st(p, header, b"\0" * 4)
    with pytest.raises(PunetError) as info:
        read_safetensors_index(p)
    assert str(info.value) == f"{p}: truncated: tensor 'a' ends at byte {8 + n + 8} but the file has {8 + n + 4} bytes"
    with pytest.raises(PunetError) as info:
        read_safetensors_index(tmp_path / "absent.safetensors")
    assert str(info.value) == f"{tmp_path / 'absent.safetensors'}: file not found"


def test_safetensors_header_limits(tmp_path):
    """A header exactly as long as the file is fine; one over 100 MiB is refused (before it is read)."""
    import os
    import struct

    from punet.weights import read_safetensors_index

    p = _st(tmp_path / "empty.safetensors", {"__metadata__": {"format": "pt"}})
    assert read_safetensors_index(p) == []
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        f.write(struct.pack("<Q", (100 << 20) + 1))
    os.truncate(big, (102 << 20) + 8)  # sparse: no disk used
    with pytest.raises(PunetError) as info:
        read_safetensors_index(big)
    assert "exceeds the file size" in str(info.value)


def test_shard_index_refusals(checkpoints, tmp_path):
    from punet.weights import find_weight_files

    d = tmp_path / "m"
    d.mkdir()
    with pytest.raises(PunetError) as info:
        find_weight_files(d)
    assert str(info.value) == (f"{d}: no diffusion_pytorch_model.safetensors or "
                               "diffusion_pytorch_model.safetensors.index.json")
    index = d / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text("[]")
    with pytest.raises(PunetError) as info:
        find_weight_files(d)
    assert str(info.value) == f"{index}: malformed shard index (expected a JSON object with 'weight_map')"
    index.write_text(json.dumps({"weight_map": {"a": "s-1.safetensors", "b": "s-2.safetensors"}}))
    (d / "s-1.safetensors").write_bytes(b"")
    with pytest.raises(PunetError) as info:
        find_weight_files(d)
    assert str(info.value) == f"{index}: shard s-2.safetensors is missing from {d}"
    index.unlink()
    (d / "a.safetensors").write_bytes(b"")
    with pytest.raises(PunetError) as info:
        find_weight_files(d)
    assert str(info.value).endswith(" (found: a.safetensors, s-1.safetensors; pass --variant?)")


def test_record_refusals_count_the_rest(checkpoints, tmp_path):
    from punet import UNetConfig
    from punet.weights import TensorRecord, expected_shapes, validate_records

    config = UNetConfig.from_json(checkpoints["tiny-sd15"] / "config.json")
    shapes = expected_shapes(config)
    f1, f2 = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    records = [TensorRecord(k, f1, "float32", s, 0, 0) for k, s in shapes.items()]
    keys = list(shapes)
    extra2 = [TensorRecord(f"x{i}", f1, "float32", (1,), 0, 0) for i in range(2)]

    def refused(recs) -> str:
        with pytest.raises(PunetError) as info:
            validate_records(recs, config, "W")
        return str(info.value)

    assert refused(records[1:]) == f"W: missing tensor {keys[0]!r} (required by config.json)"
    assert refused(records[2:]) == f"W: missing tensor {keys[0]!r} and 1 more (required by config.json)"
    assert refused(records[3:]) == f"W: missing tensor {keys[0]!r} and 2 more (required by config.json)"
    assert refused(records + extra2) == "W: unexpected tensor 'x0' and 1 more (not in the model config.json describes)"
    extra = [TensorRecord(f"x{i}", f1, "float32", (1,), 0, 0) for i in range(3)]
    assert refused(records + extra[:1]) == "W: unexpected tensor 'x0' (not in the model config.json describes)"
    assert refused(records + extra) == "W: unexpected tensor 'x0' and 2 more (not in the model config.json describes)"
    twice = records + [TensorRecord(keys[5], f2, "float32", shapes[keys[5]], 0, 0)]
    assert refused(twice) == f"W: tensor {keys[5]!r} appears twice (a.safetensors and b.safetensors)"
    validate_records(records, config, "W")


def test_import_errors_name_the_model_folder(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(checkpoints["tiny-sd15"], folder)
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    del state["conv_in.bias"]
    save_file(state, str(path))
    with pytest.raises(PunetError, match=rf"^{folder.resolve()}: missing tensor 'conv_in.bias' \(required"):
        import_checkpoint(str(folder), tmp_path / "u.irpa")
    original = load_file(str(checkpoints["tiny-sd15"] / path.name))
    state = {k: v.half() if k == "conv_in.weight" else v for k, v in original.items()}
    save_file(state, str(path))
    with pytest.raises(PunetError, match=rf"^{folder.resolve()}: tensors have dtypes \['float16', 'float32'\]"):
        import_checkpoint(str(folder), tmp_path / "u.irpa")


def test_builtin_source_is_written_under_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    src = resolve_source("builtin:tiny-sd15")
    assert src == Source(tmp_path / "xdg" / "punet" / "builtin" / "tiny-sd15-seed0", "builtin:tiny-sd15")
    assert (src.unet_dir / "config.json").is_file()
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    src = resolve_source("builtin:tiny-sd15")
    assert src.unet_dir == tmp_path / "home" / ".cache" / "punet" / "builtin" / "tiny-sd15-seed0"


def test_builtin_cache_of_an_older_config_is_rewritten(tmp_path, monkeypatch):
    """Bug: a built-in checkpoint cached before its config changed (the tiny refiner's projection width did)
    reused as is, so `builtin:NAME` silently meant the old architecture. Reference: `config_dict(NAME)`."""
    from safetensors.torch import load_file

    from punet.builtin import config_dict, write_checkpoint

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    new = config_dict("tiny-sdxl-refiner")
    folder = resolve_source("builtin:tiny-sdxl-refiner").unet_dir
    write_checkpoint(folder, {**new, "projection_class_embeddings_input_dim": 24 + 5 * 8})
    src = resolve_source("builtin:tiny-sdxl-refiner")
    assert src.unet_dir == folder and json.loads((folder / "config.json").read_text()) == new
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    assert weights["add_embedding.linear_1.weight"].shape == (64, 1280 + 5 * 8)
    written = (folder / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    resolve_source("builtin:tiny-sdxl-refiner")  # an up-to-date cache is used as is
    assert (folder / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == written


def test_folder_without_config(tmp_path):
    with pytest.raises(PunetError) as info:
        resolve_source(str(tmp_path))
    unet = tmp_path / "unet"
    assert str(info.value) == f"{tmp_path}: no config.json here or in {unet} (expected a diffusers UNet folder)"


def test_path_like_specs_never_reach_the_hub(tmp_path, fake_hub, monkeypatch):
    calls, state = fake_hub
    state["error"] = OSError("hub reached")
    monkeypatch.chdir(tmp_path)
    for spec in ("./name", "/name", "~/no-such-folder-xyz", "noslash", "a/b/c"):
        with pytest.raises(PunetError, match="no such folder, and not a Hugging Face repo id"):
            resolve_source(spec)
    assert calls == []


def test_import_passes_revision_and_variant_to_the_hub(tmp_path, fake_hub):
    from .conftest import diffusers_tiny

    calls, state = fake_hub
    state["snapshot"] = snap = tmp_path / "snapshots" / "c0ffee"
    diffusers_tiny("tiny-sd15").to(torch.float16).save_pretrained(snap / "unet", variant="fp16")
    said = []
    meta = import_checkpoint("org/pipe", tmp_path / "u.irpa", revision="v2", variant="fp16", progress=said.append)
    assert calls == [("org/pipe", "v2", _patterns("fp16"))]
    assert meta["revision"] == "c0ffee" and meta["variant"] == "fp16" and meta["dtype"] == "float16"
    assert said[0] == "downloading the UNet of org/pipe (revision v2) from the Hugging Face hub"


def test_import_reports_progress_and_provenance(checkpoints, tmp_path):
    """on_tensor counts 1..n of n; the last message names the output; provenance is recorded."""
    import datetime

    import iree.runtime as rt

    src = checkpoints["tiny-sd15"]
    out = tmp_path / "u.irpa"
    counts, said = [], []
    meta = import_checkpoint(str(src), out, dtype="float16", progress=said.append,
                             on_tensor=lambda i, n: counts.append((i, n)))
    n = meta["num_tensors"]
    assert counts == [(i, n) for i in range(1, n + 1)]
    assert said[-1] == f"writing {out}"
    created = datetime.datetime.fromisoformat(meta["created"])
    assert created.utcoffset() == datetime.timedelta(0) and meta["created"].endswith("+00:00")
    assert abs(datetime.datetime.now(datetime.timezone.utc) - created) < datetime.timedelta(minutes=5)
    assert meta["source_dir"] == str(src.resolve()) and read_metadata(out) == meta
    index = rt.ParameterIndex()
    index.load(str(out))
    assert dict(index.items())["__punet__"].metadata == b"punet-metadata"
