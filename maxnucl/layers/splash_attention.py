"""Attention through JAX's Pallas splash-attention kernel (the TPU kernel MaxText uses):
`model_config.attention_impl = 'splash'`, and `auto`'s choice on TPU.

The kernel applies Gemma-2's logit soft-cap (`attn_logits_soft_cap`), the causal mask and the
sliding window (`CausalMask & LocalMask`, skipping blocks outside them) and packed segment ids,
forward and backward (its own dq/dkv kernels); grouped-query and multi-query attention map to
its grouped heads.  Off TPU the same kernel runs in Pallas's interpreter (`interpret=True`), which
is how CPU tests check it against `xla`; it is slow there and only for tests.

Shapes follow `attentions.dot_product_attention`: q [B, T, K, G, H] (query head k * G + g uses kv
head k), k, v [B, T, K, H], segment_ids [B, T].  T is padded up to a multiple of the block (128
minimum, the TPU tile); the padding is its own segment.  Inside `sharding.activate` the kernel
runs under `shard_map` over the batch (the mesh axes of `activation_batch`); heads and sequence
are whole on each device.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec

from maxnucl import sharding
from maxnucl.layers.chunked_attention import check_self_attention, pad_positions

TILE = 128
DEFAULT_BLOCK = 512


@functools.lru_cache(maxsize=64)
def _kernel(num_heads: int, length: int, window: Optional[int], softcap: Optional[float],
            block: int, interpret: bool):
  mask = masks.CausalMask((length, length))
  if window is not None and window < length:
    # ours: key j visible from query i when i - W < j <= i; LocalMask: i - left <= j <= i + right
    mask = mask & masks.LocalMask((length, length), window_size=(window - 1, 0), offset=0)
  sizes = kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  # Concrete mask arrays even when first built inside a trace (the kernel is cached across traces)
  with jax.ensure_compile_time_eval():
    return kernel.make_splash_mha(masks.MultiHeadMask([mask] * num_heads), head_shards=1,
                                  q_seq_shards=1, block_sizes=sizes,
                                  attn_logits_soft_cap=softcap, interpret=interpret)


def splash_attention(q, k, v, segment_ids, *, scale: float, softcap: Optional[float] = None,
                     window: Optional[int] = None, block: int = DEFAULT_BLOCK,
                     interpret: Optional[bool] = None):
  """Self-attention with the splash kernel; [B, T, K, G, H] in v's dtype (module docstring)."""
  batch, length, kv_heads, groups, head_dim = q.shape
  check_self_attention("splash_attention", q, k, segment_ids)
  if interpret is None:
    interpret = jax.default_backend() != "tpu"
  block = min(block, -(-length // TILE) * TILE)
  q, k, v, segment_ids = pad_positions(q, k, v, segment_ids, block)
  padded = q.shape[1]
  heads = kv_heads * groups
  # heads first, query scaled here (the kernel computes q . k)
  q_heads = (q * jnp.asarray(scale, q.dtype)).reshape(batch, padded, heads, head_dim)
  q_heads = q_heads.transpose(0, 2, 1, 3)
  k_heads, v_heads = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  splash = _kernel(heads, padded, window, None if softcap is None else float(softcap), block,
                   bool(interpret))

  def attend(q_, k_, v_, seg_):
    one = lambda a, b, c, s: splash(a, b, c, segment_ids=kernel.SegmentIds(q=s, kv=s))
    return jax.vmap(one)(q_, k_, v_, seg_)

  context = getattr(sharding._CONTEXT, "value", None)  # pylint: disable=protected-access
  if context is None:
    out = attend(q_heads, k_heads, v_heads, segment_ids)
  else:
    mesh, rules = context
    spec = sharding.logical_to_spec(("activation_batch", None, None, None), q_heads.shape,
                                    mesh, rules)
    batch_spec = spec[0]
    four, two = PartitionSpec(batch_spec, None, None, None), PartitionSpec(batch_spec, None)
    out = jax.shard_map(attend, mesh=mesh, in_specs=(four, four, four, two), out_specs=four,
                        check_vma=False)(q_heads, k_heads, v_heads, segment_ids)
  out = out.transpose(0, 2, 1, 3).reshape(batch, padded, kv_heads, groups, head_dim)
  return out[:, :length].astype(v.dtype)
