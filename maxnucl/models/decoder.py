"""The decoder stack: Gemma-2 and PaLM-style blocks over shared building blocks.

Parameter tree (plain nested dicts; this *is* the checkpoint format):
  embedder/embedding                     [vocab, d]
  layers_{i}/attn/{q [d,N,H], k [d,K,H], v [d,K,H], o [N,H,d]}
  layers_{i}/mlp/{gate U [d,m_i], up V [d,m_i], out W [m_i,d]}   absent when m_i = 0
  Gemma-2: layers_{i}/{pre_attention_norm, post_attention_norm, pre_ffw_norm, post_ffw_norm}/scale
  PaLM:    layers_{i}/pre_norm/scale
  final_norm/scale                       [d]
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxnucl import sharding
from maxnucl import ffn
from maxnucl.layers.attentions import Attention
from maxnucl.layers.embeddings import Embedder
from maxnucl.layers.linears import GatedMLP
from maxnucl.layers.normalizations import RMSNorm
from maxnucl.models.config import ModelConfig

RESIDUAL_AXES = ("activation_batch", "activation_length", "activation_embed")

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole layer
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def _dtype(name: str):
  return jnp.dtype(name)


class _Block(nn.Module):
  """Shared construction of one layer's attention and FFN."""
  cfg: ModelConfig
  layer_index: int
  deterministic: bool = True

  def norm(self, name: str, offset_scale: bool = True):
    return RMSNorm(eps=self.cfg.norm_eps, offset_scale=offset_scale,
                   param_dtype=_dtype(self.cfg.param_dtype), name=name)

  def attention(self):
    cfg = self.cfg
    return Attention(num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
                     head_dim=cfg.head_dim, scale=cfg.attn_scale,
                     softcap=cfg.attn_logit_softcap, window=cfg.layer_windows[self.layer_index],
                     rope_theta=cfg.rope_theta, dtype=_dtype(cfg.dtype),
                     param_dtype=_dtype(cfg.param_dtype), name="attn")

  def attend(self, h, positions, segment_ids, cache, prefill):
    """(attention output, the layer's updated KV cache or None when decoding is not cached)."""
    if cache is None:
      return self.attention()(h, positions, segment_ids), None
    return self.attention()(h, positions, segment_ids, cache, prefill)

  @property
  def ffn_width(self) -> int:
    return self.cfg.layer_ffn_widths[self.layer_index]

  def mlp(self):
    cfg = self.cfg
    return GatedMLP(width=self.ffn_width, activation=cfg.activation, dtype=_dtype(cfg.dtype),
                    param_dtype=_dtype(cfg.param_dtype), name="mlp")

  def dropout(self, x):
    return nn.Dropout(rate=self.cfg.dropout_rate)(x, deterministic=self.deterministic)


class Gemma2Block(_Block):
  """h = x + post_attn_norm(attn(pre_attn_norm(x))); y = h + post_ffw_norm(ffn(pre_ffw_norm(h)))."""

  @nn.compact
  def __call__(self, x, positions, segment_ids, inner_scale=None, cache=None, prefill=False):
    h = self.norm("pre_attention_norm")(x)
    h, cache = self.attend(h, positions, segment_ids, cache, prefill)
    x = x + self.dropout(self.norm("post_attention_norm")(h))
    if self.ffn_width:  # a layer of width 0 has no FFN branch (and no FFN norms)
      h = self.norm("pre_ffw_norm")(x)
      h = self.mlp()(h, inner_scale)
      x = x + self.dropout(self.norm("post_ffw_norm")(h))
    return sharding.constrain(x, RESIDUAL_AXES), cache


class PalmBlock(_Block):
  """Parallel block: y = x + attn(norm(x)) + ffn(norm(x)), one shared pre-norm."""

  @nn.compact
  def __call__(self, x, positions, segment_ids, inner_scale=None, cache=None, prefill=False):
    h = self.norm("pre_norm", offset_scale=False)(x)
    attended, cache = self.attend(h, positions, segment_ids, cache, prefill)
    y = x + self.dropout(attended)
    if self.ffn_width:
      y = y + self.dropout(self.mlp()(h, inner_scale))
    return sharding.constrain(y, RESIDUAL_AXES), cache


BLOCKS = {"gemma2": Gemma2Block, "palm": PalmBlock}


class Decoder(nn.Module):
  """Token ids -> float32 logits [B, T, vocab].

  With `caches` ({"layers_i": KVCache}) it returns (out, new caches): `prefill=True` fills them
  from a right-padded prompt batch, `prefill=False` appends one token per row (maxnucl.decoding).
  `return_hidden=True` returns the final-normed hidden states [B, T, d] instead of logits (turned
  into logits by `output_logits`, e.g. only where they are needed).
  """
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, tokens, segment_ids, positions,
               ffn_inner_scale: Optional[dict] = None, *, caches: Optional[dict] = None,
               prefill: bool = False, return_hidden: bool = False):
    cfg = self.cfg
    gemma = cfg.family == "gemma2"
    embedder = Embedder(vocab_size=cfg.vocab_size, d_model=cfg.d_model,
                        input_scale="sqrt_d" if gemma else "none", dtype=_dtype(cfg.dtype),
                        param_dtype=_dtype(cfg.param_dtype), name="embedder")
    x = sharding.constrain(embedder.encode(tokens), RESIDUAL_AXES)
    block_cls = BLOCKS[cfg.family]
    if cfg.remat_policy != "none" and caches is None:  # decoding has no backward pass
      block_cls = nn.remat(block_cls, prevent_cse=True, policy=_REMAT_POLICIES[cfg.remat_policy])
    new_caches = {}
    for i in range(cfg.num_layers):
      name = ffn.layer_name(i)
      block = block_cls(cfg, i, self.deterministic, name=name)
      if caches is None:
        scale = None if ffn_inner_scale is None else ffn_inner_scale.get(name)
        x, _ = block(x, positions, segment_ids, scale)
      else:
        x, new_caches[name] = block(x, positions, segment_ids, None, caches[name], prefill)
    x = RMSNorm(eps=cfg.norm_eps, offset_scale=gemma, param_dtype=_dtype(cfg.param_dtype),
                name="final_norm")(x)
    out = x if return_hidden else output_logits(cfg, embedder.embedding, x)
    return out if caches is None else (out, new_caches)


def output_logits(cfg: ModelConfig, embedding, x) -> jax.Array:
  """Final-normed hidden states [..., d] -> float32 logits [..., vocab]: the tied output
  projection, PaLM's 1/sqrt(d) and the final soft-cap."""
  logits = jnp.einsum("...D,VD->...V", x, embedding.astype(_dtype(cfg.dtype)),
                      preferred_element_type=jnp.float32)
  if x.ndim == 3:
    logits = sharding.constrain(logits, ("activation_batch", "activation_length",
                                         "activation_vocab"))
  if cfg.family != "gemma2":
    logits = logits / jnp.sqrt(jnp.float32(cfg.d_model))  # PaLM: shared embedding, 1/sqrt(d)
  if cfg.final_logit_softcap is not None:
    cap = cfg.final_logit_softcap
    logits = cap * jnp.tanh(logits / cap)
  return logits
