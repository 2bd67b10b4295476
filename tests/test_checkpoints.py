"""maxnucl checkpoints: self-describing, exact, sharded restore, and safe failure modes."""

import hashlib
import pathlib

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from maxnucl import checkpoints, models, sharding


def _tree_equal(a, b):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  return (jax.tree.structure(a) == jax.tree.structure(b) and
          all(x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
              for x, y in zip(leaves_a, leaves_b)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  cfg = models.get_config("gemma2_tiny", ffn_widths=(256, 0, 96, 32), param_dtype="bfloat16")
  params = models.init(cfg, jax.random.PRNGKey(0))
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  checkpoints.save(path, cfg, params)
  return cfg, params, path


def test_round_trip_is_bit_exact_and_describes_itself(saved):
  cfg, params, path = saved
  loaded_cfg, loaded = checkpoints.load(path)
  assert loaded_cfg == cfg and loaded_cfg.layer_ffn_widths == (256, 0, 96, 32)
  assert _tree_equal(params, loaded)


def test_stored_arrays_lists_shapes_and_dtypes_without_loading(saved):
  cfg, _, path = saved
  stored = checkpoints.stored_arrays(path)
  assert stored[("layers_2", "mlp", "out")] == ((96, cfg.d_model), "bfloat16")
  assert ("layers_1", "mlp", "out") not in stored


def test_load_with_dtype_casts(saved):
  _, params, path = saved
  _, loaded = checkpoints.load(path, dtype="float32")
  leaf = loaded["layers_0"]["mlp"]["out"]
  assert leaf.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(leaf),
                                np.asarray(params["layers_0"]["mlp"]["out"], np.float32))


def test_restore_places_each_array_in_its_sharding(saved):
  cfg, params, path = saved
  mesh = sharding.create_mesh((2, 2, 2))
  _, loaded = checkpoints.load(path, mesh=mesh, rules=sharding.DEFAULT_RULES)
  axes = models.logical_axes(cfg)
  expected = sharding.tree_shardings(axes, params, mesh, sharding.DEFAULT_RULES)
  for got, want in zip(jax.tree.leaves(loaded), jax.tree.leaves(
      expected, is_leaf=lambda x: isinstance(x, NamedSharding))):
    assert got.sharding == want
  assert loaded["layers_0"]["mlp"]["gate"].sharding.spec == PartitionSpec("fsdp", "tensor")
  assert _tree_equal(params, loaded)


def _checksums(path: pathlib.Path) -> dict:
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(path.rglob("*")) if p.is_file()}


def test_refuses_to_overwrite_without_flag_and_leaves_existing_untouched(saved):
  cfg, params, path = saved
  before = _checksums(path)
  with pytest.raises(FileExistsError, match="overwrite"):
    checkpoints.save(path, cfg, params)
  assert _checksums(path) == before


def test_overwrite_replaces(tmp_path):
  cfg = models.get_config("gemma2_tiny", num_layers=1)
  first = models.init(cfg, jax.random.PRNGKey(0))
  second = models.init(cfg, jax.random.PRNGKey(1))
  checkpoints.save(tmp_path / "c", cfg, first)
  checkpoints.save(tmp_path / "c", cfg, second, overwrite=True)
  assert _tree_equal(checkpoints.load(tmp_path / "c")[1], second)


def test_missing_path_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere"):
    checkpoints.load(tmp_path / "nowhere")


def test_directory_without_config_is_not_a_checkpoint(tmp_path):
  (tmp_path / "params").mkdir()
  with pytest.raises(checkpoints.CheckpointError, match="model_config"):
    checkpoints.load(tmp_path)


def test_params_that_disagree_with_config_are_refused_naming_the_tensor(tmp_path):
  cfg = models.get_config("gemma2_tiny", num_layers=2)
  params = models.init(cfg, jax.random.PRNGKey(0))
  params["layers_1"]["mlp"]["out"] = params["layers_1"]["mlp"]["out"][:10]
  with pytest.raises(checkpoints.CheckpointError, match="layers_1/mlp/out.*shape"):
    checkpoints.save(tmp_path / "bad", cfg, params)
  del params["layers_1"]["mlp"]
  with pytest.raises(checkpoints.CheckpointError, match="layers_1/mlp/gate.*missing"):
    checkpoints.save(tmp_path / "bad", cfg, params)
  assert not (tmp_path / "bad").exists()


def test_checkpoint_whose_config_disagrees_with_arrays_is_refused(saved, tmp_path):
  """A checkpoint written for one layer layout cannot be silently read as another."""
  cfg, params, _ = saved
  other = cfg.replace(ffn_widths=(256, 0, 96, 33))
  with pytest.raises(checkpoints.CheckpointError, match="layers_3/mlp"):
    checkpoints.save(tmp_path / "mismatch", other, params)
