"""Hugging Face `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM` <-> maxnucl family
'llama': three specs of `hf_format`.

Tensors as `hf_format` lays them out, with two plain-scale norms per layer:
  model.layers.{i}.input_layernorm            -> layers_i/pre_attention_norm/scale
  model.layers.{i}.post_attention_layernorm   -> layers_i/pre_ffw_norm/scale  (the FFN's pre-norm)
plus Qwen2's q/k/v biases (attn/{q,k,v}_bias) and, when tie_word_embeddings is false,
lm_head.weight -> lm_head/embedding.

config.json -> ModelConfig, the fields transformers 5's config classes read:
  rope_parameters (or the older rope_theta + rope_scaling): rope_type 'default', 'linear' or
    'llama3' (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)
  Mistral's sliding_window: every layer local over that window (null: every layer global)
  Qwen2's use_sliding_window (false: every layer global; true: layer_types, else the layers from
    max_window_layers on are local)
  head_dim (absent: hidden_size // num_attention_heads), tie_word_embeddings, rms_norm_eps,
  bos/eos/pad_token_id (an eos list: its first id)
What maxnucl cannot compute is refused naming the field: another rope_type, a
partial_rotary_factor other than 1, Llama's attention_bias or mlp_bias, an activation other
than silu.  On export a 'llama'-family model is written as Qwen2 when it has q/k/v biases,
else as Mistral when every layer is local, else as Llama.
"""

from __future__ import annotations

import functools
from typing import Any

from maxnucl.conversion import hf_custom_code, hf_format
from maxnucl.models.config import ModelConfig

LAYER_NORMS = {"pre_attention_norm": "input_layernorm",
               "pre_ffw_norm": "post_attention_layernorm"}

# transformers 5.23's defaults for the fields a config.json may leave out
# (the dimensions vocab_size, hidden_size, intermediate_size, num_hidden_layers and
# num_attention_heads are required: the tensors' shapes come from them; num_key_value_heads and
# head_dim null: num_attention_heads and hidden_size // num_attention_heads, as transformers)
_COMMON = dict(rms_norm_eps=1e-6, pad_token_id=None, tie_word_embeddings=False, hidden_act="silu",
               head_dim=None)
_DEFAULTS = {
    "llama": dict(_COMMON, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                  sliding_window=None, num_key_value_heads=None, attention_bias=False,
                  mlp_bias=False),
    "mistral": dict(_COMMON, max_position_embeddings=4096 * 32, bos_token_id=1, eos_token_id=2,
                    sliding_window=4096, num_key_value_heads=8),
    "qwen2": dict(_COMMON, max_position_embeddings=32768, bos_token_id=None, eos_token_id=None,
                  sliding_window=4096, num_key_value_heads=32, use_sliding_window=False,
                  max_window_layers=28),
}
_NAMES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}


def _refuse_unsupported(hf: dict[str, Any], model_type: str) -> None:
  activation = hf["hidden_act"]
  if activation != "silu":
    raise ValueError(f"config.json: hidden_act {hf_format.short(activation)}; maxnucl's Llama "
                     f"family implements 'silu' (SwiGLU)")
  for field in ("mlp_bias",) + (("attention_bias",) if model_type != "qwen2" else ()):
    if hf.get(field):
      raise ValueError(f"config.json: {field} true; maxnucl's {_NAMES[model_type]} has no "
                       f"{'FFN' if field == 'mlp_bias' else 'attention'} biases")
  if hf.get("partial_rotary_factor") not in (None, 1.0):
    raise ValueError(f"config.json: partial_rotary_factor {hf['partial_rotary_factor']}; "
                     f"maxnucl rotates every dimension of a head (1.0)")


def _rope(hf: dict[str, Any], max_positions: int) -> tuple[float, Any]:
  """(rope_theta, ModelConfig.rope_scaling); an older rope_scaling wins over rope_parameters, as
  in transformers."""
  field = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
  return hf_format.rope_from_hf(hf.get(field) or {}, field,
                                hf.get("rope_theta") or 10_000.0, max_positions)


def _attention(hf: dict[str, Any], model_type: str, num_layers: int, window
               ) -> tuple[tuple[str, ...], Any]:
  """(attention_pattern, sliding_window)."""
  if model_type == "qwen2":
    if not hf.get("use_sliding_window") or window is None:  # transformers: no window, global
      return ("global",), None
    if hf.get("layer_types"):
      return hf_format.attention_pattern_from_layer_types(hf["layer_types"], num_layers), window
    first = hf["max_window_layers"] if hf["max_window_layers"] is not None else 28
    return tuple("local" if i >= first else "global" for i in range(num_layers)), window
  return (("local",), window) if window else (("global",), None)


def config_from_hf(hf: dict[str, Any], name: str = "llama_hf", *,
                   model_type: str = "llama") -> ModelConfig:
  """A ModelConfig from a Llama, Mistral or Qwen2 (`model_type`) `config.json` dict (fields named
  in errors)."""
  hf = hf_format.with_defaults(hf, _DEFAULTS[model_type])

  def need(field):
    return hf_format.need(hf, field, _NAMES[model_type])

  _refuse_unsupported(hf, model_type)
  heads, num_layers = need("num_attention_heads"), need("num_hidden_layers")
  max_positions = need("max_position_embeddings")
  theta, scaling = _rope(hf, max_positions)
  pattern, window = _attention(hf, model_type, num_layers, hf.get("sliding_window"))
  return ModelConfig(
      name=name, family="llama", vocab_size=need("vocab_size"), d_model=need("hidden_size"),
      num_layers=num_layers, num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(hf.get("head_dim") or need("hidden_size") // heads),
      ffn_dim=need("intermediate_size"),
      ffn_widths=hf_format.ffn_widths_from_hf(hf, num_layers), activation="silu",
      sliding_window=window, attention_pattern=pattern, rope_theta=theta, rope_scaling=scaling,
      qkv_bias=model_type == "qwen2", tie_embeddings=bool(hf["tie_word_embeddings"]),
      norm_eps=float(need("rms_norm_eps")), max_positions=max_positions,
      pad_id=int(hf.get("pad_token_id") or 0),
      eos_id=hf_format.first_id(hf.get("eos_token_id") or 0),
      bos_id=int(hf.get("bos_token_id") or 0))


def _common_config(cfg: ModelConfig) -> dict[str, Any]:
  """The fields LlamaConfig, MistralConfig and Qwen2Config share, for `cfg`."""
  return {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
      "intermediate_size": cfg.layer_ffn_widths[0], "hidden_act": "silu",
      "max_position_embeddings": cfg.max_positions, "rms_norm_eps": cfg.norm_eps,
      "rope_parameters": hf_format.rope_to_hf(cfg.rope_theta, cfg.rope_scaling),
      "tie_word_embeddings": cfg.tie_embeddings, "attention_dropout": 0.0,
      **hf_format.special_ids(cfg),
  }


def llama_config(cfg: ModelConfig) -> dict[str, Any]:
  return {**_common_config(cfg), "attention_bias": False, "mlp_bias": False}


def mistral_config(cfg: ModelConfig) -> dict[str, Any]:
  return {**_common_config(cfg), "sliding_window": cfg.sliding_window}


def qwen2_config(cfg: ModelConfig) -> dict[str, Any]:
  local = "local" in cfg.layer_attention_kinds
  return {**_common_config(cfg), "use_sliding_window": local,
          "sliding_window": cfg.sliding_window if local else None,
          "max_window_layers": cfg.num_layers, "layer_types": hf_format.layer_types(cfg)}


# What every one of the three computes (ModelConfig fields it has no setting for)
_FIXED = dict(activation="silu", qk_norm=False, embedding_scale="none", norm_offset=False,
              logit_scale="none", attn_logit_softcap=None, final_logit_softcap=None,
              query_pre_attn_scalar=None, rope_local_theta=None)


def _spec(architecture, model_type, config_to_hf, attention, custom_code, qkv_bias=False):
  return hf_format.HfArchitecture(
      architecture=architecture, model_type=model_type, family="llama",
      layer_norms=LAYER_NORMS,
      config_from_hf=functools.partial(config_from_hf, model_type=model_type),
      config_to_hf=config_to_hf,
      fixed=dict(_FIXED, qkv_bias=qkv_bias), attention=attention, custom_code=custom_code)


# In export order: the first that can hold a 'llama'-family model writes it.
QWEN2 = _spec("Qwen2ForCausalLM", "qwen2", qwen2_config, "any", hf_custom_code.QWEN2,
              qkv_bias=True)
MISTRAL = _spec("MistralForCausalLM", "mistral", mistral_config, "local",
                hf_custom_code.MISTRAL)
LLAMA = _spec("LlamaForCausalLM", "llama", llama_config, "global", hf_custom_code.LLAMA)
