"""A fused flash-attention kernel in Pallas (Triton backend) for GPUs, with what Gemma-2 needs and
cuDNN lacks: the logit soft-cap, the sliding window and packed segment ids, forward and backward.
`model_config.attention_impl = 'pallas_gpu'`.

FlashAttention-2's scheme, written here for these masks:
  forward  grid (query block, batch, query head): loop over the key blocks the query block can
           see (causal, and from `i - W + 1` on with a window W), online softmax in float32;
           writes the output and the row log-sum-exp.
  backward delta = rowsum(dO * O) (XLA); a dK/dV kernel per (key block, batch, query head) loops
           over the query blocks that see the key block, a dQ kernel per query block over the
           key blocks, both recomputing P = exp(s - lse).  The soft-cap's derivative
           1 - tanh(s / c)^2 multiplies dS.  Grouped heads: dK/dV per query head, summed over
           the group afterwards.
Scores are scaled before the soft-cap (s = c * tanh(scale * q.k / c)), then masked, as `xla`.
The matmuls take q, k, v and dO (P and dS cast down to them) in the inputs' dtype and accumulate
in float32, as FlashAttention does: in bfloat16 training they run on the tensor cores; softmax
statistics, the soft-cap and the accumulators stay float32.

Off GPU the kernels run in Pallas's interpreter (`interpret=True`): how the CPU tests check them
against `xla`; it is slow there and only for tests.  Shapes follow
`attentions.dot_product_attention` (q [B, T, K, G, H], k, v [B, T, K, H]); T is padded to a
multiple of the blocks (the padding is its own segment); the head dimension must be a power of 2
(Triton's tiles).
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from maxnucl.layers.chunked_attention import check_self_attention, pad_positions

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)


def _scores(q, k, q_pos, k_pos, q_seg, k_seg, scale, softcap, window):
  """(capped scores, tanh(s / c) or None, mask) of a [bq, bk] tile, in float32; q and k in their
  own dtype (bfloat16 in training: the tensor cores' input type, accumulated in float32)."""
  s = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale
  t = None
  if softcap is not None:
    t = jnp.tanh(s / softcap)
    s = softcap * t
  mask = (k_pos[None, :] <= q_pos[:, None]) & (q_seg[:, None] == k_seg[None, :])
  if window is not None:
    mask = mask & (k_pos[None, :] > q_pos[:, None] - window)
  return jnp.where(mask, s, _MASKED), t, mask


def _key_range(i, block_q, block_k, window):
  """[first, last) key blocks holding a key visible from query block i."""
  last = lax.div(block_q * (i + 1) + block_k - 1, block_k)
  if window is None:
    return 0, last
  first = lax.div(jnp.maximum(block_q * i - window + 1, 0), block_k)
  return first, last


def _query_range(j, block_q, block_k, window, num_q_blocks):
  """[first, last) query blocks that see a key of key block j."""
  first = lax.div(block_k * j, block_q)
  if window is None:
    return first, num_q_blocks
  last = jnp.minimum(lax.div(block_k * (j + 1) - 1 + window - 1, block_q) + 1, num_q_blocks)
  return first, last


def _forward_kernel(q_ref, k_ref, v_ref, seg_ref, o_ref, lse_ref, *, scale, softcap, window,
                    block_q, block_k):
  i = pl.program_id(0)
  head_dim = q_ref.shape[-1]
  q = q_ref[...]
  q_pos = block_q * i + jnp.arange(block_q)
  q_seg = seg_ref[pl.ds(block_q * i, block_q)]

  def body(j, carry):
    acc, m, l = carry
    keys = pl.ds(block_k * j, block_k)
    v = v_ref[keys, :]
    s, _, mask = _scores(q, k_ref[keys, :], q_pos, block_k * j + jnp.arange(block_k), q_seg,
                         seg_ref[keys], scale, softcap, window)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    p = jnp.where(mask, jnp.exp(s - m_new[:, None]), 0.0)
    correction = jnp.exp(m - m_new)
    acc = correction[:, None] * acc + jnp.dot(p.astype(v.dtype), v,
                                              preferred_element_type=jnp.float32)
    return acc, m_new, correction * l + jnp.sum(p, axis=-1)

  first, last = _key_range(i, block_q, block_k, window)
  init = (jnp.zeros((block_q, head_dim), jnp.float32),
          jnp.full((block_q,), _MASKED, jnp.float32), jnp.zeros((block_q,), jnp.float32))
  acc, m, l = lax.fori_loop(first, last, body, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)  # the diagonal is always visible: l > 0
  lse_ref[...] = m + jnp.log(l)


def _dkv_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                scale, softcap, window, block_q, block_k, num_q_blocks):
  j = pl.program_id(0)
  head_dim = k_ref.shape[-1]
  keys = pl.ds(block_k * j, block_k)
  k = k_ref[keys, :]
  v = v_ref[keys, :]
  k_pos = block_k * j + jnp.arange(block_k)
  k_seg = seg_ref[keys]

  def body(i, carry):
    dk, dv = carry
    rows = pl.ds(block_q * i, block_q)
    q = q_ref[rows, :]
    do = do_ref[rows, :]
    s, t, mask = _scores(q, k, block_q * i + jnp.arange(block_q), k_pos, seg_ref[rows], k_seg,
                         scale, softcap, window)
    p = jnp.where(mask, jnp.exp(s - lse_ref[rows][:, None]), 0.0)
    dv = dv + jnp.dot(p.astype(do.dtype).T, do, preferred_element_type=jnp.float32)
    ds = p * (jnp.dot(do, v.T, preferred_element_type=jnp.float32) - delta_ref[rows][:, None])
    if t is not None:
      ds = ds * (1.0 - t * t)
    return dk + jnp.dot(ds.astype(q.dtype).T, q, preferred_element_type=jnp.float32), dv

  first, last = _query_range(j, block_q, block_k, window, num_q_blocks)
  zeros = jnp.zeros((block_k, head_dim), jnp.float32)
  dk, dv = lax.fori_loop(first, last, body, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, seg_ref, do_ref, lse_ref, delta_ref, dq_ref, *, scale,
               softcap, window, block_q, block_k):
  i = pl.program_id(0)
  head_dim = q_ref.shape[-1]
  q = q_ref[...]
  do = do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_pos = block_q * i + jnp.arange(block_q)
  q_seg = seg_ref[pl.ds(block_q * i, block_q)]

  def body(j, dq):
    keys = pl.ds(block_k * j, block_k)
    k = k_ref[keys, :]
    s, t, mask = _scores(q, k, q_pos, block_k * j + jnp.arange(block_k), q_seg, seg_ref[keys],
                         scale, softcap, window)
    p = jnp.where(mask, jnp.exp(s - lse[:, None]), 0.0)
    ds = p * (jnp.dot(do, v_ref[keys, :].T, preferred_element_type=jnp.float32) - delta[:, None])
    if t is not None:
      ds = ds * (1.0 - t * t)
    return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  first, last = _key_range(i, block_q, block_k, window)
  dq = lax.fori_loop(first, last, body, jnp.zeros((block_q, head_dim), jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _specs(groups, block_q, block_k, length, head_dim):
  """BlockSpecs on the grid (block, batch, query head n); kv head n // groups."""
  del block_k
  q_block = pl.BlockSpec((None, None, block_q, head_dim), lambda i, b, n: (b, n, i, 0))
  q_all = pl.BlockSpec((None, None, length, head_dim), lambda i, b, n: (b, n, 0, 0))
  kv_all = pl.BlockSpec((None, None, length, head_dim), lambda i, b, n: (b, n // groups, 0, 0))
  seg = pl.BlockSpec((None, length), lambda i, b, n: (b, 0))
  row_block = pl.BlockSpec((None, None, block_q), lambda i, b, n: (b, n, i))
  row_all = pl.BlockSpec((None, None, length), lambda i, b, n: (b, n, 0))
  return q_block, q_all, kv_all, seg, row_block, row_all


def _compiler_params(head_dim):
  return plgpu.CompilerParams(num_warps=4 if head_dim <= 64 else 8, num_stages=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8, 9))
def _flash(q, k, v, seg, scale, softcap, window, block_q, block_k, interpret):
  return _flash_forward(q, k, v, seg, scale, softcap, window, block_q, block_k, interpret)[0]


def _flash_forward(q, k, v, seg, scale, softcap, window, block_q, block_k, interpret):
  batch, heads, length, head_dim = q.shape
  groups = heads // k.shape[1]
  q_block, _, kv_all, seg_spec, row_block, _ = _specs(groups, block_q, block_k, length, head_dim)
  kernel = functools.partial(_forward_kernel, scale=scale, softcap=softcap, window=window,
                             block_q=block_q, block_k=block_k)
  out, lse = pl.pallas_call(
      kernel, grid=(length // block_q, batch, heads),
      in_specs=[q_block, kv_all, kv_all, seg_spec], out_specs=[q_block, row_block],
      out_shape=[jax.ShapeDtypeStruct(q.shape, v.dtype),
                 jax.ShapeDtypeStruct((batch, heads, length), jnp.float32)],
      compiler_params=_compiler_params(head_dim), interpret=interpret,
      name="maxnucl_flash_forward")(q, k, v, seg)
  return out, lse


def _flash_fwd(q, k, v, seg, scale, softcap, window, block_q, block_k, interpret):
  out, lse = _flash_forward(q, k, v, seg, scale, softcap, window, block_q, block_k, interpret)
  return out, (q, k, v, seg, out, lse)


def _flash_bwd(scale, softcap, window, block_q, block_k, interpret, residuals, d_out):
  q, k, v, seg, out, lse = residuals
  batch, heads, length, head_dim = q.shape
  kv_heads = k.shape[1]
  groups = heads // kv_heads
  delta = jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32), axis=-1)
  q_block, q_all, kv_all, seg_spec, row_block, row_all = _specs(groups, block_q, block_k,
                                                                length, head_dim)
  k_block = pl.BlockSpec((None, None, block_k, head_dim), lambda j, b, n: (b, n, j, 0))
  dkv = functools.partial(_dkv_kernel, scale=scale, softcap=softcap, window=window,
                          block_q=block_q, block_k=block_k, num_q_blocks=length // block_q)
  dk, dv = pl.pallas_call(
      dkv, grid=(length // block_k, batch, heads),
      in_specs=[q_all, kv_all, kv_all, seg_spec, q_all, row_all, row_all],
      out_specs=[k_block, k_block],
      out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32)] * 2,
      compiler_params=_compiler_params(head_dim), interpret=interpret,
      name="maxnucl_flash_dkv")(q, k, v, seg, d_out, lse, delta)
  dq_kernel = functools.partial(_dq_kernel, scale=scale, softcap=softcap, window=window,
                                block_q=block_q, block_k=block_k)
  dq = pl.pallas_call(
      dq_kernel, grid=(length // block_q, batch, heads),
      in_specs=[q_block, kv_all, kv_all, seg_spec, q_block, row_block, row_block],
      out_specs=q_block, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_compiler_params(head_dim), interpret=interpret,
      name="maxnucl_flash_dq")(q, k, v, seg, d_out, lse, delta)
  # per query head -> per kv head: sum over each group
  dk = dk.reshape(batch, kv_heads, groups, length, head_dim).sum(axis=2).astype(k.dtype)
  dv = dv.reshape(batch, kv_heads, groups, length, head_dim).sum(axis=2).astype(v.dtype)
  return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, segment_ids, *, scale: float, softcap: Optional[float] = None,
                    window: Optional[int] = None, block_q: int = 64, block_k: int = 64,
                    interpret: Optional[bool] = None):
  """Self-attention with the fused kernels; [B, T, K, G, H] in v's dtype (module docstring)."""
  batch, length, kv_heads, groups, head_dim = q.shape
  check_self_attention("flash_attention", q, k, segment_ids)
  if head_dim & (head_dim - 1):
    raise ValueError(f"the Pallas GPU attention needs a power-of-2 head dimension, got "
                     f"{head_dim}; use attention_impl 'chunked'")
  if interpret is None:
    interpret = jax.default_backend() != "gpu"
  if window is not None and window >= length:
    window = None
  block_q = min(block_q, pl.next_power_of_2(length))
  block_k = min(block_k, pl.next_power_of_2(length))
  q, k, v, segment_ids = pad_positions(q, k, v, segment_ids, math.lcm(block_q, block_k))
  padded = q.shape[1]
  q_heads = q.reshape(batch, padded, kv_heads * groups, head_dim).transpose(0, 2, 1, 3)
  out = _flash(q_heads, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segment_ids,
               float(scale), None if softcap is None else float(softcap), window, block_q,
               block_k, bool(interpret))
  out = out.transpose(0, 2, 1, 3).reshape(batch, padded, kv_heads, groups, head_dim)
  return out[:, :length].astype(v.dtype)
