"""Specification of maxnucl.losses: NLL, NUCL (Stahlberg & Kumar 2025) and the loss registry."""

import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxnucl import losses
from maxnucl.models.config import get_config

REPO = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = ("ent", "gini", "mstd")


# ---- independent float64 references (the paper's equations as written) ------------------------


def np_rows(w, variant):
  """Eq. 2-5 in float64; a zero row is the uniform distribution (the documented convention)."""
  a = np.abs(np.asarray(w, np.float64))
  n = a.shape[1]
  z = a.sum(axis=1, keepdims=True)
  r = np.where(z > 0, a / np.where(z > 0, z, 1.0), 1.0 / n)  # Eq. 2
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


# ---- nucl_rows ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("shape", [(5, 3), (32, 64), (7, 257)])
def test_nucl_rows_match_float64_equations_on_random_matrices(variant, shape):
  w = np.random.default_rng(shape[1]).normal(size=shape).astype(np.float32)
  got = losses.nucl_rows(jnp.asarray(w), variant)
  assert got.shape == (shape[0],) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_rows(w, variant), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("variant", VARIANTS)
def test_nucl_rows_match_float64_equations_on_edge_cases(variant):
  w = edge_case_matrix()
  np.testing.assert_allclose(losses.nucl_rows(jnp.asarray(w), variant), np_rows(w, variant),
                             rtol=2e-5, atol=1e-6)


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

  gin.clear_config()  # nucl's gin defaults: target ffn_out, all layers
  grads = jax.grad(term)({f"layers_{i}": {"mlp": {"out": jnp.asarray(w)}}
                          for i, w in enumerate(out)})
  for i, w in enumerate(out):
    expected = central_differences(lambda w: np_rows(w, variant).sum(), w)
    got = np.asarray(grads[f"layers_{i}"]["mlp"]["out"])
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-6 * np.abs(expected).max(),
                               err_msg=f"layers_{i}")
    assert got[np.asarray(w) == 0].tolist() == [0.0] * int(np.sum(w == 0))


def test_zero_row_is_treated_as_uniform():
  n = 10
  w = jnp.zeros((2, n)).at[1].set(1e-38)  # all zero; all below ZERO_ROW_MAX_ABS
  np.testing.assert_allclose(losses.nucl_rows(w, "ent"), [np.log(n)] * 2, rtol=1e-6)
  np.testing.assert_allclose(losses.nucl_rows(w, "gini"), [1 - 1 / n] * 2, rtol=1e-6)
  np.testing.assert_array_equal(losses.nucl_rows(w, "mstd"), [0.0, 0.0])
  for variant in VARIANTS:
    grads = jax.grad(lambda w: jnp.sum(losses.nucl_rows(w, variant)))(w)
    np.testing.assert_array_equal(grads, np.zeros_like(grads))


def test_one_hot_rows_are_minimal():
  n = 8
  w = jnp.eye(n)
  np.testing.assert_allclose(losses.nucl_rows(w, "ent"), np.zeros(n), atol=1e-7)
  np.testing.assert_allclose(losses.nucl_rows(w, "gini"), np.zeros(n), atol=1e-7)
  np.testing.assert_allclose(losses.nucl_rows(w, "mstd"),
                             -np.sqrt(n - 1) / n * np.ones(n),
                             rtol=1e-6)


def test_nucl_rows_are_scale_invariant():
  w = np.random.default_rng(3).normal(size=(6, 20)).astype(np.float32)
  for variant in VARIANTS:
    base = losses.nucl_rows(jnp.asarray(w), variant)
    for scale in (1e-30, 1e30):
      np.testing.assert_allclose(losses.nucl_rows(jnp.asarray(w * scale), variant), base,
                                 rtol=1e-5, atol=1e-7)


def test_listing1_entropy_form_equals_eq3():
  # Listing 1: log z + sum_j entr(|w_j|) / z with z = sum_j |w_j|, entr(x) = -x log x.
  rng = np.random.default_rng(4)
  a = np.abs(rng.normal(size=(9, 33))) * np.exp(rng.normal(size=(9, 1)) * 5)
  z = a.sum(axis=1)
  listing1 = np.log(z) + np.sum(-a * np.log(a), axis=1) / z
  np.testing.assert_allclose(listing1, np_rows(a, "ent"), rtol=1e-12)
  np.testing.assert_allclose(losses.nucl_rows(jnp.asarray(a, jnp.float32), "ent"), listing1,
                             rtol=2e-5)


def test_eq9_equals_eq5_in_exact_arithmetic_and_near_uniform_rows_keep_their_mstd():
  rng = np.random.default_rng(5)
  n = 2304
  a = np.abs(rng.normal(size=(4, n)))
  r = a / a.sum(axis=1, keepdims=True)
  eq9 = -np.sqrt((np.sum(r**2, axis=1) - 1 / n) / n)
  np.testing.assert_allclose(eq9, np_rows(a, "mstd"), rtol=1e-9)
  # A row that is uniform up to 1e-4 relative noise: Eq. 9 in float32 rounds it to 0; ours not.
  near = (1.0 + 1e-4 * rng.normal(size=(1, n))).astype(np.float32)
  got = losses.nucl_rows(jnp.asarray(near), "mstd")
  np.testing.assert_allclose(got, np_rows(near, "mstd"), rtol=1e-3)
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
  per_layer = [np_rows(params[f"layers_{i}"]["mlp"]["out"], "mstd").sum() for i in range(4)]
  np.testing.assert_allclose(losses.nucl(params, cfg, "mstd"), sum(per_layer), rtol=1e-5)
  np.testing.assert_allclose(losses.nucl(params, cfg, "mstd", layers=[1, 3]),
                             per_layer[1] + per_layer[3], rtol=1e-5)


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
  np.testing.assert_allclose(losses.nucl(params, cfg, "gini", layers=np.array([0, 2])),
                             losses.nucl(params, cfg, "gini"), rtol=1e-6)


# ---- NLL and z-loss -----------------------------------------------------------------------------


def test_nll_mean_and_sum_normalisation_match_numpy_and_respect_the_mask():
  logits, batch = random_batch(np.random.default_rng(7))
  tok, _, mask = np_token_losses(logits, batch)
  np.testing.assert_allclose(losses.nll(logits, batch), (tok * mask).sum() / mask.sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(losses.nll(logits, batch, "sum"), (tok * mask).sum(), rtol=1e-5)
  # Changing logits at masked-out positions changes nothing.
  noisy = jnp.where(batch["loss_mask"][..., None] > 0, logits, logits + 100.0)
  np.testing.assert_allclose(losses.nll(noisy, batch), losses.nll(logits, batch), rtol=1e-6)
  weighted = dict(batch, loss_mask=batch["loss_mask"] * 0.25)  # fractional weights: same mean
  np.testing.assert_allclose(losses.nll(logits, weighted), losses.nll(logits, batch), rtol=1e-6)
  empty = dict(batch, loss_mask=jnp.zeros_like(batch["loss_mask"]))
  assert float(losses.nll(logits, empty)) == 0.0


def test_nll_is_float32_for_bfloat16_logits():
  logits, batch = random_batch(np.random.default_rng(8))
  got = losses.nll(logits.astype(jnp.bfloat16), batch)
  assert got.dtype == jnp.float32
  tok, _, mask = np_token_losses(logits.astype(jnp.bfloat16).astype(jnp.float32), batch)
  np.testing.assert_allclose(got, (tok * mask).sum() / mask.sum(), rtol=1e-5)


def test_z_loss_matches_numpy_with_both_normalisations():
  logits, batch = random_batch(np.random.default_rng(9))
  _, z2, mask = np_token_losses(logits, batch)
  np.testing.assert_allclose(losses.z_loss(logits, batch), (z2 * mask).sum() / mask.sum(),
                             rtol=1e-5)
  np.testing.assert_allclose(losses.z_loss(logits, batch, "sum"), (z2 * mask).sum(), rtol=1e-5)


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
  np.testing.assert_allclose(metrics["nll"], losses.nll(logits, batch), rtol=1e-6)
  np.testing.assert_allclose(metrics["nucl_mstd"], losses.nucl(params, cfg, "mstd"), rtol=1e-6)
  np.testing.assert_allclose(metrics["z_loss"], losses.z_loss(logits, batch), rtol=1e-6)
  expected = (metrics["nll"] + 1e-4 * metrics["z_loss"] + 100.0 * metrics["nucl_mstd"]
              + 0.5 * metrics["nucl_gini"])
  np.testing.assert_allclose(total, expected, rtol=1e-6)
  assert metrics["loss"] is total and total.dtype == jnp.float32


def test_total_loss_under_jit_equals_eager():
  cfg, params, batch, logits_fn = model_and_batch()

  def loss(p, batch):
    return losses.total_loss(p, logits_fn(p), batch, cfg, terms={"nucl_mstd": 10.0},
                             z_loss_weight=1e-4)

  eager_total, eager_metrics = loss(params, batch)
  jit_total, jit_metrics = jax.jit(loss)(params, batch)
  np.testing.assert_allclose(jit_total, eager_total, rtol=1e-5)
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
  with pytest.raises(KeyError, match="nucl_std"):
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
    np.testing.assert_allclose(total, metrics["nll"] + 2.0 * metrics["test_embedding_l2"],
                               rtol=1e-6)
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
  expected = np_rows(np.asarray(params["layers_1"]["mlp"]["up"]).T, variant).sum()
  np.testing.assert_allclose(metrics[f"nucl_{variant}"], expected, rtol=1e-5)
  np.testing.assert_allclose(total, metrics["nll"] + alpha * metrics[f"nucl_{variant}"],
                             rtol=1e-6)


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
  expected = [np_rows(params["layers_0"]["mlp"]["out"], "ent").sum(), 0.0,
              np_rows(params["layers_2"]["mlp"]["out"], "ent").sum()]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  rows = losses.outgoing_entropy_rows(params, cfg)
  assert {k: v.shape for k, v in rows.items()} == {"layers_0": (256,), "layers_1": (0,),
                                                    "layers_2": (64,)}


def test_bfloat16_params_give_float32_results_close_to_float32_params():
  cfg = tiny_cfg(num_layers=2, vocab_size=16)
  p32 = random_params(cfg, seed=12)
  p16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p32)
  p16_as_32 = jax.tree.map(lambda x: x.astype(jnp.float32), p16)
  for variant in VARIANTS:
    got = losses.nucl(p16, cfg, variant)
    assert got.dtype == jnp.float32
    # Same values as float32 params holding the bf16-rounded weights, and close to the originals.
    np.testing.assert_allclose(got, losses.nucl(p16_as_32, cfg, variant), rtol=1e-6)
    np.testing.assert_allclose(got, losses.nucl(p32, cfg, variant), rtol=1e-2)
    grads = jax.jit(jax.grad(lambda p: losses.nucl(p, cfg, variant)))(p16)
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in jax.tree.leaves(grads))
  ent16 = losses.outgoing_entropy(p16, cfg)
  assert ent16.dtype == jnp.float32
  np.testing.assert_allclose(ent16, losses.outgoing_entropy(p32, cfg), rtol=1e-3)
