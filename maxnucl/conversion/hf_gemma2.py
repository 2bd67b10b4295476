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
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from maxnucl import ffn
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
  return ModelConfig(
      name=name, family="gemma2", vocab_size=need("vocab_size"), d_model=need("hidden_size"),
      num_layers=num_layers, num_heads=need("num_attention_heads"),
      num_kv_heads=need("num_key_value_heads"), head_dim=need("head_dim"),
      ffn_dim=need("intermediate_size"), activation="gelu_tanh",
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


def hf_config(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
  """A Hugging Face Gemma-2 `config.json` dict for `cfg`; refuses what HF cannot represent."""
  if cfg.family != "gemma2":
    raise ValueError(f"model {cfg.name!r} is a {cfg.family!r} model; Hugging Face's Gemma-2 "
                     f"format holds only family 'gemma2'")
  widths = set(cfg.layer_ffn_widths)
  if len(widths) != 1 or 0 in widths:
    raise ValueError(
        f"model {cfg.name!r} has per-layer FFN widths {list(cfg.layer_ffn_widths)}; Hugging "
        f"Face's Gemma2Config has a single intermediate_size and every layer has an FFN. Keep "
        f"the maxnucl checkpoint, or zero-pad every layer to the widest width (zero rows of W "
        f"and zero columns of U, V leave the function unchanged) before exporting.")
  return {
      "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.ffn_dim if cfg.ffn_widths is None else cfg.ffn_widths[0],
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
