"""Specification of the inter-neuron diversity term `nucl_diversity` (maxnucl/losses/nucl.py):
the mean pairwise cosine similarity of the rows' outgoing distributions, per target matrix, summed
over layers, computed without an [m, m] matrix."""

import pathlib

import gin
import jax
import jax.extend.core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from maxnucl import losses, models
from test_losses import edge_case_matrix, model_and_batch, random_params, tiny_cfg
from tolerances import (EPS64, EPS_BF16, decoder_terms, gradient_terms, magnitude,
                        rounding_atol)

REPO = pathlib.Path(__file__).resolve().parents[1]


def np_similarity(w):
  """float64 reference that builds the [m, m] cosine matrix: mean over the off-diagonal entries
  of cos(r_i, r_k), r_i = |w_i| / sum_j |w_ij| (a zero row is uniform)."""
  a = np.abs(np.asarray(w, np.float64))
  m, n = a.shape
  if m < 2:
    return 0.0
  zero = a.max(axis=1) <= losses.ZERO_ROW_MAX_ABS
  a[zero] = 1.0
  r = a / a.sum(axis=1, keepdims=True)
  u = r / np.linalg.norm(r, axis=1, keepdims=True)
  cosine = u @ u.T  # [m, m]
  return (cosine.sum() - np.trace(cosine)) / (m * (m - 1))


def similarity_size(w):
  """(|sum_i u_i|^2 + m) / (m (m - 1)), u_i the unit rows: what the term's roundings are relative
  to (every u_ij >= 0, so a column sum's rounding is relative to the sum itself)."""
  a = np.abs(np.asarray(w, np.float64))
  m = a.shape[0]
  a[a.max(axis=1) <= losses.ZERO_ROW_MAX_ABS] = 1.0
  u = a / np.linalg.norm(a, axis=1, keepdims=True)
  return (np.sum(u.sum(axis=0) ** 2) + m) / (m * (m - 1))


def similarity_atol(w):
  """The term is (|sum_i u_i|^2 - m) / (m (m - 1)), u_i the unit rows: the sums of n and m terms
  round relative to |sum_i u_i|^2 + m, and the subtraction keeps that absolute error."""
  m, n = np.shape(w)
  return rounding_atol(similarity_size(w), 2 * n + m + 4)


def sum_atol(matrices):
  """The term summed over matrices: each one's bound, and one rounding per addition relative to
  the sum."""
  return (sum(similarity_atol(w) for w in matrices)
          + rounding_atol(sum(np_similarity(w) for w in matrices), len(matrices)))


def out_matrices(params, cfg, layers=None):
  """The default target (ffn_out, [m, d]) of the layers with at least two neurons (the others
  contribute an exact 0)."""
  return [np.asarray(params[f"layers_{i}"]["mlp"]["out"], np.float32)
          for i, m in enumerate(cfg.layer_ffn_widths) if m > 1 and (layers is None or i in layers)]


def bf16_similarity_atol(w):
  """How far the term moves when each weight of w is rounded to bfloat16, a relative change
  delta_ij of random sign, |delta_ij| <= EPS_BF16 / 2: to first order sum_ij c_ij delta_ij, with
  c_ij = 2 u_ij (S_j - (S . u_i) u_ij) / (m (m - 1)) and S = sum_i u_i.  Hoeffding's inequality
  bounds the sum by sqrt(ln(2 / p) / 2) x EPS_BF16 x |c|_2 but for a chance p = 1e-9 (the worst
  case, EPS_BF16 / 2 x |c|_1, is so loose that computing the term in bfloat16 would pass); the
  second order by EPS_BF16^2 x the size."""
  a = np.abs(np.asarray(w, np.float64))
  m = a.shape[0]
  u = a / np.linalg.norm(a, axis=1, keepdims=True)
  column_sums = u.sum(axis=0)
  c = 2 * u * (column_sums - (u @ column_sums)[:, None] * u) / (m * (m - 1))
  return (np.sqrt(np.log(2 / 1e-9) / 2) * EPS_BF16 * np.sqrt(np.sum(c ** 2))
          + rounding_atol(similarity_size(w), 1, EPS_BF16 ** 2))


def mstd_atol(matrices):
  """nucl_mstd = -sum over rows of sqrt(mean_j (r_ij - 1/n)^2): r_ij (a sum of n terms and a
  division) is off by (n + 1) eps r_ij, which the subtraction of 1/n keeps and the root mean
  square does not grow; the mean and the root add n + 2 roundings of sigma_i; then the sum over
  every row of every matrix."""
  bound, total, rows = 0.0, 0.0, 0
  for w in matrices:
    a = np.abs(np.asarray(w, np.float64))
    n = a.shape[1]
    r = a / a.sum(axis=1, keepdims=True)
    sigma = np.sqrt(np.mean((r - 1.0 / n) ** 2, axis=1))
    bound += rounding_atol(np.sum(r.max(axis=1) + sigma), n + 2)
    total, rows = total + sigma.sum(), rows + a.shape[0]
  return bound + rounding_atol(total, rows)


def term(params, cfg):
  return losses.LOSS_TERMS["nucl_diversity"](params, None, None, cfg)


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()  # nucl's defaults: target ffn_out, all layers
  yield
  gin.clear_config()


# ---- the value of one matrix --------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3), (5, 7), (64, 33), (300, 16), (17, 257)])
def test_equals_brute_force_cosine_matrix_on_random_matrices(shape):
  rng = np.random.default_rng(shape[0] * 1000 + shape[1])
  w = (rng.normal(size=shape) * np.exp(rng.normal(size=(shape[0], 1)))).astype(np.float32)
  got = losses.mean_pairwise_similarity(jnp.asarray(w))
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_similarity(w), rtol=0, atol=similarity_atol(w))


def test_equals_brute_force_on_edge_case_rows_including_zero_huge_and_tiny_rows():
  w = edge_case_matrix()
  np.testing.assert_allclose(losses.mean_pairwise_similarity(jnp.asarray(w)), np_similarity(w),
                             rtol=0, atol=similarity_atol(w))


def test_identical_rows_give_one_and_disjoint_supports_give_zero():
  row = np.array([0.5, -2.0, 0.0, 1.0, 3.0], np.float32)
  same = np.stack([row, -row, 1e20 * row, 1e-20 * row])  # equal up to scale and signs
  np.testing.assert_allclose(losses.mean_pairwise_similarity(jnp.asarray(same)), 1.0, rtol=0,
                             atol=similarity_atol(same))
  disjoint = np.zeros((6, 18), np.float32)
  for i in range(6):
    disjoint[i, 3 * i:3 * i + 3] = [1.0, -3.0, 0.25 * (i + 1)]
  np.testing.assert_allclose(losses.mean_pairwise_similarity(jnp.asarray(disjoint)), 0.0,
                             atol=similarity_atol(disjoint))
  # Two pairs of identical rows, the pairs with disjoint supports: 4 of 12 ordered pairs have 1.
  a, b = [1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0]
  pairs = jnp.array([a, [-2.0, -4.0, 0.0, 0.0], b, [0.0, 0.0, 6.0, -2.0]])
  np.testing.assert_allclose(losses.mean_pairwise_similarity(pairs), 4 / 12, rtol=0,
                             atol=similarity_atol(pairs))


def test_fewer_than_two_rows_give_zero_and_non_matrices_are_refused():
  for m in (0, 1):
    assert float(losses.mean_pairwise_similarity(jnp.ones((m, 8)))) == 0.0
  grad = jax.grad(losses.mean_pairwise_similarity)(jnp.ones((1, 8)))
  np.testing.assert_array_equal(grad, np.zeros((1, 8)))
  with pytest.raises(ValueError, match=r"\[m, n\]"):
    losses.mean_pairwise_similarity(jnp.ones((2, 3, 4)))


def test_gradient_is_finite_including_zero_rows_and_exact_zeros_get_zero_gradient():
  w = jnp.asarray(edge_case_matrix())
  w = jnp.concatenate([w, jnp.full((1, w.shape[1]), 1e-38, jnp.float32)])  # below the zero-row eps
  grads = np.asarray(jax.grad(losses.mean_pairwise_similarity)(w))
  assert np.all(np.isfinite(grads)), grads
  np.testing.assert_array_equal(grads[np.asarray(w) == 0], 0.0)
  np.testing.assert_array_equal(grads[[0, -1]], 0.0)  # zero rows: uniform, no gradient
  assert np.any(grads != 0)


def test_gradient_matches_float64_central_differences():
  w = np.random.default_rng(3).normal(size=(5, 6)).astype(np.float32)
  got = np.asarray(jax.grad(losses.mean_pairwise_similarity)(jnp.asarray(w)))

  def central_differences(h):
    out = np.zeros(w.shape)
    for index in np.ndindex(w.shape):
      step = np.zeros(w.shape)
      step[index] = h
      out[index] = (np_similarity(w + step) - np_similarity(w - step)) / (2 * h)
    return out

  h = 1e-6
  expected = central_differences(h)
  # float32: the value's path (2 n + m + 4 roundings) forward and back, relative to the largest
  # entry.  The float64 reference: two values' roundings (their [m, m] sum: m^2 terms) over 2 h,
  # and the truncation (h^2 / 6 times the third derivative), estimated from the step 2 h, where
  # it is 4x larger.
  m, n = w.shape
  truncation = np.abs(central_differences(2 * h) - expected).max() / 3
  atol = (rounding_atol(magnitude(expected), 2 * (2 * n + m + 4))
          + rounding_atol(similarity_size(w), n + m * m + 4, EPS64) / h + truncation)
  np.testing.assert_allclose(got, expected, rtol=0, atol=atol)


def test_sgd_on_the_term_makes_the_neurons_more_diverse():
  w = jnp.asarray(np.random.default_rng(6).normal(size=(32, 64)), jnp.float32)
  grad = jax.jit(jax.grad(losses.mean_pairwise_similarity))
  similarities = [np_similarity(w)]
  for _ in range(10):
    w = w - 200.0 * grad(w)
    similarities.append(np_similarity(w))
  assert all(b < a for a, b in zip(similarities, similarities[1:])), similarities
  assert similarities[-1] < similarities[0] - 0.05, similarities


# ---- the loss term over layers ------------------------------------------------------------------


def test_term_sums_layers_and_width_zero_or_one_layers_contribute_zero():
  cfg = tiny_cfg(num_layers=4, ffn_widths=(64, 0, 1, 40))
  params = random_params(cfg)
  per_layer = {i: np_similarity(params[f"layers_{i}"]["mlp"]["out"]) for i in (0, 3)}
  atol = sum_atol(out_matrices(params, cfg))  # layers 0 and 3, and their sum
  np.testing.assert_allclose(term(params, cfg), per_layer[0] + per_layer[3], rtol=0, atol=atol)
  assert float(losses.nucl(params, cfg, "diversity", layers=[1, 2])) == 0.0
  np.testing.assert_allclose(losses.nucl(params, cfg, "diversity", layers=[3]), per_layer[3],
                             rtol=0, atol=similarity_atol(params["layers_3"]["mlp"]["out"]))
  np.testing.assert_allclose(jax.jit(lambda p: term(p, cfg))(params), term(params, cfg), rtol=0,
                             atol=atol)
  with pytest.raises(ValueError, match="variant 'divers'.*'diversity'"):
    losses.nucl(params, cfg, "divers")


def test_term_follows_the_gin_bound_nucl_target_and_layers():
  cfg, params, batch, logits_fn = model_and_batch()
  gin.parse_config_file(str(REPO / "gin" / "losses" / "nucl_diversity.gin"))
  gin.parse_config("nucl.target = 'ffn_in_gated'\nnucl.layers = [1]")
  alpha = gin.query_parameter("%DIVERSITY_ALPHA")
  total, metrics = losses.total_loss(params, logits_fn(params), batch, cfg)
  gate = np.asarray(params["layers_1"]["mlp"]["gate"]).T
  expected = np_similarity(gate)
  np.testing.assert_allclose(metrics["nucl_diversity"], expected, rtol=0,
                             atol=similarity_atol(gate))
  weighted = alpha * metrics["nucl_diversity"]  # a product and a sum: 2 roundings
  np.testing.assert_allclose(total, metrics["nll"] + weighted, rtol=0,
                             atol=rounding_atol(magnitude(metrics["nll"], weighted, total), 2))


def test_total_loss_adds_alpha_times_the_term_and_reports_it_eager_and_jitted():
  cfg, params, batch, logits_fn = model_and_batch()

  def loss(p):
    return losses.total_loss(p, logits_fn(p), batch, cfg,
                             terms={"nucl_diversity": 3.0, "nucl_mstd": 10.0})

  total, metrics = loss(params)
  assert set(metrics) == {"nll", "nucl_diversity", "nucl_mstd", "loss"}
  matrices = out_matrices(params, cfg)
  np.testing.assert_allclose(metrics["nucl_diversity"], term(params, cfg), rtol=0,
                             atol=sum_atol(matrices))
  parts = [metrics["nll"], 3.0 * metrics["nucl_diversity"], 10.0 * metrics["nucl_mstd"]]
  np.testing.assert_allclose(total, sum(parts), rtol=0,  # 2 products, 2 sums
                             atol=rounding_atol(magnitude(*parts, total), 4))
  jit_total, jit_metrics = jax.jit(loss)(params)
  # Jitted, each part may round otherwise: the NLL (the logits' product and 2 sums, a log-softmax
  # over the vocabulary, the mean over the tokens), alpha times each term's bound, the 4 above.
  logits = logits_fn(params)
  nll_atol = (rounding_atol(magnitude(logits), cfg.vocab_size + 3)
              + rounding_atol(metrics["nll"], batch["loss_mask"].size))
  np.testing.assert_allclose(jit_total, total, rtol=0, atol=(
      nll_atol + 3.0 * sum_atol(matrices) + 10.0 * mstd_atol(matrices)
      + rounding_atol(magnitude(*parts, total), 4)))
  np.testing.assert_allclose(jit_metrics["nucl_diversity"], metrics["nucl_diversity"], rtol=0,
                             atol=sum_atol(matrices))
  grads = jax.jit(jax.grad(lambda p: loss(p)[0]))(params)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_scanned_and_unrolled_models_give_the_same_loss_and_gradients():
  """The params tree is per-layer either way; the term sees the same matrices."""
  base = models.get_config("gemma2_tiny", num_layers=6, ffn_widths=(64, 64, 64, 64, 0, 48),
                           vocab_size=32)
  params = models.init(base, jax.random.PRNGKey(0))
  tokens = jnp.asarray(np.random.default_rng(1).integers(3, 32, (2, 9)))
  batch = {"targets": tokens, "loss_mask": jnp.ones(tokens.shape, jnp.float32)}
  results = []
  for scan in (True, False):
    cfg = base.replace(scan_layers=scan)

    def loss(p, cfg=cfg):
      return losses.total_loss(p, models.apply(cfg, p, tokens), batch, cfg,
                               terms={"nucl_diversity": 100.0})[0]

    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (scanned, scanned_grads), (unrolled, unrolled_grads) = results
  # The loss: a logit's path, the log-softmax over the vocabulary and the mean over the tokens,
  # plus 100 x the term's bound.  A gradient entry: the NLL's gradient path, plus the term's value
  # path (2 n + m + 4, n = d_model, m the widest layer) forward and back, relative to the entry's
  # leaf.
  logits = models.apply(base, params, tokens)
  matrices = out_matrices(params, base)
  loss_atol = (rounding_atol(magnitude(logits), decoder_terms(base, 9) + base.vocab_size)
               + rounding_atol(losses.nll(logits, batch), tokens.size)
               + 100.0 * sum_atol(matrices))
  np.testing.assert_allclose(scanned, unrolled, rtol=0, atol=loss_atol)
  terms = (gradient_terms(base, 9, tokens.size)
           + 2 * (2 * base.d_model + max(base.layer_ffn_widths) + 4))
  for a, b in zip(jax.tree.leaves(scanned_grads), jax.tree.leaves(unrolled_grads)):
    np.testing.assert_allclose(a, b, rtol=0, atol=rounding_atol(magnitude(b), terms))


def test_bfloat16_params_give_a_float32_term_close_to_float32_params():
  cfg = tiny_cfg(num_layers=2)
  p32 = random_params(cfg, seed=12)
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
  got = term(p16, cfg)
  assert got.dtype == jnp.float32
  # each matrix's change from its weights' rounding to bfloat16, and the float32 paths
  matrices = out_matrices(p32, cfg)
  atol = sum(bf16_similarity_atol(w) for w in matrices) + sum_atol(matrices)
  np.testing.assert_allclose(got, term(p32, cfg), rtol=0, atol=atol)
  grads = jax.grad(lambda p: term(p, cfg))(p16)
  assert grads["layers_0"]["mlp"]["out"].dtype == jnp.bfloat16


# ---- memory: no [m, m] intermediate -------------------------------------------------------------


def traced_shapes(fn, *args):
  """Shapes of every value the jaxpr of fn(*args) computes, nested jaxprs (jit, custom_jvp,
  scan, ...) included."""
  shapes = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      shapes.extend(tuple(getattr(v.aval, "shape", ())) for v in eqn.outvars)
    for sub in jax_core.subjaxprs(jaxpr):
      walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return shapes


def test_no_m_by_m_intermediate_in_the_value_or_gradient_of_a_wide_layer():
  m, n = 4096, 8
  w = jax.ShapeDtypeStruct((m, n), jnp.float32)

  def brute_force(w):  # what the identity avoids: the [m, m] cosine matrix
    u = jnp.abs(w) / jnp.linalg.norm(w, axis=1, keepdims=True)
    return (jnp.sum(u @ u.T) - m) / (m * (m - 1))

  def largest(fn):
    return max(int(np.prod(s)) for s in traced_shapes(fn, w))

  assert largest(jax.grad(brute_force)) >= m * m  # the check sees an [m, m] matrix when it is there
  for fn in (losses.mean_pairwise_similarity, jax.grad(losses.mean_pairwise_similarity)):
    assert largest(fn) <= m * n
  # The compiled gradient's temporaries stay O(m n): far below one [m, m] float32 matrix (64 MiB).
  temp = (jax.jit(jax.grad(losses.mean_pairwise_similarity)).lower(w).compile()
          .memory_analysis().temp_size_in_bytes)
  assert temp <= 16 * m * n * 4, temp
