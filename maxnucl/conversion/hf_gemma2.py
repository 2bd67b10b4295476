"""Hugging Face `Gemma2ForCausalLM` <-> maxnucl params, one tensor at a time.

HF stores every Linear as (out_features, in_features); maxnucl kernels are einsum-shaped:
  model.embed_tokens.weight               (V, d)     -> embedder/embedding          [V, d]
  model.layers.{i}.self_attn.q_proj       (N*H, d)   -> layers_i/attn/q             [d, N, H]
  model.layers.{i}.self_attn.k_proj/v     (K*H, d)   -> layers_i/attn/k, v          [d, K, H]
  model.layers.{i}.self_attn.o_proj       (d, N*H)   -> layers_i/attn/o             [N, H, d]
  model.layers.{i}.mlp.gate_proj          (m, d)     -> layers_i/mlp/gate  (U)      [d, m]
  model.layers.{i}.mlp.up_proj            (m, d)     -> layers_i/mlp/up    (V)      [d, m]
  model.layers.{i}.mlp.down_proj          (d, m)     -> layers_i/mlp/out   (W)      [m, d]
  model.layers.{i}.input_layernorm        (d,)       -> layers_i/pre_attention_norm/scale
  model.layers.{i}.post_attention_layernorm          -> layers_i/post_attention_norm/scale
  model.layers.{i}.pre_feedforward_layernorm         -> layers_i/pre_ffw_norm/scale
  model.layers.{i}.post_feedforward_layernorm        -> layers_i/post_ffw_norm/scale
  model.norm.weight                                  -> final_norm/scale
Both sides store norm scales in the `(1 + scale)` convention, so they copy unchanged.  The output
projection is tied: `lm_head.weight`, when present, must equal the embedding.

Per-layer FFN widths (m_i, 0 = no FFN: a pruned model) have no place in Gemma2Config's single
`intermediate_size`; `hf_export` writes them as FFN_WIDTHS_EXPORTS[name] says: "refuse",
"pad" (every layer zero-padded to the widest: a plain Gemma2ForCausalLM, same function) or
"custom_code" (each layer at its width: `intermediate_sizes` in config.json and the model code of
maxnucl/conversion/hf_custom_code beside it, loaded with trust_remote_code=True).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import numpy as np

from maxnucl import ffn
from maxnucl.conversion import hf_custom_code
from maxnucl.models.config import ModelConfig

# maxnucl leaf -> (HF name, to_maxnucl(hf_array, cfg), to_hf(array, cfg))
_Transform = Callable[[np.ndarray, ModelConfig], np.ndarray]


def _heads_in(kind: str) -> tuple[_Transform, _Transform]:
  def heads(cfg):
    return cfg.num_heads if kind == "q" else cfg.num_kv_heads

  def to_maxnucl(w, cfg):  # (n*H, d) -> [d, n, H]
    return w.reshape(heads(cfg), cfg.head_dim, cfg.d_model).transpose(2, 0, 1)

  def to_hf(w, cfg):  # [d, n, H] -> (n*H, d)
    return w.transpose(1, 2, 0).reshape(heads(cfg) * cfg.head_dim, cfg.d_model)
  return to_maxnucl, to_hf


def _o_to_maxnucl(w, cfg):  # (d, N*H) -> [N, H, d]
  return w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.d_model)


def _o_to_hf(w, cfg):  # [N, H, d] -> (d, N*H)
  return w.transpose(2, 0, 1).reshape(cfg.d_model, cfg.num_heads * cfg.head_dim)


def _transpose(w, cfg):
  return w.T


def _same(w, cfg):
  return w


_LAYER_NORMS = {
    "pre_attention_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "pre_ffw_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


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


def tensor_map(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[str, _Transform, _Transform]]:
  """Every maxnucl leaf path -> (HF tensor name, to_maxnucl, to_hf), in checkpoint order."""
  out = {("embedder", "embedding"): ("model.embed_tokens.weight", _same, _same)}
  for i in range(cfg.num_layers):
    layer, hf = ffn.layer_name(i), f"model.layers.{i}"
    for kind in ("q", "k", "v"):
      out[(layer, "attn", kind)] = (f"{hf}.self_attn.{kind}_proj.weight", *_heads_in(kind))
    out[(layer, "attn", "o")] = (f"{hf}.self_attn.o_proj.weight", _o_to_maxnucl, _o_to_hf)
    for ours, theirs in _LAYER_NORMS.items():
      if cfg.layer_ffn_widths[i] or "ffw" not in ours:
        out[(layer, ours, "scale")] = (f"{hf}.{theirs}.weight", _same, _same)
    if cfg.layer_ffn_widths[i]:
      for ours, theirs in ((ffn.GATE, "gate_proj"), (ffn.UP, "up_proj"), (ffn.OUT, "down_proj")):
        out[(layer, "mlp", ours)] = (f"{hf}.mlp.{theirs}.weight", _transpose, _transpose)
  out[("final_norm", "scale")] = ("model.norm.weight", _same, _same)
  return out


def config_from_hf(hf: dict[str, Any], name: str = "gemma2_hf") -> ModelConfig:
  """A ModelConfig from a Hugging Face Gemma-2 `config.json` dict (fields named in errors)."""
  def need(field):
    if field not in hf:
      raise KeyError(f"config.json: missing field {field!r} (needed for a Gemma-2 model)")
    return hf[field]

  activation = hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh")
  if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
    raise ValueError(f"config.json: hidden_activation {activation!r}; maxnucl's Gemma-2 "
                     f"implements 'gelu_pytorch_tanh'")
  num_layers = need("num_hidden_layers")
  layer_types = hf.get("layer_types")
  if layer_types:
    pattern = tuple("local" if t == "sliding_attention" else "global" for t in layer_types)
    if len(pattern) != num_layers:
      raise ValueError(f"config.json: layer_types has {len(pattern)} entries for "
                       f"{num_layers} layers")
  else:
    pattern = ("local", "global")
  widths = hf.get("intermediate_sizes")  # a custom_code export: layer i's FFN width
  if widths is not None and len(widths) != num_layers:
    raise ValueError(f"config.json: intermediate_sizes has {len(widths)} entries for "
                     f"{num_layers} layers")
  return ModelConfig(
      name=name, family="gemma2", vocab_size=need("vocab_size"), d_model=need("hidden_size"),
      num_layers=num_layers, num_heads=need("num_attention_heads"),
      num_kv_heads=need("num_key_value_heads"), head_dim=need("head_dim"),
      ffn_dim=need("intermediate_size"),
      ffn_widths=None if widths is None else tuple(widths), activation="gelu_tanh",
      query_pre_attn_scalar=need("query_pre_attn_scalar"),
      attn_logit_softcap=hf.get("attn_logit_softcapping"),
      final_logit_softcap=hf.get("final_logit_softcapping"),
      sliding_window=need("sliding_window"), attention_pattern=pattern,
      rope_theta=float(hf.get("rope_theta", (hf.get("rope_parameters") or {}).get(
          "rope_theta", 10_000.0))),
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      max_positions=int(hf.get("max_position_embeddings", 8192)),
      pad_id=int(hf.get("pad_token_id", 0) or 0), eos_id=_first(hf.get("eos_token_id", 1)),
      bos_id=_first(hf.get("bos_token_id", 2)))


def _first(value) -> int:
  return int(value[0] if isinstance(value, (list, tuple)) else value)


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


def _plain(cfg: ModelConfig, torch_dtype: str) -> HfExport:
  return HfExport(cfg, _gemma2_config(cfg, torch_dtype))


def _refuse(cfg: ModelConfig, torch_dtype: str) -> HfExport:
  raise ValueError(
      f"model {cfg.name!r} has per-layer FFN widths {list(cfg.layer_ffn_widths)}; Hugging "
      f"Face's Gemma2Config has a single intermediate_size and every layer has an FFN. Choose "
      f"an export mode with ffn_widths_export (CLI: --ffn_widths_export): 'pad' zero-pads every "
      f"layer to the widest width (zero columns of U, V and zero rows of W leave the function "
      f"unchanged) and writes a plain Gemma2ForCausalLM; 'custom_code' keeps each layer's width "
      f"and writes a custom-code model (AutoModelForCausalLM.from_pretrained(..., "
      f"trust_remote_code=True)). Or keep the maxnucl checkpoint.")


def _pad(cfg: ModelConfig, torch_dtype: str) -> HfExport:
  widest = max(cfg.layer_ffn_widths)
  if not widest:
    raise ValueError(f"model {cfg.name!r} has no FFN in any layer; ffn_widths_export='pad' "
                     f"would write intermediate_size 0: use 'custom_code'")
  return _plain(cfg.replace(ffn_dim=widest, ffn_widths=None), torch_dtype)


def _custom_code(cfg: ModelConfig, torch_dtype: str) -> HfExport:
  config = {**_gemma2_config(cfg, torch_dtype), "model_type": hf_custom_code.MODEL_TYPE,
            "architectures": [hf_custom_code.ARCHITECTURE], "auto_map": dict(hf_custom_code.AUTO_MAP),
            "intermediate_size": cfg.ffn_dim,
            "intermediate_sizes": list(cfg.layer_ffn_widths)}
  return HfExport(cfg, config, hf_custom_code.sources())


# How maxnucl_to_hf writes a model whose layers' FFN widths differ (or include 0):
# name -> fn(cfg, torch_dtype) -> HfExport.
FFN_WIDTHS_EXPORTS = {"refuse": _refuse, "pad": _pad, "custom_code": _custom_code}


def hf_export(cfg: ModelConfig, torch_dtype: str = "float32", *,
              ffn_widths_export: str = "refuse") -> HfExport:
  """The Hugging Face form of `cfg`: a plain Gemma-2 when every layer has the same nonzero FFN
  width (whatever `ffn_widths_export` says), else as FFN_WIDTHS_EXPORTS[ffn_widths_export]
  writes it.  Raises ValueError for what it cannot represent."""
  if cfg.family != "gemma2":
    raise ValueError(f"model {cfg.name!r} is a {cfg.family!r} model; Hugging Face's Gemma-2 "
                     f"format holds only family 'gemma2'")
  if ffn_widths_export not in FFN_WIDTHS_EXPORTS:
    raise ValueError(f"ffn_widths_export {ffn_widths_export!r}; expected one of "
                     f"{sorted(FFN_WIDTHS_EXPORTS)}")
  widths = set(cfg.layer_ffn_widths)
  if len(widths) == 1 and 0 not in widths:
    return _plain(cfg, torch_dtype)
  return FFN_WIDTHS_EXPORTS[ffn_widths_export](cfg, torch_dtype)


def hf_config(cfg: ModelConfig, torch_dtype: str = "float32", *,
              ffn_widths_export: str = "refuse") -> dict[str, Any]:
  """The Hugging Face `config.json` dict for `cfg` (`hf_export`'s); refuses what HF cannot
  represent."""
  return hf_export(cfg, torch_dtype, ffn_widths_export=ffn_widths_export).config


def _gemma2_config(cfg: ModelConfig, torch_dtype: str) -> dict[str, Any]:
  """Gemma2Config's fields for `cfg` (intermediate_size: layer 0's FFN width)."""
  return {
      "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.layer_ffn_widths[0],
      "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
      "query_pre_attn_scalar": cfg.query_pre_attn_scalar or cfg.head_dim,
      "attn_logit_softcapping": cfg.attn_logit_softcap,
      "final_logit_softcapping": cfg.final_logit_softcap,
      "sliding_window": cfg.sliding_window,
      "layer_types": ["sliding_attention" if k == "local" else "full_attention"
                      for k in cfg.layer_attention_kinds],
      "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
      "max_position_embeddings": cfg.max_positions, "pad_token_id": cfg.pad_id,
      "eos_token_id": cfg.eos_id, "bos_token_id": cfg.bos_id, "tie_word_embeddings": True,
      "attention_bias": False, "attention_dropout": 0.0, "torch_dtype": torch_dtype,
      "dtype": torch_dtype,
  }


def iter_params_from_hf(cfg: ModelConfig, get_tensor: Callable[[str], np.ndarray]
                        ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """(maxnucl path, array) pairs, reading one HF tensor at a time through `get_tensor(name)`."""
  for path, (hf_name, to_maxnucl, _) in tensor_map(cfg).items():
    yield path, to_maxnucl(np.asarray(get_tensor(hf_name)), cfg)


def params_from_hf_state(cfg: ModelConfig, state: dict[str, np.ndarray]) -> dict:
  """Whole-model convenience over `iter_params_from_hf` (tests, small models)."""
  params: dict = {}
  for path, array in iter_params_from_hf(cfg, lambda name: state[name]):
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = array
  return params


def hf_state_from_params(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
  """The HF state dict (without the tied lm_head) for maxnucl params."""
  out = {}
  for path, (hf_name, _, to_hf) in tensor_map(cfg).items():
    node = params
    for key in path:
      node = node[key]
    out[hf_name] = np.ascontiguousarray(to_hf(np.asarray(node), cfg))
  return out
