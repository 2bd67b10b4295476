"""Hugging Face `Gemma3ForCausalLM` (the text model, config.json model_type "gemma3_text") <->
maxnucl family 'gemma3': a spec of `hf_format`.

Tensors as Gemma-2's (`hf_gemma2.LAYER_NORMS`: four (1 + scale) norms per layer) plus QK-norm:
  model.layers.{i}.self_attn.q_norm.weight  (H,)   -> layers_i/attn/query_norm/scale
  model.layers.{i}.self_attn.k_norm.weight  (H,)   -> layers_i/attn/key_norm/scale
and lm_head.weight -> lm_head/embedding when tie_word_embeddings is false.

config.json -> ModelConfig: `rope_parameters` {"full_attention": {rope_type 'default' or
'linear', factor, rope_theta}, "sliding_attention": {rope_theta}} -> rope_theta, rope_scaling
(global layers) and rope_local_theta (local layers, never scaled); the older keys rope_theta,
rope_scaling and rope_local_base_freq as transformers reads them.  `layer_types`, else
`sliding_window_pattern` (every n-th layer global; default 6) -> attention_pattern;
query_pre_attn_scalar, sliding_window and the soft-caps as Gemma-2.
"""

from __future__ import annotations

from typing import Any

from maxnucl.conversion import hf_custom_code, hf_format, hf_gemma2
from maxnucl.models.config import ModelConfig

# transformers 5.23's Gemma3TextConfig defaults for the fields a config.json may leave out
# (the dimensions vocab_size, hidden_size, intermediate_size, num_hidden_layers and
# num_attention_heads are required: the tensors' shapes come from them)
_DEFAULTS = dict(num_key_value_heads=4, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                 max_position_embeddings=131_072, rms_norm_eps=1e-6, pad_token_id=0,
                 eos_token_id=1, bos_token_id=2, tie_word_embeddings=True, attention_bias=False,
                 query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                 attn_logit_softcapping=None, final_logit_softcapping=None,
                 use_bidirectional_attention=False)
_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def _rope_parameters(hf: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """config.json's RoPE settings as transformers' Gemma3TextConfig assembles them: one dict per
  layer type, rope_scaling over the full-attention one, the older base keys as defaults."""
  given = hf.get("rope_parameters") or {}
  for key in _THETA:
    if given.get(key) is not None and not isinstance(given[key], dict):
      raise ValueError(f"config.json: rope_parameters.{key} is {hf_format.short(given[key])}; "
                       f"expected an object")
  if given and not set(given) & set(_THETA):
    raise ValueError(f"config.json: rope_parameters has no 'full_attention' or "
                     f"'sliding_attention' entry (keys {sorted(given)}); Gemma-3 sets RoPE per "
                     f"layer type")
  full = {**(given.get("full_attention") or {}), **(hf.get("rope_scaling") or {})}
  local = dict(given.get("sliding_attention") or {})
  full.setdefault("rope_theta", hf.get("rope_theta") or _THETA["full_attention"])
  local.setdefault("rope_theta", hf.get("rope_local_base_freq") or _THETA["sliding_attention"])
  return {"full_attention": full, "sliding_attention": local}


def _attention_pattern(hf: dict[str, Any], num_layers: int) -> tuple[str, ...]:
  if hf.get("layer_types"):
    return hf_format.attention_pattern_from_layer_types(hf["layer_types"], num_layers)
  every = hf["sliding_window_pattern"] or _DEFAULTS["sliding_window_pattern"]
  return hf_format.shortest_period(tuple("local" if (i + 1) % every else "global"
                                         for i in range(num_layers)))


def config_from_hf(hf: dict[str, Any], name: str = "gemma3_hf") -> ModelConfig:
  """A ModelConfig from a Hugging Face Gemma-3 text `config.json` dict (fields named in
  errors)."""
  hf = hf_format.with_defaults(hf, _DEFAULTS)

  def need(field):
    return hf_format.need(hf, field, "Gemma-3")

  if hf["hidden_activation"] not in ("gelu_pytorch_tanh", "gelu_tanh"):
    raise ValueError(f"config.json: hidden_activation {hf_format.short(hf['hidden_activation'])};"
                     f" maxnucl's Gemma-3 implements 'gelu_pytorch_tanh'")
  hf_format.refuse_true(hf, "use_bidirectional_attention",
                        "maxnucl's Gemma-3 is a causal decoder")
  hf_format.refuse_true(hf, "attention_bias", "maxnucl's Gemma-3 has no attention biases")
  num_layers, max_positions = need("num_hidden_layers"), need("max_position_embeddings")
  rope = _rope_parameters(hf)
  theta, scaling = hf_format.rope_from_hf(rope["full_attention"],
                                          "rope_parameters.full_attention",
                                          _THETA["full_attention"], max_positions)
  local_theta, local_scaling = hf_format.rope_from_hf(
      rope["sliding_attention"], "rope_parameters.sliding_attention",
      _THETA["sliding_attention"], max_positions)
  if local_scaling is not None:  # representable only as the global layers' RoPE on every layer
    if (local_theta, local_scaling) != (theta, scaling):
      raise ValueError(f"config.json: rope_parameters.sliding_attention.rope_type "
                       f"{local_scaling[0]!r}; maxnucl's Gemma-3 scales the local layers' RoPE "
                       f"only as the global layers' (same rope_theta and scaling)")
    local_theta = None
  return ModelConfig(
      name=name, family="gemma3", vocab_size=need("vocab_size"), d_model=need("hidden_size"),
      num_layers=num_layers, num_heads=need("num_attention_heads"),
      num_kv_heads=need("num_key_value_heads"), head_dim=need("head_dim"),
      ffn_dim=need("intermediate_size"),
      ffn_widths=hf_format.ffn_widths_from_hf(hf, num_layers), activation="gelu_tanh",
      qk_norm=True, query_pre_attn_scalar=need("query_pre_attn_scalar"),
      attn_logit_softcap=hf.get("attn_logit_softcapping"),
      final_logit_softcap=hf.get("final_logit_softcapping"),
      sliding_window=need("sliding_window"), attention_pattern=_attention_pattern(hf, num_layers),
      rope_theta=theta, rope_scaling=scaling, rope_local_theta=local_theta,
      tie_embeddings=hf["tie_word_embeddings"] is not False,
      norm_eps=float(need("rms_norm_eps")), max_positions=max_positions,
      pad_id=int(hf["pad_token_id"] or 0),
      eos_id=hf_format.first_id(hf["eos_token_id"] if hf["eos_token_id"] is not None else 1),
      bos_id=int(hf["bos_token_id"] if hf["bos_token_id"] is not None else 2))


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  """Gemma3TextConfig's fields for `cfg` (intermediate_size: layer 0's FFN width)."""
  local_theta = cfg.rope_theta if cfg.rope_local_theta is None else cfg.rope_local_theta
  local_scaling = cfg.rope_scaling if cfg.rope_local_theta is None else None
  return {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.layer_ffn_widths[0], "hidden_activation": "gelu_pytorch_tanh",
      "query_pre_attn_scalar": cfg.query_pre_attn_scalar or cfg.head_dim,
      "attn_logit_softcapping": cfg.attn_logit_softcap,
      "final_logit_softcapping": cfg.final_logit_softcap,
      "sliding_window": cfg.sliding_window, "layer_types": hf_format.layer_types(cfg),
      "rope_parameters": {
          "full_attention": hf_format.rope_to_hf(cfg.rope_theta, cfg.rope_scaling),
          "sliding_attention": hf_format.rope_to_hf(local_theta, local_scaling)},
      "rms_norm_eps": cfg.norm_eps, "max_position_embeddings": cfg.max_positions,
      **hf_format.special_ids(cfg), "tie_word_embeddings": cfg.tie_embeddings,
      "attention_bias": False, "attention_dropout": 0.0, "use_bidirectional_attention": False,
  }


GEMMA3 = hf_format.HfArchitecture(
    architecture="Gemma3ForCausalLM", model_type="gemma3_text", family="gemma3",
    layer_norms=hf_gemma2.LAYER_NORMS, config_from_hf=config_from_hf, config_to_hf=config_to_hf,
    fixed=dict(activation="gelu_tanh", qkv_bias=False, qk_norm=True, embedding_scale="sqrt_d",
               norm_offset=True, logit_scale="none"),
    attention="any", custom_code=hf_custom_code.GEMMA3)
