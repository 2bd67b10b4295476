"""Memory-efficient attention in plain JAX: online softmax over key blocks, recomputed backward.

    out = chunked_attention(q, k, v, segment_ids, scale=..., softcap=50.0, window=4096)

The same function as `attentions.dot_product_attention` with `attentions.attention_mask`
(causal, same segment, `i - W < j <= i` when windowed; Gemma-2's logit soft-cap before the
mask), computed without the [T, S] score matrix:

* forward: for each block of `block_q` queries, a loop over the key blocks it can see keeps the
  running maximum m, normaliser l and weighted sum of values (the online softmax of
  Milakov & Gimelshein / FlashAttention), then saves only the output and the row log-sum-exp;
* key blocks that are entirely in the future (causal) or entirely before the window are never
  visited, so a sliding-window layer costs O(T * W), not O(T^2);
* backward (`jax.custom_vjp`): recomputes each block's probabilities from q, k and the saved
  log-sum-exp, so nothing of size [T, S] is stored between the passes:
      dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  through the soft-cap dS *= 1 - (s / c)^2,
      dQ = scale dS K,  dK = scale dS^T Q,  dV = P^T dO.

Runs on every backend (CPU included).  Scores and accumulators are float32 whatever the input
dtype; probabilities meet the values in the values' dtype, as in the reference.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

_MASKED = -2.3819763e38  # as attentions._MASKED: finite, so no NaN anywhere


def check_self_attention(name: str, q, k, segment_ids) -> int:
  """The number of positions T of q [B, T, ...], after checking that k and segment_ids have it
  too (the blockwise implementations are self-attention only)."""
  length = q.shape[1]
  if k.shape[1] != length or segment_ids.shape[-1] != length:
    raise ValueError(f"{name} is self-attention: q has {length} positions, k {k.shape[1]}, "
                     f"segment_ids {segment_ids.shape[-1]}")
  return length


def pad_positions(q, k, v, segment_ids, multiple: int):
  """q, k, v [B, T, ...] and segment_ids [B, T] (as int32) padded with positions up to a multiple
  of `multiple`; the padding is its own segment (-1), so no real position sees it."""
  length = q.shape[1]
  extra = -(-length // multiple) * multiple - length
  segment_ids = segment_ids.astype(jnp.int32)
  if extra:
    pad = lambda x: jnp.pad(x, [(0, 0), (0, extra)] + [(0, 0)] * (x.ndim - 2))
    q, k, v = pad(q), pad(k), pad(v)
    segment_ids = jnp.pad(segment_ids, [(0, 0), (0, extra)], constant_values=-1)
  return q, k, v, segment_ids


def chunked_attention(q, k, v, segment_ids, *, scale: float, softcap: Optional[float] = None,
                      window: Optional[int] = None, block_q: int = 512, block_k: int = 512):
  """Self-attention of q [B, T, K, G, H] over k, v [B, T, K, H] (query head k * G + g uses kv
  head k) with packed `segment_ids` [B, T]; returns [B, T, K, G, H] in v's dtype.  Block sizes
  are capped at T; T is padded up to a multiple of them (padding is its own segment)."""
  length = check_self_attention("chunked_attention", q, k, segment_ids)
  block_q, block_k = min(block_q, length), min(block_k, length)
  q, k, v, segment_ids = pad_positions(q, k, v, segment_ids, math.lcm(block_q, block_k))
  out = _attention(q, k, v, segment_ids, float(scale),
                   None if softcap is None else float(softcap), window, block_q, block_k)
  return out[:, :length]


def _key_blocks(i, block_q, block_k, num_k_blocks, window):
  """[lo, hi) of the key blocks that query block i can see (causal, and inside the window)."""
  hi = jnp.minimum(((i + 1) * block_q - 1) // block_k + 1, num_k_blocks)
  if window is None:
    return 0, hi
  return jnp.maximum((i * block_q - window + 1) // block_k, 0), hi


def _block_scores(q_blk, k_blk, seg_q, seg_k, i, j, scale, softcap, window, block_q, block_k):
  """Capped scores [B, K, G, bq, bk] (float32), their mask and the uncapped-to-capped factor."""
  s = jnp.einsum("BTKGH,BSKH->BKGTS", q_blk, k_blk, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    s = softcap * jnp.tanh(s / softcap)
  rows = i * block_q + jnp.arange(block_q)[:, None]
  cols = j * block_k + jnp.arange(block_k)[None, :]
  allowed = cols <= rows
  if window is not None:
    allowed = allowed & (cols > rows - window)
  mask = allowed[None] & (seg_q[:, :, None] == seg_k[:, None, :])  # [B, bq, bk]
  return s, mask[:, None, None]


def _slice(x, start, size, axis=1):
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _forward(q, k, v, segment_ids, scale, softcap, window, block_q, block_k):
  """(out [B, T, K, G, H], lse [B, K, G, T] float32)."""
  batch, length, kv, groups, head = q.shape
  num_k_blocks = length // block_k

  def one_query_block(i):
    q_blk = _slice(q, i * block_q, block_q)
    seg_q = _slice(segment_ids, i * block_q, block_q)

    def visit(j, carry):
      m, l, acc = carry
      k_blk, v_blk = _slice(k, j * block_k, block_k), _slice(v, j * block_k, block_k)
      s, mask = _block_scores(q_blk, k_blk, seg_q, _slice(segment_ids, j * block_k, block_k),
                              i, j, scale, softcap, window, block_q, block_k)
      s = jnp.where(mask, s, _MASKED)
      m_new = jnp.maximum(m, jnp.max(s, axis=-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      correction = jnp.exp(m - m_new)
      l = l * correction + jnp.sum(p, axis=-1)
      acc = acc * correction[..., None] + jnp.einsum(
          "BKGTS,BSKH->BKGTH", p.astype(v.dtype), v_blk, preferred_element_type=jnp.float32)
      return m_new, l, acc

    init = (jnp.full((batch, kv, groups, block_q), _MASKED, jnp.float32),
            jnp.zeros((batch, kv, groups, block_q), jnp.float32),
            jnp.zeros((batch, kv, groups, block_q, head), jnp.float32))
    lo, hi = _key_blocks(i, block_q, block_k, num_k_blocks, window)
    m, l, acc = jax.lax.fori_loop(lo, hi, visit, init)
    l = jnp.where(l > 0, l, 1.0)  # a row with nothing to see (only padding can be one)
    return (acc / l[..., None]).astype(v.dtype), m + jnp.log(l)

  outs, lses = jax.lax.map(one_query_block, jnp.arange(length // block_q))
  # [nq, B, K, G, bq, H] -> [B, T, K, G, H];  [nq, B, K, G, bq] -> [B, K, G, T]
  out = outs.transpose(1, 0, 4, 2, 3, 5).reshape(batch, length, kv, groups, head)
  lse = lses.transpose(1, 2, 3, 0, 4).reshape(batch, kv, groups, length)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _attention(q, k, v, segment_ids, scale, softcap, window, block_q, block_k):
  return _forward(q, k, v, segment_ids, scale, softcap, window, block_q, block_k)[0]


def _attention_fwd(q, k, v, segment_ids, scale, softcap, window, block_q, block_k):
  out, lse = _forward(q, k, v, segment_ids, scale, softcap, window, block_q, block_k)
  return out, (q, k, v, segment_ids, out, lse)


def _attention_bwd(scale, softcap, window, block_q, block_k, residuals, d_out):
  q, k, v, segment_ids, out, lse = residuals
  length = q.shape[1]
  num_k_blocks = length // block_k
  # rowsum(dO * O) [B, K, G, T]
  delta = jnp.einsum("BTKGH,BTKGH->BKGT", d_out.astype(jnp.float32), out.astype(jnp.float32))

  def one_query_block(carry, i):
    dk, dv = carry
    q_blk = _slice(q, i * block_q, block_q)
    do_blk = _slice(d_out, i * block_q, block_q)
    seg_q = _slice(segment_ids, i * block_q, block_q)
    lse_blk = _slice(lse, i * block_q, block_q, axis=3)
    delta_blk = _slice(delta, i * block_q, block_q, axis=3)

    def visit(j, inner):
      dq_blk, dk, dv = inner
      k_blk, v_blk = _slice(k, j * block_k, block_k), _slice(v, j * block_k, block_k)
      s, mask = _block_scores(q_blk, k_blk, seg_q, _slice(segment_ids, j * block_k, block_k),
                              i, j, scale, softcap, window, block_q, block_k)
      p = jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)
      dp = jnp.einsum("BTKGH,BSKH->BKGTS", do_blk, v_blk, preferred_element_type=jnp.float32)
      ds = p * (dp - delta_blk[..., None])
      if softcap is not None:
        ds = ds * (1.0 - (s / softcap) ** 2)
      ds = ds * scale
      dq_blk = dq_blk + jnp.einsum("BKGTS,BSKH->BTKGH", ds, k_blk.astype(jnp.float32))
      dk_blk = jnp.einsum("BKGTS,BTKGH->BSKH", ds, q_blk.astype(jnp.float32))
      dv_blk = jnp.einsum("BKGTS,BTKGH->BSKH", p, do_blk.astype(jnp.float32))
      dk = jax.lax.dynamic_update_slice_in_dim(
          dk, _slice(dk, j * block_k, block_k) + dk_blk, j * block_k, axis=1)
      dv = jax.lax.dynamic_update_slice_in_dim(
          dv, _slice(dv, j * block_k, block_k) + dv_blk, j * block_k, axis=1)
      return dq_blk, dk, dv

    lo, hi = _key_blocks(i, block_q, block_k, num_k_blocks, window)
    dq_blk, dk, dv = jax.lax.fori_loop(
        lo, hi, visit, (jnp.zeros(q_blk.shape, jnp.float32), dk, dv))
    return (dk, dv), dq_blk

  zeros = jnp.zeros(k.shape, jnp.float32)
  (dk, dv), dq_blocks = jax.lax.scan(one_query_block, (zeros, zeros),
                                     jnp.arange(length // block_q))
  dq = jnp.moveaxis(dq_blocks, 0, 1).reshape(q.shape)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)
