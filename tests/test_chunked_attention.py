"""The chunked (memory-efficient) attention equals the XLA reference, in outputs and gradients, on
the shapes that break blockwise code; it visits only the key blocks a query block can see; and it
does not hold the [T, S] scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attention_cases
from maxnucl import models
from maxnucl.layers import attentions
from maxnucl.layers.chunked_attention import _key_blocks, chunked_attention
from maxnucl.models.config import ConfigError
from tolerances import decoder_terms, gradient_terms, magnitude, rounding_atol

CASES = {
    # B, T, K, G, H, window, softcap, block_q, block_k, packed segments
    "T not a multiple of the blocks": (2, 37, 2, 2, 8, None, None, 8, 16, False),
    "MQA, window smaller than a block, packed": (2, 37, 1, 4, 8, 5, 50.0, 16, 8, True),
    "MHA, window 3, soft-cap": (1, 64, 2, 1, 16, 3, 30.0, 16, 16, True),
    "window longer than the sequence, one block": (2, 50, 4, 2, 8, 100, 20.0, 64, 64, False),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_outputs_and_gradients_equal_xla(case):
  b, t, k, g, h, window, softcap, block_q, block_k, packed = case
  q, key, v, seg = attention_cases.inputs(b, t, k, g, h, packed)

  def chunked(q, key, v):
    return chunked_attention(q, key, v, seg, scale=0.3, softcap=softcap, window=window,
                             block_q=block_q, block_k=block_k)

  attention_cases.assert_equals_xla(chunked, q, key, v, seg, window=window, softcap=softcap)


@pytest.mark.parametrize("window", [None, 1, 5, 8, 13, 40])
@pytest.mark.parametrize("block_q, block_k", [(8, 8), (8, 4), (4, 16)])
def test_visited_key_blocks_are_exactly_those_with_a_visible_key(window, block_q, block_k):
  length = 48
  i = np.arange(length)[:, None]
  j = np.arange(length)[None, :]
  visible = (j <= i) & ((j > i - window) if window else True)
  for qb in range(length // block_q):
    lo, hi = (int(x) for x in _key_blocks(qb, block_q, block_k, length // block_k, window))
    rows = visible[qb * block_q:(qb + 1) * block_q]
    needed = [kb for kb in range(length // block_k)
              if rows[:, kb * block_k:(kb + 1) * block_k].any()]
    assert list(range(lo, hi)) == needed, (qb, lo, hi, needed)


def test_forward_and_backward_at_4096_use_a_quarter_of_the_xla_memory():
  """compiled.memory_analysis() of the gradient at sequence 4096 (the target: at most 1/4)."""
  q = jax.ShapeDtypeStruct((1, 4096, 1, 2, 32), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, 4096, 1, 32), jnp.float32)
  seg = jax.ShapeDtypeStruct((1, 4096), jnp.int32)

  def xla(q, k, v, s):
    return jnp.sum(attentions.dot_product_attention(q, k, v, attentions.attention_mask(s, None),
                                                    scale=0.1, softcap=50.0))

  def chunked(q, k, v, s):
    return jnp.sum(chunked_attention(q, k, v, s, scale=0.1, softcap=50.0))

  temp = {f.__name__: jax.jit(jax.grad(f, argnums=(0, 1, 2))).lower(q, kv, kv, seg).compile()
          .memory_analysis().temp_size_in_bytes for f in (xla, chunked)}
  assert temp["chunked"] * 4 <= temp["xla"], temp
  assert temp["xla"] >= 4096 * 4096 * 4  # the reference really holds a [T, S] float32 matrix


@pytest.mark.parametrize("preset", ["gemma2_tiny", "palm_tiny"])
def test_model_with_chunked_attention_equals_xla(preset):
  base = models.get_config(preset, num_layers=2, max_positions=64)
  tokens = jnp.asarray(np.random.default_rng(2).integers(3, base.vocab_size, (2, 40)))
  segments = jnp.asarray(np.repeat([[1] * 25 + [2] * 15], 2, axis=0))
  params = models.init(base, jax.random.PRNGKey(0))
  results = {}
  for impl in ("xla", "chunked"):
    cfg = base.replace(attention_impl=impl)

    def loss(p, cfg=cfg):
      return jnp.mean(models.apply(cfg, p, tokens, segments) ** 2)
    results[impl] = (models.apply(cfg, params, tokens, segments), jax.grad(loss)(params))
  # a logit's roundings along its path, plus the chunked kernel's rescaling of its running sums
  # (at most one rounding per key in every layer); a gradient of the mean squared logit runs that
  # path forward and back and sums over every logit (tests/tolerances.py)
  length = tokens.shape[1]
  blocked = base.num_layers * length
  np.testing.assert_allclose(results["chunked"][0], results["xla"][0], rtol=0,
                             atol=rounding_atol(magnitude(results["xla"][0]),
                                                decoder_terms(base, length) + blocked))
  terms = gradient_terms(base, length, tokens.size * base.vocab_size) + 2 * blocked
  for a, b in zip(jax.tree.leaves(results["chunked"][1]), jax.tree.leaves(results["xla"][1])):
    np.testing.assert_allclose(a, b, rtol=0, atol=rounding_atol(magnitude(b), terms))


def test_unknown_attention_impl_is_refused():
  with pytest.raises(ConfigError, match="attention_impl"):
    models.get_config("gemma2_tiny", attention_impl="flash")
