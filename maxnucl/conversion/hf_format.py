"""What every Hugging Face causal LM that maxnucl converts shares: the tensor layout, the export
modes for per-layer FFN widths, and the spec (`HfArchitecture`) each architecture fills in.

HF stores every Linear as (out_features, in_features); maxnucl kernels are einsum-shaped:
  model.embed_tokens.weight               (V, d)     -> embedder/embedding          [V, d]
  lm_head.weight (untied only)            (V, d)     -> lm_head/embedding           [V, d]
  model.layers.{i}.self_attn.q_proj       (N*H, d)   -> layers_i/attn/q             [d, N, H]
  model.layers.{i}.self_attn.k_proj/v     (K*H, d)   -> layers_i/attn/k, v          [d, K, H]
  model.layers.{i}.self_attn.{q,k,v}_proj.bias (n*H) -> layers_i/attn/{q,k,v}_bias  [n, H] (Qwen2)
  model.layers.{i}.self_attn.q_norm/k_norm (H,)      -> layers_i/attn/{query,key}_norm/scale
  model.layers.{i}.self_attn.o_proj       (d, N*H)   -> layers_i/attn/o             [N, H, d]
  model.layers.{i}.mlp.gate_proj          (m, d)     -> layers_i/mlp/gate  (U)      [d, m]
  model.layers.{i}.mlp.up_proj            (m, d)     -> layers_i/mlp/up    (V)      [d, m]
  model.layers.{i}.mlp.down_proj          (d, m)     -> layers_i/mlp/out   (W)      [m, d]
  model.layers.{i}.<norm>.weight          (d,)       -> layers_i/<norm>/scale  (spec's layer_norms)
  model.norm.weight                                  -> final_norm/scale
Norm weights copy unchanged: each architecture's HF class applies them as maxnucl's family does
(Gemma: 1 + w; Llama: w).  RoPE is half-split on both sides (HF's rotate_half), so q/k need only
the reshape.  A layer of FFN width 0 has no mlp tensors and none of its FFN branch's norms.

Per-layer FFN widths (m_i, 0 = no FFN: a pruned model) have no place in HF's single
`intermediate_size`; `hf_export` writes them as FFN_WIDTHS_EXPORTS[name] says: "refuse", "pad"
(every layer zero-padded to the widest: a plain HF model, same function) or "custom_code" (each
layer at its width: `intermediate_sizes` in config.json and the model code of
maxnucl/conversion/hf_custom_code beside it, loaded with trust_remote_code=True).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Iterator, Optional

import numpy as np

from maxnucl import ffn
from maxnucl.conversion import hf_custom_code
from maxnucl.models.config import ModelConfig

_Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]
# maxnucl leaf path -> (HF name, to_maxnucl(hf_array, cfg), to_hf(array, cfg))
TensorMap = dict[tuple[str, ...], tuple[str, _Transform, _Transform]]


# ---- the layout ---------------------------------------------------------------------------------

def _heads(kind: str, cfg: ModelConfig) -> int:
  return cfg.num_heads if kind == "q" else cfg.num_kv_heads


def _projection(kind: str) -> tuple[_Transform, _Transform]:
  def to_maxnucl(w, cfg):  # (n*H, d) -> [d, n, H]
    return w.reshape(_heads(kind, cfg), cfg.head_dim, cfg.d_model).transpose(2, 0, 1)

  def to_hf(w, cfg):  # [d, n, H] -> (n*H, d)
    return w.transpose(1, 2, 0).reshape(_heads(kind, cfg) * cfg.head_dim, cfg.d_model)
  return to_maxnucl, to_hf


def _bias(kind: str) -> tuple[_Transform, _Transform]:
  def to_maxnucl(b, cfg):  # (n*H,) -> [n, H]
    return b.reshape(_heads(kind, cfg), cfg.head_dim)

  def to_hf(b, cfg):  # [n, H] -> (n*H,)
    return b.reshape(-1)
  return to_maxnucl, to_hf


def _o_to_maxnucl(w, cfg):  # (d, N*H) -> [N, H, d]
  return w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.d_model)


def _o_to_hf(w, cfg):  # [N, H, d] -> (d, N*H)
  return w.transpose(2, 0, 1).reshape(cfg.d_model, cfg.num_heads * cfg.head_dim)


def _transpose(w, cfg):
  return w.T


def _same(w, cfg):
  return w


def hf_axes(path: tuple[str, ...]) -> tuple[int, ...]:
  """The axis permutation inside `to_hf` of leaf `path`: to_hf(w) is
  w.transpose(hf_axes(path)) followed by a reshape that merges adjacent axes (free in C order),
  so an exporter can have the transpose done while reading."""
  if path[-1] in ("q", "k", "v"):  # [d, n, H] -> [n, H, d]
    return (1, 2, 0)
  if path[-1] == "o":  # [N, H, d] -> [d, N, H]
    return (2, 0, 1)
  if path[-2:-1] == ("mlp",):  # [d, m] -> [m, d], [m, d] -> [d, m]
    return (1, 0)
  return (0,) if path[0] == "final_norm" or path[-1] == "scale" else (0, 1)


def tensor_map(cfg: ModelConfig, layer_norms: dict[str, str]) -> TensorMap:
  """Every maxnucl leaf path -> (HF tensor name, to_maxnucl, to_hf), in checkpoint order.

  layer_norms: maxnucl norm name -> HF module name of the architecture's per-layer norms."""
  out: TensorMap = {("embedder", "embedding"): ("model.embed_tokens.weight", _same, _same)}
  for i in range(cfg.num_layers):
    out.update(_layer_tensors(cfg, i, layer_norms))
  out[("final_norm", "scale")] = ("model.norm.weight", _same, _same)
  if not cfg.tie_embeddings:
    out[("lm_head", "embedding")] = ("lm_head.weight", _same, _same)
  return out


def _layer_tensors(cfg: ModelConfig, i: int, layer_norms: dict[str, str]) -> TensorMap:
  layer, hf, width = ffn.layer_name(i), f"model.layers.{i}", cfg.layer_ffn_widths[i]
  out: TensorMap = {}
  for kind in ("q", "k", "v"):
    out[(layer, "attn", kind)] = (f"{hf}.self_attn.{kind}_proj.weight", *_projection(kind))
    if cfg.qkv_bias:
      out[(layer, "attn", f"{kind}_bias")] = (f"{hf}.self_attn.{kind}_proj.bias", *_bias(kind))
  if cfg.qk_norm:
    for ours, theirs in (("query_norm", "q_norm"), ("key_norm", "k_norm")):
      out[(layer, "attn", ours, "scale")] = (f"{hf}.self_attn.{theirs}.weight", _same, _same)
  out[(layer, "attn", "o")] = (f"{hf}.self_attn.o_proj.weight", _o_to_maxnucl, _o_to_hf)
  for ours, theirs in layer_norms.items():
    if width or "ffw" not in ours:  # an FFN-less layer has no FFN norms
      out[(layer, ours, "scale")] = (f"{hf}.{theirs}.weight", _same, _same)
  if width:
    for ours, theirs in ((ffn.GATE, "gate_proj"), (ffn.UP, "up_proj"), (ffn.OUT, "down_proj")):
      out[(layer, "mlp", ours)] = (f"{hf}.mlp.{theirs}.weight", _transpose, _transpose)
  return out


def iter_params_from_hf(mapping: TensorMap, cfg: ModelConfig,
                        get_tensor: Callable[[str], np.ndarray]
                        ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """(maxnucl path, array) pairs, reading one HF tensor at a time through `get_tensor(name)`."""
  for path, (hf_name, to_maxnucl, _) in mapping.items():
    yield path, to_maxnucl(np.asarray(get_tensor(hf_name)), cfg)


def params_from_hf_state(mapping: TensorMap, cfg: ModelConfig,
                         state: dict[str, np.ndarray]) -> dict:
  """Whole-model convenience over `iter_params_from_hf` (tests, small models)."""
  params: dict = {}
  for path, array in iter_params_from_hf(mapping, cfg, lambda name: state[name]):
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = array
  return params


def hf_state_from_params(mapping: TensorMap, cfg: ModelConfig,
                         params: dict) -> dict[str, np.ndarray]:
  """The HF state dict (without a tied lm_head) for maxnucl params."""
  out = {}
  for path, (hf_name, _, to_hf) in mapping.items():
    node = params
    for key in path:
      node = node[key]
    out[hf_name] = np.ascontiguousarray(to_hf(np.asarray(node), cfg))
  return out


# ---- config.json fields every architecture reads alike -------------------------------------------

def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


MAX_SIZE = 2**31 - 1  # sizes, counts and ids: int32, as XLA indexes arrays and token ids

# What each config.json field must be, when present and not null (a field is validated wherever it
# is read, by `with_defaults`): (description, test).
_COUNT = ("an integer in [1, 2**31)", lambda v: _is_int(v) and 1 <= v <= MAX_SIZE)
_NATURAL = ("an integer in [0, 2**31)", lambda v: _is_int(v) and 0 <= v <= MAX_SIZE)
_POSITIVE = ("a finite number > 0", lambda v: _is_number(v) and v > 0)
_BOOL = ("true or false", lambda v: isinstance(v, bool))
_STRING = ("a string", lambda v: isinstance(v, str))
_OBJECT = ("an object", lambda v: isinstance(v, dict))
_STRINGS = ("a list of strings", lambda v: isinstance(v, list) and all(
    isinstance(x, str) for x in v))
_WIDTHS = ("a list of integers in [0, 2**31)", lambda v: isinstance(v, list) and all(
    _NATURAL[1](x) for x in v))
_IDS = ("a token id (an integer in [0, 2**31)) or a non-empty list of them",
        lambda v: _NATURAL[1](v) or (isinstance(v, list) and v and all(map(_NATURAL[1], v))))
FIELDS = {
    "model_type": _STRING, "architectures": _STRINGS, "vocab_size": _COUNT,
    "hidden_size": _COUNT, "intermediate_size": _COUNT, "intermediate_sizes": _WIDTHS,
    "num_hidden_layers": _COUNT, "num_attention_heads": _COUNT, "num_key_value_heads": _COUNT,
    "head_dim": _COUNT, "max_position_embeddings": _COUNT, "sliding_window": _COUNT,
    "sliding_window_pattern": _COUNT, "max_window_layers": _NATURAL, "layer_types": _STRINGS,
    "rms_norm_eps": _POSITIVE, "rope_theta": _POSITIVE, "rope_local_base_freq": _POSITIVE,
    "partial_rotary_factor": _POSITIVE, "query_pre_attn_scalar": _POSITIVE,
    "attn_logit_softcapping": _POSITIVE, "final_logit_softcapping": _POSITIVE,
    "pad_token_id": _NATURAL, "bos_token_id": _NATURAL, "eos_token_id": _IDS,
    "tie_word_embeddings": _BOOL, "attention_bias": _BOOL, "mlp_bias": _BOOL,
    "use_sliding_window": _BOOL, "use_bidirectional_attention": _BOOL,
    "hidden_act": _STRING, "hidden_activation": _STRING, "rope_parameters": _OBJECT,
    "rope_scaling": _OBJECT,
}


def short(value) -> str:
  """A config value as JSON, cut to 60 characters (for one-line messages)."""
  try:
    text = json.dumps(value, allow_nan=True)
  except (TypeError, ValueError):
    text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def with_defaults(hf: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
  """config.json's fields over `defaults` (the transformers config class's own defaults for what
  a config.json may leave out: an absent field reads as transformers reads it; an explicit null
  stays null), every field of FIELDS checked for its type and range (ValueError naming it)."""
  hf = {**defaults, **hf}
  for field, (expected, valid) in FIELDS.items():
    value = hf.get(field)
    if value is not None and not valid(value):
      raise ValueError(f"config.json: {field} is {short(value)}; expected {expected}")
  for role in ("pad", "bos", "eos"):
    ids = hf.get(f"{role}_token_id")
    if ids is not None and hf.get("vocab_size") is not None and any(
        i >= hf["vocab_size"] for i in (ids if isinstance(ids, list) else [ids])):
      raise ValueError(f"config.json: {role}_token_id is {short(ids)}; expected ids below "
                       f"vocab_size {hf['vocab_size']}")
  return hf


def refuse_true(hf: dict[str, Any], field: str, why: str) -> None:
  """A boolean field whose true value the architecture's maxnucl model does not compute."""
  if hf.get(field):
    raise ValueError(f"config.json: {field} true; {why}")


def first_id(value) -> int:
  """A token id of config.json (eos_token_id may be a list: its first)."""
  return int(value[0] if isinstance(value, (list, tuple)) else value)


def need(hf: dict[str, Any], field: str, what: str) -> Any:
  if hf.get(field) is None:
    raise KeyError(f"config.json: missing field {field!r} (needed for a {what} model)")
  return hf[field]


def ffn_widths_from_hf(hf: dict[str, Any], num_layers: int) -> Optional[tuple[int, ...]]:
  """`intermediate_sizes` of a custom_code export (layer i's FFN width), else None."""
  widths = hf.get("intermediate_sizes")
  if widths is not None and len(widths) != num_layers:
    raise ValueError(f"config.json: intermediate_sizes has {len(widths)} entries for "
                     f"{num_layers} layers")
  return None if widths is None else tuple(int(w) for w in widths)


def attention_pattern_from_layer_types(layer_types: list[str], num_layers: int
                                       ) -> tuple[str, ...]:
  """config.json's `layer_types` ("sliding_attention" / "full_attention" per layer)."""
  kinds = {"sliding_attention": "local", "full_attention": "global"}
  if len(layer_types) != num_layers:
    raise ValueError(f"config.json: layer_types has {len(layer_types)} entries for "
                     f"{num_layers} layers")
  unknown = sorted(set(layer_types) - set(kinds))
  if unknown:
    raise ValueError(f"config.json: layer_types has {unknown[0]!r}; expected "
                     f"'sliding_attention' or 'full_attention'")
  return shortest_period(tuple(kinds[t] for t in layer_types))


def shortest_period(pattern: tuple[str, ...]) -> tuple[str, ...]:
  """The shortest prefix of `pattern` that, cycled, gives `pattern` (ModelConfig.attention_pattern
  is cycled over the layers, and one period is what a scanned stack repeats)."""
  for period in range(1, len(pattern) + 1):
    if all(kind == pattern[i % period] for i, kind in enumerate(pattern)):
      return pattern[:period]
  return pattern


def layer_types(cfg: ModelConfig) -> list[str]:
  return ["sliding_attention" if k == "local" else "full_attention"
          for k in cfg.layer_attention_kinds]


def rope_from_hf(params: dict[str, Any], field: str, theta: float, max_positions: int
                 ) -> tuple[float, Optional[tuple]]:
  """(RoPE base, ModelConfig.rope_scaling) of one rope_parameters dict (`field` names it in
  errors; `theta`: the base when the dict has none)."""
  if not isinstance(params, dict):
    raise ValueError(f"config.json: {field} is {short(params)}; expected an object")
  kind = params.get("rope_type", params.get("type", "default"))
  partial = params.get("partial_rotary_factor", 1.0)
  if partial != 1.0:
    raise ValueError(f"config.json: {field}.partial_rotary_factor {short(partial)}; maxnucl "
                     f"rotates every dimension of a head (1.0)")

  def number(key, default=None, check=_POSITIVE):
    value = params.get(key, default)
    if value is None:
      raise ValueError(f"config.json: {field}.{key} is missing (needed for rope_type "
                       f"{kind!r})")
    if not check[1](value):
      raise ValueError(f"config.json: {field}.{key} is {short(value)}; expected {check[0]}")
    return value

  theta = float(number("rope_theta", theta))
  if kind == "default":
    return theta, None
  if kind == "linear":
    return theta, ("linear", float(number("factor")))
  if kind == "llama3":
    return theta, ("llama3", float(number("factor")), float(number("low_freq_factor")),
                   float(number("high_freq_factor")),
                   int(number("original_max_position_embeddings", max_positions, _COUNT)))
  raise ValueError(f"config.json: {field}.rope_type {short(kind)}; maxnucl implements "
                   f"'default', 'linear' and 'llama3'")


def rope_to_hf(theta: float, scaling: Optional[tuple]) -> dict[str, Any]:
  """The rope_parameters dict of (RoPE base, ModelConfig.rope_scaling)."""
  if scaling is None:
    return {"rope_type": "default", "rope_theta": theta}
  if scaling[0] == "linear":
    return {"rope_type": "linear", "factor": scaling[1], "rope_theta": theta}
  _, factor, low, high, original = scaling
  return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
          "high_freq_factor": high, "original_max_position_embeddings": original,
          "rope_theta": theta}


def special_ids(cfg: ModelConfig) -> dict[str, int]:
  return {"pad_token_id": cfg.pad_id, "eos_token_id": cfg.eos_id, "bos_token_id": cfg.bos_id}


# ---- the spec of one architecture ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HfArchitecture:
  """One Hugging Face causal-LM class that maxnucl converts in both directions.

  architecture / model_type: config.json's `architectures[0]` and `model_type`.
  family: the maxnucl family it reads into (and is written from).
  layer_norms: maxnucl per-layer norm -> HF module name.
  config_from_hf(hf dict, name) -> ModelConfig (errors name the config.json field).
  config_to_hf(cfg) -> the architecture's config.json fields (a plain model: intermediate_size
    is layer 0's width).
  fixed: ModelConfig fields the HF class hard-codes (field -> the only value it computes).
  attention: the attention kinds its layers can have: "global", "local" or "any".
  custom_code: the trust_remote_code model with one FFN width per layer.
  """
  architecture: str
  model_type: str
  family: str
  layer_norms: dict[str, str]
  config_from_hf: Callable[[dict[str, Any], str], ModelConfig]
  config_to_hf: Callable[[ModelConfig], dict[str, Any]]
  fixed: dict[str, Any]
  attention: str
  custom_code: hf_custom_code.CustomCode

  def tensor_map(self, cfg: ModelConfig) -> TensorMap:
    return tensor_map(cfg, self.layer_norms)

  def refusal(self, cfg: ModelConfig) -> Optional[str]:
    """Why this architecture cannot hold `cfg` (the first field it cannot represent), or None."""
    if cfg.family != self.family:
      return f"family {cfg.family!r} (it holds {self.family!r})"
    for field, value in self.fixed.items():
      if getattr(cfg, field) != value:
        return f"{field} = {getattr(cfg, field)!r} (it computes {value!r})"
    kinds = set(cfg.layer_attention_kinds)
    if self.attention != "any" and kinds != {self.attention}:
      return (f"attention_pattern {list(cfg.attention_pattern)} (its layers are all "
              f"{self.attention})")
    return None


# ---- export of per-layer FFN widths --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HfExport:
  """What a Hugging Face directory holds for a maxnucl model.

  cfg: the model its tensors describe (`tensor_map(cfg)`): the exported model's own config, or a
    wider one when FFNs are zero-padded.  config: the config.json dict.  files: name -> text of
    the other files written beside it (custom model code).
  """
  cfg: ModelConfig
  config: dict[str, Any]
  files: dict[str, str] = dataclasses.field(default_factory=dict)


def plain_config(spec: HfArchitecture, cfg: ModelConfig, torch_dtype: str) -> dict[str, Any]:
  return {"architectures": [spec.architecture], "model_type": spec.model_type,
          **spec.config_to_hf(cfg), "torch_dtype": torch_dtype, "dtype": torch_dtype}


def _plain(spec: HfArchitecture, cfg: ModelConfig, torch_dtype: str) -> HfExport:
  return HfExport(cfg, plain_config(spec, cfg, torch_dtype))


def _refuse(spec: HfArchitecture, cfg: ModelConfig, torch_dtype: str) -> HfExport:
  raise ValueError(
      f"model {cfg.name!r} has per-layer FFN widths {list(cfg.layer_ffn_widths)}; Hugging "
      f"Face's {spec.architecture} has a single intermediate_size and every layer has an FFN. "
      f"Choose an export mode with ffn_widths_export (CLI: --ffn_widths_export): 'pad' "
      f"zero-pads every layer to the widest width (zero columns of U, V and zero rows of W "
      f"leave the function unchanged) and writes a plain {spec.architecture}; 'custom_code' "
      f"keeps each layer's width and writes a custom-code model "
      f"(AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)). Or keep the "
      f"maxnucl checkpoint.")


def _pad(spec: HfArchitecture, cfg: ModelConfig, torch_dtype: str) -> HfExport:
  widest = max(cfg.layer_ffn_widths)
  if not widest:
    raise ValueError(f"model {cfg.name!r} has no FFN in any layer; ffn_widths_export='pad' "
                     f"would write intermediate_size 0: use 'custom_code'")
  return _plain(spec, cfg.replace(ffn_dim=widest, ffn_widths=None), torch_dtype)


def _custom_code(spec: HfArchitecture, cfg: ModelConfig, torch_dtype: str) -> HfExport:
  code = spec.custom_code
  config = {**plain_config(spec, cfg, torch_dtype), "model_type": code.model_type,
            "architectures": [code.architecture], "auto_map": dict(code.auto_map),
            "intermediate_size": cfg.ffn_dim, "intermediate_sizes": list(cfg.layer_ffn_widths)}
  return HfExport(cfg, config, code.sources())


# How maxnucl_to_hf writes a model whose layers' FFN widths differ (or include 0):
# name -> fn(spec, cfg, torch_dtype) -> HfExport.
FFN_WIDTHS_EXPORTS = {"refuse": _refuse, "pad": _pad, "custom_code": _custom_code}


def hf_export(spec: HfArchitecture, cfg: ModelConfig, torch_dtype: str = "float32", *,
              ffn_widths_export: str = "refuse") -> HfExport:
  """The Hugging Face form of `cfg` as `spec`: a plain model when every layer has the same
  nonzero FFN width (whatever `ffn_widths_export` says), else as
  FFN_WIDTHS_EXPORTS[ffn_widths_export] writes it.  Raises ValueError for what it cannot
  represent."""
  refusal = spec.refusal(cfg)
  if refusal:
    raise ValueError(f"model {cfg.name!r} cannot be written as Hugging Face's "
                     f"{spec.architecture}: {refusal}")
  if ffn_widths_export not in FFN_WIDTHS_EXPORTS:
    raise ValueError(f"ffn_widths_export {ffn_widths_export!r}; expected one of "
                     f"{sorted(FFN_WIDTHS_EXPORTS)}")
  widths = set(cfg.layer_ffn_widths)
  if len(widths) == 1 and 0 not in widths:
    return _plain(spec, cfg, torch_dtype)
  return FFN_WIDTHS_EXPORTS[ffn_widths_export](spec, cfg, torch_dtype)
