"""Model configuration: one frozen dataclass and a registry of named presets.

A config is plain data (ints, floats, strings, tuples) so it round-trips through JSON and is
stored beside the arrays of every checkpoint (`maxnucl.checkpoints`).  Per-layer FFN widths live
in `ffn_widths`; a pruned checkpoint or a layer-wise FFN-allocation experiment simply carries a
non-uniform tuple (an entry of 0 means that layer has no FFN branch at all).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Optional

# gemma2: sequential block with 4 (1 + scale) norms; gemma3: the same with QK-norm; llama: sequential
# pre-norm block with 2 plain-scale norms (Llama, Mistral, Qwen2, SmolLM2); palm: parallel block.
FAMILIES = ("gemma2", "gemma3", "llama", "palm")
EMBEDDING_SCALES = ("sqrt_d", "none")
LOGIT_SCALES = ("none", "inv_sqrt_d")
# Numerics each family's checkpoints assume, for the fields a config leaves None (a config written
# before the field existed, too).  Gemma: lookup x sqrt(d), norms applied as (1 + scale); PaLM:
# logits / sqrt(d); Llama: neither.
FAMILY_DEFAULTS = {
    "gemma2": dict(embedding_scale="sqrt_d", norm_offset=True, logit_scale="none"),
    "gemma3": dict(embedding_scale="sqrt_d", norm_offset=True, logit_scale="none"),
    "llama": dict(embedding_scale="none", norm_offset=False, logit_scale="none"),
    "palm": dict(embedding_scale="none", norm_offset=False, logit_scale="inv_sqrt_d"),
}
# ("linear", factor) | ("llama3", factor, low_freq_factor, high_freq_factor, original_max_positions)
ROPE_SCALING_KINDS = {"linear": 2, "llama3": 5}
DTYPES = ("float32", "bfloat16", "float16")
ACTIVATIONS = ("gelu_tanh", "silu")
ATTENTION_KINDS = ("local", "global")
REMAT_POLICIES = ("none", "full", "save_dots")
# xla: the [T, S] score matrix; chunked: online softmax over key blocks with a recomputing
# backward (maxnucl/layers/chunked_attention.py); auto: chunked from AUTO_CHUNKED_LENGTH tokens
ATTENTION_IMPLS = ("auto", "xla", "chunked", "splash", "cudnn", "pallas_gpu")

# Plausibility bounds of a config read from a file (the largest released models are far inside
# them): a typo such as num_layers = 10**12 is refused at once instead of building (or hanging
# on) an impossible model.
MAX_LAYERS = 1 << 12
MAX_WIDTH = 1 << 20  # d_model, FFN widths, num_heads x head_dim
MAX_VOCAB = 1 << 24
MAX_POSITIONS = 1 << 24
MAX_PARAMS = 10 ** 13


class ConfigError(ValueError):
  """A model config field has a value the model cannot be built from."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder-only transformer.

  Notation (the NUCL paper's): d = `d_model` (the paper's n), m_i = `ffn_widths[i]` (the paper's
  m), N = `num_heads`, K = `num_kv_heads`, H = `head_dim`.
  """

  name: str
  family: str  # one of FAMILIES
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  ffn_dim: int  # default width of every layer's FFN (m)
  ffn_widths: Optional[tuple[int, ...]] = None  # per-layer widths; None = ffn_dim everywhere
  activation: str = "gelu_tanh"  # gate nonlinearity of the gated FFN (GeGLU / SwiGLU)
  query_pre_attn_scalar: Optional[float] = None  # scores scaled by this**-0.5; None = head_dim
  attn_logit_softcap: Optional[float] = None
  final_logit_softcap: Optional[float] = None
  sliding_window: Optional[int] = None  # W: query i sees key j iff i - W < j <= i on local layers
  attention_pattern: tuple[str, ...] = ("global",)  # cycled over layers: ("local", "global")
  rope_theta: float = 10_000.0
  # RoPE base of the local (sliding-window) layers when it differs from the global layers'
  # (Gemma-3: 10k local, 1M global); None = rope_theta on every layer.
  rope_local_theta: Optional[float] = None
  # Frequency scaling of RoPE (see ROPE_SCALING_KINDS), on the global layers and, when
  # rope_local_theta is None, on every layer: Llama-3.1's "llama3", Gemma-3's "linear".
  rope_scaling: Optional[tuple] = None
  qkv_bias: bool = False  # biases on the q, k, v projections (Qwen2)
  qk_norm: bool = False  # RMSNorm over head_dim of queries and keys before RoPE (Gemma-3)
  # Output projection shares the input embedding; False: a separate lm_head/embedding [V, d].
  tie_embeddings: bool = True
  # None = the family's (FAMILY_DEFAULTS): embedding lookup scale, norm scale stored as s and
  # applied as 1 + s (norm_offset) or as is, and the logits' scale.
  embedding_scale: Optional[str] = None
  norm_offset: Optional[bool] = None
  logit_scale: Optional[str] = None
  norm_eps: float = 1e-6
  max_positions: int = 8192
  pad_id: int = 0
  eos_id: int = 1
  bos_id: int = 2
  dtype: str = "float32"  # activation / compute dtype
  param_dtype: str = "float32"
  dropout_rate: float = 0.0  # residual-branch dropout, active only when a dropout rng is given
  remat_policy: str = "none"  # rematerialisation of each decoder layer in the backward pass
  # Run the layer stack under jax.lax.scan (compile time independent of depth); the params tree
  # and the function computed are the same either way (maxnucl.models.decoder).
  scan_layers: bool = True
  attention_impl: str = "auto"  # one of ATTENTION_IMPLS (training and prefill; same results)

  def __post_init__(self):
    # Tuples, not lists, so configs stay hashable (they are static arguments to jit).
    for field in ("ffn_widths", "attention_pattern", "rope_scaling"):
      value = getattr(self, field)
      if isinstance(value, list):
        object.__setattr__(self, field, tuple(value))
    for field, value in FAMILY_DEFAULTS.get(self.family, {}).items():
      if getattr(self, field) is None:
        object.__setattr__(self, field, value)
    self.validate()

  # ---- derived per-layer structure -------------------------------------------------------------

  @property
  def layer_ffn_widths(self) -> tuple[int, ...]:
    """FFN inner width of each layer (0 = no FFN)."""
    if self.ffn_widths is None:
      return (self.ffn_dim,) * self.num_layers
    return self.ffn_widths

  @property
  def layer_attention_kinds(self) -> tuple[str, ...]:
    """'local' (sliding window) or 'global' for each layer; Gemma-2: even layers are local."""
    pattern = self.attention_pattern
    return tuple(pattern[i % len(pattern)] for i in range(self.num_layers))

  @property
  def layer_windows(self) -> tuple[Optional[int], ...]:
    return tuple(self.sliding_window if kind == "local" else None
                 for kind in self.layer_attention_kinds)

  def layer_rope(self, index: int) -> tuple[float, Optional[tuple]]:
    """(RoPE base, RoPE scaling) of layer `index`."""
    if self.rope_local_theta is not None and self.layer_attention_kinds[index] == "local":
      return self.rope_local_theta, None
    return self.rope_theta, self.rope_scaling

  @property
  def attn_scale(self) -> float:
    scalar = self.query_pre_attn_scalar or self.head_dim
    return float(scalar) ** -0.5

  # ---- validation and (de)serialisation -------------------------------------------------------

  def validate(self) -> None:
    """Types, ranges, finiteness and plausibility of every field (one ConfigError naming the
    first bad field): a config read from a file is untrusted input (docs/checkpoints.md)."""
    def fail(field: str, expected: str):
      raise ConfigError(
          f"model config {self.name!r}: field {field!r} = {getattr(self, field)!r}; "
          f"expected {expected}")

    def is_int(value) -> bool:
      return isinstance(value, int) and not isinstance(value, bool)

    def is_number(value) -> bool:
      return (isinstance(value, (int, float)) and not isinstance(value, bool)
              and math.isfinite(value))

    if not isinstance(self.name, str):
      fail("name", "a string")
    if self.family not in FAMILIES:
      fail("family", f"one of {FAMILIES}")
    for field, largest in (("vocab_size", MAX_VOCAB), ("d_model", MAX_WIDTH),
                           ("num_layers", MAX_LAYERS), ("num_heads", MAX_WIDTH),
                           ("num_kv_heads", MAX_WIDTH), ("head_dim", MAX_WIDTH)):
      value = getattr(self, field)
      if not is_int(value) or not 0 < value <= largest:
        fail(field, f"an integer in [1, {largest}]")
    if not is_int(self.ffn_dim) or not 0 <= self.ffn_dim <= MAX_WIDTH:
      fail("ffn_dim", f"an integer in [0, {MAX_WIDTH}]")
    if self.num_heads % self.num_kv_heads:
      fail("num_kv_heads", f"a divisor of num_heads={self.num_heads}")
    if self.head_dim % 2:
      fail("head_dim", "an even number (RoPE rotates pairs of dimensions)")
    if self.num_heads * self.head_dim > MAX_WIDTH:
      fail("head_dim", f"num_heads x head_dim <= {MAX_WIDTH}")
    if self.ffn_widths is not None:
      if not isinstance(self.ffn_widths, tuple):
        fail("ffn_widths", f"None or a list of num_layers={self.num_layers} widths")
      if len(self.ffn_widths) != self.num_layers:
        fail("ffn_widths", f"a list of num_layers={self.num_layers} widths, got "
             f"{len(self.ffn_widths)}")
      bad = [i for i, w in enumerate(self.ffn_widths) if not is_int(w) or not 0 <= w <= MAX_WIDTH]
      if bad:
        fail("ffn_widths", f"integers in [0, {MAX_WIDTH}] (layer {bad[0]} is not)")
    for field in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap",
                  "rope_local_theta"):
      value = getattr(self, field)
      if value is not None and (not is_number(value) or value <= 0):
        fail(field, "None or a finite positive number")
    if not is_number(self.rope_theta) or self.rope_theta <= 0:
      fail("rope_theta", "a finite positive number (the RoPE base)")
    if not is_number(self.norm_eps) or not 0 < self.norm_eps <= 1:
      fail("norm_eps", "a finite number in (0, 1]")
    if self.sliding_window is not None and (not is_int(self.sliding_window)
                                            or self.sliding_window <= 0):
      fail("sliding_window", "None or a positive integer")
    if not is_int(self.max_positions) or not 0 < self.max_positions <= MAX_POSITIONS:
      fail("max_positions", f"an integer in [1, {MAX_POSITIONS}]")
    for field in ("pad_id", "eos_id", "bos_id"):
      value = getattr(self, field)
      if not is_int(value) or not 0 <= value < self.vocab_size:
        fail(field, f"a token id in [0, vocab_size={self.vocab_size})")
    if not isinstance(self.attention_pattern, tuple):
      fail("attention_pattern", f"a non-empty list of {ATTENTION_KINDS}")
    if self.activation not in ACTIVATIONS:
      fail("activation", f"one of {ACTIVATIONS}")
    if not self.attention_pattern or any(not isinstance(k, str) or k not in ATTENTION_KINDS
                                         for k in self.attention_pattern):
      fail("attention_pattern", f"a non-empty sequence of {ATTENTION_KINDS}")
    if "local" in self.attention_pattern and not self.sliding_window:
      fail("sliding_window", "a positive window size when attention_pattern has 'local' layers")
    for field in ("dtype", "param_dtype"):
      if getattr(self, field) not in DTYPES:
        fail(field, f"one of {DTYPES}")
    if not is_number(self.dropout_rate) or not 0.0 <= self.dropout_rate < 1.0:
      fail("dropout_rate", "a rate in [0, 1)")
    if self.rope_scaling is not None:
      kind = (self.rope_scaling[0] if isinstance(self.rope_scaling, tuple) and self.rope_scaling
              else None)
      if (not isinstance(kind, str) or kind not in ROPE_SCALING_KINDS or len(self.rope_scaling) != ROPE_SCALING_KINDS[kind]
          or not all(is_number(v) and v > 0 for v in self.rope_scaling[1:])):
        fail("rope_scaling", "None, ('linear', factor) or ('llama3', factor, low_freq_factor, "
             "high_freq_factor, original_max_positions) with positive numbers")
    if self.estimated_params() > MAX_PARAMS:
      fail("num_layers", f"a model of at most {MAX_PARAMS:.0e} parameters (this one has about "
           f"{self.estimated_params():.1e}: d_model={self.d_model}, ffn widths up to "
           f"{max(self.layer_ffn_widths)}, vocab_size={self.vocab_size})")
    if self.embedding_scale not in EMBEDDING_SCALES:
      fail("embedding_scale", f"one of {EMBEDDING_SCALES}")
    if self.logit_scale not in LOGIT_SCALES:
      fail("logit_scale", f"one of {LOGIT_SCALES}")
    for field in ("qkv_bias", "qk_norm", "tie_embeddings", "norm_offset"):
      if not isinstance(getattr(self, field), bool):
        fail(field, "True or False")
    if self.remat_policy not in REMAT_POLICIES:
      fail("remat_policy", f"one of {REMAT_POLICIES}")
    if not isinstance(self.scan_layers, bool):
      fail("scan_layers", "True or False")
    if self.attention_impl not in ATTENTION_IMPLS:
      fail("attention_impl", f"one of {ATTENTION_IMPLS}")
    if self.attention_impl == "cudnn" and self.attn_logit_softcap is not None:
      fail("attention_impl", f"not 'cudnn' with attn_logit_softcap = {self.attn_logit_softcap} "
           f"(cuDNN's fused attention has no logit soft-cap; Gemma-2 needs 'auto', 'chunked', "
           f"'splash' or 'xla')")

  def estimated_params(self) -> int:
    """Parameters, to within the norms and biases: embedding(s), attention and FFN matrices."""
    d, heads = self.d_model, (self.num_heads + self.num_kv_heads) * self.head_dim
    embeddings = self.vocab_size * d * (1 if self.tie_embeddings is True else 2)
    return embeddings + sum(2 * d * heads + 3 * d * m for m in self.layer_ffn_widths)

  def replace(self, **overrides: Any) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(self)}
    unknown = sorted(set(overrides) - known)
    if unknown:
      raise ConfigError(f"model config {self.name!r}: unknown field(s) {unknown}; "
                        f"known fields: {sorted(known)}")
    # Changing the depth or the default width of a uniform model keeps it uniform.
    if self.ffn_widths is None or "num_layers" in overrides or "ffn_dim" in overrides:
      overrides.setdefault("ffn_widths", None)
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    for field in ("ffn_widths", "attention_pattern", "rope_scaling"):
      if out[field] is not None:
        out[field] = list(out[field])
    return out

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
    if not isinstance(data, dict):
      raise ConfigError(f"model config: expected a JSON object of fields, got "
                        f"{type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
      raise ConfigError(f"model config: unknown field(s) {unknown}")
    missing = sorted(f.name for f in dataclasses.fields(cls)
                     if f.name not in data and f.default is dataclasses.MISSING)
    if missing:
      raise ConfigError(f"model config: missing required field(s) {missing}")
    return cls(**data)

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ---- presets --------------------------------------------------------------------------------------

PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def register_preset(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
  PRESETS[fn.__name__] = fn
  return fn


def _gemma2(name: str, **shape) -> ModelConfig:
  # Every field passed explicitly: see docs/gemma2.md.
  return ModelConfig(name=name, family="gemma2", vocab_size=256_000, activation="gelu_tanh",
                     attn_logit_softcap=50.0, final_logit_softcap=30.0, sliding_window=4096,
                     attention_pattern=("local", "global"), rope_theta=10_000.0,
                     norm_eps=1e-6, max_positions=8192, **shape)


@register_preset
def gemma2_2b():
  return _gemma2("gemma2_2b", d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4,
                 head_dim=256, ffn_dim=9216, query_pre_attn_scalar=256)


@register_preset
def gemma2_9b():
  return _gemma2("gemma2_9b", d_model=3584, num_layers=42, num_heads=16, num_kv_heads=8,
                 head_dim=256, ffn_dim=14336, query_pre_attn_scalar=256)


@register_preset
def gemma2_27b():
  # query_pre_attn_scalar = d_model / num_heads = 144, not head_dim (128).
  return _gemma2("gemma2_27b", d_model=4608, num_layers=46, num_heads=32, num_kv_heads=16,
                 head_dim=128, ffn_dim=36864, query_pre_attn_scalar=144)


@register_preset
def gemma2_tiny():
  """A few-hundred-thousand-parameter Gemma-2 for tests and CPU demos (byte-level vocabulary)."""
  return ModelConfig(name="gemma2_tiny", family="gemma2", vocab_size=384, d_model=64,
                     num_layers=4, num_heads=4, num_kv_heads=2, head_dim=16, ffn_dim=256,
                     activation="gelu_tanh", query_pre_attn_scalar=16, attn_logit_softcap=50.0,
                     final_logit_softcap=30.0, sliding_window=16,
                     attention_pattern=("local", "global"), max_positions=512)


@register_preset
def gemma2_small():
  """A 48M-parameter Gemma-2 (16M of them the 32k embedding) for single-GPU experiments and
  benchmarks."""
  return ModelConfig(name="gemma2_small", family="gemma2", vocab_size=32_000, d_model=512,
                     num_layers=8, num_heads=8, num_kv_heads=4, head_dim=64, ffn_dim=2048,
                     activation="gelu_tanh", query_pre_attn_scalar=64, attn_logit_softcap=50.0,
                     final_logit_softcap=30.0, sliding_window=256,
                     attention_pattern=("local", "global"), max_positions=2048)


def _palm(name: str, **shape) -> ModelConfig:
  # PaLM (Chowdhery et al. 2022): SwiGLU with d_ff = 4 d, multi-query attention (K = 1), head 256,
  # RoPE, no biases, shared embedding with 1/sqrt(d) output scaling, vocabulary 256k.
  return ModelConfig(name=name, family="palm", vocab_size=256_000, num_kv_heads=1,
                     activation="silu", attention_pattern=("global",), **shape)


@register_preset
def palm_8b():
  return _palm("palm_8b", d_model=4096, num_layers=32, num_heads=16, head_dim=256,
               ffn_dim=4 * 4096)


@register_preset
def palm_62b():
  return _palm("palm_62b", d_model=8192, num_layers=64, num_heads=32, head_dim=256,
               ffn_dim=4 * 8192)


@register_preset
def palm_540b():
  return _palm("palm_540b", d_model=18432, num_layers=118, num_heads=48, head_dim=256,
               ffn_dim=4 * 18432)


@register_preset
def palm_tiny():
  return ModelConfig(name="palm_tiny", family="palm", vocab_size=384, d_model=64, num_layers=4,
                     num_heads=4, num_kv_heads=1, head_dim=16, ffn_dim=256, activation="silu",
                     attention_pattern=("global",), max_positions=512)


@register_preset
def palm_small():
  return ModelConfig(name="palm_small", family="palm", vocab_size=32_000, d_model=512,
                     num_layers=8, num_heads=8, num_kv_heads=1, head_dim=64, ffn_dim=2048,
                     activation="silu", attention_pattern=("global",), max_positions=2048)


# ---- Gemma-3 (text decoder; docs/models.md) ------------------------------------------------------

def _gemma3(name: str, **shape) -> ModelConfig:
  # Gemma-3 technical report and the released config.json files: Gemma-2's block with QK-norm
  # in place of both soft-caps, 5 local : 1 global layers, RoPE base 10k local / 1M global.
  shape.setdefault("vocab_size", 262_208)
  return ModelConfig(name=name, family="gemma3", activation="gelu_tanh", qk_norm=True,
                     attention_pattern=("local",) * 5 + ("global",), rope_theta=1_000_000.0,
                     rope_local_theta=10_000.0, norm_eps=1e-6, **shape)


@register_preset
def gemma3_270m():
  return _gemma3("gemma3_270m", vocab_size=262_144, d_model=640, num_layers=18, num_heads=4,
                 num_kv_heads=1, head_dim=256, ffn_dim=2048, query_pre_attn_scalar=256,
                 sliding_window=512, max_positions=32_768)


@register_preset
def gemma3_1b():
  return _gemma3("gemma3_1b", vocab_size=262_144, d_model=1152, num_layers=26, num_heads=4,
                 num_kv_heads=1, head_dim=256, ffn_dim=6912, query_pre_attn_scalar=256,
                 sliding_window=512, max_positions=32_768)


@register_preset
def gemma3_4b():
  return _gemma3("gemma3_4b", d_model=2560, num_layers=34, num_heads=8, num_kv_heads=4,
                 head_dim=256, ffn_dim=10240, query_pre_attn_scalar=256, sliding_window=1024,
                 rope_scaling=("linear", 8.0), max_positions=131_072)


@register_preset
def gemma3_12b():
  return _gemma3("gemma3_12b", d_model=3840, num_layers=48, num_heads=16, num_kv_heads=8,
                 head_dim=256, ffn_dim=15360, query_pre_attn_scalar=256, sliding_window=1024,
                 rope_scaling=("linear", 8.0), max_positions=131_072)


@register_preset
def gemma3_27b():
  # query_pre_attn_scalar = d_model / num_heads = 168, not head_dim (128), as Gemma-2 27B.
  return _gemma3("gemma3_27b", d_model=5376, num_layers=62, num_heads=32, num_kv_heads=16,
                 head_dim=128, ffn_dim=21504, query_pre_attn_scalar=168, sliding_window=1024,
                 rope_scaling=("linear", 8.0), max_positions=131_072)


@register_preset
def gemma3_tiny():
  """A Gemma-3 of a few hundred thousand parameters (6 layers: one full 5:1 period)."""
  return ModelConfig(name="gemma3_tiny", family="gemma3", vocab_size=384, d_model=64,
                     num_layers=6, num_heads=4, num_kv_heads=2, head_dim=16, ffn_dim=256,
                     activation="gelu_tanh", qk_norm=True, query_pre_attn_scalar=16,
                     sliding_window=16, attention_pattern=("local",) * 5 + ("global",),
                     rope_theta=1_000_000.0, rope_local_theta=10_000.0, max_positions=512)


# ---- Llama family (Llama-2/3.1, Mistral, Qwen2, SmolLM2; docs/models.md) --------------------------

LLAMA3_ROPE_SCALING = ("llama3", 8.0, 1.0, 4.0, 8192)


def _llama(name: str, **shape) -> ModelConfig:
  # Sequential pre-norm blocks, plain-scale RMSNorm, SwiGLU, no logit scaling or soft-caps.
  shape.setdefault("norm_eps", 1e-5)
  return ModelConfig(name=name, family="llama", activation="silu", **shape)


def _smollm2(name: str, **shape) -> ModelConfig:
  # HuggingFaceTB/SmolLM2-*: tied embeddings, vocabulary 49152, <|endoftext|> = 0 in the base
  # models (the instruct models' GGUF/config.json carry their own special ids).
  return _llama(name, vocab_size=49_152, head_dim=64, tie_embeddings=True, max_positions=8192,
                pad_id=0, eos_id=0, bos_id=0, **shape)


@register_preset
def smollm2_135m():
  return _smollm2("smollm2_135m", d_model=576, num_layers=30, num_heads=9, num_kv_heads=3,
                  ffn_dim=1536, rope_theta=100_000.0)


@register_preset
def smollm2_360m():
  return _smollm2("smollm2_360m", d_model=960, num_layers=32, num_heads=15, num_kv_heads=5,
                  ffn_dim=2560, rope_theta=100_000.0)


@register_preset
def smollm2_1_7b():
  return _smollm2("smollm2_1_7b", d_model=2048, num_layers=24, num_heads=32, num_kv_heads=32,
                  ffn_dim=8192, rope_theta=130_000.0)


@register_preset
def llama2_7b():
  return _llama("llama2_7b", vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32,
                num_kv_heads=32, head_dim=128, ffn_dim=11008, rope_theta=10_000.0,
                tie_embeddings=False, max_positions=4096, pad_id=0, eos_id=2, bos_id=1)


def _llama3_1(name: str, **shape) -> ModelConfig:
  # meta-llama/Llama-3.1-*: vocabulary 128256, RoPE base 500k with Llama-3.1's scaling, untied,
  # <|begin_of_text|> 128000, <|end_of_text|> 128001, <|finetune_right_pad_id|> 128004.
  return _llama(name, vocab_size=128_256, num_kv_heads=8, head_dim=128, rope_theta=500_000.0,
                rope_scaling=LLAMA3_ROPE_SCALING, tie_embeddings=False, max_positions=131_072,
                pad_id=128_004, eos_id=128_001, bos_id=128_000, **shape)


@register_preset
def llama3_1_8b():
  return _llama3_1("llama3_1_8b", d_model=4096, num_layers=32, num_heads=32, ffn_dim=14336)


@register_preset
def llama3_1_70b():
  return _llama3_1("llama3_1_70b", d_model=8192, num_layers=80, num_heads=64, ffn_dim=28672)


@register_preset
def mistral_7b():
  # Mistral-7B-v0.1: every layer attends over a 4096-token sliding window.
  return _llama("mistral_7b", vocab_size=32_000, d_model=4096, num_layers=32, num_heads=32,
                num_kv_heads=8, head_dim=128, ffn_dim=14336, rope_theta=10_000.0,
                sliding_window=4096, attention_pattern=("local",), tie_embeddings=False,
                max_positions=32_768, pad_id=0, eos_id=2, bos_id=1)


@register_preset
def qwen2_7b():
  return _llama("qwen2_7b", vocab_size=152_064, d_model=3584, num_layers=28, num_heads=28,
                num_kv_heads=4, head_dim=128, ffn_dim=18944, rope_theta=1_000_000.0,
                norm_eps=1e-6, qkv_bias=True, tie_embeddings=False, max_positions=131_072,
                pad_id=151_643, eos_id=151_643, bos_id=151_643)


@register_preset
def llama_tiny():
  """A Llama-family model of a few hundred thousand parameters (GQA, untied head) for tests."""
  return _llama("llama_tiny", vocab_size=384, d_model=64, num_layers=4, num_heads=4,
                num_kv_heads=2, head_dim=16, ffn_dim=256, rope_theta=10_000.0,
                tie_embeddings=False, max_positions=512)


def get_config(name: str, **overrides: Any) -> ModelConfig:
  """A named preset with optional field overrides, e.g. `get_config("gemma2_2b", num_layers=2)`."""
  if name not in PRESETS:
    raise ConfigError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
  cfg = PRESETS[name]()
  return cfg.replace(**overrides) if overrides else cfg
