"""Print punet-vs-diffusers parity figures for every tiny family (what tests/test_model.py asserts).

    python bench/parity.py
"""

from __future__ import annotations

import torch

from punet import UNetConfig, UNet2DConditionModel
from punet.builtin import TINY_CONFIGS, config_dict, random_state_dict
from punet.eager import call_model, diffusers_call
from punet.signature import Signature, make_inputs


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def main() -> None:
    from diffusers import UNet2DConditionModel as DiffusersUNet

    torch.set_num_threads(2)
    print(f"{'family':18} {'batch':>5} {'t':>9} {'fp32 maxabs/max|ref|':>21} | {'dtype':5} {'punet err':>10} {'diffusers err':>13} {'ratio':>6}")
    for name in TINY_CONFIGS:
        d = config_dict(name)
        ref = DiffusersUNet(**{k: v for k, v in d.items() if not k.startswith("_")}).eval()
        ref.load_state_dict(random_state_dict({k: tuple(v.shape) for k, v in ref.state_dict().items()}, 0))
        ours = UNet2DConditionModel(UNetConfig.from_dict(d)).eval()
        ours.load_state_dict(ref.state_dict(), strict=True)
        for t in (0, 10, 999):
            for batch, ts in ((1, [t]), (2, [t, 500])):
                x = make_inputs(ours.config, Signature(batch, 128, 128, tokens=7), 1)
                x["timestep"] = torch.tensor(ts, dtype=torch.float32)
                gold = diffusers_call(ref, x)
                err = (call_model(ours, x) - gold).abs().max().item() / gold.abs().max().item()
                print(f"{name:18} {batch:5} {str(ts):>9} {err:21.2e}")
        x = make_inputs(ours.config, Signature(2, 128, 128, tokens=7), 1)
        x["timestep"] = torch.tensor([999.0, 10.0])
        gold = diffusers_call(ref, x)
        for dtype in (torch.bfloat16, torch.float16):
            low = {k: v.to(dtype) if k in ("sample", "encoder_hidden_states", "text_embeds") else v for k, v in x.items()}
            e_ref = rel_l2(diffusers_call(ref.to(dtype), low).float(), gold)
            e_our = rel_l2(call_model(ours.to(dtype), low).float(), gold)
            ref.float(), ours.float()
            print(f"{name:18} {2:5} {'[999, 10]':>9} {'':21} | {str(dtype)[6:]:5} {e_our:10.2e} {e_ref:13.2e} {e_our / e_ref:6.2f}")


if __name__ == "__main__":
    main()
