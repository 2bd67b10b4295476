"""Grouped-query self-attention with RoPE (optionally frequency-scaled), optional q/k/v biases and
QK-norm, logit soft-cap, sliding window and packed segments, and the key/value cache that
decoding extends one token at a time."""

from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from maxnucl import sharding
from maxnucl.layers.chunked_attention import chunked_attention
from maxnucl.layers.embeddings import apply_rope
from maxnucl.layers.gpu_attention import flash_attention
from maxnucl.layers.splash_attention import splash_attention
from maxnucl.layers.initializers import fan_in_normal, param_with_axes
from maxnucl.layers.normalizations import RMSNorm

_MASKED = -2.3819763e38  # a large finite negative (not -inf: no NaN for any fully masked row)
# impl "auto": on TPU the splash kernel; elsewhere, from this many positions the chunked attention,
# which is smaller and, on CPU, faster from here on (benchmarks/attention_memory.py).
AUTO_CHUNKED_LENGTH = 1024


def choose_impl(impl: str, length: int, backend: Optional[str] = None,
                softcap: Optional[float] = None) -> str:
  """The implementation `impl` ("xla" | "chunked" | "splash" | "cudnn" | "pallas_gpu" | "auto")
  means for `length` positions on `backend` (default: JAX's default backend) with logit soft-cap
  `softcap`: on TPU splash; on GPU without a soft-cap (PaLM) cuDNN's fused attention;
  otherwise chunked from AUTO_CHUNKED_LENGTH positions, xla below.  'pallas_gpu' (Gemma-2's
  fused GPU kernel) is chosen only explicitly until it is measured on a GPU."""
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  if backend == "tpu":
    return "splash"
  if backend == "gpu" and softcap is None:
    return "cudnn"
  return "chunked" if length >= AUTO_CHUNKED_LENGTH else "xla"


def cudnn_attention(q, k, v, segment_ids, *, scale: float, window: Optional[int],
                    implementation: Optional[str] = None):
  """`jax.nn.dot_product_attention` (cuDNN's fused kernel on GPU; XLA elsewhere, or with
  `implementation`) for q [B, T, K, G, H], k, v [B, T, K, H]: causal, `local_window_size` for a
  sliding window, packed segments as a [B, 1, T, T] mask.  No logit soft-cap (refused by the
  config)."""
  batch, length, kv_heads, groups, head_dim = q.shape
  if implementation is None and jax.default_backend() == "gpu":
    implementation = "cudnn"
  same_segment = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  out = jax.nn.dot_product_attention(
      q.reshape(batch, length, kv_heads * groups, head_dim), k, v, mask=same_segment,
      scale=scale, is_causal=True,
      local_window_size=None if window is None or window >= length else (window - 1, 0),
      implementation=implementation)
  return out.reshape(batch, length, kv_heads, groups, head_dim).astype(v.dtype)


def attention_mask(segment_ids, window: Optional[int]):
  """[B, 1, 1, T, S] bool: causal, same segment, and `i - W < j <= i` when windowed."""
  everything = slice(0, segment_ids.shape[-1])
  return attention_mask_block(segment_ids, window, everything, everything)


def _attention_probs(scores, mask, softcap: Optional[float], dtype):
  if softcap is not None:
    scores = softcap * jnp.tanh(scores / softcap)  # soft-cap before the mask, as Gemma-2
  scores = jnp.where(mask, scores, _MASKED)
  return jax.nn.softmax(scores, axis=-1).astype(dtype)


def dot_product_attention(q, k, v, mask, *, scale: float, softcap: Optional[float]):
  """Reference attention (XLA); the seam where fused kernels plug in later.

  q: [B, T, K, G, H] (query head n = k * G + g uses kv head k); k, v: [B, S, K, H];
  mask: broadcastable to [B, K, G, T, S].  Returns [B, T, K, G, H] in v's dtype.
  """
  scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32) * scale
  probs = _attention_probs(scores, mask, softcap, v.dtype)
  # Written [B, K, G, T, H] then transposed: XLA:CPU computes "->BTKGH" directly ~10x slower.
  return jnp.einsum("BKGTS,BSKH->BKGTH", probs, v).transpose(0, 3, 1, 2, 4)


# Query rows per block of `causal_blocked_attention`: on 2 CPU cores a 512-token prefill of
# SmolLM2-135M's attention runs 2.3x faster in blocks of 64 than as one [T, T] product
# (benchmarks/smollm2_speed.py, docs/performance.md).
QUERY_BLOCK = 64
MAX_QUERY_BLOCKS = 16


def causal_blocked_attention(q, k, v, segment_ids, *, scale: float, softcap: Optional[float],
                             window: Optional[int]):
  """`dot_product_attention` computed per block of query rows against only the keys the block
  can see (causal: keys up to its last row; windowed: from its first row's window start), so the
  masked upper triangle is neither multiplied nor exponentiated: about half the work of one
  [T, T] product.  Each row's softmax still covers every key it is allowed, so the result is the
  same function (masked keys contribute exp(-inf) = 0 either way).

  q: [B, T, K, G, H]; k, v: [B, T, K, H]; segment_ids: [B, T] -> [B, T, K, G, H].
  """
  length = q.shape[1]
  block = max(QUERY_BLOCK, -(-length // MAX_QUERY_BLOCKS))
  outputs = []
  for start in range(0, length, block):
    stop = min(start + block, length)
    first_key = 0 if window is None else max(0, start - window + 1)
    keys = slice(first_key, stop)
    mask = attention_mask_block(segment_ids, window, slice(start, stop), keys)
    outputs.append(dot_product_attention(q[:, start:stop], k[:, keys], v[:, keys], mask,
                                         scale=scale, softcap=softcap))
  return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)


def attention_mask_block(segment_ids, window: Optional[int], queries: slice, keys: slice):
  """The rows `queries` and columns `keys` of `attention_mask`: [B, 1, 1, Tq, Sk] bool."""
  i = jnp.arange(queries.start, queries.stop)[:, None]
  j = jnp.arange(keys.start, keys.stop)[None, :]
  allowed = j <= i
  if window is not None:
    allowed = allowed & (j > i - window)
  same_segment = segment_ids[:, queries, None] == segment_ids[:, None, keys]
  return (allowed[None] & same_segment)[:, None, None, :, :]


def cached_dot_product_attention(q, cache: "KVCache", mask, *, scale: float,
                                 softcap: Optional[float]):
  """The same attention over a cache's heads-major keys and values [B, K, L, H] (a contiguous
  [L, H] matrix per row and head: no transposed copy of the cache at each decode step).

  q: [B, T, K, G, H]; mask: broadcastable to [B, K, G, T, L].  Returns [B, T, K, G, H].
  """
  scores = jnp.einsum("BTKGH,BKLH->BKGTL", q, cache.k,
                      preferred_element_type=jnp.float32) * scale
  probs = _attention_probs(scores, mask, softcap, cache.v.dtype)
  return jnp.einsum("BKGTL,BKLH->BKGTH", probs, cache.v).transpose(0, 3, 1, 2, 4)


@flax.struct.dataclass
class KVCache:
  """One attention layer's keys and values for decoding.

  k, v       [B, K, L, H] in the compute dtype, RoPE already applied to k (heads-major, so the
             decode step reads each head's keys as one contiguous matrix);
  positions  [B, L] int32: the position of the token held in each slot, -1 for an empty slot.

  The token at position p lives in slot p % L.  A global layer's L is at least the longest
  sequence, so slot = position; a sliding-window layer's L is the window W: a ring buffer whose
  memory does not grow with the sequence (a slot is overwritten by the token W positions later,
  exactly when the window stops seeing it).  Masks are computed from `positions`, so rows of one
  batch may hold sequences of different lengths.
  """
  k: jax.Array
  v: jax.Array
  positions: jax.Array

  @classmethod
  def empty(cls, batch: int, length: int, num_kv_heads: int, head_dim: int,
            dtype) -> "KVCache":
    shape = (batch, num_kv_heads, length, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
               jnp.full((batch, length), -1, jnp.int32))

  @property
  def length(self) -> int:
    return self.k.shape[2]


_CACHE_AXES = ("activation_batch", "activation_kv_heads", "activation_length", "activation_kv")


def _constrain_cache(cache: KVCache) -> KVCache:
  return KVCache(sharding.constrain(cache.k, _CACHE_AXES), sharding.constrain(cache.v, _CACHE_AXES),
                 sharding.constrain(cache.positions, ("activation_batch", "activation_length")))


def fill_cache(cache: KVCache, k, v, lengths) -> KVCache:
  """The cache after a prompt: k, v [B, T, K, H] of right-padded rows whose first `lengths[b]`
  tokens (positions 0..lengths[b]-1) are real.  Slot s receives the latest real position p with
  p % L == s, i.e. the last L tokens of each row when the prompt is longer than the ring."""
  slots = jnp.arange(cache.length, dtype=jnp.int32)[None, :]  # [1, L]
  last = lengths[:, None].astype(jnp.int32) - 1  # [B, 1]
  source = slots + cache.length * jnp.floor_divide(last - slots, cache.length)  # [B, L]
  filled = slots <= last
  index = jnp.clip(source, 0, k.shape[1] - 1)[:, :, None, None]

  def gather(x, dtype):  # [B, T, K, H] -> [B, K, L, H]
    return jnp.take_along_axis(x, index, axis=1).astype(dtype).transpose(0, 2, 1, 3)

  return _constrain_cache(KVCache(gather(k, cache.k.dtype), gather(v, cache.v.dtype),
                                  jnp.where(filled, source, -1)))


def append_to_cache(cache: KVCache, k, v, positions) -> KVCache:
  """k, v [B, 1, K, H] of the tokens at `positions` [B, 1] written into slot position % L."""
  slot = positions[:, 0] % cache.length

  def write(buffer, update, s):  # one row: buffer [K, L, H] or [L], update [K, 1, H] or [1]
    axis = buffer.ndim - 2 if buffer.ndim > 1 else 0
    return jax.lax.dynamic_update_slice_in_dim(buffer, update, s, axis=axis)

  write_rows = jax.vmap(write)
  return _constrain_cache(KVCache(
      write_rows(cache.k, k.astype(cache.k.dtype).transpose(0, 2, 1, 3), slot),
      write_rows(cache.v, v.astype(cache.v.dtype).transpose(0, 2, 1, 3), slot),
      write_rows(cache.positions, positions, slot)))


def cached_attention_mask(query_positions, key_positions, window: Optional[int]):
  """[B, 1, 1, T, L] bool from positions: a filled slot, causal, and inside the window."""
  q = query_positions[:, :, None]
  j = key_positions[:, None, :]
  allowed = (j >= 0) & (j <= q)
  if window is not None:
    allowed = allowed & (j > q - window)
  return allowed[:, None, None, :, :]


class Attention(nn.Module):
  """Self-attention.  q [d, N, H], k/v [d, K, H], o [N, H, d]; K = 1 is multi-query."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  scale: float
  softcap: Optional[float] = None
  window: Optional[int] = None
  rope_theta: float = 10_000.0
  rope_scaling: Optional[tuple] = None  # ModelConfig.rope_scaling
  qkv_bias: bool = False  # q_bias [N, H], k_bias / v_bias [K, H] (Qwen2)
  qk_norm: bool = False  # query_norm / key_norm: RMSNorm over H before RoPE (Gemma-3)
  norm_offset: bool = True  # the QK-norms' scale convention (RMSNorm.offset_scale)
  norm_eps: float = 1e-6
  impl: str = "xla"  # "xla" | "chunked" | "splash" | "cudnn" | "pallas_gpu" | "auto" (choose_impl)
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache: Optional[KVCache] = None,
               prefill: bool = False):
    """x: [B, T, d]; positions, segment_ids: [B, T] int -> [B, T, d].

    With a `cache` the call returns (out, new_cache):
      prefill=True   x is a right-padded prompt batch (segment id 0 on padding, positions
                     0, 1, ...): attention as without a cache, and the cache is filled from it;
      prefill=False  x is one new token per row [B, 1] at `positions`: it is written into the
                     cache, then attends over the cache.
    """
    n, kv, h = self.num_heads, self.num_kv_heads, self.head_dim
    w_q, w_k, w_v, w_o = self.kernels(x.shape[-1])
    q, k, v = self.project(x, positions, w_q, w_k, w_v)
    groups = n // kv
    q = q.reshape(*q.shape[:2], kv, groups, h)
    if cache is None or prefill:
      impl = choose_impl(self.impl, x.shape[1], softcap=self.softcap)
      if impl == "chunked":
        out = chunked_attention(q, k, v, segment_ids, scale=self.scale, softcap=self.softcap,
                                window=self.window)
      elif impl == "splash":
        out = splash_attention(q, k, v, segment_ids, scale=self.scale, softcap=self.softcap,
                               window=self.window)
      elif impl == "cudnn":
        out = cudnn_attention(q, k, v, segment_ids, scale=self.scale, window=self.window)
      elif impl == "pallas_gpu":
        out = flash_attention(q, k, v, segment_ids, scale=self.scale, softcap=self.softcap,
                              window=self.window)
      else:
        out = causal_blocked_attention(q, k, v, segment_ids, scale=self.scale,
                                       softcap=self.softcap, window=self.window)
      if cache is not None:
        cache = fill_cache(cache, k, v, jnp.sum(segment_ids != 0, axis=1))
    else:
      if x.shape[1] != 1:
        raise ValueError(f"a decode step takes one token per row, got {x.shape[1]}")
      cache = append_to_cache(cache, k, v, positions)
      mask = cached_attention_mask(positions, cache.positions, self.window)
      out = cached_dot_product_attention(q, cache, mask, scale=self.scale, softcap=self.softcap)
    out = out.reshape(*out.shape[:2], n, h)
    out = sharding.constrain(out, ("activation_batch", "activation_length", "activation_heads",
                                   "activation_kv"))
    out = jnp.einsum("BTNH,NHD->BTD", out, w_o.astype(self.dtype))
    return out if cache is None else (out, cache)

  def kernels(self, d: int):
    """The projections q [d, N, H], k, v [d, K, H], o [N, H, d], created in this order."""
    n, kv, h = self.num_heads, self.num_kv_heads, self.head_dim
    init = fan_in_normal((0,))
    return (
        param_with_axes(self, "q", init, (d, n, h), self.param_dtype, ("embed", "heads", "kv")),
        param_with_axes(self, "k", init, (d, kv, h), self.param_dtype,
                        ("embed", "kv_heads", "kv")),
        param_with_axes(self, "v", init, (d, kv, h), self.param_dtype,
                        ("embed", "kv_heads", "kv")),
        param_with_axes(self, "o", fan_in_normal((0, 1)), (n, h, d), self.param_dtype,
                        ("heads", "kv", "embed")))

  def project(self, x, positions, w_q, w_k, w_v):
    """x [B, T, d] -> q [B, T, N, H], k, v [B, T, K, H]: the projections, their biases
    (qkv_bias), QK-norm (qk_norm) and RoPE on q and k."""
    n, kv, h = self.num_heads, self.num_kv_heads, self.head_dim
    q = jnp.einsum("BTD,DNH->BTNH", x, w_q.astype(self.dtype))
    k = jnp.einsum("BSD,DKH->BSKH", x, w_k.astype(self.dtype))
    v = jnp.einsum("BSD,DKH->BSKH", x, w_v.astype(self.dtype))
    if self.qkv_bias:
      zeros = nn.initializers.zeros
      q = q + param_with_axes(self, "q_bias", zeros, (n, h), self.param_dtype,
                              ("heads", "kv")).astype(self.dtype)
      k = k + param_with_axes(self, "k_bias", zeros, (kv, h), self.param_dtype,
                              ("kv_heads", "kv")).astype(self.dtype)
      v = v + param_with_axes(self, "v_bias", zeros, (kv, h), self.param_dtype,
                              ("kv_heads", "kv")).astype(self.dtype)
    if self.qk_norm:
      norm = dict(eps=self.norm_eps, offset_scale=self.norm_offset, param_dtype=self.param_dtype)
      q = RMSNorm(**norm, name="query_norm")(q)
      k = RMSNorm(**norm, name="key_norm")(k)
    q = sharding.constrain(q, ("activation_batch", "activation_length", "activation_heads",
                               "activation_kv"))
    return (apply_rope(q, positions, self.rope_theta, self.rope_scaling),
            apply_rope(k, positions, self.rope_theta, self.rope_scaling), v)
