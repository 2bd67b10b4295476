"""A tiny random transformers Gemma-2 built offline: the independent numerics reference."""

import numpy as np
import torch
import transformers

from maxnucl import ffn
from maxnucl.conversion import hf_gemma2

TINY_HF_CONFIG = dict(
    vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    query_pre_attn_scalar=24,  # deliberately != head_dim
    sliding_window=6,  # shorter than the test sequences
    attn_logit_softcapping=5.0, final_logit_softcapping=3.0,  # small caps: both active
    max_position_embeddings=64, rope_theta=10_000.0, rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh", pad_token_id=0, eos_token_id=1, bos_token_id=2,
    tie_word_embeddings=True)


def tiny_hf_gemma2(seed: int = 0, weight_std: float = 0.3, norm_std: float = 0.5,
                   **overrides) -> transformers.Gemma2ForCausalLM:
  """A random HF Gemma-2 with *every* weight redrawn (norm scales too) at a noticeable scale."""
  config = transformers.Gemma2Config(**{**TINY_HF_CONFIG, **overrides})
  config._attn_implementation = "eager"  # the path that applies the attention soft-cap on CPU
  torch.manual_seed(seed)
  model = transformers.Gemma2ForCausalLM(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.normal_(0.0, norm_std if p.ndim == 1 else weight_std)
  return model


def hf_state_numpy(model) -> dict[str, np.ndarray]:
  return {k: v.detach().float().numpy() for k, v in model.state_dict().items()}


def maxnucl_from_hf(model):
  """(cfg, params) for a transformers Gemma-2 model."""
  cfg = hf_gemma2.config_from_hf(model.config.to_dict(), name="tiny_from_hf")
  return cfg, hf_gemma2.params_from_hf_state(cfg, hf_state_numpy(model))


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.as_tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def with_ffn_widths(cfg, params, widths):
  """cfg and params with layer i's FFN cut to its first widths[i] neurons (columns of U, V, rows
  of W); a layer of width 0 loses its FFN and FFN norms, as the pruner leaves it."""
  params = {name: dict(node) for name, node in params.items()}
  for i, width in enumerate(widths):
    layer = params[ffn.layer_name(i)]
    if width:
      mlp = layer["mlp"]
      layer["mlp"] = {ffn.GATE: mlp[ffn.GATE][:, :width], ffn.UP: mlp[ffn.UP][:, :width],
                      ffn.OUT: mlp[ffn.OUT][:width]}
    else:
      for name in ("mlp", "pre_ffw_norm", "post_ffw_norm"):  # Llama's has no post_ffw_norm
        layer.pop(name, None)
  return cfg.replace(ffn_widths=tuple(widths)), params
