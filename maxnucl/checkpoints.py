"""maxnucl checkpoints: Orbax (TensorStore) arrays with the model config stored beside them.

Layout of a checkpoint directory (an Orbax composite checkpoint):
    CKPT/model_config/   the `ModelConfig` as JSON (per-layer FFN widths included)
    CKPT/params/         the params tree, one TensorStore array per leaf
    CKPT/tokenizer/      optional: the model's tokenizer as Hugging Face files (tokenizer.json
                         and tokenizer_config.json, or a SentencePiece tokenizer.model), so a
                         converted checkpoint needs no --vocab (`checkpoint_vocab`)

A checkpoint describes itself: `cfg, params = load(path)` needs nothing else.  The trainer's
checkpoint steps use the same two items (plus optimizer and data state), so `load` also reads a
training step directory.  With a mesh, every array is restored directly into its sharding, so no
host ever holds the whole model.

Whole-tree API:   save(path, cfg, params), load(path, mesh=, rules=, dtype=), load_config(path),
                  stored_arrays(path), resolve(path) (a training workdir -> its latest step),
                  training_vocab(path) (the vocabulary a training workdir records),
                  checkpoint_vocab(path) (the one CKPT/tokenizer/ holds), own_vocab(path)
Streaming API (one tensor in memory at a time; converters and the pruner use it):
  read_array(path, key_path, dtype=None, axes=None)        one stored array (np.ndarray), e.g.
                                                          ("layers_3", "mlp", "out"); axes:
                                                          transposed while read
  pytree_arrays(dir), read_pytree_array(dir, key_path)     the same for any Orbax PyTree
                                                          directory (DeepMind checkpoints)
  open_array(path, key_path)                               a lazy TensorStore view of one array
  iter_arrays(path, dtype=None)                            (key_path, array) pairs, one at a time
  with StreamingWriter(path, cfg, dtype=..., overwrite=False) as writer:
      writer.write(key_path, array)                        each leaf of the config's tree once,
                                                          in any order
StreamingWriter writes the layout Orbax itself writes with `use_ocdbt=False`: one zarr v2 array
per leaf (created and filled by TensorStore's zarr driver, uncompressed, chunked by blocks of
rows), plus the small Orbax `_METADATA` / `_CHECKPOINT_METADATA` JSON files, so `load` (plain
Orbax) reads it unchanged.  Each row block is written as soon as it is produced (two blocks in
flight); chunk files are not fsynced one by one (that stalls the writer) but by a background
thread as each leaf finishes, and all of them before the final rename.  The single-array
readers open such zarr leaves with TensorStore directly (no Orbax tree restore per array); any
other leaf layout (OCDBT, as `save` and DeepMind's checkpoints use) is read through Orbax.
Everything goes to a temporary sibling directory (`maxnucl.outputs.TemporaryOutput`, owned by the
writing process) that is renamed to `path` only after every expected tensor was written with the
expected shape and dtype: an interrupted writer leaves nothing under `path`, and the temporary
directory of a killed one is removed by the next writer of `path`.  An existing `path` (with
overwrite=True) is swapped with the new one in a single rename (`outputs.replace_directory`).

Every `path` may also be a URL, `gs://bucket/dir` or `file:///dir` (maxnucl.paths): arrays then
go through TensorStore's kvstore drivers, small files through etils.epath and Orbax's own path
handling.  A bucket has no rename, so `save` and StreamingWriter build a URL checkpoint under
the temporary prefix and publish it by copying, the commit marker `commit_success.txt` last
(`outputs.publish`); the readers here refuse a URL checkpoint without that marker as
incomplete.  (Orbax writes the same marker into every checkpoint it finishes, trainer steps
included.)
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from concurrent import futures
from typing import Any, Iterator, Optional

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxnucl import gin_config, models, outputs, paths, sharding
from maxnucl.data import vocabularies
from maxnucl.models.config import ModelConfig

PARAMS = "params"
MODEL_CONFIG = "model_config"
TOKENIZER = "tokenizer"
# The file of CKPT/tokenizer/ that names the vocabulary (maxnucl.data.vocabularies.get_tokenizer),
# in order of preference.
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "tokenizer.model")


class CheckpointError(ValueError):
  """A checkpoint is missing, incomplete or does not match its config."""


def _checkpointer() -> ocp.Checkpointer:
  return ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save(path: str | os.PathLike, cfg: ModelConfig, params: dict, *,
         overwrite: bool = False) -> paths.Path:
  """Write `params` and `cfg` to `path` (atomically: Orbax writes a temporary directory first;
  for a URL, see the module docstring: from one process only, the temporary prefix is this
  process's own).

  Refuses to replace an existing path unless `overwrite=True`.
  """
  path = paths.as_path(path)
  if paths.exists(path) and not overwrite:
    raise FileExistsError(f"checkpoint {path} already exists; pass overwrite=True "
                          f"(--overwrite) to replace it")
  check_params(cfg, params)
  items = ocp.args.Composite(**{
      PARAMS: ocp.args.PyTreeSave(params, save_args=save_args(params)),
      MODEL_CONFIG: ocp.args.JsonSave(cfg.to_dict())})
  if not paths.is_url(path):
    _checkpointer().save(path, items, force=overwrite)
    return path
  with outputs.TemporaryOutput(path, overwrite, make_content=False) as tmp:
    _checkpointer().save(paths.orbax_path(tmp), items)
  return path


def save_args(params: dict) -> dict:
  """Orbax SaveArgs storing every array in chunks of at most ~_CHUNK_BYTES, so that readers that
  stream (the pruner, `read_array` of one block of rows) never decode a whole large array at once
  (Orbax's default is one chunk per array on a single host)."""
  return jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES), params)


def load_config(path: str | os.PathLike) -> ModelConfig:
  path = _checkpoint(path)
  config_dir = path / MODEL_CONFIG
  if not config_dir.is_dir():
    raise CheckpointError(f"{path} is not a maxnucl checkpoint: no {MODEL_CONFIG}/ directory "
                          f"(expected {MODEL_CONFIG}/ and {PARAMS}/)")
  data = _checkpointer().restore(
      paths.orbax_path(path),
      ocp.args.Composite(**{MODEL_CONFIG: ocp.args.JsonRestore()}))[MODEL_CONFIG]
  return ModelConfig.from_dict(data)


def stored_arrays(path: str | os.PathLike) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
  """Leaf path -> (shape, dtype name) of every stored array, read from metadata only."""
  params_dir = _checkpoint(path) / PARAMS
  if not params_dir.is_dir():
    raise CheckpointError(f"{path}: no {PARAMS}/ directory")
  return pytree_arrays(params_dir)


def pytree_arrays(directory: str | os.PathLike
                  ) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
  """Like `stored_arrays`, for any Orbax PyTree directory (e.g. a DeepMind `gemma` checkpoint)."""
  metadata = ocp.PyTreeCheckpointHandler().metadata(paths.orbax_path(_existing(directory))).tree
  out = {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(metadata)[0]:
    out[tuple(k.key for k in keys)] = (tuple(leaf.shape), np.dtype(leaf.dtype).name)
  return out


def read_pytree_array(directory: str | os.PathLike, key_path: tuple[str, ...],
                      dtype: Optional[str] = None,
                      axes: Optional[tuple[int, ...]] = None) -> np.ndarray:
  """One array of any Orbax PyTree directory (host numpy), reading nothing else."""
  key_path = tuple(key_path)
  stored = pytree_arrays(directory)
  if key_path not in stored:
    raise CheckpointError(f"{directory}: no stored tensor {'/'.join(key_path)}")
  shape, stored_dtype = stored[key_path]
  return _read_leaf(_existing(directory), key_path, shape, dtype or stored_dtype, axes)


def read_listed_array(path: str | os.PathLike, key_path: tuple[str, ...],
                      stored: tuple[tuple[int, ...], str]) -> np.ndarray:
  """`read_array` of a leaf whose (shape, dtype) the caller already has from `stored_arrays`:
  the Orbax metadata (~0.15 s a read for a 30-layer model) is not read again."""
  shape, dtype = stored
  return _read_leaf(_existing(_checkpoint(path) / PARAMS), tuple(key_path), shape, dtype, None)


def load(path: str | os.PathLike, *, mesh: Optional[Mesh] = None,
         rules: Optional[sharding.Rules] = None, dtype: Optional[str] = None
         ) -> tuple[ModelConfig, dict]:
  """`(cfg, params)` from a checkpoint.

  mesh/rules: restore each array straight into its NamedSharding on `mesh` (default: one
  device).  dtype: cast on restore (e.g. "bfloat16"); default: as stored.
  """
  path = _checkpoint(path)
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
  target = unflatten({
      k: jax.ShapeDtypeStruct(expected[k], np.dtype(dtype or stored[k][1]), sharding=shardings[k])
      for k in expected})
  restore_args = jax.tree.map(
      lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, dtype=x.dtype, global_shape=x.shape),
      target)
  restored = _checkpointer().restore(
      paths.orbax_path(path),
      ocp.args.Composite(**{PARAMS: ocp.args.PyTreeRestore(target, restore_args)}))
  return cfg, restored[PARAMS]


def check_params(cfg: ModelConfig, params: dict) -> None:
  """Raise CheckpointError naming the first tensor whose presence or shape disagrees with cfg."""
  actual = _leaf_shapes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params))
  _compare(f"params for model {cfg.name!r}", _leaf_shapes(models.abstract_params(cfg)), actual)


# ---- streaming access ---------------------------------------------------------------------------

def read_array(path: str | os.PathLike, key_path: tuple[str, ...],
               dtype: Optional[str] = None, axes: Optional[tuple[int, ...]] = None
               ) -> np.ndarray:
  """One stored array (host numpy), without reading any other tensor.

  key_path: the leaf's path in the params tree, e.g. ("layers_0", "mlp", "out").  dtype: cast on
  read (default: as stored).  axes: return `array.transpose(axes)`, C-contiguous (TensorStore
  transposes while it reads: one pass over the data instead of two).
  """
  return read_pytree_array(_checkpoint(path) / PARAMS, key_path, dtype, axes)


def iter_arrays(path: str | os.PathLike, dtype: Optional[str] = None
                ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """(key_path, array) for every stored array, one array in memory at a time."""
  params_dir = _checkpoint(path) / PARAMS
  for key_path, (shape, stored_dtype) in stored_arrays(path).items():
    yield key_path, _read_leaf(params_dir, key_path, shape, dtype or stored_dtype)


def _read_leaf(params_dir: paths.Path, key_path, shape, dtype, axes=None) -> np.ndarray:
  leaf_dir = params_dir / ".".join(key_path)
  if (leaf_dir / ".zarray").is_file():  # a per-leaf zarr array (use_ocdbt=False): TensorStore
    return _read_zarr(leaf_dir, shape, np.dtype(dtype), axes)
  item = unflatten({key_path: jax.ShapeDtypeStruct(shape, np.dtype(dtype))})
  restore_args = unflatten({key_path: ocp.RestoreArgs(restore_type=np.ndarray,
                                                       dtype=np.dtype(dtype))})
  restored = ocp.PyTreeCheckpointHandler().restore(
      paths.orbax_path(params_dir),
      args=ocp.args.PyTreeRestore(item, restore_args, partial_restore=True))
  for key in key_path:
    restored = restored[key]
  return np.asarray(restored) if axes is None else np.ascontiguousarray(
      np.transpose(restored, axes))


def _zarr_spec(leaf_dir: paths.Path) -> dict:
  return {"driver": "zarr", "kvstore": paths.kvstore_spec(leaf_dir)}


def open_array(path: str | os.PathLike, key_path: tuple[str, ...]) -> Optional[ts.TensorStore]:
  """A lazy, read-only TensorStore view of one stored array (nothing read yet; slicing it and
  `np.asarray` on the slice reads only those elements), or None for a layout this module does not
  open directly (then use `read_array`).

  Knows the two layouts maxnucl writes: a per-leaf zarr directory (StreamingWriter, Orbax with
  `use_ocdbt=False`) and Orbax's OCDBT store (`save`, trainer checkpoints).
  """
  params_dir = _checkpoint(path) / PARAMS
  leaf = ".".join(key_path)
  if (params_dir / leaf / ".zarray").is_file():
    spec = _zarr_spec(params_dir / leaf)
  else:
    try:
      meta = json.loads((params_dir / "_METADATA").read_text())
    except (OSError, ValueError):
      return None
    if not meta.get("use_ocdbt"):
      return None
    spec = {"driver": "zarr3" if meta.get("use_zarr3") else "zarr",
            "kvstore": {"driver": "ocdbt", "base": paths.kvstore_spec(params_dir),
                        "path": leaf}}
  try:
    return ts.open(spec, open=True, read=True).result()
  except ValueError:
    return None


def _read_zarr(leaf_dir: paths.Path, shape, dtype: np.dtype, axes=None) -> np.ndarray:
  """One zarr leaf, read by TensorStore (cast on the fly).  TensorStore's own `read()`: copying
  into a preallocated array through `ts.array(out).write(...)` is twice as slow."""
  try:
    array = ts.open(_zarr_spec(leaf_dir), open=True, read=True).result()
    if tuple(array.shape) != tuple(shape):
      raise CheckpointError(f"{leaf_dir}: zarr array has shape {tuple(array.shape)}, the "
                            f"checkpoint metadata says {tuple(shape)}")
    if array.dtype.numpy_dtype != dtype:
      array = ts.cast(array, ts.dtype(dtype.name))
    if axes is not None:
      array = array[ts.d[tuple(axes)].transpose[:]]
    return array.read().result()
  except ValueError as e:  # TensorStore reports missing/truncated chunks as ValueError
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f"{leaf_dir}: cannot read the array ({e})") from None


_ZARR_DTYPES = {"float32": "<f4", "bfloat16": "bfloat16", "float16": "<f2"}
NP_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16),
              "float16": np.dtype(np.float16)}
_CHUNK_BYTES = 64 << 20  # rows per chunk file: about this many bytes


def _chunk_rows(num_rows: int, row_bytes: int) -> int:
  """Rows per chunk: the fewest chunks of at most ~_CHUNK_BYTES, split as evenly as possible.

  zarr v2 stores every chunk at full size, so the last one is padded; near-equal chunks keep the
  padding below one row per chunk and the file size proportional to the array's (a pruned matrix
  is smaller on disk too).
  """
  per_chunk = max(1, _CHUNK_BYTES // max(row_bytes, 1))
  num_chunks = -(-num_rows // per_chunk)
  return max(1, -(-num_rows // num_chunks))


class StreamingWriter:
  """Write a checkpoint one tensor at a time (see the module docstring for the layout).

      with StreamingWriter(path, cfg, dtype="bfloat16") as writer:
        for key_path, array in pairs:        # any order; arrays may be memmaps or views
          writer.write(key_path, array)      # cast to `dtype`, written in row blocks

  On leaving the `with` block normally the checkpoint is checked (every leaf of
  `models.abstract_params(cfg)` present) and renamed into place; on an exception (SystemExit
  from `outputs.exit_on_sigterm` included) the temporary directory is removed and nothing
  appears under `path`.
  """

  def __init__(self, path: str | os.PathLike, cfg: ModelConfig, *, dtype: str = "float32",
               overwrite: bool = False, tokenizer_files: Optional[dict[str, bytes]] = None):
    """`tokenizer_files` (file name -> content) are written to CKPT/tokenizer/."""
    self.path = paths.as_path(path)
    self.tokenizer_files = dict(tokenizer_files or {})
    bad = [name for name in self.tokenizer_files if "/" in name or name.startswith(".")]
    if bad:
      raise ValueError(f"tokenizer file name {bad[0]!r}: expected a plain file name")
    if paths.exists(self.path) and not overwrite:
      raise FileExistsError(f"output {self.path} already exists; pass overwrite=True "
                            f"(--overwrite) to replace it")
    if dtype not in _ZARR_DTYPES:
      raise ValueError(f"checkpoint dtype {dtype!r}; expected one of {sorted(_ZARR_DTYPES)}")
    self.cfg, self.dtype, self.overwrite = cfg, NP_DTYPES[dtype], overwrite
    self.expected = _leaf_shapes(models.abstract_params(cfg))
    self.written: dict[tuple[str, ...], tuple[int, ...]] = {}
    # TensorStore fsyncs every chunk file by default, which stalls the writer on each chunk;
    # the chunks are made durable once, in `commit`, before the rename instead.
    self.context = ts.Context({"file_io_sync": False})
    self.syncing = futures.ThreadPoolExecutor(1)  # fsyncs each finished leaf in the background
    self.synced: list[futures.Future] = []
    # owned by this process (a later run removes it if this one is killed); `tmp` is its content
    self.temporary = outputs.TemporaryOutput(self.path, overwrite)
    self.tmp = self.temporary.content
    (self.tmp / PARAMS).mkdir()

  def __enter__(self) -> "StreamingWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.commit()
    else:
      self.abort()

  def write(self, key_path: tuple[str, ...], array: np.ndarray) -> None:
    """Write one leaf; `array` must have the config's shape for `key_path`."""
    key_path = tuple(key_path)
    name = "/".join(key_path)
    if key_path not in self.expected:
      raise CheckpointError(f"{self.path}: tensor {name} is not in model config "
                            f"{self.cfg.name!r}")
    if key_path in self.written:
      raise CheckpointError(f"{self.path}: tensor {name} written twice")
    if tuple(array.shape) != self.expected[key_path]:
      raise CheckpointError(f"{self.path}: tensor {name} has shape {tuple(array.shape)}, "
                            f"expected {self.expected[key_path]} from the model config")
    shape = tuple(array.shape)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
    rows = _chunk_rows(shape[0], row_bytes) if shape else 1
    leaf_dir = self.tmp / PARAMS / ".".join(key_path)
    store = ts.open({
        **_zarr_spec(leaf_dir),
        "metadata": {"shape": list(shape), "chunks": [rows, *shape[1:]] if shape else [],
                     "dtype": _ZARR_DTYPES[self.dtype.name], "compressor": None,
                     "fill_value": None, "order": "C", "dimension_separator": "."},
        "store_data_equal_to_fill_value": True}, create=True, context=self.context).result()
    if not shape:
      store.write(_cast(array, store.dtype)).result()
    pending: list = []  # two row blocks in flight: one is copied while the other is written
    for start in range(0, shape[0] if shape else 0, rows):
      stop = min(start + rows, shape[0])
      pending.append(store[start:stop].write(_cast(array[start:stop], store.dtype)))
      if len(pending) > 1:
        pending.pop(0).result()
    for future in pending:
      future.result()
    if not paths.is_url(leaf_dir):  # objects in a bucket are durable once written
      self.synced.append(self.syncing.submit(_fsync_tree, leaf_dir))
    self.written[key_path] = shape

  def commit(self) -> paths.Path:
    try:
      return self._commit()
    except BaseException:  # SIGTERM (SystemExit) or Ctrl-C while finishing, too
      self.abort()
      raise

  def _commit(self) -> paths.Path:
    missing = [k for k in self.expected if k not in self.written]
    if missing:
      raise CheckpointError(f"{self.path}: tensor {'/'.join(missing[0])} was never written "
                            f"({len(missing)} missing, expected shape {self.expected[missing[0]]})")
    tree_metadata = {
        str(key_path): {"key_metadata": [{"key": k, "key_type": 2} for k in key_path],
                        "value_metadata": {"value_type": "np.ndarray",
                                           "skip_deserialize": False}}
        for key_path in self.expected}
    (self.tmp / PARAMS / "_METADATA").write_text(json.dumps({
        "tree_metadata": tree_metadata, "use_ocdbt": False, "use_zarr3": False,
        "store_array_data_equal_to_fill_value": True, "custom_metadata": None}))
    (self.tmp / MODEL_CONFIG).mkdir()
    (self.tmp / MODEL_CONFIG / "metadata").write_text(json.dumps(self.cfg.to_dict()))
    if self.tokenizer_files:
      write_tokenizer_files(self.tmp, self.tokenizer_files)
    now = time.time_ns()
    (self.tmp / "_CHECKPOINT_METADATA").write_text(json.dumps({
        "item_handlers": {
            MODEL_CONFIG: "orbax.checkpoint._src.handlers.json_checkpoint_handler."
                          "JsonCheckpointHandler",
            PARAMS: "orbax.checkpoint._src.handlers.pytree_checkpoint_handler."
                    "PyTreeCheckpointHandler"},
        "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now,
        "commit_timestamp_nsecs": now, "custom_metadata": {}}))
    # As Orbax does for every checkpoint it finishes, so that a copy of this one in a bucket is
    # recognised as complete (for a URL, `publish` copies it last).
    (self.tmp / outputs.COMMIT_MARKER).write_text(f"maxnucl checkpoint committed to {self.path}")
    for synced in self.synced:
      synced.result()
    self.syncing.shutdown()
    if not paths.is_url(self.tmp):
      _fsync_tree(self.tmp, files=False)
      for name in ("_METADATA", "_CHECKPOINT_METADATA", f"{MODEL_CONFIG}/metadata",
                   outputs.COMMIT_MARKER, *[f"{TOKENIZER}/{f}" for f in self.tokenizer_files]):
        _fsync_tree(self.tmp / name)
    return self.temporary.commit()

  def abort(self) -> None:
    self.syncing.shutdown(cancel_futures=True)
    self.temporary.discard()


def _cast(block: np.ndarray, dtype: ts.dtype) -> ts.TensorStore:
  """A (possibly strided) block, converted to `dtype` by TensorStore while it is written (faster
  than numpy's strided copy for bfloat16; TensorStore refuses implicit narrowing casts)."""
  return ts.cast(ts.array(np.asarray(block)), dtype)


def _fsync_tree(root: pathlib.Path, files: bool = True) -> None:
  """Flush `root` (a file, or a directory with its entries and, if `files`, every file below)."""
  if root.is_file():
    walk = [(str(root.parent), [], [root.name])]
  else:
    walk = [(d, [], f if files else []) for d, _, f in os.walk(root)]
  for directory, _, names in walk:
    for name in [*names] + (["."] if root.is_dir() else []):
      fd = os.open(os.path.join(directory, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)


# ---- helpers ----------------------------------------------------------------------------------

def resolve(path: str | os.PathLike) -> paths.Path:
  """The checkpoint directory a user means by `path`: a checkpoint itself, or a training workdir
  (or its `checkpoints/` directory), meaning its latest step (for a URL: its latest committed
  step; one still being written has no commit marker yet)."""
  path = _existing(path)
  if (path / MODEL_CONFIG).is_dir():
    return _checkpoint(path)
  url = paths.is_url(path)
  for steps_dir in (path / "checkpoints", path):
    steps = sorted((int(d.name), d) for d in steps_dir.glob("*")
                   if d.name.isdigit() and (d / MODEL_CONFIG).is_dir()
                   and (not url or outputs.is_committed(d)))
    if steps:
      return steps[-1][1]
  raise CheckpointError(f"{path} is neither a maxnucl checkpoint (no {MODEL_CONFIG}/ directory) "
                        f"nor a training workdir (no {'committed ' if url else ''}"
                        f"checkpoints/<step>/{MODEL_CONFIG}/)")


# A training workdir's record of its gin config (maxnucl.train): the values used, else as given.
RECORDED_CONFIGS = ("operative_config.gin", "config.gin")


def training_vocab(path: str | os.PathLike, *, hint: str = "give --vocab PATH"
                   ) -> Optional[tuple[str, paths.Path]]:
  """(vocabulary, the file that records it) of the training run that wrote `path`: a training
  workdir, its `checkpoints/` directory or one of its steps, whose recorded gin config binds
  `create_data_iterator.vocab` ('byte' or a SentencePiece model file, as the run was given it);
  None for a checkpoint outside a workdir or a config that records none.  A recorded model file
  that is not here is a FileNotFoundError naming the record, ending with `hint`."""
  step = resolve(path)
  if step.parent.name != "checkpoints":
    return None
  for name in RECORDED_CONFIGS:
    record = step.parent.parent / name
    if record.is_file():
      vocab = gin_config.recorded_binding(record.read_text(), "create_data_iterator", "vocab")
      if not isinstance(vocab, str):
        continue
      if vocab != vocabularies.BYTE_VOCAB_NAME and not paths.as_path(vocab).is_file():
        raise FileNotFoundError(f"{record} records the vocabulary {vocab}, which is not a file "
                                f"here; {hint}")
      return vocab, record
  return None


def write_tokenizer_files(checkpoint_dir: str | os.PathLike, files: dict[str, bytes]) -> None:
  """Write `files` (name -> content) into CHECKPOINT/tokenizer/ of a checkpoint being built (a
  writer's temporary directory: a finished checkpoint is never modified)."""
  directory = paths.as_path(checkpoint_dir) / TOKENIZER
  directory.mkdir(parents=True, exist_ok=True)
  for name, content in files.items():
    (directory / name).write_bytes(content)


def tokenizer_files(path: str | os.PathLike) -> dict[str, bytes]:
  """The files of a checkpoint's tokenizer/ directory (empty when it carries none); `path` may
  also be a training workdir (its latest step)."""
  directory = resolve(path) / TOKENIZER
  if not directory.is_dir():
    return {}
  return {f.name: f.read_bytes() for f in sorted(directory.iterdir()) if f.is_file()}


def checkpoint_vocab(path: str | os.PathLike) -> Optional[str]:
  """The vocabulary a checkpoint carries (a path for `vocabularies.get_tokenizer`: its
  tokenizer/tokenizer.json or tokenizer/tokenizer.model), or None when it carries none."""
  directory = resolve(path) / TOKENIZER
  for name in TOKENIZER_VOCAB_FILES:
    if (directory / name).is_file():
      return str(directory / name)
  return None


def own_vocab(path: str | os.PathLike, *, hint: str = "give --vocab PATH"
              ) -> Optional[tuple[str, str]]:
  """(vocabulary, where it comes from) that `path` brings with it: the one its training run
  records (`training_vocab`; `hint` ends the error when that file is gone), else the tokenizer
  the checkpoint carries (`checkpoint_vocab`); None when neither."""
  recorded = training_vocab(path, hint=hint)
  if recorded is not None:
    return recorded[0], f"recorded in {recorded[1]}"
  carried = checkpoint_vocab(path)
  if carried is not None:
    return carried, "carried by the checkpoint"
  return None


def _existing(path) -> paths.Path:
  path = paths.as_path(path)
  if not path.exists():
    raise FileNotFoundError(f"checkpoint {path} does not exist")
  return path


def _checkpoint(path) -> paths.Path:
  """An existing checkpoint directory; for a URL, one that holds its commit marker."""
  path = _existing(path)
  if paths.is_url(path) and not outputs.is_committed(path):
    raise CheckpointError(
        f"checkpoint {path} is incomplete (no commit marker {outputs.COMMIT_MARKER}): its "
        f"writer has not finished, or was stopped, or it was copied there without the marker "
        f"(a complete checkpoint copied into a bucket needs its {outputs.COMMIT_MARKER} too; "
        f"Orbax writes one into every checkpoint it finishes)")
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


def unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  """{("a", "b"): x} -> {"a": {"b": x}}."""
  tree: dict = {}
  for keys, value in flat.items():
    node = tree
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = value
  return tree
