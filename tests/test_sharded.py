"""Tensor- and data-parallel punet in torch eager (N ranks simulated), the plan, and `punet shard` archives.

References: punet's float model on the same weights (itself checked against diffusers), and the
unsharded archive's bytes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from punet.artifacts import rank_irpa_path
from punet.builtin import random_state_dict
from punet.config import UNetConfig
from punet.errors import PunetError
from punet.model import GuidedUNet, UNet2DConditionModel
from punet.model.layers import GEGLU, BasicTransformerBlock, ResnetBlock2D
from punet.sharded import DataParallelUNet, EagerComm, ShardedUNet, make_plan, split_tensor
from punet.sharded.archive import shard_archive
from punet.signature import Signature, make_inputs

from .conftest import MICRO_SDXL, rel_l2, run_cli

# MICRO_SDXL with 4 heads per level, so that it splits over 4 ranks too.
MICRO_SDXL_4 = {**MICRO_SDXL, "attention_head_dim": [4, 4]}


def _float_model(config_dict: dict, seed: int = 0) -> tuple[UNetConfig, UNet2DConditionModel]:
    config = UNetConfig.from_dict(config_dict)
    model = UNet2DConditionModel(config).eval()
    model.load_state_dict(random_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}, seed))
    return config, model


def _sharded(config: UNetConfig, model: UNet2DConditionModel, tp: int) -> ShardedUNet:
    plan = make_plan(config, tp)
    sharded = ShardedUNet(config, plan, EagerComm(tp)).eval()
    state = model.state_dict()
    for r, local in enumerate(sharded.ranks):
        local.load_state_dict({k: split_tensor(v, plan.splits[k], tp, r) for k, v in state.items()}, strict=True)
    return sharded


# ---- the plan ---------------------------------------------------------------------------------


def test_plan_covers_every_weight_and_calls_one_all_reduce_per_split_layer():
    config, model = _float_model(MICRO_SDXL)
    plan = make_plan(config, 2)
    assert set(plan.splits) == set(model.state_dict())
    resnets = sum(isinstance(m, ResnetBlock2D) for m in model.modules())
    blocks = sum(isinstance(m, BasicTransformerBlock) for m in model.modules())
    assert len(plan.all_reduces) == resnets + 3 * blocks == 8 + 3 * 4  # attn1, attn2, ff per transformer block
    s = plan.splits
    p = "down_blocks.1.attentions.0.transformer_blocks.0"
    assert (s[f"{p}.attn1.to_q.weight"].dim, s[f"{p}.attn1.to_out.0.weight"].dim, s[f"{p}.attn1.to_out.0.bias"].dim) \
        == (0, 1, None)
    assert (s[f"{p}.ff.net.0.proj.weight"].dim, s[f"{p}.ff.net.0.proj.weight"].halves, s[f"{p}.ff.net.2.weight"].dim) \
        == (0, 2, 1)
    r = "up_blocks.0.resnets.0"
    assert [s[f"{r}.{w}"].dim for w in ("norm1.weight", "conv1.weight", "norm2.weight", "conv2.weight", "conv2.bias",
                                        "conv_shortcut.weight", "time_emb_proj.weight")] == [None, 0, 0, 1, None, 1, 0]
    for key in ("conv_in.weight", "conv_out.weight", "time_embedding.linear_1.weight", "add_embedding.linear_2.weight",
                "down_blocks.0.downsamplers.0.conv.weight", "up_blocks.0.upsamplers.0.conv.weight",
                f"{p.rsplit('.', 2)[0]}.proj_in.weight"):
        assert not plan.is_sharded(key) and plan.reasons[key] != "replicated", key
    # The plan is data: it survives JSON (the sharded archive stores it so).
    assert make_plan(config, 2).to_dict() == json.loads(json.dumps(plan.to_dict()))


@pytest.mark.parametrize(
    "tp, message",
    [
        (4, ("--tp 4: layer down_blocks.1.attentions.0.transformer_blocks.0.attn1 (attention) has 2 heads, "
             "not divisible by 4")),
        (3, "--tp 3: expected one of 2, 4, 8"),
        (8, "--tp 8: layer down_blocks.1.attentions.0.transformer_blocks.0.attn1 (attention) has 2 heads"),
    ],
)
def test_a_rank_count_that_does_not_divide_is_refused_naming_the_layer(tp, message):
    with pytest.raises(PunetError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        make_plan(UNetConfig.from_dict(MICRO_SDXL), tp)


def test_groups_are_split_on_group_boundaries():
    config = UNetConfig.from_dict({**MICRO_SDXL_4, "norm_num_groups": 4})
    with pytest.raises(PunetError, match=r"^--tp 8: layer down_blocks.0.resnets.0 \(resnet\) has 4 norm groups"):
        make_plan(config, 8)


def test_geglu_halves_split_alike():
    """Rank r's GEGLU slice computes exactly features r of the float GEGLU's output."""
    torch.manual_seed(0)
    full = GEGLU(8, 12)
    x = torch.randn(3, 8)
    plan = make_plan(UNetConfig.from_dict(MICRO_SDXL), 2)
    split = plan.splits["down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight"]
    parts = []
    for r in range(2):
        local = GEGLU(8, 6)
        local.load_state_dict({k: split_tensor(v, split, 2, r) for k, v in full.state_dict().items()})
        parts.append(local(x))
    torch.testing.assert_close(torch.cat(parts, dim=-1), full(x), rtol=0, atol=0)


# ---- eager sharded execution -------------------------------------------------------------------


@pytest.mark.parametrize("config_dict, tp", [(MICRO_SDXL, 2), (MICRO_SDXL_4, 2), (MICRO_SDXL_4, 4)])
def test_sharded_eager_equals_the_float_model(config_dict, tp):
    config, model = _float_model(config_dict)
    sharded = _sharded(config, model, tp)
    x = make_inputs(config, Signature(2, 64, 48))
    with torch.inference_mode():
        ref, out = model(**x), sharded(**x)
    assert rel_l2(out, ref) <= 1e-5
    # Exactly the plan's all-reduces, each once.
    assert sorted(sharded.comm.log) == sorted(sharded.plan.all_reduces)


def test_sharded_cfg_and_data_parallel_cfg_equal_the_float_cfg_step():
    config, model = _float_model(MICRO_SDXL)
    x = make_inputs(config, Signature(1, 64, 64, cfg=True))
    with torch.inference_mode():
        ref = GuidedUNet(model)(**x)
        tp = GuidedUNet(_sharded(config, model, 2))(**x)
        dp = GuidedUNet(DataParallelUNet([model, model], EagerComm(2)))(**x)
    assert rel_l2(tp, ref) <= 1e-5
    assert rel_l2(dp, ref) <= 1e-5


def test_sharded_eager_fp16_stays_as_close_as_the_float_model():
    config, model = _float_model(MICRO_SDXL)
    x = make_inputs(config, Signature(1, 64, 64))
    with torch.inference_mode():
        ref = model(**x)
        half = {k: v.half() if k in ("sample", "encoder_hidden_states", "text_embeds") else v for k, v in x.items()}
        f16 = model.half()(**half).float()
        sharded16 = _sharded(config, model, 2).half()(**half).float()
    assert rel_l2(sharded16, ref) <= 2 * rel_l2(f16, ref) + 1e-4


# ---- punet shard archives -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def micro_irpa(tmp_path_factory) -> Path:
    from diffusers import UNet2DConditionModel as DiffusersUNet

    from punet.weights import import_checkpoint

    root = tmp_path_factory.mktemp("sharded")
    ref = DiffusersUNet(**MICRO_SDXL_4).eval()
    ref.load_state_dict(random_state_dict({k: tuple(v.shape) for k, v in ref.state_dict().items()}, 0))
    ref.save_pretrained(root / "micro")
    import_checkpoint(str(root / "micro"), root / "unet.irpa")
    return root / "unet.irpa"


@pytest.mark.parametrize("tp", [2, 4])
def test_shard_writes_one_slice_per_rank_of_every_split_tensor(micro_irpa, tmp_path, tp):
    from punet.weights import load_irpa, load_model, read_metadata, read_tensors

    out = tmp_path / f"unet.tp{tp}.irpa"
    meta = shard_archive(micro_irpa, tp, out)
    config, whole = load_irpa(micro_irpa)
    plan = make_plan(config, tp)
    main = read_tensors(out)
    ranks = [read_tensors(rank_irpa_path(out, r)) for r in range(tp)]
    # Every key once per rank: replicated keys in the main file only, each split key once in every rank file.
    assert set(main) == {k for k in whole if not plan.is_sharded(k)}
    for r, tensors in enumerate(ranks):
        assert sorted(tensors) == sorted(f"{k}.rank{r}" for k in whole if plan.is_sharded(k))
        for k in whole:
            if plan.is_sharded(k):
                assert torch.equal(tensors[f"{k}.rank{r}"], split_tensor(whole[k], plan.splits[k], tp, r))
    # Each rank file holds 1/N of the split weights: at most 1/N + the replicated share + 5% of the archive.
    size = micro_irpa.stat().st_size
    replicated_share = out.stat().st_size / size
    for r in range(tp):
        assert rank_irpa_path(out, r).stat().st_size <= (1 / tp + replicated_share + 0.05) * size
    # Read back whole: the same bytes as the unsharded archive; the same metadata plus the plan.
    _, back = load_irpa(out)
    assert back.keys() == whole.keys() and all(torch.equal(back[k], whole[k]) for k in whole)
    assert read_metadata(out)["weights_sha256"] == meta["weights_sha256"] == read_metadata(micro_irpa)["weights_sha256"]
    # Eager from the sharded archive: the ranks simulated, equal to the float model.
    model, _ = load_model(micro_irpa)
    sharded, _ = load_model(out)
    assert isinstance(sharded, ShardedUNet) and sharded.plan.tp == tp
    x = make_inputs(config, Signature(1, 64, 64))
    with torch.inference_mode():
        assert rel_l2(sharded(**x), model(**x)) <= 1e-5


def test_shard_cli_and_its_mistakes(micro_irpa, tmp_path):
    out = tmp_path / "u.tp2.irpa"
    r = run_cli("shard", str(micro_irpa), "--tp", "2", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "attention" in r.stdout and "1 all-reduce, after to_out.0" in r.stdout and "wrote u.tp2.irpa" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.tp2.irpa", "u.tp2.rank0.irpa", "u.tp2.rank1.irpa"]

    r = run_cli("shard", str(out), "--tp", "2", "-o", str(tmp_path / "again.irpa"))
    assert r.returncode == 1 and r.stderr.strip() == (
        f"punet shard: error: {out}: already sharded (--tp 2); shard the unsharded archive")
    r = run_cli("shard", str(micro_irpa), "--tp", "3")
    assert r.returncode == 2 and "--tp: invalid choice: 3" in r.stderr
    r = run_cli("shard", str(micro_irpa), "--tp", "8", "-o", str(tmp_path / "eight.irpa"))
    assert r.returncode == 1 and r.stderr.strip() == (
        "punet shard: error: --tp 8: layer down_blocks.1.attentions.0.transformer_blocks.0.attn1 (attention) "
        "has 4 heads, not divisible by 8")
    # Nothing half-written after a refusal.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["u.tp2.irpa", "u.tp2.rank0.irpa", "u.tp2.rank1.irpa"]


def test_a_missing_or_foreign_rank_file_is_one_line_naming_it(micro_irpa, tmp_path):
    from punet.weights import load_model

    a, b = tmp_path / "a" / "u.tp2.irpa", tmp_path / "b" / "u.tp2.irpa"
    shard_archive(micro_irpa, 2, a)
    shard_archive(micro_irpa, 4, b)
    rank1 = rank_irpa_path(a, 1)
    rank1.rename(tmp_path / "away.irpa")
    with pytest.raises(PunetError, match=f"^{rank1}: rank file 1 of 2 of u.tp2.irpa is missing"):
        load_model(a)
    rank_irpa_path(b, 1).rename(rank1)  # rank 1 of a --tp 4 archive
    with pytest.raises(PunetError, match=f"^{rank1}: rank file of a --tp 4 archive, u.tp2.irpa is --tp 2"):
        load_model(a)
    shutil.copy(rank_irpa_path(a, 0), rank1)  # rank 0 where rank 1 belongs
    with pytest.raises(PunetError, match=rf"^{rank1}: not rank 1 of a punet sharded archive"):
        load_model(a)
    shutil.move(tmp_path / "away.irpa", rank1)
    rank_irpa_path(a, 0).unlink()
    r = run_cli("run", str(a), "--height", "64", "--width", "64", "-o", str(tmp_path / "o.safetensors"))
    assert r.returncode == 1 and r.stderr.strip().startswith(f"punet run: error: {rank_irpa_path(a, 0)}: rank file 0")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"dp": 2}, "--dp 2 splits the CFG step's two halves over two devices: it needs --cfg"),
        ({"dp": 2, "cfg": True, "tp": 2}, "--tp 2 with --dp 2: one strategy at a time"),
        ({"tp": 2, "scheduled": True}, "a sharded or data-parallel module is not yet exported as a serving or scheduled"),
        ({"tp": 3}, "tp must be 1, 2, 4 or 8 ranks, got 3"),
        ({"dp": 4, "cfg": True}, "dp must be 1 or 2 (the CFG step's two halves), got 4"),
    ],
)
def test_the_signature_says_how_many_devices_and_refuses_what_is_not_built(kwargs, message):
    with pytest.raises(PunetError) as e:
        Signature(1, 64, 64, **kwargs)
    assert str(e.value).startswith(message)
    assert Signature(1, 64, 64, tp=4).devices == 4 and Signature(1, 64, 64, cfg=True, dp=2).devices == 2


def test_export_takes_the_archives_rank_count(micro_irpa, tmp_path):
    from punet.export import export_mlir

    sharded = tmp_path / "unet.tp2.irpa"
    shard_archive(micro_irpa, 2, sharded)
    with pytest.raises(PunetError, match=f"^{sharded}: sharded for --tp 2, not 4$"):
        export_mlir(sharded, sig=Signature(1, 64, 64, tp=4))
    with pytest.raises(PunetError, match=f"^{sharded}: --dp 2 replicates the weights: export the unsharded archive$"):
        export_mlir(sharded, sig=Signature(1, 64, 64, cfg=True, dp=2))
    with pytest.raises(PunetError, match=rf"^{micro_irpa}: not a sharded archive; split it first: punet shard "):
        export_mlir(micro_irpa, sig=Signature(1, 64, 64, tp=2))


def test_an_archive_with_tensors_the_plan_does_not_know_is_refused(micro_irpa, tmp_path):
    """A quantized archive (scales beside weights) has no split rules yet: one line, no files written."""
    from punet.sharded.archive import _ArchiveWriter
    from punet.weights import METADATA_KEY, read_metadata, read_tensors

    odd = tmp_path / "odd.irpa"
    writer = _ArchiveWriter(odd)
    try:
        for key, t in read_tensors(micro_irpa).items():
            writer.add(key, t)
        writer.add("conv_in.weight_scale", torch.ones(1))
        writer.write(METADATA_KEY, read_metadata(micro_irpa))
    finally:
        writer.close()
    with pytest.raises(PunetError, match=f"^{odd}: tensor 'conv_in.weight_scale' is not in the float model's plan"):
        shard_archive(odd, 2, tmp_path / "out" / "odd.tp2.irpa")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
