"""Model configuration: one frozen dataclass and a registry of named presets.

A config is plain data (ints, floats, strings, tuples) so it round-trips through JSON and is
stored beside the arrays of every checkpoint (`maxnucl.checkpoints`).  Per-layer FFN widths live
in `ffn_widths`; a pruned checkpoint or a layer-wise FFN-allocation experiment simply carries a
non-uniform tuple (an entry of 0 means that layer has no FFN branch at all).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Optional

FAMILIES = ("gemma2", "palm")
DTYPES = ("float32", "bfloat16", "float16")
ACTIVATIONS = ("gelu_tanh", "silu")
ATTENTION_KINDS = ("local", "global")
REMAT_POLICIES = ("none", "full", "save_dots")
# xla: the [T, S] score matrix; chunked: online softmax over key blocks with a recomputing
# backward (maxnucl/layers/chunked_attention.py); auto: chunked from AUTO_CHUNKED_LENGTH tokens
ATTENTION_IMPLS = ("auto", "xla", "chunked", "splash", "cudnn", "pallas_gpu")


class ConfigError(ValueError):
  """A model config field has a value the model cannot be built from."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and numerics of a decoder-only transformer.

  Notation (the NUCL paper's): d = `d_model` (the paper's n), m_i = `ffn_widths[i]` (the paper's
  m), N = `num_heads`, K = `num_kv_heads`, H = `head_dim`.
  """

  name: str
  family: str  # "gemma2": sequential block with 4 norms; "palm": parallel attention+FFN block
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
    for field in ("ffn_widths", "attention_pattern"):
      value = getattr(self, field)
      if isinstance(value, list):
        object.__setattr__(self, field, tuple(value))
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

  @property
  def attn_scale(self) -> float:
    scalar = self.query_pre_attn_scalar or self.head_dim
    return float(scalar) ** -0.5

  # ---- validation and (de)serialisation -------------------------------------------------------

  def validate(self) -> None:
    def fail(field: str, expected: str):
      raise ConfigError(
          f"model config {self.name!r}: field {field!r} = {getattr(self, field)!r}; "
          f"expected {expected}")

    if self.family not in FAMILIES:
      fail("family", f"one of {FAMILIES}")
    for field in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads",
                  "head_dim"):
      if not isinstance(getattr(self, field), int) or getattr(self, field) <= 0:
        fail(field, "a positive integer")
    if not isinstance(self.ffn_dim, int) or self.ffn_dim < 0:
      fail("ffn_dim", "a non-negative integer")
    if self.num_heads % self.num_kv_heads:
      fail("num_kv_heads", f"a divisor of num_heads={self.num_heads}")
    if self.head_dim % 2:
      fail("head_dim", "an even number (RoPE rotates pairs of dimensions)")
    if self.ffn_widths is not None:
      if len(self.ffn_widths) != self.num_layers:
        fail("ffn_widths", f"a list of num_layers={self.num_layers} widths, got "
             f"{len(self.ffn_widths)}")
      bad = [i for i, w in enumerate(self.ffn_widths) if not isinstance(w, int) or w < 0]
      if bad:
        fail("ffn_widths", f"non-negative integers (layer {bad[0]} is not)")
    if self.activation not in ACTIVATIONS:
      fail("activation", f"one of {ACTIVATIONS}")
    if not self.attention_pattern or any(k not in ATTENTION_KINDS
                                         for k in self.attention_pattern):
      fail("attention_pattern", f"a non-empty sequence of {ATTENTION_KINDS}")
    if "local" in self.attention_pattern and not self.sliding_window:
      fail("sliding_window", "a positive window size when attention_pattern has 'local' layers")
    for field in ("dtype", "param_dtype"):
      if getattr(self, field) not in DTYPES:
        fail(field, f"one of {DTYPES}")
    if not 0.0 <= self.dropout_rate < 1.0:
      fail("dropout_rate", "a rate in [0, 1)")
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
    for field in ("ffn_widths", "attention_pattern"):
      if out[field] is not None:
        out[field] = list(out[field])
    return out

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
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


def get_config(name: str, **overrides: Any) -> ModelConfig:
  """A named preset with optional field overrides, e.g. `get_config("gemma2_2b", num_layers=2)`."""
  if name not in PRESETS:
    raise ConfigError(f"unknown model preset {name!r}; known presets: {sorted(PRESETS)}")
  cfg = PRESETS[name]()
  return cfg.replace(**overrides) if overrides else cfg
