"""maxnucl checkpoints: Orbax (TensorStore) arrays with the model config stored beside them.

Layout of a checkpoint directory (an Orbax composite checkpoint):
    CKPT/model_config/   the `ModelConfig` as JSON (per-layer FFN widths included)
    CKPT/params/         the params tree, one TensorStore array per leaf
    CKPT/tokenizer/      optional: the model's tokenizer as Hugging Face files (tokenizer.json
                         and tokenizer_config.json, or a SentencePiece tokenizer.model), so a
                         converted checkpoint needs no --vocab (`checkpoint_vocab`)

A checkpoint describes itself: `cfg, params = load(path)` needs nothing else.  The trainer's
checkpoint steps use the same two items (plus optimizer and data state), so `load` also reads a
training step directory.  With a mesh, every array is placed straight into its sharding: a host
holds one whole array at a time (to verify it), never the whole model.

A checkpoint is untrusted input (docs/checkpoints.md).  Every reader here goes through one read
of a stored array (`_read_leaf`, or `VerifiedView` for the pruner's block-wise copies): TensorStore
with `fill_missing_data_reads: False` (a missing chunk is an error, never zeros), the stored shape
and dtype against the metadata, the array's CRC32C against the one its writer recorded in
params/_METADATA (`params_metadata`; every writer here records them), and finite values unless
`allow_nonfinite` (or MAXNUCL_ALLOW_NONFINITE=1).  The config is validated where it is built
(`ModelConfig.validate`) and its tree against the stored one (`stored_arrays`).  Each refusal is a
CheckpointError (or ConfigError) of one line naming the file and the tensor or field.

Whole-tree API:   save(path, cfg, params), load(path, mesh=, rules=, dtype=, allow_nonfinite=),
                  load_config(path), stored_checksums(path), verify_params(path, params),
                  stored_arrays(path), resolve(path) (a training workdir -> its latest step),
                  training_vocab(path) (the vocabulary a training workdir records),
                  checkpoint_vocab(path) (the one CKPT/tokenizer/ holds), own_vocab(path)
Streaming API (one tensor in memory at a time; converters and the pruner use it):
  read_array(path, key_path, dtype=None, axes=None)        one stored array (np.ndarray), e.g.
                                                          ("layers_3", "mlp", "out"); axes:
                                                          transposed once verified
  pytree_arrays(dir), read_pytree_array(dir, key_path)     the same for any Orbax PyTree
                                                          directory (DeepMind checkpoints)
  open_array(path, key_path)                               a lazy view of one array, verified
                                                          as it is read in row order
  iter_arrays(path, dtype=None)                            (key_path, array) pairs, one at a time
  with StreamingWriter(path, cfg, dtype=..., overwrite=False) as writer:
      writer.write(key_path, array)                        each leaf of the config's tree once,
                                                          in any order
StreamingWriter writes the layout Orbax itself writes with `use_ocdbt=False`: one zarr v2 array
per leaf (created and filled by TensorStore's zarr driver, uncompressed, chunked by blocks of
rows), plus the small Orbax `_METADATA` / `_CHECKPOINT_METADATA` JSON files, so `load` (plain
Orbax) reads it unchanged.  Each row block is written as soon as it is produced (two blocks in
flight); chunk files are not fsynced one by one (that stalls the writer) but by a background
thread as each leaf finishes, and all of them before the final rename.  The readers open every
leaf with TensorStore directly, a zarr leaf directory or the OCDBT store (`save`, trainer and
DeepMind checkpoints) alike (no Orbax tree restore).
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
included.)  `save` is called by every process of a multi-process run, each with its shards: the
temporary prefix is process 0's, shared with the others, and process 0 publishes it once all have
written; StreamingWriter writes from one process, under a prefix of its own.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import os
import pathlib
import time
from concurrent import futures
from typing import Any, Iterator, Optional

import google_crc32c
import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxnucl import distributed, gin_config, models, outputs, paths, sharding
from maxnucl.data import vocabularies
from maxnucl.models.config import ConfigError, ModelConfig

log = logging.getLogger(__name__)

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
  for a URL, see the module docstring), with the CRC32C of every array in params/_METADATA
  (`params_metadata`).

  Every process of a multi-process run calls it, each with its shards of `params` (arrays on a
  global mesh): process 0 decides whether `path` may be written and chooses the one temporary
  directory, every process writes its shards there through Orbax, and process 0 alone puts the
  result in place; an error of process 0 is raised on every process (`distributed.on_primary`).

  Refuses to replace an existing path unless `overwrite=True`.
  """
  path = paths.as_path(path)

  def refuse_existing() -> None:
    if paths.exists(path) and not overwrite:
      raise FileExistsError(f"checkpoint {path} already exists; pass overwrite=True "
                            f"(--overwrite) to replace it")

  distributed.on_primary(refuse_existing)
  check_params(cfg, params)
  items = ocp.args.Composite(**{
      PARAMS: ocp.args.PyTreeSave(params, save_args=save_args(params),
                                  custom_metadata=params_metadata(params)),
      MODEL_CONFIG: ocp.args.JsonSave(cfg.to_dict())})
  if not paths.is_url(path):
    _checkpointer().save(path, items, force=overwrite)
    return path
  with _shared_temporary_output(path, overwrite) as tmp:
    _checkpointer().save(paths.orbax_path(tmp), items)
  return path


@contextlib.contextmanager
def _shared_temporary_output(path: paths.Path, overwrite: bool) -> Iterator[paths.Path]:
  """`outputs.TemporaryOutput(path)` for every process: made, published (or discarded on an
  error) and owned by process 0, its content directory shared with all (not created: Orbax
  creates it).  Every process leaves the block only once the output is published."""
  temporary: list[outputs.TemporaryOutput] = []

  def make() -> str:
    temporary.append(outputs.TemporaryOutput(path, overwrite, make_content=False))
    return str(temporary[0].content)

  content = paths.as_path(distributed.on_primary(make))
  try:
    yield content
  except BaseException:
    if temporary:
      temporary[0].discard()
    raise
  # Orbax's save returns on every process once all of them have written their shards
  distributed.on_primary(lambda: str(temporary[0].commit()))


def save_args(params: dict) -> dict:
  """Orbax SaveArgs storing every array in chunks of at most ~_CHUNK_BYTES, so that readers that
  stream (the pruner, `read_array` of one block of rows) never decode a whole large array at once
  (Orbax's default is one chunk per array on a single host)."""
  return jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=_CHUNK_BYTES), params)


# ---- integrity: checksums and finiteness -------------------------------------------------------
#
# Every writer records, in params/_METADATA's "custom_metadata", the CRC32C (Castagnoli) of each
# array: of its elements in C order, as the little-endian bytes of its stored dtype, so the sum
# does not depend on how the array is chunked or which layout (zarr leaves, OCDBT) holds it.
# Every reader recomputes it over the array it has just read (`_Verifier`: in blocks, with the
# finiteness check, while the block is in cache) and refuses a mismatch.

CHECKSUMS = "crc32c"  # custom_metadata[CHECKSUMS] = {"layers_0/mlp/out": crc, ...}
# Non-finite weights (NaN, inf) are refused by every reader unless allowed: by the
# `allow_nonfinite` argument, or for every reader of a process (the CLIs) by this variable = 1.
ALLOW_NONFINITE_ENV = "MAXNUCL_ALLOW_NONFINITE"
_VERIFY_BLOCK_BYTES = 1 << 20  # verified in blocks that stay in the CPU's cache
# Bits of the exponent of each float dtype (as unsigned integers): all set = inf or NaN.
_EXPONENT_MASKS = {"float32": (np.uint32, 0x7F800000), "bfloat16": (np.uint16, 0x7F80),
                   "float16": (np.uint16, 0x7C00), "float64": (np.uint64, 0x7FF0000000000000)}


def crc32c(array: np.ndarray, crc: int = 0) -> int:
  """CRC32C of `array`'s elements in C order as little-endian bytes (extending `crc`)."""
  data = np.ascontiguousarray(array)
  if data.dtype.byteorder == ">" or (data.dtype.byteorder == "=" and not _LITTLE_ENDIAN):
    data = data.byteswap().view(data.dtype.newbyteorder("<"))
  view = data.reshape(-1).view(np.uint8)
  view.flags.writeable = False  # google_crc32c takes read-only buffers only
  return google_crc32c.extend(crc, view)


_LITTLE_ENDIAN = np.little_endian


def params_metadata(params: dict) -> dict:
  """The custom_metadata every writer stores with the params: each array's CRC32C, by leaf name
  ("layers_0/mlp/out").  An array that no single process holds whole (a multi-host sharded
  training state) gets none; its readers then check only finiteness."""
  sums = {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      continue
    sums["/".join(k.key for k in keys)] = crc32c(np.asarray(leaf))
  return {CHECKSUMS: sums}


def verify_params(path: str | os.PathLike, params: dict, *,
                  allow_nonfinite: Optional[bool] = None) -> None:
  """Check params restored by Orbax itself (the trainer's resume) as every reader here checks
  what it reads: each array this process holds whole against the CRC32C recorded in
  `path`/params/_METADATA, and finite unless allowed.  Raises CheckpointError naming the
  tensor."""
  params_dir = _checkpoint(path) / PARAMS
  checksums = _checksums(params_dir, _tree_metadata(params_dir))
  for keys, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      continue
    key = tuple(k.key for k in keys)
    host = np.asarray(leaf)
    verifier = _Verifier(str(params_dir / ".".join(key)), "/".join(key), host.dtype,
                         checksums.get(key), allow_nonfinite)
    verifier.update(host)
    verifier.finish()


def allow_nonfinite_default() -> bool:
  return os.environ.get(ALLOW_NONFINITE_ENV, "") not in ("", "0")


class _Verifier:
  """Checks the blocks of one array as they are read, in C order: their CRC32C against the one
  recorded at save (when there is one) and that every value is finite (unless allowed)."""

  def __init__(self, where: str, name: str, dtype: np.dtype, checksum: Optional[int],
               allow_nonfinite: Optional[bool]):
    self.where, self.name, self.checksum = where, name, checksum
    allow = allow_nonfinite_default() if allow_nonfinite is None else allow_nonfinite
    self.mask = None if allow else _EXPONENT_MASKS.get(np.dtype(dtype).name)
    self.crc, self.nonfinite = 0, 0

  def update(self, block: np.ndarray) -> None:
    block = np.ascontiguousarray(block)
    flat = block.reshape(-1)
    step = max(1, _VERIFY_BLOCK_BYTES // max(block.itemsize, 1))
    # float32/64: x . 0 is NaN exactly when some x is NaN or inf (one BLAS pass, no temporary);
    # other floats: the exponent bits, all set for inf and NaN
    zeros = (np.zeros(min(step, flat.size), block.dtype)
             if self.mask is not None and block.dtype in (np.float32, np.float64) else None)
    for start in range(0, flat.size, step):
      part = flat[start:start + step]
      if self.checksum is not None:
        self.crc = crc32c(part, self.crc)
      if self.mask is None or not part.size:
        continue
      if zeros is not None:
        with np.errstate(invalid="ignore"):
          if np.isfinite(np.dot(part, zeros[:part.size])):
            continue
      else:
        bits, mask = self.mask
        if np.bitwise_and(part.view(bits), bits(mask)).max() != mask:
          continue
      exponent = np.bitwise_and(part.view(self.mask[0]), self.mask[0](self.mask[1]))
      self.nonfinite += int(np.count_nonzero(exponent == self.mask[1]))

  def finish(self) -> None:
    if self.checksum is not None and self.crc != self.checksum:
      raise CheckpointError(
          f"{self.where}: tensor {self.name} fails its checksum (CRC32C {self.crc:#010x}, "
          f"recorded at save {self.checksum:#010x}): the stored data is corrupted")
    if self.nonfinite:
      raise CheckpointError(
          f"{self.where}: tensor {self.name} holds {self.nonfinite} non-finite value(s) (NaN "
          f"or inf); expected finite weights (allow_nonfinite=True, or {ALLOW_NONFINITE_ENV}=1, "
          f"loads them anyway, for debugging)")


# ---- metadata --------------------------------------------------------------------------------

def _one_line(error: BaseException, limit: int = 300) -> str:
  """A foreign library's error as one short line (TensorStore's carry whole specs)."""
  text = " ".join(str(error).split()) or type(error).__name__
  return text if len(text) <= limit else text[:limit] + " ..."


def load_config(path: str | os.PathLike) -> ModelConfig:
  """The checkpoint's ModelConfig (CKPT/model_config/metadata), validated (ConfigError naming the
  file and the field)."""
  path = _checkpoint(path)
  config_dir = path / MODEL_CONFIG
  if not config_dir.is_dir():
    raise CheckpointError(f"{path} is not a maxnucl checkpoint: no {MODEL_CONFIG}/ directory "
                          f"(expected {MODEL_CONFIG}/ and {PARAMS}/)")
  config_file = config_dir / "metadata"
  try:
    data = json.loads(config_file.read_bytes())
  except FileNotFoundError:
    raise CheckpointError(f"{config_file}: missing (the checkpoint's model config)") from None
  except (OSError, ValueError) as e:  # ValueError: JSON and UTF-8 errors
    raise CheckpointError(f"{config_file}: not a JSON model config ({_one_line(e)})") from None
  try:
    return ModelConfig.from_dict(data)
  except ConfigError as e:
    raise ConfigError(f"{config_file}: {e}") from None
  except TypeError as e:  # a field name that is not a string
    raise ConfigError(f"{config_file}: model config: {e}") from None


def _tree_metadata(directory: paths.Path, required: bool = True) -> dict:
  """params/_METADATA, parsed and checked for the fields the readers use ({} when absent and not
  `required`: a PyTree directory of an older Orbax, e.g. a DeepMind checkpoint)."""
  metadata_file = directory / "_METADATA"
  try:
    metadata = json.loads(metadata_file.read_bytes())
  except FileNotFoundError:
    if not required:
      return {}
    raise CheckpointError(f"{metadata_file}: missing (the tree metadata of the stored "
                          f"arrays)") from None
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{metadata_file}: not JSON ({_one_line(e)})") from None
  if not isinstance(metadata, dict) or not isinstance(metadata.get("tree_metadata"), dict):
    raise CheckpointError(f"{metadata_file}: expected a JSON object with a 'tree_metadata' "
                          f"object (Orbax's tree metadata)")
  for field in ("use_ocdbt", "use_zarr3"):
    if not isinstance(metadata.get(field, False), bool):
      raise CheckpointError(f"{metadata_file}: field {field!r} = {metadata[field]!r}; expected "
                            f"true or false")
  return metadata


def _missing_leaf_directories(directory: paths.Path, metadata: dict) -> None:
  """A checkpoint of one zarr directory per leaf (not OCDBT) must hold each leaf's directory:
  a missing one is named with its tensor, not with the spec TensorStore fails to open."""
  if not metadata or metadata.get("use_ocdbt", False):
    return
  for entry in metadata["tree_metadata"].values():
    listed = entry.get("key_metadata") if isinstance(entry, dict) else None
    if not isinstance(listed, list):
      continue  # a malformed entry: the tree's own check refuses it
    keys = [str(k.get("key")) for k in listed if isinstance(k, dict)]
    leaf = directory / ".".join(keys)
    if keys and not (leaf / ".zarray").exists() and not (leaf / "zarr.json").exists():
      raise CheckpointError(f"{leaf}: missing (the data of tensor {'/'.join(keys)}, listed in "
                            f"{directory / '_METADATA'})")


def stored_checksums(path: str | os.PathLike) -> dict[tuple[str, ...], int]:
  """Leaf path -> the CRC32C its writer recorded (empty for a checkpoint written before
  checksums, or by a writer that records none)."""
  return _checksums(_checkpoint(path) / PARAMS, _tree_metadata(_checkpoint(path) / PARAMS))


def _checksums(params_dir: paths.Path, metadata: dict) -> dict[tuple[str, ...], int]:
  custom = metadata.get("custom_metadata")
  sums = custom.get(CHECKSUMS) if isinstance(custom, dict) else None
  if sums is None:
    return {}
  bad = (not isinstance(sums, dict) or
         [k for k, v in sums.items() if not isinstance(v, int) or isinstance(v, bool)
          or not 0 <= v < 1 << 32])
  if bad:
    raise CheckpointError(f"{params_dir / '_METADATA'}: custom_metadata.{CHECKSUMS}"
                          f"{'.' + bad[0] if isinstance(bad, list) else ''}: expected a CRC32C "
                          f"(an integer in [0, 2**32)) per tensor")
  return {tuple(name.split("/")): value for name, value in sums.items()}


_WARNED_UNCHECKED: set[str] = set()


def _warn_unchecked(params_dir: paths.Path) -> None:
  if str(params_dir) not in _WARNED_UNCHECKED:
    _WARNED_UNCHECKED.add(str(params_dir))
    log.warning("%s: no checksums recorded (a checkpoint written before maxnucl recorded "
                "them); its arrays are checked for missing chunks and non-finite values only",
                params_dir / "_METADATA")


def stored_arrays(path: str | os.PathLike) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
  """Leaf path -> (shape, dtype name) of every stored array, read from metadata only, checked
  against the checkpoint's config (every tensor present with its shape, nothing else)."""
  path = _checkpoint(path)
  cfg = load_config(path)
  params_dir = path / PARAMS
  if not params_dir.is_dir():
    raise CheckpointError(f"{path}: no {PARAMS}/ directory")
  stored = pytree_arrays(params_dir)
  # The config's depth against the stored tree before the config's tree is built: a config
  # claiming more layers than are stored is refused without building it.
  layers = {k[0] for k in stored if k[0].startswith("layers_")}
  if len(layers) != cfg.num_layers:
    raise ConfigError(f"{path / MODEL_CONFIG / 'metadata'}: field 'num_layers' = "
                      f"{cfg.num_layers}; the checkpoint stores {len(layers)} layers")
  _compare(f"{params_dir / '_METADATA'} (the stored arrays, against "
           f"{path / MODEL_CONFIG / 'metadata'})", _expected_shapes(cfg),
           {k: v[0] for k, v in stored.items()}, params_dir)
  return stored


def pytree_arrays(directory: str | os.PathLike
                  ) -> dict[tuple[str, ...], tuple[tuple[int, ...], str]]:
  """Like `stored_arrays`, for any Orbax PyTree directory (e.g. a DeepMind `gemma` checkpoint)."""
  directory = _existing(directory)
  _missing_leaf_directories(directory, _tree_metadata(directory, required=False))
  try:
    metadata = ocp.PyTreeCheckpointHandler().metadata(paths.orbax_path(directory)).tree
    out = {}
    for keys, leaf in jax.tree_util.tree_flatten_with_path(metadata)[0]:
      out[tuple(str(k.key) for k in keys)] = (tuple(int(n) for n in leaf.shape),
                                              np.dtype(leaf.dtype).name)
    return out
  except Exception as e:  # noqa: BLE001 - Orbax's errors on malformed metadata vary widely
    failure = (f"{directory / '_METADATA'}: cannot read the stored arrays' metadata "
               f"({type(e).__name__}: {_one_line(e)})")
  _collect_unretrieved_futures()
  raise CheckpointError(failure)


def _collect_unretrieved_futures() -> None:
  """Orbax reads the arrays' metadata concurrently (asyncio); when one read fails, the failed
  futures of the others are never retrieved, and asyncio logs each with a traceback ("Future
  exception was never retrieved") whenever the garbage collector reaches it: after a command's
  one-line refusal, or in a later run in the same process.  The failure is reported by the
  caller, so they are collected now, with asyncio's logger silent meanwhile."""
  asyncio_log = logging.getLogger("asyncio")
  disabled, asyncio_log.disabled = asyncio_log.disabled, True
  try:
    gc.collect()
  finally:
    asyncio_log.disabled = disabled


# ---- reading: one path for every reader --------------------------------------------------------

def read_pytree_array(directory: str | os.PathLike, key_path: tuple[str, ...],
                      dtype: Optional[str] = None, axes: Optional[tuple[int, ...]] = None, *,
                      allow_nonfinite: Optional[bool] = None) -> np.ndarray:
  """One array of any Orbax PyTree directory (host numpy), reading nothing else (verified as
  `read_array` does; a directory without maxnucl's checksums is checked for finiteness only)."""
  key_path = tuple(key_path)
  directory = _existing(directory)
  stored = pytree_arrays(directory)
  if key_path not in stored:
    raise CheckpointError(f"{directory}: no stored tensor {'/'.join(key_path)}")
  shape, stored_dtype = stored[key_path]
  checksum = _checksums(directory, _tree_metadata(directory, required=False)).get(key_path)
  return _read_leaf(directory, key_path, shape, stored_dtype, dtype, axes, checksum,
                    allow_nonfinite)


def read_listed_array(path: str | os.PathLike, key_path: tuple[str, ...],
                      stored: tuple[tuple[int, ...], str], *,
                      checksums: Optional[dict] = None,
                      allow_nonfinite: Optional[bool] = None) -> np.ndarray:
  """`read_array` of a leaf whose (shape, dtype) the caller already has from `stored_arrays`
  (and its checksum from `stored_checksums`): the metadata (~0.15 s a read for a 30-layer model)
  is not read again."""
  shape, dtype = stored
  params_dir = _existing(_checkpoint(path) / PARAMS)
  if checksums is None:
    checksums = _checksums(params_dir, _tree_metadata(params_dir))
  return _read_leaf(params_dir, tuple(key_path), shape, dtype, dtype, None,
                    checksums.get(tuple(key_path)), allow_nonfinite)


def load(path: str | os.PathLike, *, mesh: Optional[Mesh] = None,
         rules: Optional[sharding.Rules] = None, dtype: Optional[str] = None,
         allow_nonfinite: Optional[bool] = None) -> tuple[ModelConfig, dict]:
  """`(cfg, params)` from a checkpoint, every array verified (its checksum, no missing chunk,
  finite values unless `allow_nonfinite`; see the module docstring).

  mesh/rules: place each array straight into its NamedSharding on `mesh` (default: one device);
  each process reads one whole array at a time (to verify it) and keeps only its own shards.
  dtype: cast on load (e.g. "bfloat16"); default: as stored.
  """
  path = _checkpoint(path)
  cfg = load_config(path)
  stored = stored_arrays(path)
  params_dir = path / PARAMS
  checksums = _checksums(params_dir, _tree_metadata(params_dir))
  if not checksums:
    _warn_unchecked(params_dir)
  expected = _expected_shapes(cfg)
  if mesh is None:
    mesh = Mesh(np.asarray(jax.devices()[:1]), ("data",))
    shardings = {k: NamedSharding(mesh, PartitionSpec()) for k in expected}
  else:
    axes = _leaf_shapes(models.logical_axes(cfg), leaf_is_tuple=True)
    rules = sharding.logical_axis_rules() if rules is None else rules
    shardings = {k: NamedSharding(mesh, sharding.logical_to_spec(axes[k], expected[k], mesh,
                                                                 rules)) for k in expected}
  params = {}
  leaves = [(key, stored[key][0], stored[key][1], dtype or stored[key][1]) for key in expected]
  for key, host in _read_leaves(params_dir, leaves, checksums, allow_nonfinite):
    params[key] = jax.make_array_from_callback(host.shape, shardings[key],
                                               lambda index, host=host: host[index])
  return cfg, unflatten(params)


def check_params(cfg: ModelConfig, params: dict) -> None:
  """Raise CheckpointError naming the first tensor whose presence or shape disagrees with cfg."""
  actual = _leaf_shapes(jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), params))
  _compare(f"params for model {cfg.name!r}", _expected_shapes(cfg), actual)


# ---- streaming access ---------------------------------------------------------------------------

def read_array(path: str | os.PathLike, key_path: tuple[str, ...],
               dtype: Optional[str] = None, axes: Optional[tuple[int, ...]] = None, *,
               allow_nonfinite: Optional[bool] = None) -> np.ndarray:
  """One stored array (host numpy), without reading any other tensor, verified (checksum, no
  missing chunk, finite unless `allow_nonfinite`).

  key_path: the leaf's path in the params tree, e.g. ("layers_0", "mlp", "out").  dtype: cast on
  read (default: as stored).  axes: return `array.transpose(axes)`, C-contiguous.
  """
  return read_pytree_array(_checkpoint(path) / PARAMS, key_path, dtype, axes,
                           allow_nonfinite=allow_nonfinite)


def iter_arrays(path: str | os.PathLike, dtype: Optional[str] = None, *,
                allow_nonfinite: Optional[bool] = None
                ) -> Iterator[tuple[tuple[str, ...], np.ndarray]]:
  """(key_path, array) for every stored array, one array in memory at a time, each verified."""
  params_dir = _checkpoint(path) / PARAMS
  stored = stored_arrays(path)
  checksums = _checksums(params_dir, _tree_metadata(params_dir))
  if not checksums:
    _warn_unchecked(params_dir)
  yield from _read_leaves(params_dir, [(key, shape, stored_dtype, dtype or stored_dtype)
                                       for key, (shape, stored_dtype) in stored.items()],
                          checksums, allow_nonfinite)


def _leaf_spec(params_dir: paths.Path, key_path: tuple[str, ...]) -> dict:
  """The TensorStore spec of one stored leaf, in either layout Orbax writes: a zarr directory
  per leaf (use_ocdbt=False, StreamingWriter) or the OCDBT store (`save`, trainer checkpoints);
  a missing chunk is an error, never the fill value."""
  leaf = ".".join(key_path)
  leaf_dir = params_dir / leaf
  if (leaf_dir / ".zarray").is_file():
    spec = {"driver": "zarr", "kvstore": paths.kvstore_spec(leaf_dir)}
  elif (leaf_dir / "zarr.json").is_file():
    spec = {"driver": "zarr3", "kvstore": paths.kvstore_spec(leaf_dir)}
  else:
    metadata = _tree_metadata(params_dir, required=False)
    if not metadata.get("use_ocdbt", (params_dir / "manifest.ocdbt").is_file()):
      raise CheckpointError(f"{leaf_dir}: missing (tensor {'/'.join(key_path)}: expected a zarr "
                            f"array directory, as {params_dir / '_METADATA'} says the arrays are "
                            f"not in an OCDBT store)")
    spec = {"driver": "zarr3" if metadata.get("use_zarr3") else "zarr",
            "kvstore": {"driver": "ocdbt", "base": paths.kvstore_spec(params_dir),
                        "path": leaf}}
  return {**spec, "fill_missing_data_reads": False}


def _open_leaf(params_dir: paths.Path, key_path, shape) -> ts.TensorStore:
  leaf_file = params_dir / ".".join(key_path)
  try:
    array = ts.open(_leaf_spec(params_dir, key_path), open=True, read=True).result()
  except ValueError as e:
    raise CheckpointError(f"{leaf_file}: cannot open tensor {'/'.join(key_path)} "
                          f"({_one_line(e)})") from None
  if tuple(array.shape) != tuple(shape):
    raise CheckpointError(f"{leaf_file}: tensor {'/'.join(key_path)} is stored with shape "
                          f"{tuple(array.shape)}, the checkpoint metadata says {tuple(shape)}")
  return array


def _read_leaf(params_dir: paths.Path, key_path, shape, stored_dtype, dtype=None, axes=None,
               checksum: Optional[int] = None,
               allow_nonfinite: Optional[bool] = None) -> np.ndarray:
  """THE read of one stored array: opened by TensorStore (missing chunks refused), read in its
  stored dtype, verified (`_Verifier`), then cast and transposed as asked."""
  return _finish_read(_start_read(params_dir, key_path, shape, stored_dtype, dtype, axes,
                                  checksum, allow_nonfinite))


def _read_leaves(params_dir: paths.Path, leaves, checksums: dict,
                 allow_nonfinite: Optional[bool]) -> Iterator[tuple[tuple, np.ndarray]]:
  """`_read_leaf` of each (key_path, shape, stored dtype, dtype) in turn, the next array read
  (by TensorStore's threads) while this one is verified: two arrays in memory at most."""
  pending = None
  for key_path, shape, stored_dtype, dtype in leaves:
    started = _start_read(params_dir, key_path, shape, stored_dtype, dtype, None,
                          checksums.get(tuple(key_path)), allow_nonfinite)
    if pending is not None:
      yield pending[0], _finish_read(pending[1])
    pending = (tuple(key_path), started)
  if pending is not None:
    yield pending[0], _finish_read(pending[1])


def _start_read(params_dir, key_path, shape, stored_dtype, dtype, axes, checksum,
                allow_nonfinite) -> tuple:
  key_path = tuple(key_path)
  where = params_dir / ".".join(key_path)
  array = _open_leaf(params_dir, key_path, shape)
  if array.dtype.numpy_dtype != np.dtype(stored_dtype):
    raise CheckpointError(f"{where}: tensor {'/'.join(key_path)} is stored as "
                          f"{array.dtype.numpy_dtype}, the checkpoint metadata says "
                          f"{stored_dtype}")
  verifier = _Verifier(str(where), "/".join(key_path), array.dtype.numpy_dtype, checksum,
                       allow_nonfinite)
  return where, key_path, array.read(), verifier, dtype, axes


def _finish_read(started: tuple) -> np.ndarray:
  where, key_path, future, verifier, dtype, axes = started
  try:
    data = future.result()
  except ValueError as e:  # a missing or truncated chunk, an undecodable one
    raise CheckpointError(f"{where}: cannot read tensor {'/'.join(key_path)} "
                          f"({_one_line(e)})") from None
  verifier.update(data)
  verifier.finish()
  if dtype is not None and np.dtype(dtype) != data.dtype:
    data = _cast(data, ts.dtype(np.dtype(dtype).name)).read().result()
  if axes is not None:
    data = np.ascontiguousarray(np.transpose(data, axes))
  return data


class VerifiedView:
  """A lazy view of one stored array that verifies what is read through it: rows read in order
  from the first to the last (StreamingWriter.write's row blocks) are checked as `_read_leaf`
  checks a whole array, and `finish()` (called by StreamingWriter.write after the last block)
  raises CheckpointError on a checksum mismatch, a non-finite value, or when the rows were not
  all read in order (nothing verified)."""

  def __init__(self, store: ts.TensorStore, where: str, name: str, checksum: Optional[int],
               allow_nonfinite: Optional[bool]):
    self.store, self.where, self.name = store, where, name
    self.shape, self.dtype = tuple(store.shape), store.dtype
    self.chunk_layout = store.chunk_layout
    self._verifier = _Verifier(where, name, store.dtype.numpy_dtype, checksum, allow_nonfinite)
    self._next_row, self._in_order = 0, True

  def __getitem__(self, index) -> np.ndarray:
    try:
      block = self.store[index].read().result()
    except ValueError as e:
      raise CheckpointError(f"{self.where}: cannot read tensor {self.name} "
                            f"({_one_line(e)})") from None
    rows = index if isinstance(index, slice) else None
    if (rows is not None and rows.step in (None, 1) and (rows.start or 0) == self._next_row
        and self.shape and self._in_order):
      self._verifier.update(block)
      self._next_row = min(rows.stop if rows.stop is not None else self.shape[0],
                           self.shape[0])
    else:
      self._in_order = False
    return block

  def __array__(self, dtype=None, copy=None):
    return np.asarray(self[:] if self.shape else self.store.read().result(), dtype)

  def finish(self) -> None:
    if not self.shape:
      self._verifier.update(self.store.read().result())
    elif not self._in_order or self._next_row != self.shape[0]:
      raise CheckpointError(f"{self.where}: tensor {self.name} was not read whole and in order, "
                            f"so it could not be verified")
    self._verifier.finish()


def open_array(path: str | os.PathLike, key_path: tuple[str, ...], *,
               stored: Optional[tuple[tuple[int, ...], str]] = None,
               checksums: Optional[dict] = None,
               allow_nonfinite: Optional[bool] = None) -> VerifiedView:
  """A lazy, read-only view of one stored array (nothing read yet; slicing it reads only those
  elements), verified as it is read in row order (`VerifiedView`).  `stored` = its (shape,
  dtype) from `stored_arrays`, `checksums` from `stored_checksums`, when the caller has them."""
  params_dir = _checkpoint(path) / PARAMS
  key_path = tuple(key_path)
  if stored is None:
    stored = pytree_arrays(params_dir).get(key_path)
    if stored is None:
      raise CheckpointError(f"{params_dir}: no stored tensor {'/'.join(key_path)}")
  if checksums is None:
    checksums = _checksums(params_dir, _tree_metadata(params_dir))
  store = _open_leaf(params_dir, key_path, stored[0])
  where = str(params_dir / ".".join(key_path))
  if store.dtype.numpy_dtype != np.dtype(stored[1]):
    raise CheckpointError(f"{where}: tensor {'/'.join(key_path)} is stored as "
                          f"{store.dtype.numpy_dtype}, the checkpoint metadata says {stored[1]}")
  return VerifiedView(store, where, "/".join(key_path), checksums.get(key_path),
                      allow_nonfinite)


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
    self.expected = dict(_expected_shapes(cfg))
    self.written: dict[tuple[str, ...], tuple[int, ...]] = {}
    self.checksums: dict[str, int] = {}  # CRC32C of each written array (params/_METADATA)
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
    """Write one leaf; `array` must have the config's shape for `key_path`.  A `VerifiedView`
    (a stored array copied block by block) is verified as its blocks are read."""
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
        "driver": "zarr", "kvstore": paths.kvstore_spec(leaf_dir),
        "metadata": {"shape": list(shape), "chunks": [rows, *shape[1:]] if shape else [],
                     "dtype": _ZARR_DTYPES[self.dtype.name], "compressor": None,
                     "fill_value": None, "order": "C", "dimension_separator": "."},
        "store_data_equal_to_fill_value": True}, create=True, context=self.context).result()
    crc = 0
    if not shape:
      block = _cast(np.asarray(array), store.dtype).read().result()
      crc = crc32c(block)
      store.write(block).result()
    pending: list = []  # two row blocks in flight: one is copied while the other is written
    for start in range(0, shape[0] if shape else 0, rows):
      stop = min(start + rows, shape[0])
      # cast here (not by the store) so that the checksum is of the bytes stored
      block = _cast(array[start:stop], store.dtype).read().result()
      crc = crc32c(block, crc)
      pending.append(store[start:stop].write(block))
      if len(pending) > 1:
        pending.pop(0).result()
    for future in pending:
      future.result()
    if isinstance(array, VerifiedView):
      array.finish()
    self.checksums["/".join(key_path)] = crc
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
        "store_array_data_equal_to_fill_value": True,
        "custom_metadata": {CHECKSUMS: self.checksums}}))
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


@functools.lru_cache(maxsize=8)
def _expected_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Leaf path -> shape of the params tree of `cfg` (traced once per config: seconds for a
  30-layer model)."""
  return _leaf_shapes(models.abstract_params(cfg))


def _compare(where, expected: dict, actual: dict, params_dir=None) -> None:
  """Every expected tensor present with its shape, nothing else; `params_dir`: the stored
  checkpoint's, whose leaf file a shape mismatch names."""
  for key in expected:
    if key not in actual:
      raise CheckpointError(f"{where}: tensor {'/'.join(key)} is missing "
                            f"(expected shape {expected[key]})")
    if tuple(actual[key]) != tuple(expected[key]):
      stored = f" (stored in {params_dir / '.'.join(key)})" if params_dir is not None else ""
      raise CheckpointError(f"{where}: tensor {'/'.join(key)} has shape {tuple(actual[key])}"
                            f"{stored}, expected {expected[key]} from the model config")
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
