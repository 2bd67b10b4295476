"""Specification of maxnucl.losses: NLL, NUCL (Stahlberg & Kumar 2025) and the loss registry."""

import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxnucl import losses
from maxnucl.models.config import get_config
from tolerances import (EPS32, EPS64, EPS_BF16, central_difference_atol, magnitude,
                        rounding_atol, typical_rounding_atol)

REPO = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ("ent", "gini", "mstd")


# ---- independent float64 references (the paper's equations as written) ------------------------


def np_distributions(w):
  """Eq. 2 in float64: the rows' outgoing distributions r [m, n]; a zero row is uniform (the
  documented convention)."""
  a = np.abs(np.asarray(w, np.float64))
  z = a.sum(axis=1, keepdims=True)
  return np.where(z > 0, a / np.where(z > 0, z, 1.0), 1.0 / a.shape[1])


def np_rows(w, variant):
  """Eq. 2-5 in float64; a zero row is the uniform distribution (the documented convention)."""
  r = np_distributions(w)  # Eq. 2
  n = r.shape[1]
  if variant == "ent":  # Eq. 3
    with np.errstate(divide="ignore", invalid="ignore"):
      return -np.sum(np.where(r > 0, r * np.log(r), 0.0), axis=1)
  if variant == "gini":  # Eq. 4
    return 1.0 - np.sum(r**2, axis=1)
  return -np.sqrt(np.sum((r - 1.0 / n) ** 2, axis=1) / n)  # Eq. 5


def edge_case_matrix():
  rng = np.random.default_rng(1)
  n = 16
  rows = [
      np.zeros(n),                                   # zero row
      np.eye(n)[3],                                  # one-hot
      -np.eye(n)[0] * 7.0,                           # negative one-hot
      np.ones(n),                                    # exactly uniform
      np.where(np.arange(n) % 2, 1.0, -1.0),         # uniform magnitudes, mixed signs
      rng.normal(size=n) * 1e30,                     # huge
      rng.normal(size=n) * 1e-30,                    # tiny
      np.concatenate([[1e30], rng.normal(size=n - 1) * 1e-30]),  # huge and tiny in one row
      rng.normal(size=n),                            # mixed signs
      np.concatenate([np.zeros(n // 2), rng.normal(size=n // 2)]),  # half zeros
  ]
  return np.stack(rows).astype(np.float32)


def tiny_cfg(**overrides):
  return get_config("gemma2_tiny", **overrides)


def random_params(cfg, seed=0, dtype=jnp.float32):
  """A params tree with the model contract's names and shapes."""
  rng = np.random.default_rng(seed)
  d, N, K, H = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def arr(*shape):
    return jnp.asarray(rng.normal(size=shape) * 0.05, dtype)

  params = {"embedder": {"embedding": arr(cfg.vocab_size, d)}, "final_norm": {"scale": arr(d)}}
  for i, m in enumerate(cfg.layer_ffn_widths):
    layer = {"attn": {"q": arr(d, N, H), "k": arr(d, K, H), "v": arr(d, K, H), "o": arr(N, H, d)},
             "pre_attention_norm": {"scale": arr(d)}}
    if m:
      layer["mlp"] = {"gate": arr(d, m), "up": arr(d, m), "out": arr(m, d)}
    params[f"layers_{i}"] = layer
  return params


def random_batch(rng, B=3, L=7, V=11):
  logits = jnp.asarray(rng.normal(size=(B, L, V)) * 3.0, jnp.float32)
  batch = {"targets": jnp.asarray(rng.integers(0, V, size=(B, L)), jnp.int32),
           "loss_mask": jnp.asarray(rng.random((B, L)) < 0.6, jnp.float32)}
  return logits, batch


def np_token_losses(logits, batch):
  x = np.asarray(logits, np.float64)
  mx = x.max(-1, keepdims=True)
  log_z = (mx + np.log(np.exp(x - mx).sum(-1, keepdims=True)))[..., 0]
  t = np.asarray(batch["targets"])
  target_logit = np.take_along_axis(x, t[..., None], -1)[..., 0]
  return log_z - target_logit, log_z**2, np.asarray(batch["loss_mask"], np.float64)


# ---- tolerances: the roundings along each computation (tests/tolerances.py, tests/README.md) ----


def entry_sensitivities(w, variant):
  """Per row of w, sum_j |d value / d ln|w_j||: a relative change of at most eps of every |w_j|
  (a rounding of s = |w| / max|w|, of a cast to float32 or to bfloat16) moves the row's value by
  at most eps times this, to first order.  With r the row's distribution (Eq. 2) the derivatives
  are -r_j (log r_j + ent) for ent, -2 r_j (r_j - sum r^2) for gini and
  -r_j (x_j - sum_k x_k r_k) / (n std) for mstd (x = r - 1/n, std = -mstd); at mstd's kink, a
  uniform row, the value moves by at most the rms of the change of r, 2 eps rms(r)."""
  r = np_distributions(w)
  n = r.shape[1]
  values = np_rows(w, variant)
  if variant == "ent":
    surprisal = -np.log(np.where(r > 0, r, 1.0))
    return np.sum(r * np.abs(surprisal - values[:, None]), axis=1)
  if variant == "gini":
    return np.sum(2 * r * np.abs(r - np.sum(r**2, axis=1, keepdims=True)), axis=1)
  x, std = r - 1.0 / n, -values
  slope = np.sum(r * np.abs(x - np.sum(x * r, axis=1, keepdims=True)), axis=1)
  kink = std == 0
  return np.where(kink, 2 * np.sqrt(np.mean(r**2, axis=1)),
                  slope / (n * np.where(kink, 1.0, std)))


def row_bounds(w, variant, entry_roundings=1, eps=EPS32):
  """Per row of w [m, n], the largest |computed - exact| of its value as maxnucl/losses/nucl.py
  computes it: `entry_roundings` relative roundings of every entry (1: s = |w| / max|w|; 2 when w
  was rounded before, e.g. cast to float32) through `entry_sensitivities`, plus the path's own:
    ent = log z - T, T = sum s log s / z: z's sum (n; a relative error of z is absolute in log z
      and moves T by T times it), the logs (2 each), the products, T's sum (n), the division and
      the subtraction: 2n + 8 roundings of values up to 1 + log n (log z and T are <= log n);
    gini = 1 - sum r^2, r = s / z: z's sum (n, twice in r^2), the division (2, twice: XLA may
      multiply by 1 / z), the square and the sum (n): 3n + 5 of sum r^2; the subtraction: 1 of 1;
    mstd = -sqrt(mean x^2), x = r - 1/n: z's sum (n: it scales r, which moves x by at most
      n eps rms(r) in rms), the division (2), 1/n and the subtraction (1 each): n + 4 of rms(r);
      the squares, the mean (n + 1) and the sqrt: n / 2 + 2 of |mstd| (relative)."""
  r = np_distributions(w)
  n = r.shape[1]
  if variant == "ent":
    path = [rounding_atol(1 + np.log(n), 2 * n + 8, eps)] * len(r)
  elif variant == "gini":
    path = [rounding_atol(q, 3 * n + 5, eps) + rounding_atol(1.0, 1, eps)
            for q in np.sum(r**2, axis=1)]
  else:
    rms, std = np.sqrt(np.mean(r**2, axis=1)), np.sqrt(np.mean((r - 1.0 / n) ** 2, axis=1))
    path = [rounding_atol(a, n + 4, eps) + rounding_atol(b, (n + 1) // 2 + 2, eps)
            for a, b in zip(rms, std)]
  return np.array([p + rounding_atol(s, entry_roundings, eps)
                   for p, s in zip(path, entry_sensitivities(w, variant))])


def nucl_rows_atol(w, variant, entry_roundings=1, eps=EPS32):
  """The largest of w's `row_bounds`: an atol for nucl_rows(w) against the exact rows."""
  return float(np.max(row_bounds(w, variant, entry_roundings, eps)))


def nucl_atol(matrices, variant, entry_roundings=1, eps=EPS32):
  """nucl (Eq. 6) of the matrices against the exact sum: every row's `row_bounds`, plus the sums'
  R roundings (R rows in all) of values up to sum |row value|."""
  values = np.concatenate([np_rows(m, variant) for m in matrices])
  rows = sum(float(np.sum(row_bounds(m, variant, entry_roundings, eps))) for m in matrices)
  return rows + rounding_atol(np.sum(np.abs(values)), len(values), eps)


def bf16_weights_atol(matrices, variant):
  """nucl of bfloat16 weights against nucl of their float32 originals: the cast changes each |w|
  by a relative EPS_BF16 at most, which moves each row by EPS_BF16 times its
  `entry_sensitivities` (first order); plus both float32 computations' `nucl_atol`."""
  shift = sum(float(np.sum(entry_sensitivities(m, variant))) for m in matrices)
  return rounding_atol(shift, 1, EPS_BF16) + 2 * nucl_atol(matrices, variant)


def near_uniform_mstd_atol(w):
  """mstd of rows within a small relative noise of uniform, where `row_bounds`' term for z's sum
  (n eps rms(r), about eps / n: more than mstd itself) proves nothing.  r - 1/n cancels there, so
  the error is counted against that: a relative error d of z = sum s scales r by 1 - d, which
  (sum_j (r_j - 1/n) = 0) moves mstd by d |mstd| and, through the shift d/n of the mean, by
  d^2 / (2 n^2 |mstd|); d is the random-sign model's sqrt(n) eps for the n additions
  (typical_rounding_atol; the worst case n eps would allow eps^2 / 2|mstd|, several times mstd).
  The entries' roundings (s, the division: 3 with XLA's 1 / z) and 1/n's (1) move mstd by at most
  their rms, 4 eps rms(r); the subtraction is exact (Sterbenz: r_j and 1/n are within a factor of
  2); the squares, the mean and the sqrt: n / 2 + 2 of |mstd|."""
  r = np_distributions(w)
  n = r.shape[1]
  shift = typical_rounding_atol(1.0 / n, n)  # d / n
  bounds = [rounding_atol(rms, 4) + rounding_atol(std, (n + 1) // 2 + 2)
            + typical_rounding_atol(std, n) + shift**2 / (2 * std)
            for rms, std in zip(np.sqrt(np.mean(r**2, axis=1)),
                                np.sqrt(np.mean((r - 1.0 / n) ** 2, axis=1)))]
  return float(np.max(bounds))


def nucl_gradient_atol(w, variant):
  """jax.grad of the sum of w's row values against the exact gradient: the forward path and the
  backward path through the same reductions (twice `row_bounds`' path: 2n + 8 for ent, 3n + 6 for
  gini, n + n/2 + 6 for mstd) and the entries' roundings there and back (4), each rounding values
  up to the backward's largest intermediate B / sum_j |w_ij|, d value / d w_k being
  (g_k - sum_j g_j r_j) / sum_j |w_ij| with g = d value / d r; B bounds both pieces: for ent
  (Listing 1's pieces 1, log s_k + 1 and T) 2 + log n + max |log r_j|, for gini
  2 max r + 2 sum r^2, for mstd 2 max |x| / (n std)."""
  a = np.abs(np.asarray(w, np.float64))
  r = np_distributions(w)
  n = r.shape[1]
  path = {"ent": 2 * n + 8, "gini": 3 * n + 6, "mstd": n + (n + 1) // 2 + 6}[variant]
  if variant == "ent":
    largest = 2 + np.log(n) + np.max(-np.log(np.where(r > 0, r, 1.0)), axis=1)
  elif variant == "gini":
    largest = 2 * np.max(r, axis=1) + 2 * np.sum(r**2, axis=1)
  else:
    x = r - 1.0 / n
    std = np.sqrt(np.mean(x**2, axis=1))
    largest = np.where(std > 0, 2 * np.max(np.abs(x), axis=1) / (n * np.where(std > 0, std, 1.0)),
                       0.0)
  scale = np.max(largest / np.where(a.sum(axis=1) > 0, a.sum(axis=1), np.inf))
  return rounding_atol(scale, 2 * path + 4)


def third_derivative_scale(f, x, rel_step=1e-2):
  """Twice the largest |d^3 f / dx_k^3| over the nonzero entries of x, each estimated by the third
  difference (f(x + 2H) - 2 f(x + H) + 2 f(x - H) - f(x - 2H)) / 2H^3 at H = rel_step |x_k|: the
  stencil stays on x_k's side of 0, where this file's functions of |w| are smooth; twice, for
  the change of f''' between the stencil and x_k +- h."""
  x = np.asarray(x, np.float64)
  largest = 0.0
  for index in zip(*np.nonzero(x)):
    step = np.zeros_like(x)
    step[index] = rel_step * abs(x[index])
    third = (f(x + 2 * step) - 2 * f(x + step) + 2 * f(x - step) - f(x - 2 * step)) \
        / (2 * step[index] ** 3)
    largest = max(largest, abs(third))
  return 2 * largest


def log_z_atol(logits, extra_roundings=0):
  """A token's float32 log Z = max + log sum_v exp(x_v - max) (token_log_z) against the exact one:
  the subtractions x_v - max (1, of up to the logits' range 2 max|x|; exp makes it a relative
  error), exp (2) and the sum over the vocabulary (V) are relative errors of Z, absolute in
  log Z; the log (2, of log Z - max <= log V), the addition of the max (1, of |log Z| <= max|x| +
  log V) and `extra_roundings` of each logit (they move log Z by as much): V + 6 + extra
  roundings of values up to 1 + 2 max|x| + log V."""
  vocab = np.shape(logits)[-1]
  return rounding_atol(1 + 2 * magnitude(logits) + np.log(vocab), vocab + 6 + extra_roundings)


def nll_token_atol(logits, logit_roundings=0):
  """A token's NLL log Z - x_target: `log_z_atol`, the logits' roundings once more for the
  target's and the subtraction (1)."""
  return log_z_atol(logits, 2 * logit_roundings + 1)


def z2_token_atol(logits, logit_roundings=0):
  """A token's log(Z)^2: log Z's error e times 2 |log Z| (and e^2), and the square's rounding."""
  x = np.asarray(logits, np.float64)
  log_z = magnitude(x.max(-1) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)))
  e = log_z_atol(logits, logit_roundings)
  return 2 * log_z * e + e * e + rounding_atol(log_z**2, 1)


def reduce_tokens_atol(token_atol, values, mask, normalization="mean"):
  """reduce_tokens of per-token values, each within token_atol: the masked sum over T positions
  (the products and T additions: T + 1 roundings of sum |v m|) and for "mean" the division by
  sum m (1; the count of a 0/1 mask is exact)."""
  weighted = np.abs(np.asarray(values, np.float64) * mask)
  count = float(np.sum(mask))
  if normalization == "sum":
    return count * token_atol + rounding_atol(np.sum(weighted), weighted.size + 1)
  return token_atol + rounding_atol(np.sum(weighted) / count, weighted.size + 2)


def weighted_sum_atol(*parts):
  """A float32 sum of k parts w_k v_k, parts given as pairs (w_k, v_k): k products and k - 1
  additions, each rounding values up to sum |w_k v_k|."""
  size = sum(abs(weight) * magnitude(value) for weight, value in parts)
  return rounding_atol(size, 2 * len(parts) - 1)


# ---- nucl_rows ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(5, 3), (32, 64), (7, 257)])
def test_nucl_rows_match_float64_equations_on_random_matrices(variant, shape):
  w = np.random.default_rng(shape[1]).normal(size=shape).astype(np.float32)
  got = losses.nucl_rows(jnp.asarray(w), variant)
  assert got.shape == (shape[0],) and got.dtype == jnp.float32
  # float32 against float64 on the same w: the float32 path's roundings (row_bounds).
  np.testing.assert_allclose(got, np_rows(w, variant), rtol=0, atol=nucl_rows_atol(w, variant))


@pytest.mark.parametrize("variant", VARIANTS)
def test_nucl_rows_match_float64_equations_on_edge_cases(variant):
  w = edge_case_matrix()  # row_bounds, as for random matrices
  np.testing.assert_allclose(losses.nucl_rows(jnp.asarray(w), variant), np_rows(w, variant),
                             rtol=0, atol=nucl_rows_atol(w, variant))


@pytest.mark.parametrize("variant", VARIANTS)
def test_nucl_rows_values_and_gradients_are_finite_on_edge_cases(variant):
  w = jnp.asarray(edge_case_matrix())
  w = jnp.concatenate([w, jnp.full((1, w.shape[1]), 1e-38, jnp.float32)])  # below the zero-row eps
  values = losses.nucl_rows(w, variant)
  grads = jax.grad(lambda w: jnp.sum(losses.nucl_rows(w, variant)))(w)
  assert np.all(np.isfinite(values)), values
  assert np.all(np.isfinite(grads)), grads


@pytest.mark.parametrize("variant", VARIANTS)
def test_exact_zero_weights_get_zero_gradient(variant):
  w = jnp.asarray(edge_case_matrix())
  grads = jax.grad(lambda w: jnp.sum(losses.nucl_rows(w, variant)))(w)
  np.testing.assert_array_equal(np.asarray(grads)[np.asarray(w) == 0], 0.0)
  assert np.any(np.asarray(grads)[np.asarray(w) != 0] != 0)


def central_differences(f, x, h=1e-6):
  """df/dx of a scalar float64 function f of an array x, entry by entry: (f(x+h) - f(x-h)) / 2h."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    step = np.zeros_like(x)
    step[index] = h
    grad[index] = (f(x + step) - f(x - step)) / (2 * h)
  return grad


@pytest.mark.parametrize("variant", VARIANTS)
def test_nucl_term_gradients_match_float64_central_differences(variant):
  """jax.grad of the registered loss term nucl_<variant> (float32) against central differences
  of Eq. 2-6 in float64, on the W of two layers at different scales.  An exact zero weight is
  included: central differences of a function of |w| are 0 there, the documented subgradient."""
  rng = np.random.default_rng(21)
  cfg = tiny_cfg(num_layers=2)
  out = [rng.normal(size=(6, 5)) * scale for scale in (1.0, 30.0)]
  out[0][2, 3] = 0.0
  out = [w.astype(np.float32) for w in out]  # the float64 reference sees the same numbers

  def term(params):
    return losses.LOSS_TERMS[f"nucl_{variant}"](params, None, None, cfg)

  def reference(w):
    return np_rows(w, variant).sum()

  gin.clear_config()  # nucl's gin defaults: target ffn_out, all layers
  grads = jax.grad(term)({f"layers_{i}": {"mlp": {"out": jnp.asarray(w)}}
                          for i, w in enumerate(out)})
  h = 1e-6
  for i, w in enumerate(out):
    expected = central_differences(reference, w, h)
    got = np.asarray(grads[f"layers_{i}"]["mlp"]["out"])
    # The float32 gradient's rounding, and the float64 differences' truncation (h^2 |f'''| / 6)
    # and rounding (the reference's own float64 rounding, divided by 2h).
    atol = nucl_gradient_atol(w, variant) + central_difference_atol(
        h, third_derivative_scale(reference, w), nucl_atol([w], variant, eps=EPS64))
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol, err_msg=f"layers_{i}")
    assert got[np.asarray(w) == 0].tolist() == [0.0] * int(np.sum(w == 0))


def test_zero_row_is_treated_as_uniform():
  n = 10
  w = jnp.zeros((2, n)).at[1].set(1e-38)  # all zero; all below ZERO_ROW_MAX_ABS
  # The rows' general bounds (row_bounds) for the uniform rows they stand for.
  np.testing.assert_allclose(losses.nucl_rows(w, "ent"), [np.log(n)] * 2, rtol=0,
                             atol=nucl_rows_atol(w, "ent"))
  np.testing.assert_allclose(losses.nucl_rows(w, "gini"), [1 - 1 / n] * 2, rtol=0,
                             atol=nucl_rows_atol(w, "gini"))
  np.testing.assert_array_equal(losses.nucl_rows(w, "mstd"), [0.0, 0.0])
  for variant in VARIANTS:
    grads = jax.grad(lambda w: jnp.sum(losses.nucl_rows(w, variant)))(w)
    np.testing.assert_array_equal(grads, np.zeros_like(grads))


def test_one_hot_rows_are_minimal():
  n = 8
  w = jnp.eye(n)  # row_bounds, as for any row
  np.testing.assert_allclose(losses.nucl_rows(w, "ent"), np.zeros(n), rtol=0,
                             atol=nucl_rows_atol(w, "ent"))
  np.testing.assert_allclose(losses.nucl_rows(w, "gini"), np.zeros(n), rtol=0,
                             atol=nucl_rows_atol(w, "gini"))
  np.testing.assert_allclose(losses.nucl_rows(w, "mstd"),
                             -np.sqrt(n - 1) / n * np.ones(n),
                             rtol=0, atol=nucl_rows_atol(w, "mstd"))


def test_nucl_rows_are_scale_invariant():
  w = np.random.default_rng(3).normal(size=(6, 20)).astype(np.float32)
  for variant in VARIANTS:
    base = losses.nucl_rows(jnp.asarray(w), variant)
    # Both float32, each within its row bounds of the exact rows; w * scale has one rounding per
    # entry more than w (the product).
    atol = nucl_rows_atol(w, variant, entry_roundings=2) + nucl_rows_atol(w, variant)
    for scale in (1e-30, 1e30):
      np.testing.assert_allclose(losses.nucl_rows(jnp.asarray(w * scale), variant), base,
                                 rtol=0, atol=atol)


def test_listing1_entropy_form_equals_eq3():
  # Listing 1: log z + sum_j entr(|w_j|) / z with z = sum_j |w_j|, entr(x) = -x log x.
  rng = np.random.default_rng(4)
  a = np.abs(rng.normal(size=(9, 33))) * np.exp(rng.normal(size=(9, 1)) * 5)
  z = a.sum(axis=1)
  listing1 = np.log(z) + np.sum(-a * np.log(a), axis=1) / z
  # Both float64.  Listing 1: z's sum (n, absolute in log z), log z (2), log a (2), the products
  # and their sum (1 + n, of sum |a log a| / z <= max |log a|), the division and the addition
  # (2): 2n + 7 roundings of values up to 1 + max(|log z|, |log a|); Eq. 3: its row bound.
  n = a.shape[1]
  listing1_atol = rounding_atol(1 + max(magnitude(np.log(z)), magnitude(np.log(a))), 2 * n + 7,
                                EPS64)
  np.testing.assert_allclose(listing1, np_rows(a, "ent"), rtol=0,
                             atol=listing1_atol + nucl_rows_atol(a, "ent", eps=EPS64))
  # float32 (its rounding dominates): a's cast and s = |a| / max|a| round each entry (2).
  np.testing.assert_allclose(losses.nucl_rows(jnp.asarray(a, jnp.float32), "ent"), listing1,
                             rtol=0, atol=nucl_rows_atol(a, "ent", entry_roundings=2))


def test_eq9_equals_eq5_in_exact_arithmetic_and_near_uniform_rows_keep_their_mstd():
  rng = np.random.default_rng(5)
  n = 2304
  a = np.abs(rng.normal(size=(4, n)))
  r = a / a.sum(axis=1, keepdims=True)
  eq9 = -np.sqrt((np.sum(r**2, axis=1) - 1 / n) / n)
  # Both float64.  Eq. 9's sum r^2 (r: n + 1 roundings, twice in r^2; the squares and the sum:
  # 3n + 3) less 1/n (2) cancels to n mstd^2, so mstd^2 is off by (3n + 5) eps sum r^2 / n, which
  # the sqrt halves and divides by |mstd| (and 2 of |mstd|: / n, sqrt); Eq. 5: its row bound.
  eq9_atol = max(rounding_atol(q / (2 * n * abs(m)), 3 * n + 5, EPS64)
                 + rounding_atol(abs(m), 2, EPS64) for q, m in zip(np.sum(r**2, axis=1), eq9))
  np.testing.assert_allclose(eq9, np_rows(a, "mstd"), rtol=0,
                             atol=eq9_atol + nucl_rows_atol(a, "mstd", eps=EPS64))
  # A row that is uniform up to 1e-4 relative noise: Eq. 9 in float32 rounds it to 0; ours not.
  near = (1.0 + 1e-4 * rng.normal(size=(1, n))).astype(np.float32)
  got = losses.nucl_rows(jnp.asarray(near), "mstd")
  np.testing.assert_allclose(got, np_rows(near, "mstd"), rtol=0,
                             atol=near_uniform_mstd_atol(near))
  assert float(got[0]) < 0


def test_nucl_rows_rejects_unknown_variant_and_non_matrices():
  with pytest.raises(ValueError, match="variant 'entropy'"):
    losses.nucl_rows(jnp.ones((2, 3)), "entropy")
  with pytest.raises(ValueError, match=r"\[m, n\]"):
    losses.nucl_rows(jnp.ones((2, 3, 4)), "ent")


def test_sgd_on_nucl_mstd_alone_lowers_row_entropy():
  # dNUCL/dW scales like 1 / sum_j |W_ij| (~50 here), hence the large learning rate.
  w = jnp.asarray(np.random.default_rng(6).normal(size=(32, 64)), jnp.float32)
  grad = jax.jit(jax.grad(lambda w: jnp.sum(losses.nucl_rows(w, "mstd"))))
  entropies = [np_rows(w, "ent").sum()]
  for _ in range(10):
    w = w - 50.0 * grad(w)
    entropies.append(np_rows(w, "ent").sum())
  assert all(b < a for a, b in zip(entropies, entropies[1:])), entropies
  assert entropies[-1] < entropies[0] - 5.0, entropies


# ---- targets and layers -------------------------------------------------------------------------


def constant_params(cfg):
  """Every matrix filled with its own constant, so a selected matrix can be recognised."""
  params = random_params(cfg)
  codes = {}
  for i in range(cfg.num_layers):
    layer = params[f"layers_{i}"]
    for group, names in (("attn", ("q", "k", "v", "o")), ("mlp", ("gate", "up", "out"))):
      if group not in layer:
        continue
      for name in names:
        code = 100.0 * i + len(codes) + 1.0
        codes[(i, group, name)] = code
        layer[group][name] = jnp.full_like(layer[group][name], code)
  return params, codes


@pytest.mark.parametrize("target, group, name, shape", [
    ("ffn_out", "mlp", "out", lambda c: (c.ffn_dim, c.d_model)),
    ("ffn_in_linear", "mlp", "up", lambda c: (c.ffn_dim, c.d_model)),
    ("ffn_in_gated", "mlp", "gate", lambda c: (c.ffn_dim, c.d_model)),
    ("attn_out", "attn", "o", lambda c: (c.num_heads * c.head_dim, c.d_model)),
])
def test_target_selects_the_named_matrix_with_rows_as_inner_neurons(target, group, name, shape):
  cfg = tiny_cfg(num_layers=3)
  params, codes = constant_params(cfg)
  matrices = losses.target_matrices(params, cfg, target)
  assert sorted(matrices) == ["layers_0", "layers_1", "layers_2"]
  for i in range(3):
    m = matrices[f"layers_{i}"]
    assert m.shape == shape(cfg)
    np.testing.assert_array_equal(m, codes[(i, group, name)])


def test_incoming_targets_use_the_transposed_kernel():
  cfg = tiny_cfg(num_layers=1)
  params = random_params(cfg)
  mlp = params["layers_0"]["mlp"]
  np.testing.assert_array_equal(losses.target_matrices(params, cfg, "ffn_in_linear")["layers_0"],
                                mlp["up"].T)
  np.testing.assert_array_equal(losses.target_matrices(params, cfg, "ffn_in_gated")["layers_0"],
                                mlp["gate"].T)


def test_attn_out_rows_are_the_n_times_h_inner_dims():
  cfg = tiny_cfg(num_layers=1)
  params = random_params(cfg)
  o = np.asarray(params["layers_0"]["attn"]["o"])  # [N, H, d]
  m = np.asarray(losses.target_matrices(params, cfg, "attn_out")["layers_0"])
  N, H, d = o.shape
  for n in range(N):
    for h in (0, H - 1):
      np.testing.assert_array_equal(m[n * H + h], o[n, h])


def test_nucl_sums_rows_over_the_chosen_layers():
  cfg = tiny_cfg(num_layers=4)
  params = random_params(cfg)
  out = [params[f"layers_{i}"]["mlp"]["out"] for i in range(4)]
  per_layer = [np_rows(w, "mstd").sum() for w in out]
  # float32 against float64: each row's row_bounds and the sum over the chosen layers' rows.
  np.testing.assert_allclose(losses.nucl(params, cfg, "mstd"), sum(per_layer), rtol=0,
                             atol=nucl_atol(out, "mstd"))
  np.testing.assert_allclose(losses.nucl(params, cfg, "mstd", layers=[1, 3]),
                             per_layer[1] + per_layer[3], rtol=0,
                             atol=nucl_atol([out[1], out[3]], "mstd"))


def test_layer_without_mlp_contributes_nothing_and_bad_layer_index_is_named():
  cfg = tiny_cfg(num_layers=3, ffn_widths=(256, 0, 128))
  params = random_params(cfg)
  assert "mlp" not in params["layers_1"]
  assert sorted(losses.target_matrices(params, cfg, "ffn_out")) == ["layers_0", "layers_2"]
  assert float(losses.nucl(params, cfg, "gini", layers=[1])) == 0.0
  with pytest.raises(ValueError, match="index 3"):
    losses.nucl(params, cfg, "gini", layers=[3])
  with pytest.raises(ValueError, match="target 'ffn'"):
    losses.nucl(params, cfg, "gini", target="ffn")
  # The same matrices summed in the same order: the same float32 operations, bit for bit.
  np.testing.assert_array_equal(losses.nucl(params, cfg, "gini", layers=np.array([0, 2])),
                                losses.nucl(params, cfg, "gini"))


# ---- NLL and z-loss -----------------------------------------------------------------------------


def test_nll_mean_and_sum_normalisation_match_numpy_and_respect_the_mask():
  logits, batch = random_batch(np.random.default_rng(7))
  tok, _, mask = np_token_losses(logits, batch)
  np.testing.assert_allclose(losses.nll(logits, batch), (tok * mask).sum() / mask.sum(), rtol=0,
                             atol=reduce_tokens_atol(nll_token_atol(logits), tok, mask))
  np.testing.assert_allclose(losses.nll(logits, batch, "sum"), (tok * mask).sum(), rtol=0,
                             atol=reduce_tokens_atol(nll_token_atol(logits), tok, mask, "sum"))
  # Changing logits at masked-out positions changes nothing: their losses are multiplied by 0,
  # the same float32 sum of the same values.
  noisy = jnp.where(batch["loss_mask"][..., None] > 0, logits, logits + 100.0)
  np.testing.assert_array_equal(losses.nll(noisy, batch), losses.nll(logits, batch))
  # Fractional weights: same mean.  Scaling by a power of 2 commutes with rounding, so the sums
  # and the quotient are those of the 0/1 mask, bit for bit.
  weighted = dict(batch, loss_mask=batch["loss_mask"] * 0.25)
  np.testing.assert_array_equal(losses.nll(logits, weighted), losses.nll(logits, batch))
  empty = dict(batch, loss_mask=jnp.zeros_like(batch["loss_mask"]))
  assert float(losses.nll(logits, empty)) == 0.0


def test_nll_is_float32_for_bfloat16_logits():
  logits, batch = random_batch(np.random.default_rng(8))
  got = losses.nll(logits.astype(jnp.bfloat16), batch)
  assert got.dtype == jnp.float32
  rounded = logits.astype(jnp.bfloat16).astype(jnp.float32)  # the reference sees the same values
  tok, _, mask = np_token_losses(rounded, batch)
  np.testing.assert_allclose(got, (tok * mask).sum() / mask.sum(), rtol=0,
                             atol=reduce_tokens_atol(nll_token_atol(rounded), tok, mask))


def test_z_loss_matches_numpy_with_both_normalisations():
  logits, batch = random_batch(np.random.default_rng(9))
  _, z2, mask = np_token_losses(logits, batch)
  np.testing.assert_allclose(losses.z_loss(logits, batch), (z2 * mask).sum() / mask.sum(), rtol=0,
                             atol=reduce_tokens_atol(z2_token_atol(logits), z2, mask))
  np.testing.assert_allclose(losses.z_loss(logits, batch, "sum"), (z2 * mask).sum(), rtol=0,
                             atol=reduce_tokens_atol(z2_token_atol(logits), z2, mask, "sum"))


def test_nll_errors_name_the_missing_key_and_bad_normalisation():
  logits, batch = random_batch(np.random.default_rng(10))
  with pytest.raises(KeyError, match="loss_mask"):
    losses.nll(logits, {"targets": batch["targets"]})
  with pytest.raises(ValueError, match="normalization 'avg'"):
    losses.nll(logits, batch, "avg")


# ---- total_loss and the registry ----------------------------------------------------------------


def model_and_batch(seed=11):
  cfg = tiny_cfg(num_layers=2, vocab_size=11)
  params = random_params(cfg, seed)
  logits, batch = random_batch(np.random.default_rng(seed), V=cfg.vocab_size)
  # Tie the logits to the params so the NLL has gradients w.r.t. the FFN too.
  w = params["layers_0"]["mlp"]["out"]
  return cfg, params, batch, lambda p: logits + jnp.sum(p["layers_0"]["mlp"]["out"] - w) \
      + 0.1 * jnp.sum(p["embedder"]["embedding"][:, :1], axis=1)


def test_total_loss_is_nll_plus_alpha_times_terms_with_raw_metrics():
  cfg, params, batch, logits_fn = model_and_batch()
  logits = logits_fn(params)
  total, metrics = losses.total_loss(params, logits, batch, cfg,
                                     terms={"nucl_mstd": 100.0, "nucl_gini": 0.5},
                                     z_loss_weight=1e-4)
  assert set(metrics) == {"nll", "nucl_mstd", "nucl_gini", "z_loss", "loss"}
  # Raw metrics: the same functions of the same arrays, the same float32 operations, bit for bit.
  np.testing.assert_array_equal(metrics["nll"], losses.nll(logits, batch))
  np.testing.assert_array_equal(metrics["nucl_mstd"], losses.nucl(params, cfg, "mstd"))
  np.testing.assert_array_equal(metrics["z_loss"], losses.z_loss(logits, batch))
  parts = [(1.0, metrics["nll"]), (1e-4, metrics["z_loss"]), (100.0, metrics["nucl_mstd"]),
           (0.5, metrics["nucl_gini"])]
  expected = sum(weight * value for weight, value in parts)
  # Two float32 sums of the same parts, each within weighted_sum_atol of the exact one.
  np.testing.assert_allclose(total, expected, rtol=0, atol=2 * weighted_sum_atol(*parts))
  assert metrics["loss"] is total and total.dtype == jnp.float32


def test_total_loss_under_jit_equals_eager():
  cfg, params, batch, logits_fn = model_and_batch()

  def loss(p, batch):
    return losses.total_loss(p, logits_fn(p), batch, cfg, terms={"nucl_mstd": 10.0},
                             z_loss_weight=1e-4)

  eager_total, eager_metrics = loss(params, batch)
  jit_total, jit_metrics = jax.jit(loss)(params, batch)
  # jit may fuse and order the reductions otherwise: each side is within its bound of the exact
  # total; the logits carry logits_fn's 2 roundings (the product and the sum).
  logits = logits_fn(params)
  tok, z2, mask = np_token_losses(logits, batch)
  out = [params[f"layers_{i}"]["mlp"]["out"] for i in range(cfg.num_layers)]
  each = (reduce_tokens_atol(nll_token_atol(logits, 2), tok, mask)
          + 1e-4 * reduce_tokens_atol(z2_token_atol(logits, 2), z2, mask)
          + 10.0 * nucl_atol(out, "mstd")
          + weighted_sum_atol((1.0, eager_metrics["nll"]), (1e-4, eager_metrics["z_loss"]),
                              (10.0, eager_metrics["nucl_mstd"])))
  np.testing.assert_allclose(jit_total, eager_total, rtol=0, atol=2 * each)
  assert set(jit_metrics) == set(eager_metrics)


def test_alpha_zero_gives_exactly_the_plain_nll_gradients():
  cfg, params, batch, logits_fn = model_and_batch()

  def loss(p, terms):
    return losses.total_loss(p, logits_fn(p), batch, cfg, terms=terms)[0]

  def grads(terms):
    return jax.jit(jax.grad(lambda p: loss(p, terms)))(params)

  plain = grads(None)
  with_zero = grads({"nucl_mstd": 0.0, "nucl_ent": 0})
  with_alpha = grads({"nucl_mstd": 1.0})
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(with_zero)):
    np.testing.assert_array_equal(np.asarray(a).view(np.uint32), np.asarray(b).view(np.uint32))
  assert not np.array_equal(plain["layers_0"]["mlp"]["out"], with_alpha["layers_0"]["mlp"]["out"])


def test_unknown_term_is_named_and_a_registered_term_is_used():
  cfg, params, batch, logits_fn = model_and_batch()
  with pytest.raises(ValueError, match="'nucl_std' is not a registered loss term"):
    losses.total_loss(params, logits_fn(params), batch, cfg, terms={"nucl_std": 1.0})

  @losses.register_term("test_embedding_l2")
  def _l2(params, logits, batch, cfg):
    return jnp.sum(jnp.square(params["embedder"]["embedding"]))

  try:
    with pytest.raises(ValueError, match="'test_embedding_l2' is taken"):
      losses.register_term("test_embedding_l2")(_l2)
    with pytest.raises(ValueError, match="'loss' is taken"):
      losses.register_term("loss")(_l2)
    total, metrics = losses.total_loss(params, logits_fn(params), batch, cfg,
                                       terms={"test_embedding_l2": 2.0})
    parts = [(1.0, metrics["nll"]), (2.0, metrics["test_embedding_l2"])]
    np.testing.assert_allclose(total, metrics["nll"] + 2.0 * metrics["test_embedding_l2"],
                               rtol=0, atol=2 * weighted_sum_atol(*parts))
  finally:
    del losses.LOSS_TERMS["test_embedding_l2"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_gin_snippet_switches_on_nucl_with_variant_alpha_and_target(variant):
  cfg, params, batch, logits_fn = model_and_batch()
  gin.clear_config()
  try:
    gin.parse_config_file(str(REPO / "gin" / "losses" / f"nucl_{variant}.gin"))
    gin.parse_config("nucl.target = 'ffn_in_linear'\nnucl.layers = [1]")
    alpha = gin.query_parameter("%NUCL_ALPHA")
    total, metrics = losses.total_loss(params, logits_fn(params), batch, cfg)
  finally:
    gin.clear_config()
  up = np.asarray(params["layers_1"]["mlp"]["up"]).T
  np.testing.assert_allclose(metrics[f"nucl_{variant}"], np_rows(up, variant).sum(), rtol=0,
                             atol=nucl_atol([up], variant))
  parts = [(1.0, metrics["nll"]), (alpha, metrics[f"nucl_{variant}"])]
  np.testing.assert_allclose(total, metrics["nll"] + alpha * metrics[f"nucl_{variant}"],
                             rtol=0, atol=2 * weighted_sum_atol(*parts))


def test_gin_rejects_binding_the_variant_which_the_term_name_picks():
  gin.clear_config()
  try:
    with pytest.raises(ValueError, match="variant"):
      gin.parse_config("nucl.variant = 'gini'")
  finally:
    gin.clear_config()


# ---- outgoing entropy (Fig. 2) and dtypes -------------------------------------------------------


def test_outgoing_entropy_is_per_layer_sum_of_row_entropies_and_zero_without_mlp():
  cfg = tiny_cfg(num_layers=3, ffn_widths=(256, 0, 64))
  params = random_params(cfg)
  got = losses.outgoing_entropy(params, cfg)
  assert got.shape == (3,) and got.dtype == jnp.float32
  assert float(got[1]) == 0.0
  for i in (0, 2):  # float32 against float64: each row's row_bounds and the sum over the rows
    w = params[f"layers_{i}"]["mlp"]["out"]
    np.testing.assert_allclose(got[i], np_rows(w, "ent").sum(), rtol=0, atol=nucl_atol([w], "ent"),
                               err_msg=f"layers_{i}")
  rows = losses.outgoing_entropy_rows(params, cfg)
  assert {k: v.shape for k, v in rows.items()} == {"layers_0": (256,), "layers_1": (0,),
                                                    "layers_2": (64,)}


def test_bfloat16_params_give_float32_results_close_to_float32_params():
  cfg = tiny_cfg(num_layers=2, vocab_size=16)
  p32 = random_params(cfg, seed=12)
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
  p16_as_32 = jax.tree.map(lambda x: x.astype(jnp.float32), p16)
  out32 = [p32[f"layers_{i}"]["mlp"]["out"] for i in range(cfg.num_layers)]
  out16 = [p16_as_32[f"layers_{i}"]["mlp"]["out"] for i in range(cfg.num_layers)]
  for variant in VARIANTS:
    got = losses.nucl(p16, cfg, variant)
    assert got.dtype == jnp.float32
    # Same values as float32 params holding the bf16-rounded weights (the same float32 operations
    # on the same values, in two compiled programs: each within nucl_atol of the exact value),
    # and close to the originals (the bf16 rounding of each weight: bf16_weights_atol).
    np.testing.assert_allclose(got, losses.nucl(p16_as_32, cfg, variant), rtol=0,
                               atol=2 * nucl_atol(out16, variant))
    np.testing.assert_allclose(got, losses.nucl(p32, cfg, variant), rtol=0,
                               atol=bf16_weights_atol(out32, variant))
    grads = jax.jit(jax.grad(lambda p: losses.nucl(p, cfg, variant)))(p16)
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in jax.tree.leaves(grads))
  ent16 = losses.outgoing_entropy(p16, cfg)
  assert ent16.dtype == jnp.float32
  ent32 = losses.outgoing_entropy(p32, cfg)
  for i, w in enumerate(out32):  # each layer's weights rounded to bf16: bf16_weights_atol
    np.testing.assert_allclose(ent16[i], ent32[i], rtol=0, atol=bf16_weights_atol([w], "ent"),
                               err_msg=f"layers_{i}")
