"""Grouped-query self-attention with RoPE, logit soft-cap, sliding window and packed segments."""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from maxnucl import sharding
from maxnucl.layers.embeddings import apply_rope
from maxnucl.layers.initializers import fan_in_normal, param_with_axes

_MASKED = -2.3819763e38  # a large finite negative (not -inf: no NaN for any fully masked row)


def attention_mask(segment_ids, window: Optional[int]):
  """[B, 1, 1, T, S] bool: causal, same segment, and `i - W < j <= i` when windowed."""
  length = segment_ids.shape[-1]
  i = jnp.arange(length)[:, None]
  j = jnp.arange(length)[None, :]
  allowed = j <= i
  if window is not None:
    allowed = allowed & (j > i - window)
  same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (allowed[None] & same_segment)[:, None, None, :, :]


def dot_product_attention(q, k, v, mask, *, scale: float, softcap: Optional[float]):
  """Reference attention (XLA); the seam where fused kernels plug in later.

  q: [B, T, K, G, H] (query head n = k * G + g uses kv head k); k, v: [B, S, K, H];
  mask: broadcastable to [B, K, G, T, S].  Returns [B, T, K, G, H] in v's dtype.
  """
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    scores = softcap * jnp.tanh(scores / softcap)  # soft-cap before the mask, as Gemma-2
  scores = jnp.where(mask, scores, _MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("BKGTS,BSKH->BTKGH", probs, v)


class Attention(nn.Module):
  """Self-attention.  q [d, N, H], k/v [d, K, H], o [N, H, d]; K = 1 is multi-query."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  scale: float
  softcap: Optional[float] = None
  window: Optional[int] = None
  rope_theta: float = 10_000.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    """x: [B, T, d]; positions, segment_ids: [B, T] int -> [B, T, d]."""
    d = x.shape[-1]
    n, kv, h = self.num_heads, self.num_kv_heads, self.head_dim
    init = fan_in_normal((0,))
    w_q = param_with_axes(self, "q", init, (d, n, h), self.param_dtype, ("embed", "heads", "kv"))
    w_k = param_with_axes(self, "k", init, (d, kv, h), self.param_dtype,
                          ("embed", "kv_heads", "kv"))
    w_v = param_with_axes(self, "v", init, (d, kv, h), self.param_dtype,
                          ("embed", "kv_heads", "kv"))
    w_o = param_with_axes(self, "o", fan_in_normal((0, 1)), (n, h, d), self.param_dtype,
                          ("heads", "kv", "embed"))
    q = jnp.einsum("BTD,DNH->BTNH", x, w_q.astype(self.dtype))
    k = jnp.einsum("BSD,DKH->BSKH", x, w_k.astype(self.dtype))
    v = jnp.einsum("BSD,DKH->BSKH", x, w_v.astype(self.dtype))
    q = sharding.constrain(q, ("activation_batch", "activation_length", "activation_heads",
                               "activation_kv"))
    q = apply_rope(q, positions, self.rope_theta)
    k = apply_rope(k, positions, self.rope_theta)
    groups = n // kv
    q = q.reshape(*q.shape[:2], kv, groups, h)
    mask = attention_mask(segment_ids, self.window)
    out = dot_product_attention(q, k, v, mask, scale=self.scale, softcap=self.softcap)
    out = out.reshape(*out.shape[:2], n, h)
    out = sharding.constrain(out, ("activation_batch", "activation_length", "activation_heads",
                                   "activation_kv"))
    return jnp.einsum("BTNH,NHD->BTD", out, w_o.astype(self.dtype))
