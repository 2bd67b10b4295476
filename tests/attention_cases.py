"""Shared inputs and the outputs-and-gradients comparison of the attention implementation tests
(test_chunked_attention.py, test_fused_attention.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from maxnucl.layers import attentions
from tolerances import magnitude, rounding_atol


def inputs(b, t, k, g, h, packed, seed=0):
  """q [B, T, K, G, H], k, v [B, T, K, H] and segment ids [B, T]; `packed`: three documents, and
  right padding (segment 0) in row 0."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, t, k, g, h)) * 2, jnp.float32)
  key = jnp.asarray(rng.normal(size=(b, t, k, h)) * 2, jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, t, k, h)), jnp.float32)
  seg = np.ones((b, t), np.int32)
  if packed:
    seg[:, t // 3:], seg[:, 2 * t // 3:], seg[0, -4:] = 2, 3, 0
  return q, key, v, jnp.asarray(seg)


def attention_terms(length: int, head_dim: int) -> int:
  """Roundings of one attention output: the score (head_dim terms), its scale and soft-cap, the
  softmax's sum and the value mix (length terms each), and a blocked kernel's rescaling of its
  running sums (at most one rounding per key)."""
  return head_dim + 3 * length + 4


def assert_equals_xla(attend, q, key, v, seg, *, window, softcap, scale=0.3):
  """`attend(q, key, v)` equals `attentions.dot_product_attention` (scale 0.3) in outputs and in
  the gradients of a random projection of them, within their float32 roundings
  (tests/tolerances.py): outputs are mixtures of v's rows, so |v| bounds them; a gradient's path
  runs the attention forward and back, relative to the reference gradient's largest entry."""
  def xla(q, key, v):
    return attentions.dot_product_attention(q, key, v, attentions.attention_mask(seg, window),
                                            scale=scale, softcap=softcap)

  terms = attention_terms(q.shape[1], q.shape[-1])
  np.testing.assert_allclose(attend(q, key, v), xla(q, key, v), rtol=0,
                             atol=rounding_atol(magnitude(v), terms))
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  grads = [jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2))(q, key, v)
           for f in (xla, attend)]
  for name, expected, actual in zip("qkv", *grads):
    np.testing.assert_allclose(actual, expected, rtol=0, err_msg=name,
                               atol=rounding_atol(magnitude(expected), 2 * terms))
