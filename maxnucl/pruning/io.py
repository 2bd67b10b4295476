"""Layer-by-layer checkpoint I/O for the pruner (the one place that touches the storage format).

The pruner only ever asks for one layer's FFN at a time (`CheckpointReader.read_ffn`) and hands
back arrays one at a time (`CheckpointWriter.put`), so the storage backend can be swapped without
touching the pruning code.  Today's backend:

  reading  Orbax partial restore (`PyTreeRestore(partial_restore=True)`) of exactly the requested
           leaves, as numpy arrays: one layer's {gate U, up V, out W}, or everything else.
  writing  the arrays are collected and written with one `maxnucl.checkpoints.save` at `finish()`
           (that API takes a whole tree), so the *writer* holds the whole output checkpoint.

When `maxnucl.checkpoints` gains streaming per-array read/write, only this module changes and the
pruner's peak memory becomes one layer's FFN (input + pruned copy) plus the largest other array.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Iterable

import jax
import numpy as np
import orbax.checkpoint as ocp

from maxnucl import checkpoints
from maxnucl.models.config import ModelConfig

FFN_KEYS = ("gate", "up", "out")  # U [d, m], V [d, m], W [m, d]

Key = tuple[str, ...]


class CheckpointReader:
  """Reads a maxnucl checkpoint a few arrays at a time (never the whole tree unless asked)."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path).absolute()
    self.cfg: ModelConfig = checkpoints.load_config(self.path)
    self.stored: dict[Key, tuple[tuple[int, ...], str]] = checkpoints.stored_arrays(self.path)

  def read(self, keys: Iterable[Key]) -> dict[Key, np.ndarray]:
    """The named leaves as numpy arrays in their stored dtype."""
    keys = list(keys)
    missing = [k for k in keys if k not in self.stored]
    if missing:
      raise checkpoints.CheckpointError(
          f"{self.path}: tensor {'/'.join(missing[0])} is not stored in this checkpoint")
    if not keys:
      return {}
    item = _unflatten({k: jax.ShapeDtypeStruct(self.stored[k][0], np.dtype(self.stored[k][1]))
                       for k in keys})
    restore_args = jax.tree.map(
        lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), item)
    restored = ocp.Checkpointer(ocp.CompositeCheckpointHandler()).restore(
        self.path, ocp.args.Composite(**{checkpoints.PARAMS: ocp.args.PyTreeRestore(
            item, restore_args, partial_restore=True)}))[checkpoints.PARAMS]
    return {k: np.asarray(_get(restored, k)) for k in keys}

  def read_ffn(self, layer: str) -> dict[str, np.ndarray]:
    """One layer's FFN: {"gate": U [d, m], "up": V [d, m], "out": W [m, d]} (stored dtype)."""
    arrays = self.read([(layer, "mlp", name) for name in FFN_KEYS])
    return {k[-1]: v for k, v in arrays.items()}

  def non_ffn_keys(self) -> list[Key]:
    return [k for k in self.stored if not (len(k) == 3 and k[1] == "mlp")]

  def read_all(self) -> dict:
    """The whole params tree (numpy). Only calibration and perplexity evaluation need this."""
    return _unflatten(self.read(self.stored))


class CheckpointWriter:
  """Collects arrays with `put` and writes a checkpoint at `finish` (see the module docstring)."""

  def __init__(self, path: str | os.PathLike, cfg: ModelConfig):
    self.path = pathlib.Path(path).absolute()
    self.cfg = cfg
    self._arrays: dict[Key, Any] = {}

  def put(self, key: Key, array: np.ndarray) -> None:
    self._arrays[key] = array

  def finish(self) -> pathlib.Path:
    params = _unflatten(self._arrays)
    self._arrays = {}
    return checkpoints.save(self.path, self.cfg, params)


def _get(tree: dict, key: Key):
  for k in key:
    tree = tree[k]
  return tree


def _unflatten(flat: dict[Key, Any]) -> dict:
  tree: dict = {}
  for keys, value in flat.items():
    node = tree
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = value
  return tree
