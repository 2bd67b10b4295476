"""Hugging Face `Gemma2ForCausalLM` <-> maxnucl: the Gemma-2 spec of `hf_format`.

Tensors as `hf_format` lays them out, with Gemma-2's four per-layer norms:
  model.layers.{i}.input_layernorm                   -> layers_i/pre_attention_norm/scale
  model.layers.{i}.post_attention_layernorm          -> layers_i/post_attention_norm/scale
  model.layers.{i}.pre_feedforward_layernorm         -> layers_i/pre_ffw_norm/scale
  model.layers.{i}.post_feedforward_layernorm        -> layers_i/post_ffw_norm/scale
Both sides store norm scales in the `(1 + scale)` convention, so they copy unchanged.  The output
projection is tied: `lm_head.weight`, when present, must equal the embedding.

Per-layer FFN widths are exported as `hf_format.FFN_WIDTHS_EXPORTS` says; Gemma-2's custom-code
model is maxnucl/conversion/hf_custom_code/*_gemma2_ffn_widths.py.  The functions below keep
this module's older, Gemma-2-only signatures (benchmarks and tests call them).
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np

from maxnucl.conversion import hf_custom_code, hf_format
from maxnucl.conversion.hf_format import FFN_WIDTHS_EXPORTS, HfExport, hf_axes  # noqa: F401
from maxnucl.models.config import ModelConfig

LAYER_NORMS = {
    "pre_attention_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "pre_ffw_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}


def tensor_map(cfg: ModelConfig) -> hf_format.TensorMap:
  """Every maxnucl leaf path -> (HF tensor name, to_maxnucl, to_hf), in checkpoint order."""
  return hf_format.tensor_map(cfg, LAYER_NORMS)


# transformers 5.23's Gemma2Config defaults for the fields a config.json may leave out (the
# dimensions vocab_size, hidden_size, intermediate_size, num_hidden_layers and
# num_attention_heads are required: the tensors' shapes come from them)
_DEFAULTS = dict(num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                 max_position_embeddings=8192, rms_norm_eps=1e-6, pad_token_id=0,
                 eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, attention_bias=False,
                 query_pre_attn_scalar=256, sliding_window=4096, final_logit_softcapping=30.0,
                 attn_logit_softcapping=50.0, use_bidirectional_attention=None)
_THETA = 10_000.0


def config_from_hf(hf: dict[str, Any], name: str = "gemma2_hf") -> ModelConfig:
  """A ModelConfig from a Hugging Face Gemma-2 `config.json` dict (fields named in errors); an
  absent field reads as transformers' Gemma2Config default (_DEFAULTS)."""
  hf = hf_format.with_defaults(hf, _DEFAULTS)

  def need(field):
    return hf_format.need(hf, field, "Gemma-2")

  activation = hf["hidden_activation"]
  if activation not in ("gelu_pytorch_tanh", "gelu_tanh"):
    raise ValueError(f"config.json: hidden_activation {hf_format.short(activation)}; maxnucl's "
                     f"Gemma-2 implements 'gelu_pytorch_tanh'")
  if hf["tie_word_embeddings"] is False:
    raise ValueError("config.json: tie_word_embeddings false; Gemma-2's output projection is "
                     "the embedding (maxnucl has no separate lm_head for it)")
  hf_format.refuse_true(hf, "attention_bias", "maxnucl's Gemma-2 has no attention biases")
  hf_format.refuse_true(hf, "use_bidirectional_attention",
                        "maxnucl's Gemma-2 is a causal decoder")
  num_layers, max_positions = need("num_hidden_layers"), need("max_position_embeddings")
  layer_types = hf.get("layer_types")
  pattern = (hf_format.attention_pattern_from_layer_types(layer_types, num_layers)
             if layer_types else ("local", "global"))
  theta, scaling = hf_format.rope_from_hf(hf.get("rope_parameters") or {}, "rope_parameters",
                                          hf.get("rope_theta") or _THETA, max_positions)
  if scaling is not None:
    raise ValueError(f"config.json: rope_parameters.rope_type {scaling[0]!r}; maxnucl's Gemma-2 "
                     f"implements 'default'")
  return ModelConfig(
      name=name, family="gemma2", vocab_size=need("vocab_size"), d_model=need("hidden_size"),
      num_layers=num_layers, num_heads=need("num_attention_heads"),
      num_kv_heads=need("num_key_value_heads"), head_dim=need("head_dim"),
      ffn_dim=need("intermediate_size"), ffn_widths=hf_format.ffn_widths_from_hf(hf, num_layers),
      activation="gelu_tanh", query_pre_attn_scalar=need("query_pre_attn_scalar"),
      attn_logit_softcap=hf["attn_logit_softcapping"],
      final_logit_softcap=hf["final_logit_softcapping"],
      sliding_window=need("sliding_window") if "local" in pattern else hf["sliding_window"],
      attention_pattern=pattern, rope_theta=theta,
      norm_eps=float(need("rms_norm_eps")), max_positions=max_positions,
      pad_id=int(hf["pad_token_id"] or 0),
      eos_id=hf_format.first_id(hf["eos_token_id"] if hf["eos_token_id"] is not None else 1),
      bos_id=int(hf["bos_token_id"] if hf["bos_token_id"] is not None else 2))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """Gemma2Config's fields for `cfg` (intermediate_size: layer 0's FFN width)."""
  return {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.layer_ffn_widths[0],
      "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
      "query_pre_attn_scalar": cfg.query_pre_attn_scalar or cfg.head_dim,
      "attn_logit_softcapping": cfg.attn_logit_softcap,
      "final_logit_softcapping": cfg.final_logit_softcap,
      "sliding_window": cfg.sliding_window, "layer_types": hf_format.layer_types(cfg),
      "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
      "max_position_embeddings": cfg.max_positions, **hf_format.special_ids(cfg),
      "tie_word_embeddings": True, "attention_bias": False, "attention_dropout": 0.0,
  }


GEMMA2 = hf_format.HfArchitecture(
    architecture="Gemma2ForCausalLM", model_type="gemma2", family="gemma2",
    layer_norms=LAYER_NORMS, config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    fixed=dict(activation="gelu_tanh", qkv_bias=False, qk_norm=False, tie_embeddings=True,
               embedding_scale="sqrt_d", norm_offset=True, logit_scale="none",
               rope_scaling=None, rope_local_theta=None),
    attention="any", custom_code=hf_custom_code.GEMMA2)


def hf_export(cfg: ModelConfig, torch_dtype: str = "float32", *,
              ffn_widths_export: str = "refuse") -> HfExport:
  """`hf_format.hf_export` as Gemma-2."""
  return hf_format.hf_export(GEMMA2, cfg, torch_dtype, ffn_widths_export=ffn_widths_export)


def hf_config(cfg: ModelConfig, torch_dtype: str = "float32", *,
              ffn_widths_export: str = "refuse") -> dict[str, Any]:
  """The Hugging Face `config.json` dict for `cfg` (`hf_export`'s); refuses what HF cannot
  represent."""
  return hf_export(cfg, torch_dtype, ffn_widths_export=ffn_widths_export).config


def iter_params_from_hf(cfg: ModelConfig, get_tensor: Callable[[str], np.ndarray]
                        ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """(maxnucl path, array) pairs, reading one HF tensor at a time through `get_tensor(name)`."""
  return hf_format.iter_params_from_hf(tensor_map(cfg), cfg, get_tensor)


def params_from_hf_state(cfg: ModelConfig, state: dict[str, np.ndarray]) -> dict:
  """Whole-model convenience over `iter_params_from_hf` (tests, small models)."""
  return hf_format.params_from_hf_state(tensor_map(cfg), cfg, state)


def hf_state_from_params(cfg: ModelConfig, params: dict) -> dict[str, np.ndarray]:
  """The HF state dict (without the tied lm_head) for maxnucl params."""
  return hf_format.hf_state_from_params(tensor_map(cfg), cfg, params)
