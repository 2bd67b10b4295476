"""maxnucl's Gemma-2 against transformers' Gemma2ForCausalLM (eager attention), weights mapped."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_reference import hf_logits, maxnucl_from_hf, tiny_hf_gemma2
from maxnucl import models

FLOAT32_ATOL = 1e-4
# bf16 compute (float32 params, bfloat16 activations) against the float32 reference: bf16 keeps
# 8 mantissa bits, so per-op relative error ~4e-3 compounds over 4 layers.  Measured: max 0.18,
# mean 0.018 (transformers' own bf16 path: max 0.30, mean 0.021) on logits within +-3.
# Documented in README ("Numerics").
BF16_ATOL = 0.25
BF16_MEAN_ATOL = 0.03


@pytest.fixture(scope="module")
def reference():
  model = tiny_hf_gemma2(seed=0)
  cfg, params = maxnucl_from_hf(model)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, size=(2, 20))  # 20 > window 6
  return model, cfg, params, tokens, hf_logits(model, tokens)


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
  np.testing.assert_allclose(ours, ref, atol=FLOAT32_ATOL, rtol=0)


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
  assert np.abs(wrong - ref).max() > 100 * FLOAT32_ATOL


def test_bf16_compute_within_documented_tolerance(reference):
  _, cfg, params, tokens, ref = reference
  ours = np.asarray(models.apply(cfg.replace(dtype="bfloat16"), params, tokens))
  assert ours.dtype == np.float32
  err = np.abs(ours - ref)
  assert err.max() < BF16_ATOL and err.mean() < BF16_MEAN_ATOL
  # Not worse than transformers' own bf16 path by more than a small factor.
  model = tiny_hf_gemma2(seed=0).to(torch.bfloat16)
  hf_err = np.abs(hf_logits(model, tokens) - ref)
  assert err.mean() < 1.5 * hf_err.mean()


def test_bf16_params_and_compute_close_to_float32_reference(reference):
  _, cfg, params, tokens, ref = reference
  bf16 = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
  params16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  ours = np.asarray(models.apply(bf16, params16, tokens))
  assert np.abs(ours - ref).mean() < BF16_MEAN_ATOL
