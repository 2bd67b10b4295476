"""Scanned layers: the same params tree and the same function as the unrolled stack."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxnucl import models, sharding
from maxnucl.models import decoder
from maxnucl.models.config import ConfigError, ModelConfig
from tolerances import decoder_terms, gradient_terms, magnitude, rounding_atol

TOKENS = np.random.RandomState(0).randint(3, 384, (2, 20)).astype(np.int32)  # 20 > window 16
SEGMENTS = np.array([[1] * 20, [1] * 12 + [2] * 8], np.int32)

CASES = {
    "gemma2_4_layers": ("gemma2_tiny", {}),
    "gemma2_6_layers_full_remat": ("gemma2_tiny", {"num_layers": 6, "remat_policy": "full"}),
    "gemma2_odd_depth_save_dots": ("gemma2_tiny", {"num_layers": 5, "remat_policy": "save_dots"}),
    # runs of pairs (0,1)(2,3) | singleton (4,5) with a 0-width FFN | run (6,7)(8,9)
    "gemma2_per_layer_widths": ("gemma2_tiny", {
        "num_layers": 10, "ffn_widths": (256, 256, 256, 256, 128, 0, 64, 64, 64, 64)}),
    "palm_4_layers": ("palm_tiny", {}),
    # one 6-layer group (5 local : 1 global) scanned over 2 periods, then a 1-layer remainder
    "gemma3_13_layers": ("gemma3_tiny", {"num_layers": 13}),
    # runs (0)(1) | singleton (2) without FFN or pre_ffw_norm | run (3)(4)
    "llama_per_layer_widths_biases": ("llama_tiny", {
        "num_layers": 5, "ffn_widths": (256, 256, 0, 96, 96), "qkv_bias": True}),
    # run (0)(1) | singleton (2) without FFN | run (3)(4)(5) | singleton (6)
    "palm_per_layer_widths_save_dots": ("palm_tiny", {
        "num_layers": 7, "ffn_widths": (256, 256, 0, 96, 96, 96, 32),
        "remat_policy": "save_dots"}),
}


def _weights(cfg):
  return jnp.asarray(np.random.RandomState(1).normal(size=TOKENS.shape + (cfg.vocab_size,)),
                     jnp.float32)


def _loss(params, cfg, weights, dropout_rng=None):
  logits = models.apply(cfg, params, TOKENS, SEGMENTS, dropout_rng=dropout_rng)
  return jnp.sum(logits * weights) / logits.size, logits


def _logits_and_grads(cfg, params, dropout_rng=None):
  fn = jax.jit(jax.grad(_loss, has_aux=True), static_argnums=1)
  grads, logits = fn(params, cfg, _weights(cfg), dropout_rng)
  return np.asarray(logits), grads


def _assert_logits_equal(cfg, logits, reference):
  """Scanned and unrolled stacks sum in other orders: the roundings of a logit's path."""
  np.testing.assert_allclose(logits, reference, rtol=0,
                             atol=rounding_atol(magnitude(reference),
                                                decoder_terms(cfg, TOKENS.shape[1])))


def _assert_grads_equal(cfg, a, b):
  """The roundings of a gradient's path (the loss sums every logit times a weight), relative to
  each reference gradient's largest entry."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  terms = gradient_terms(cfg, TOKENS.shape[1], TOKENS.size * cfg.vocab_size)
  for path, x, y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(a),
                        jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=rounding_atol(magnitude(y), terms),
                               err_msg=jax.tree_util.keystr(path[0]))


def _config(case):
  preset, overrides = CASES[case]
  return models.get_config(preset, **overrides)


def _scan_count(cfg, params):
  jaxpr = jax.make_jaxpr(lambda p: models.apply(cfg, p, TOKENS))(params)
  return str(jaxpr).count("scan[")


def test_presets_scan_by_default_and_old_configs_load_with_the_default():
  cfg = models.get_config("gemma2_2b")
  assert cfg.scan_layers and models.get_config("palm_8b").scan_layers
  old = cfg.to_dict()
  del old["scan_layers"]  # a checkpoint written before the field existed
  assert ModelConfig.from_dict(old) == cfg
  assert ModelConfig.from_dict(cfg.replace(scan_layers=False).to_dict()).scan_layers is False
  with pytest.raises(ConfigError, match="scan_layers"):
    cfg.replace(scan_layers="yes")


def test_scan_runs_group_pairs_and_split_where_shapes_differ():
  assert decoder.scan_runs(models.get_config("gemma2_tiny", num_layers=46)) == [
      [(2 * k, 2 * k + 1) for k in range(23)]]
  assert decoder.scan_runs(models.get_config("palm_tiny")) == [[(0,), (1,), (2,), (3,)]]
  assert decoder.scan_runs(_config("gemma2_per_layer_widths")) == [
      [(0, 1), (2, 3)], [(4, 5)], [(6, 7), (8, 9)]]
  assert decoder.scan_runs(_config("gemma2_odd_depth_save_dots")) == [
      [(0, 1), (2, 3)], [(4,)]]
  assert decoder.scan_runs(_config("palm_per_layer_widths_save_dots")) == [
      [(0,), (1,)], [(2,)], [(3,), (4,), (5,)], [(6,)]]


@pytest.mark.parametrize("case", ["gemma2_4_layers", "gemma2_per_layer_widths"])
def test_params_tree_is_the_same_whatever_scan_layers(case):
  cfg = _config(case)
  scanned = models.init(cfg, jax.random.PRNGKey(0))
  unrolled = models.init(cfg.replace(scan_layers=False), jax.random.PRNGKey(0))
  assert jax.tree.map(jnp.shape, scanned) == jax.tree.map(jnp.shape, unrolled)
  assert set(scanned) == {"embedder", "final_norm"} | {f"layers_{i}"
                                                        for i in range(cfg.num_layers)}
  jax.tree.map(np.testing.assert_array_equal, scanned, unrolled)
  assert models.logical_axes(cfg) == models.logical_axes(cfg.replace(scan_layers=False))


@pytest.mark.parametrize("case", sorted(CASES))
def test_scanned_logits_and_gradients_equal_unrolled(case):
  cfg = _config(case)
  params = models.init(cfg, jax.random.PRNGKey(0))
  # The scan is real wherever a run has two or more groups.
  assert _scan_count(cfg, params) == sum(len(run) > 1 for run in decoder.scan_runs(cfg)) > 0
  assert _scan_count(cfg.replace(scan_layers=False), params) == 0
  logits, grads = _logits_and_grads(cfg, params)
  ref_logits, ref_grads = _logits_and_grads(cfg.replace(scan_layers=False), params)
  _assert_logits_equal(cfg, logits, ref_logits)
  _assert_grads_equal(cfg, grads, ref_grads)


def test_scanned_dropout_draws_the_unrolled_masks():
  cfg = models.get_config("gemma2_tiny", dropout_rate=0.3)
  params = models.init(cfg, jax.random.PRNGKey(0))
  rng = jax.random.PRNGKey(5)
  logits, grads = _logits_and_grads(cfg, params, rng)
  ref_logits, ref_grads = _logits_and_grads(cfg.replace(scan_layers=False), params, rng)
  _assert_logits_equal(cfg, logits, ref_logits)
  _assert_grads_equal(cfg, grads, ref_grads)
  no_dropout = np.asarray(models.apply(cfg, params, TOKENS, SEGMENTS))
  # the masks are not all ones: the logits move by more than a logit's rounding could explain
  assert np.abs(logits - no_dropout).max() > rounding_atol(magnitude(no_dropout),
                                                           decoder_terms(cfg, TOKENS.shape[1]))


def test_scanned_on_a_2x2x2_mesh_equals_unrolled_on_one_device():
  cfg = models.get_config("gemma2_tiny", num_heads=8, num_kv_heads=8, head_dim=8, num_layers=6,
                          remat_policy="full")
  params = models.init(cfg, jax.random.PRNGKey(0))
  ref_logits, ref_grads = _logits_and_grads(cfg.replace(scan_layers=False), params)
  mesh = sharding.create_mesh((2, 2, 2))
  rules = sharding.DEFAULT_RULES
  param_shardings = sharding.tree_shardings(models.logical_axes(cfg), params, mesh, rules)
  with sharding.activate(mesh, rules):
    sharded = jax.device_put(params, param_shardings)
    fn = jax.jit(jax.grad(functools.partial(_loss, cfg=cfg), has_aux=True))
    grads, logits = fn(sharded, weights=_weights(cfg))
  assert grads["layers_0"]["mlp"]["gate"].sharding.spec == sharded["layers_0"]["mlp"][
      "gate"].sharding.spec  # gradients come back in the params' (canonical) layout and sharding
  _assert_logits_equal(cfg, np.asarray(logits), ref_logits)
  _assert_grads_equal(cfg, grads, ref_grads)


def test_per_layer_reads_stay_unrolled_and_agree_with_scanned_logits():
  cfg = _config("gemma2_4_layers")
  params = models.init(cfg, jax.random.PRNGKey(0))
  logits, inner = models.apply_with_ffn(cfg, params, TOKENS, SEGMENTS)
  assert set(inner) == {f"layers_{i}" for i in range(cfg.num_layers)}
  _assert_logits_equal(cfg, logits, models.apply(cfg, params, TOKENS, SEGMENTS))


def test_deep_scanned_stack_traces_one_group():
  # What keeps compile time flat: the traced program of 46 layers is that of 4 layers.
  def program_size(num_layers):
    cfg = models.get_config("gemma2_tiny", num_layers=num_layers)
    jaxpr = jax.make_jaxpr(lambda p: models.apply(cfg, p, TOKENS))(models.abstract_params(cfg))
    return str(jaxpr).count("dot_general")
  assert program_size(46) == program_size(4)


def test_params_that_do_not_fit_the_config_name_the_layer():
  cfg = models.get_config("gemma2_tiny")
  wrong = models.abstract_params(cfg.replace(ffn_widths=(256, 256, 128, 128)))
  with pytest.raises(ValueError, match="params layers_2 have shapes"):
    jax.eval_shape(lambda p: models.apply(cfg, p, TOKENS), wrong)
