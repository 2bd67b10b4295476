"""maxnucl's Gemma-2 against transformers' Gemma2ForCausalLM (eager attention), weights mapped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import hf_logits, maxnucl_from_hf, tiny_hf_gemma2
from maxnucl import models
from tolerances import (EPS_BF16, bf16_rounding_sites, decoder_terms, magnitude, rounding_atol,
                        typical_rounding_atol)

# bf16 compute (float32 params, bfloat16 activations) against the float32 reference: each
# operation's output is rounded to 8 significant bits (bf16_rounding_sites counts them along a
# logit's path): the largest error is bounded by the worst case, the mean error by the random-
# sign model (tests/tolerances.py).  Measured here: max 0.18, mean 0.018 (transformers' own bf16
# path: max 0.30, mean 0.021) on logits within +-3; README ("Numerics").


@pytest.fixture(scope="module")
def reference():
  model = tiny_hf_gemma2(seed=0)
  cfg, params = maxnucl_from_hf(model)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, size=(2, 20))  # 20 > window 6
  return model, cfg, params, tokens, hf_logits(model, tokens)


def float32_atol(cfg, tokens, ref):
  """Two float32 implementations of the same logits: the roundings of a logit's path."""
  return rounding_atol(magnitude(ref), decoder_terms(cfg, tokens.shape[1]))


def test_reference_exercises_softcaps_and_window(reference):
  model, cfg, _, tokens, ref = reference
  assert tokens.shape[1] > cfg.sliding_window
  cap = cfg.final_logit_softcap
  # Logits neither all saturated by the final soft-cap nor all tiny.
  assert 0.2 < np.mean(np.abs(ref) < 0.9 * cap) < 0.95


def test_float32_logits_match_transformers(reference):
  _, cfg, params, tokens, ref = reference
  ours = np.asarray(models.apply(cfg, params, tokens))
  assert ours.dtype == np.float32 and ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=float32_atol(cfg, tokens, ref), rtol=0)


@pytest.mark.parametrize("mistake", [
    dict(sliding_window=7),  # window off by one: i - W <= j instead of i - W < j
    dict(attention_pattern=("global", "local")),  # local layers on odd indices
    dict(query_pre_attn_scalar=16),  # head_dim instead of query_pre_attn_scalar
    dict(attn_logit_softcap=None),  # soft-cap skipped
])
def test_parity_check_detects_classic_mistakes(reference, mistake):
  """The parity test above is sharp: each known pitfall moves logits far beyond its tolerance."""
  _, cfg, params, tokens, ref = reference
  wrong = np.asarray(models.apply(cfg.replace(**mistake), params, tokens))
  assert np.abs(wrong - ref).max() > 100 * float32_atol(cfg, tokens, ref)


def _assert_bf16_close(ours, ref, sites):
  err = np.abs(ours - ref)
  np.testing.assert_allclose(err.max(), 0.0, atol=rounding_atol(magnitude(ref), sites, EPS_BF16))
  np.testing.assert_allclose(err.mean(), 0.0,
                             atol=typical_rounding_atol(magnitude(ref), sites, EPS_BF16))


def test_bf16_compute_within_its_rounding(reference):
  _, cfg, params, tokens, ref = reference
  ours = np.asarray(models.apply(cfg.replace(dtype="bfloat16"), params, tokens))
  assert ours.dtype == np.float32
  _assert_bf16_close(ours, ref, bf16_rounding_sites(cfg))


def test_bf16_params_and_compute_within_their_rounding(reference):
  """bf16 params add one rounding per kernel on the path (7 a layer, and the embedding)."""
  _, cfg, params, tokens, ref = reference
  bf16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
  params16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  ours = np.asarray(models.apply(bf16, params16, tokens))
  _assert_bf16_close(ours, ref, bf16_rounding_sites(cfg) + 7 * cfg.num_layers + 1)
