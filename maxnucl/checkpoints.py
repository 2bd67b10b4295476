"""maxnucl checkpoints: Orbax (TensorStore) arrays with the model config stored beside them.

Layout of a checkpoint directory (an Orbax composite checkpoint):
    CKPT/model_config/   the `ModelConfig` as JSON (per-layer FFN widths included)
    CKPT/params/         the params tree, one TensorStore array per leaf

A checkpoint describes itself: `cfg, params = load(path)` needs nothing else.  The trainer's
checkpoint steps use the same two items (plus optimizer and data state), so `load` also reads a
training step directory.  With a mesh, every array is restored directly into its sharding, so no
host ever holds the whole model.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxnucl import models, sharding
from maxnucl.models.config import ModelConfig

PARAMS = "params"
MODEL_CONFIG = "model_config"


class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete or does not match its config."""


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save(path: str | os.PathLike, cfg: ModelConfig, params: dict, *,
         overwrite: bool = False) -> pathlib.Path:
  """Write `params` and `cfg` to `path` (atomically: Orbax writes a temporary directory first).

  Refuses to replace an existing path unless `overwrite=True`.
  """
  path = pathlib.Path(path).absolute()
  if path.exists() and not overwrite:
    raise FileExistsError(f"checkpoint {path} already exists; pass overwrite=True "
                          f"(--overwrite) to replace it")
  check_params(cfg, params)
  _checkpointer().save(
      path, ocp.args.Composite(**{PARAMS: ocp.args.PyTreeSave(params),
                                  MODEL_CONFIG: ocp.args.JsonSave(cfg.to_dict())}),
      force=overwrite)
  return path


def load_config(path: str | os.PathLike) -> ModelConfig:
  path = _existing(path)
  config_dir = path / MODEL_CONFIG
  if not config_dir.is_dir():
    raise CheckpointError(f"{path} is not a maxnucl checkpoint: no {MODEL_CONFIG}/ directory "
                          f"(expected {MODEL_CONFIG}/ and {PARAMS}/)")
  data = _checkpointer().restore(
      path, ocp.args.Composite(**{MODEL_CONFIG: ocp.args.JsonRestore()}))[MODEL_CONFIG]
  return ModelConfig.from_dict(data)


def stored_arrays(path: str | os.PathLike) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
  """Leaf path -> (shape, dtype name) of every stored array, read from metadata only."""
  params_dir = _existing(path) / PARAMS
  if not params_dir.is_dir():
    raise CheckpointError(f"{path}: no {PARAMS}/ directory")
  metadata = ocp.PyTreeCheckpointHandler().metadata(params_dir).tree
  out = {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(metadata)[0]:
    out[tuple(k.key for k in keys)] = (tuple(leaf.shape), np.dtype(leaf.dtype).name)
  return out


def load(path: str | os.PathLike, *, mesh: Optional[Mesh] = None,
         rules: Optional[sharding.Rules] = None, dtype: Optional[str] = None
         ) -> tuple[ModelConfig, dict]:
  """`(cfg, params)` from a checkpoint.

  mesh/rules: restore each array straight into its NamedSharding on `mesh` (default: one
  device).  dtype: cast on restore (e.g. "bfloat16"); default: as stored.
  """
  path = _existing(path)
  cfg = load_config(path)
  stored = stored_arrays(path)
  expected = _leaf_shapes(models.abstract_params(cfg))
  _compare(path, expected, {k: v[0] for k, v in stored.items()})
  if mesh is None:
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    shardings = {k: NamedSharding(mesh, PartitionSpec()) for k in expected}
  else:
    axes = _leaf_shapes(models.logical_axes(cfg), leaf_is_tuple=True)
    rules = sharding.logical_axis_rules() if rules is None else rules
    shardings = {k: NamedSharding(mesh, sharding.logical_to_spec(axes[k], expected[k], mesh,
                                                                 rules)) for k in expected}
  target = _unflatten({
      k: jax.ShapeDtypeStruct(expected[k], np.dtype(dtype or stored[k][1]), sharding=shardings[k])
      for k in expected})
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype, global_shape=x.shape),
      target)
  restored = _checkpointer().restore(
      path, ocp.args.Composite(**{PARAMS: ocp.args.PyTreeRestore(target, restore_args)}))
  return cfg, restored[PARAMS]


def check_params(cfg: ModelConfig, params: dict) -> None:
  """Raise CheckpointError naming the first tensor whose presence or shape disagrees with cfg."""
  actual = _leaf_shapes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params))
  _compare(f"params for model {cfg.name!r}", _leaf_shapes(models.abstract_params(cfg)), actual)


# ---- helpers ----------------------------------------------------------------------------------

def _existing(path) -> pathlib.Path:
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  return path


def _leaf_shapes(tree: Any, leaf_is_tuple: bool = False) -> dict[tuple[str, ...], Any]:
  is_leaf = (lambda x: isinstance(x, tuple)) if leaf_is_tuple else None
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
  return {tuple(k.key for k in keys): (leaf if leaf_is_tuple else tuple(leaf.shape))
          for keys, leaf in flat}


def _compare(where, expected: dict, actual: dict) -> None:
  for key in expected:
    if key not in actual:
      raise CheckpointError(f"{where}: tensor {'/'.join(key)} is missing "
                            f"(expected shape {expected[key]})")
    if tuple(actual[key]) != tuple(expected[key]):
      raise CheckpointError(f"{where}: tensor {'/'.join(key)} has shape {tuple(actual[key])}, "
                            f"expected {expected[key]} from the model config")
  unexpected = sorted("/".join(k) for k in actual if k not in expected)
  if unexpected:
    raise CheckpointError(f"{where}: unexpected tensor(s) {unexpected[:5]}"
                          f"{' ...' if len(unexpected) > 5 else ''} not in the model config")


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for keys, value in flat.items():
    node = tree
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = value
  return tree
