"""The one contract between stages: inputs, dtypes, parameter scope, entry names.

Every stage (run, export, compile, runtime, bench) builds its tensors and
checks its files through this module, so the names, shapes and dtypes of
the UNet's inputs are written down exactly once.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch

from .config import UNetConfig
from .errors import PunetError

# Parameter scope of every external weight: #flow.parameter.named<"model"::"<key>">.
SCOPE = "model"
# Entry functions of the exported module.
ENTRY_MAIN = "main"
ENTRY_CFG = "main_cfg"
# The entries shark-ai's SDXL server (shortfin_apps.sd) calls: the scheduled UNet's, and the CFG UNet's.
ENTRY_INITIALIZE = "run_initialize"
ENTRY_FORWARD = "run_forward"
ENTRY_SERVING = "main"
# Module names: iree-turbine's default, and the names shark-ai's server configs use.
MODULE_DEFAULT = "module"
MODULE_SERVING = "compiled_punet"
MODULE_SCHEDULED = "compiled_spunet"
# The scheduled UNet's step tables: row n holds the n-step schedule, zero-padded (n <= 99).
TABLE_WIDTH = 100

# The VAE's spatial downscale: latent = pixels / 8.
LATENT_SCALE = 8
DEFAULT_TOKENS = 77
# Pooled text-embedding width of the SDXL text encoder (OpenCLIP bigG).
SDXL_POOLED_WIDTH = 1280

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
# Short names for artifact file names and IREE.
DTYPE_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
# Tensor dtypes an entry may take besides the model dtypes: step counts and indices.
TENSOR_DTYPES: dict[str, torch.dtype] = {**DTYPES, "int64": torch.int64}

INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
CFG_INPUT_NAMES = INPUT_NAMES + ("guidance_scale",)
OUTPUT_NAME = "sample"


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise PunetError(f"unknown dtype {name!r} (expected one of: {', '.join(DTYPES)})") from None


def dtype_name(dtype: torch.dtype) -> str:
    for k, v in DTYPES.items():
        if v == dtype:
            return k
    raise PunetError(f"unsupported dtype {dtype} (expected one of: {', '.join(DTYPES)})")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # a key of DTYPES

    @property
    def torch_dtype(self) -> torch.dtype:
        return TENSOR_DTYPES[self.dtype]


@dataclass(frozen=True)
class Entry:
    """One function of the exported module: its name, arguments in order, and results."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def num_time_ids(config: UNetConfig) -> int:
    """How many SDXL micro-conditioning values `time_ids` holds.

    SDXL base passes 6 (original size, crop, target size); the refiner 5
    (original size, crop, aesthetic score). config.json does not say which,
    so it is read off the projection width with the SDXL pooled text width
    of 1280; any other width is taken as the 6-value layout.
    """
    proj, step = config.projection_class_embeddings_input_dim, config.addition_time_embed_dim
    for n in (6, 5):
        if proj - n * step == SDXL_POOLED_WIDTH:
            return n
    return 6


def text_embeds_width(config: UNetConfig) -> int:
    width = config.projection_class_embeddings_input_dim - num_time_ids(config) * config.addition_time_embed_dim
    if width <= 0:
        raise PunetError(
            f"projection_class_embeddings_input_dim={config.projection_class_embeddings_input_dim} leaves no room "
            f"for text_embeds next to {num_time_ids(config)} time ids of width {config.addition_time_embed_dim}"
        )
    return width


@dataclass(frozen=True)
class Signature:
    """Static shapes of one compiled UNet call."""

    batch: int
    height: int  # pixels
    width: int  # pixels
    dtype: str = "float32"
    tokens: int = DEFAULT_TOKENS
    cfg: bool = False  # classifier-free guidance entry: 2*batch text rows, guided output
    # The CFG entry as shark-ai's server calls it: `main`, conditioning in the model dtype (implies cfg).
    serving: bool = False
    # run_initialize + run_forward: CFG UNet call and Euler step in one function (implies serving).
    scheduled: bool = False
    module_name: str = ""  # "" = the default for the kind: module, compiled_punet, compiled_spunet
    # Quantization scheme of the weights ("" = float; see punet.quant.scheme). Inputs and outputs keep `dtype`.
    quant: str = ""
    fp8: str = ""  # the fp8 element type of a scheme with fp8 attention: float8_e4m3fn or float8_e4m3fnuz
    # Devices (punet/sharded): tp ranks split every layer of a `punet shard --tp N` archive; dp 2 runs the
    # CFG step's negative and positive rows on two devices with the weights replicated.
    tp: int = 1
    dp: int = 1

    def __post_init__(self):
        if self.scheduled:
            object.__setattr__(self, "serving", True)
        if self.serving:
            object.__setattr__(self, "cfg", True)
        if not self.module_name:
            default = MODULE_SCHEDULED if self.scheduled else MODULE_SERVING if self.serving else MODULE_DEFAULT
            object.__setattr__(self, "module_name", default)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.module_name):
            raise PunetError(f"module name {self.module_name!r} must be an identifier (letters, digits, _)")
        if self.batch < 1:
            raise PunetError(f"batch must be >= 1, got {self.batch}")
        for key in ("height", "width"):
            v = getattr(self, key)
            if v < LATENT_SCALE or v % LATENT_SCALE:
                raise PunetError(f"{key} must be a positive multiple of {LATENT_SCALE} pixels, got {v}")
        if self.dtype not in DTYPES:
            raise PunetError(f"unknown dtype {self.dtype!r} (expected one of: {', '.join(DTYPES)})")
        if self.quant or self.fp8:
            from .quant.scheme import FP8_DTYPES, get_scheme

            if get_scheme(self.quant).fp8_attention != bool(self.fp8) or (self.fp8 and self.fp8 not in FP8_DTYPES):
                raise PunetError(f"quantization {self.quant!r} with fp8 type {self.fp8 or 'none'!r}: not a valid pair")
        if self.tp not in (1, 2, 4, 8):
            raise PunetError(f"tp must be 1, 2, 4 or 8 ranks, got {self.tp}")
        if self.dp not in (1, 2):
            raise PunetError(f"dp must be 1 or 2 (the CFG step's two halves), got {self.dp}")
        if self.dp > 1 and (not self.cfg or self.serving):
            raise PunetError("--dp 2 splits the CFG step's two halves over two devices: it needs --cfg")
        if self.devices > 1 and self.serving:
            raise PunetError("a sharded or data-parallel module is not yet exported as a serving or scheduled one")
        if self.tp > 1 and self.dp > 1:
            raise PunetError(f"--tp {self.tp} with --dp {self.dp}: one strategy at a time")
        if self.serving and not self.scheduled and self.dtype == "bfloat16":
            raise PunetError(
                "the serving entry takes its timestep in the model dtype, and bfloat16 rounds timesteps "
                "(999 becomes 1000): export it in float16 or float32, or export --scheduled (timesteps stay float32)"
            )

    @property
    def rows(self) -> int:
        """The UNet's batch rows: a CFG step (serving and scheduled ones too) runs a negative and a positive row per image."""
        return 2 * self.batch if self.cfg else self.batch

    @property
    def devices(self) -> int:
        """How many devices the module runs on (IREE logical devices __device_0 ... __device_{n-1})."""
        return self.tp * self.dp

    @property
    def entry(self) -> str:
        """The one entry of a single-entry module (not of a scheduled one: see `entries`)."""
        if self.scheduled:
            raise PunetError(f"a scheduled module has two entries ({ENTRY_INITIALIZE}, {ENTRY_FORWARD}), not one")
        return ENTRY_SERVING if self.serving else ENTRY_CFG if self.cfg else ENTRY_MAIN

    def entries(self, config: UNetConfig) -> list[Entry]:
        """Every function of the module, in export order."""
        if not self.scheduled:
            return [Entry(self.entry, tuple(self.inputs(config)), (self.output(config),))]
        b, rows, dt = self.batch, self.rows, self.dtype
        latent = self._latent(config.in_channels)
        if not config.has_text_time:
            raise PunetError("a scheduled module is SDXL's: the config needs addition_embed_type 'text_time'")
        text = (
            TensorSpec("prompt_embeds", (rows, self.tokens, config.cross_attention_dim), dt),
            TensorSpec("text_embeds", (rows, text_embeds_width(config)), dt),
        )
        time_ids = TensorSpec("time_ids", (rows, num_time_ids(config)), "float32")
        tables = (TensorSpec("timesteps", (TABLE_WIDTH,), "float32"), TensorSpec("sigmas", (TABLE_WIDTH,), "float32"))
        latents = TensorSpec("latents", (b, *latent), dt)
        return [
            Entry(
                ENTRY_INITIALIZE,
                (TensorSpec("sample", (b, *latent), dt), TensorSpec("num_steps", (1,), "int64")),
                (latents, time_ids, *tables),
            ),
            Entry(
                ENTRY_FORWARD,
                (latents, *text, time_ids, TensorSpec("guidance_scale", (1,), dt), TensorSpec("step_index", (1,), "int64"), *tables),
                (latents,),
            ),
        ]

    def _latent(self, channels: int) -> tuple[int, int, int]:
        return (channels, self.height // LATENT_SCALE, self.width // LATENT_SCALE)

    def inputs(self, config: UNetConfig) -> list[TensorSpec]:
        """Input tensors in the order of the (single) entry function's arguments."""
        if self.scheduled:
            raise PunetError(f"a scheduled module has two entries ({ENTRY_INITIALIZE}, {ENTRY_FORWARD}), not one")
        b, rows = self.batch, self.rows  # text rows: negative then positive prompts under CFG
        # The serving entry takes one timestep and its conditioning in the model dtype, as the server sends them.
        cond = self.dtype if self.serving else "float32"
        specs = [
            TensorSpec("sample", (b, *self._latent(config.in_channels)), self.dtype),
            TensorSpec("timestep", (1,) if self.serving else (b,), cond),
            TensorSpec("encoder_hidden_states", (rows, self.tokens, config.cross_attention_dim), self.dtype),
        ]
        if config.has_text_time:
            specs.append(TensorSpec("text_embeds", (rows, text_embeds_width(config)), self.dtype))
            specs.append(TensorSpec("time_ids", (rows, num_time_ids(config)), cond))
        if self.cfg:
            specs.append(TensorSpec("guidance_scale", (1,), cond))
        return specs

    def output(self, config: UNetConfig) -> TensorSpec:
        return TensorSpec(OUTPUT_NAME, (self.batch, *self._latent(config.out_channels)), self.dtype)

    def to_dict(self) -> dict:
        return asdict(self)


def make_inputs(config: UNetConfig, sig: Signature, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic inputs for `sig`: random latents and text, realistic conditioning."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for spec in sig.inputs(config):
        if spec.name == "timestep":
            t = torch.randint(0, 1000, spec.shape, generator=g).float()
        elif spec.name == "time_ids":
            t = default_time_ids(sig, spec.shape[0], spec.shape[1])
        elif spec.name == "guidance_scale":
            t = torch.tensor([7.5], dtype=torch.float32)
        else:
            t = torch.randn(spec.shape, generator=g, dtype=torch.float32)
        out[spec.name] = t.to(spec.torch_dtype)
    return out


def default_time_ids(sig: Signature, rows: int, n: int) -> torch.Tensor:
    """SDXL micro-conditioning for an uncropped image of the signature's size, float32 (rows, n).

    Original size, crop top-left (0, 0), then the target size (base, 6
    values) or an aesthetic score of 6 (refiner, 5 values).
    """
    h, w = float(sig.height), float(sig.width)
    row = [h, w, 0.0, 0.0, h, w] if n == 6 else [h, w, 0.0, 0.0, 6.0][:n] + [0.0] * max(0, n - 5)
    return torch.tensor(row, dtype=torch.float32).expand(rows, n).clone()


def level_sizes(config: UNetConfig, sig: Signature) -> list[tuple[int, int]]:
    """The (h, w) of each level's feature map, from the latent down: halved once per level by the
    stride-2 3x3 convolution, which rounds up with diffusers' usual padding of 1 and down with
    `downsample_padding` 0 (one row and column of zeros padded on one side, then no padding)."""
    pad = 2 * config.downsample_padding or 1

    def down(n: int) -> int:
        return (n + pad - 3) // 2 + 1

    h, w = -(-sig.height // LATENT_SCALE), -(-sig.width // LATENT_SCALE)
    sizes = [(h, w)]
    for _ in config.down_block_types[1:]:
        h, w = down(h), down(w)
        sizes.append((h, w))
    return sizes


def deepest_latent(config: UNetConfig, sig: Signature) -> tuple[int, int]:
    """The (h, w) of the deepest feature map (`level_sizes`' last)."""
    return level_sizes(config, sig)[-1]


def attention_key_lengths(config: UNetConfig, sig: Signature) -> set[int]:
    """Every key length an attention of the UNet sees: the text tokens, and each level's feature-map
    tokens (self-attention)."""
    return {sig.tokens} | {h * w for h, w in level_sizes(config, sig)}


def check_fits(config: UNetConfig, sig: Signature) -> None:
    """Refuse, in one line, an image size the model's levels shrink to a 1-pixel feature map.

    Eager torch runs any size, but IREE 3.13 cannot compile the stride-2
    convolution that takes a 2x2 map to 1x1 ("'linalg.generic' op inferred
    input/output operand #1 has shape's dimension #2 to be 4, but found 3").
    Sizes that do not halve evenly compile and match eager (9 -> 5 -> 3).
    """
    levels = len(config.down_block_types)
    deepest = deepest_latent(config, sig)
    if min(deepest) >= 2:
        return
    key, px = ("height", sig.height) if deepest[0] < 2 else ("width", sig.width)
    need = 1  # the smallest latent side still >= 2 at the deepest level
    while min(deepest_latent(config, Signature(1, need * LATENT_SCALE, need * LATENT_SCALE))) < 2:
        need += 1
    raise PunetError(
        f"{key} {px} px: the latent ({px // LATENT_SCALE}) is halved {levels - 1} times by the model's {levels} "
        f"levels down to 1x1, which IREE cannot compile; use a {key} of at least {need * LATENT_SCALE} px"
    )


def check_tensors(
    specs: list[TensorSpec],
    tensors: dict[str, torch.Tensor],
    where: str,
    *,
    optional: tuple[str, ...] = (),
    paired: tuple[str, ...] = (),
) -> None:
    """Raise PunetError naming `where` and the key unless `tensors` are exactly `specs`.

    Names in `optional` may be absent; a wrong shape of a name in `paired` (text rows of a CFG
    step) says the rows come negative, then positive.
    """
    expected = [s.name for s in specs]
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise PunetError(f"{where}: unexpected input {extra[0]!r} (expected keys: {', '.join(sorted(expected))})")
    for s in specs:
        if s.name not in tensors:
            if s.name in optional:
                continue
            raise PunetError(f"{where}: missing input {s.name!r} (expected shape {list(s.shape)} {s.dtype})")
        t = tensors[s.name]
        if tuple(t.shape) != s.shape:
            rows = " (negative rows, then positive)" if s.name in paired else ""
            raise PunetError(f"{where}: input {s.name!r} has shape {list(t.shape)}, expected {list(s.shape)}{rows}")
        if t.dtype != s.torch_dtype:
            raise PunetError(f"{where}: input {s.name!r} has dtype {t.dtype}, expected {s.dtype}")


def check_inputs(config: UNetConfig, sig: Signature, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raise PunetError naming `where` and the key unless `tensors` fit `sig`'s single entry exactly."""
    check_tensors(sig.inputs(config), tensors, where)


def shape_of_inputs(tensors: dict[str, torch.Tensor], where: str, rows: str = "B") -> dict:
    """Batch, size, dtype and tokens as a file of inputs has them (`Signature` keywords)."""
    for key in ("sample", "encoder_hidden_states"):
        if key not in tensors:
            raise PunetError(f"{where}: missing input {key!r}")
    sample, ehs = tensors["sample"], tensors["encoder_hidden_states"]
    if sample.dim() != 4 or ehs.dim() != 3:
        raise PunetError(
            f"{where}: 'sample' must be 4-D (B, C, H/8, W/8) and 'encoder_hidden_states' 3-D ({rows}, tokens, D); "
            f"got {list(sample.shape)} and {list(ehs.shape)}"
        )
    return {
        "batch": sample.shape[0],
        "height": sample.shape[2] * LATENT_SCALE,
        "width": sample.shape[3] * LATENT_SCALE,
        "dtype": dtype_name(sample.dtype),
        "tokens": ehs.shape[1],
    }


def signature_from_inputs(config: UNetConfig, tensors: dict[str, torch.Tensor], where: str) -> Signature:
    """Infer the Signature of an inputs file (batch, size, dtype, tokens) and check it."""
    sig = Signature(**shape_of_inputs(tensors, where), cfg="guidance_scale" in tensors)
    check_inputs(config, sig, tensors, where)
    return sig
