"""Sharded forward passes on 8 simulated CPU devices equal the single-device forward."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from maxnucl import models, sharding
from tolerances import decoder_terms, magnitude, rounding_atol

MESHES = {
    "data": (8, 1, 1),
    "fsdp": (1, 8, 1),
    "tensor": (1, 1, 8),
    "data_fsdp_tensor": (2, 2, 2),
}


def _sharded_logits(cfg, params, tokens, segment_ids, mesh_shape):
  mesh = sharding.create_mesh(mesh_shape)
  rules = sharding.DEFAULT_RULES
  param_shardings = sharding.tree_shardings(models.logical_axes(cfg), params, mesh, rules)
  batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(
      ("activation_batch", "activation_length"), tokens.shape, mesh, rules))
  with sharding.activate(mesh, rules):
    forward = jax.jit(functools.partial(models.apply, cfg),
                      in_shardings=(param_shardings, batch_sharding, batch_sharding))
    sharded_params = jax.device_put(params, param_shardings)
    logits = forward(sharded_params, tokens, segment_ids)
  return sharded_params, logits


@pytest.fixture(scope="module", params=["gemma2_tiny", "palm_tiny"])
def setup(request):
  # 8 query heads so a tensor axis of 8 divides them; PaLM keeps its single K/V head (MQA).
  cfg = models.get_config(request.param, num_heads=8, num_kv_heads=8 if request.param ==
                          "gemma2_tiny" else 1, head_dim=8, num_layers=2)
  params = models.init(cfg, jax.random.PRNGKey(0))
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, cfg.vocab_size, (8, 24)).astype(np.int32)
  segment_ids = np.repeat(np.array([[1] * 14 + [2] * 10]), 8, axis=0).astype(np.int32)
  reference = np.asarray(models.apply(cfg, params, tokens, segment_ids))
  return cfg, params, tokens, segment_ids, reference


def test_eight_simulated_devices_available():
  assert jax.device_count() == 8


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_forward_equals_unsharded(setup, mesh_name):
  cfg, params, tokens, segment_ids, reference = setup
  sharded_params, logits = _sharded_logits(cfg, params, tokens, segment_ids, MESHES[mesh_name])
  # partial sums per shard, added in another order: the roundings of a logit's path
  np.testing.assert_allclose(np.asarray(logits), reference, rtol=0, atol=rounding_atol(
      magnitude(reference), decoder_terms(cfg, tokens.shape[1])))
  # The parallelism is real: the mesh axis of this test partitions the params or the batch.
  gate = sharded_params["layers_0"]["mlp"]["gate"].sharding.spec
  if mesh_name == "fsdp":
    assert gate == PartitionSpec("fsdp", None)
  if mesh_name == "tensor":
    assert gate == PartitionSpec(None, "tensor")
    assert sharded_params["layers_0"]["attn"]["q"].sharding.spec == PartitionSpec(
        None, "tensor", None)
  if mesh_name in ("data", "fsdp"):
    assert len(logits.sharding.device_set) == 8


def test_rule_falls_back_to_replication_when_axis_does_not_divide():
  mesh = sharding.create_mesh((1, 1, 8))
  # MQA: a single K/V head cannot be split 8 ways; the head_dim rule maps to no axis.
  spec = sharding.logical_to_spec(("embed", "kv_heads", "kv"), (64, 1, 16), mesh,
                                  sharding.DEFAULT_RULES)
  assert spec == PartitionSpec(None, None, None)
  spec = sharding.logical_to_spec(("embed", "heads", "kv"), (64, 8, 16), mesh,
                                  sharding.DEFAULT_RULES)
  assert spec == PartitionSpec(None, "tensor", None)


def test_mesh_axis_used_once_per_array():
  mesh = sharding.create_mesh((1, 8, 1))
  rules = (("a", "fsdp"), ("b", "fsdp"))
  assert sharding.logical_to_spec(("a", "b"), (8, 8), mesh, rules) == PartitionSpec("fsdp", None)


def test_create_mesh_auto_sizes_one_axis_and_names_bad_shapes():
  assert dict(sharding.create_mesh((2, -1, 1)).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  with pytest.raises(ValueError, match="at most one axis"):
    sharding.create_mesh((-1, -1, 1))
  assert sharding.create_mesh((1, 1, 1)).devices.size == 1  # fully specified: first devices
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.create_mesh((4, 4, 1))
  with pytest.raises(ValueError, match="not divisible by 3"):
    sharding.create_mesh((3, -1, 1))


def test_rules_reject_unknown_mesh_axis():
  with pytest.raises(ValueError, match="'model'"):
    sharding.logical_axis_rules([("mlp", "model")])


def test_params_can_be_created_directly_sharded():
  cfg = models.get_config("gemma2_tiny", num_layers=2)
  mesh = sharding.create_mesh((1, 8, 1))
  shardings = sharding.tree_shardings(models.logical_axes(cfg), models.abstract_params(cfg),
                                      mesh, sharding.DEFAULT_RULES)
  params = models.init(cfg, jax.random.PRNGKey(0), shardings=shardings)
  assert params["embedder"]["embedding"].sharding.spec == PartitionSpec(None, "fsdp")
  reference = models.init(cfg, jax.random.PRNGKey(0))
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("family_cfg", [
    # untied lm_head, Qwen2's q/k/v biases sharded with their heads, GQA
    dict(name="llama_tiny", qkv_bias=True, num_kv_heads=2),
    # QK-norms over the (unsharded) head dimension, local and global layers
    dict(name="gemma3_tiny", num_kv_heads=2),
])
def test_llama_and_gemma3_sharded_forward_equals_unsharded(family_cfg):
  """The new families' extra params (lm_head, biases, QK-norm scales) declare logical axes that
  shard on every mesh axis at once, and the sharded forward is the same function."""
  overrides = dict(family_cfg)
  cfg = models.get_config(overrides.pop("name"), num_heads=8, head_dim=8, **overrides)
  params = models.init(cfg, jax.random.PRNGKey(0))
  rng = np.random.RandomState(1)
  tokens = rng.randint(3, cfg.vocab_size, (8, 24)).astype(np.int32)
  segment_ids = np.ones_like(tokens)
  reference = np.asarray(models.apply(cfg, params, tokens, segment_ids))
  sharded_params, logits = _sharded_logits(cfg, params, tokens, segment_ids, (2, 2, 2))
  np.testing.assert_allclose(np.asarray(logits), reference, rtol=0, atol=rounding_atol(
      magnitude(reference), decoder_terms(cfg, tokens.shape[1])))
  if not cfg.tie_embeddings:
    assert sharded_params["lm_head"]["embedding"].sharding.spec == PartitionSpec("tensor",
                                                                                 "fsdp")
  if cfg.qkv_bias:
    assert sharded_params["layers_0"]["attn"]["q_bias"].sharding.spec == PartitionSpec(
        "tensor", None)
