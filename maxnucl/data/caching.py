"""The TF-free cache: packed rows as numpy shards plus a JSON index.

Layout of one cached task/mixture split (`<cache_dir>/<source>/<split>/`):

  index.json                     format, the settings the rows were built with (source, split,
                                 seq_len, pack, loss_on_inputs, vocab, vocab_size, eos/pad/bos ids,
                                 seed, shuffle, ...), num_rows and the shard list
  shard-00000.tokens.npy         int32   [rows_in_shard, seq_len]
  shard-00000.targets.npy        int32   [rows_in_shard, seq_len]
  shard-00000.loss_mask.npy      float32 [rows_in_shard, seq_len]
  shard-00000.segment_ids.npy    int32   [rows_in_shard, seq_len]
  shard-00000.positions.npy      int32   [rows_in_shard, seq_len]
  ...

Shards are memory-mapped on read, so each host touches only the rows of its part of the batch.
Reading needs numpy only.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np

from maxnucl import outputs
from maxnucl.data import packing

CACHE_FORMAT = "maxnucl-packed-rows-v1"
INDEX_FILE = "index.json"


def cache_split_dir(cache_dir: str | os.PathLike, source: str, split: str) -> pathlib.Path:
  return pathlib.Path(cache_dir) / source / split


def write_rows(directory: str | os.PathLike, rows: Mapping[str, np.ndarray],
               metadata: Mapping[str, Any], rows_per_shard: int = 16_384) -> pathlib.Path:
  """Writes packed rows (dict of `packing.FEATURES`, each [num_rows, seq_len]) and the index."""
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  num_rows = len(rows["tokens"])
  shards = []
  for shard, start in enumerate(range(0, max(num_rows, 1), rows_per_shard)):
    name = f"shard-{shard:05d}"
    stop = min(start + rows_per_shard, num_rows)
    for feature in packing.FEATURES:
      array = np.ascontiguousarray(rows[feature][start:stop],
                                   dtype=packing.FEATURE_DTYPES[feature])
      # whole or not at all: a full disk leaves no torn shard
      outputs.write_atomically(directory / f"{name}.{feature}.npy",
                               lambda f, array=array: np.save(outputs.WriteOnly(f), array))
    shards.append({"name": name, "num_rows": stop - start})
  index = {"format": CACHE_FORMAT, **metadata, "num_rows": num_rows, "shards": shards,
           "features": {f: np.dtype(packing.FEATURE_DTYPES[f]).name for f in packing.FEATURES}}
  index_path = directory / INDEX_FILE
  # the index appears last: a cache with an index is complete
  outputs.write_file_atomically(index_path, json.dumps(index, indent=2, sort_keys=True))
  return index_path


class CachedRows:
  """Random access to cached rows: `rows(indices)` -> dict of arrays [len(indices), seq_len]."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = pathlib.Path(directory)
    index_path = self.directory / INDEX_FILE
    if not index_path.is_file():
      raise FileNotFoundError(
          f"No cache index at {index_path}; build it with `python tools/cache_tasks.py` "
          f"(maxnucl.data.pipeline.cache_task)")
    self.index = json.loads(index_path.read_text())
    if self.index.get("format") != CACHE_FORMAT:
      raise ValueError(f"{index_path}: format {self.index.get('format')!r}, expected "
                       f"{CACHE_FORMAT!r}")
    self.num_rows = int(self.index["num_rows"])
    self.seq_len = int(self.index["seq_len"])
    self._shards = []
    for shard in self.index["shards"]:
      arrays = {}
      for feature in packing.FEATURES:
        path = self.directory / f"{shard['name']}.{feature}.npy"
        if not path.is_file():
          raise FileNotFoundError(f"Cache shard file missing: {path} (listed in {index_path})")
        arrays[feature] = np.load(path, mmap_mode="r")
        if arrays[feature].shape != (shard["num_rows"], self.seq_len):
          raise ValueError(f"{path}: shape {arrays[feature].shape}, index says "
                           f"{(shard['num_rows'], self.seq_len)}")
      self._shards.append(arrays)
    self._starts = np.cumsum([0] + [s["num_rows"] for s in self.index["shards"]])

  def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, dtype=np.int64)
    shard_of = np.searchsorted(self._starts, indices, side="right") - 1
    out = packing.empty_rows(len(indices), self.seq_len)
    for shard in np.unique(shard_of):
      selected = np.nonzero(shard_of == shard)[0]
      local = indices[selected] - self._starts[shard]
      for feature in packing.FEATURES:
        out[feature][selected] = self._shards[shard][feature][local]
    return out


class InMemoryRows:
  """The same interface over rows built in this process."""

  def __init__(self, rows: Mapping[str, np.ndarray], metadata: Mapping[str, Any]):
    self._rows = dict(rows)
    self.index = dict(metadata)
    self.num_rows = len(self._rows["tokens"])
    self.seq_len = int(self._rows["tokens"].shape[1])

  def rows(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, dtype=np.int64)
    return {feature: self._rows[feature][indices] for feature in packing.FEATURES}
