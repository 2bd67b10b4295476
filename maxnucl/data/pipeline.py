"""The TF-free input pipeline: `create_data_iterator` and the checkpointable `DataIterator`.

    text examples (catalog) -> token ids (vocabularies) -> segments and packed rows (packing)
        -> [optional] numpy shard cache (caching) -> DataIterator -> per-host batches

Rows are built once per (source, split, settings): in this process ("live") or ahead of time by
`cache_task` / `tools/cache_tasks.py`.  With `cache_dir` the iterator reads only the cached
shards (a GPU/TPU host needs nothing else); `synthetic_arithmetic` needs neither cache nor files.
Importing this module never imports TensorFlow; only `use_seqio=True` (live reading through the
registered seqio tasks) and TFDS-backed sources do, with accelerators hidden from TensorFlow.

Batches: a dict of numpy arrays, each [batch_size // process_count, seq_len] (this host's part
of the global batch):
  tokens      int32    model input tokens ([BOS] inputs targets of each packed example)
  targets     int32    next-token targets (the last position of each example targets EOS)
  loss_mask   float32  1 where the target counts toward the loss, 0 on padding
  segment_ids int32    1, 2, ... per packed example in a row, 0 on padding
  positions   int32    0, 1, ... restarting at each example

Order: row r of the infinite stream is row `permutation(epoch)[r % num_rows]`, with a fresh
seeded permutation per epoch when `shuffle`; global batch k is stream rows [k*B, (k+1)*B) and
host p takes its contiguous slice of B/process_count of them.  The state is the stream position,
so `set_state(get_state())` resumes exactly, on any number of hosts with the same global batch.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping, Optional

import gin
import numpy as np

from maxnucl import outputs
from maxnucl.data import caching
from maxnucl.data import catalog
from maxnucl.data import packing
from maxnucl.data import sources
from maxnucl.data import vocabularies

# Settings that decide the content of the rows; a cache built with other values is refused.
_ROW_SETTINGS = ("source", "split", "seq_len", "pack", "loss_on_inputs", "vocab",
                 "feature_lengths")


def tokenized_examples(source: str, split: str, *, vocab: str, seed: int, shuffle: bool,
                       mixture_size: Optional[int] = None, use_seqio: bool = False
                       ) -> list[tuple[list[int], list[int]]]:
  """(inputs ids, targets ids) of every example, without BOS/EOS."""
  if use_seqio:
    from maxnucl.data import tasks  # pylint: disable=import-outside-toplevel  # imports TF
    return tasks.tokenized_examples_via_seqio(source, split, vocab=vocab, seed=seed,
                                              shuffle=shuffle, mixture_size=mixture_size)
  tokenizer = vocabularies.get_tokenizer(vocab)
  examples = catalog.text_examples(source, split, seed=seed, shuffle=shuffle,
                                   mixture_size=mixture_size)
  return [(tokenizer.encode(e["inputs"]), tokenizer.encode(e["targets"])) for e in examples]


def build_packed_rows(source: str, split: str, *, seq_len: int, pack: bool = True,
                      loss_on_inputs: bool = False, seed: int = 0, shuffle: bool = True,
                      vocab: str = vocabularies.BYTE_VOCAB_NAME,
                      feature_lengths: Optional[Mapping[str, int]] = None,
                      mixture_size: Optional[int] = None, use_seqio: bool = False
                      ) -> caching.InMemoryRows:
  """All rows of a task/mixture split: examples shuffled (if `shuffle`), tokenized, packed."""
  tokenizer = vocabularies.get_tokenizer(vocab)
  examples = tokenized_examples(source, split, vocab=vocab, seed=seed, shuffle=shuffle,
                                mixture_size=mixture_size, use_seqio=use_seqio)
  if not examples:
    raise ValueError(f"'{source}' split '{split}' yielded no examples")
  bos_id = tokenizer.bos_id if tokenizer.add_bos else None  # SmolLM2, Qwen2: text has no BOS
  segments = (packing.example_segment(inputs, targets, seq_len=seq_len, bos_id=bos_id,
                                      eos_id=tokenizer.eos_id, loss_on_inputs=loss_on_inputs,
                                      feature_lengths=feature_lengths)
              for inputs, targets in examples)
  rows = packing.pack_segments(segments, seq_len=seq_len, pack=pack)
  metadata = {"source": source, "split": split, "seq_len": seq_len, "pack": pack,
              "loss_on_inputs": loss_on_inputs, "vocab": vocab,
              "feature_lengths": dict(feature_lengths) if feature_lengths else None,
              "seed": seed, "shuffle": shuffle, "mixture_size": mixture_size,
              "num_examples": len(examples), "vocab_size": tokenizer.vocab_size,
              "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id}
  return caching.InMemoryRows(rows, metadata)


@gin.configurable
def cache_task(source: str, split: str, cache_dir: str | os.PathLike, *, seq_len: int = 128,
               pack: bool = True, loss_on_inputs: bool = False, seed: int = 0,
               shuffle: bool = True, vocab: str = vocabularies.BYTE_VOCAB_NAME,
               feature_lengths: Optional[Mapping[str, int]] = None,
               mixture_size: Optional[int] = None, use_seqio: bool = False,
               rows_per_shard: int = 16_384) -> pathlib.Path:
  """Materialises a task/mixture split's packed rows under `<cache_dir>/<source>/<split>/`.

  Returns the path of the written index.json.  `create_data_iterator(cache_dir=cache_dir, ...)`
  with the same settings then yields exactly what it yields live.  Refuses (before reading
  anything) a cache directory that is, or lies inside, a directory the dataset files are read
  from, symlinks resolved (outputs.OutputPathError).
  """
  split_dir = caching.cache_split_dir(cache_dir, source, split)
  inputs = {"data root" + (f" {i + 1}" if i else ""): root
            for i, root in enumerate(sources.data_roots())}
  inputs["TFDS data_dir"] = sources.tfds_data_dir()
  outputs.check_output_path(split_dir, inputs, flag="cache directory", overwrite=None,
                            replaces=False)
  rows = build_packed_rows(source, split, seq_len=seq_len, pack=pack,
                           loss_on_inputs=loss_on_inputs, seed=seed, shuffle=shuffle, vocab=vocab,
                           feature_lengths=feature_lengths, mixture_size=mixture_size,
                           use_seqio=use_seqio)
  return caching.write_rows(split_dir,
                            rows.rows(np.arange(rows.num_rows)), rows.index,
                            rows_per_shard=rows_per_shard)


class DataIterator:
  """Deterministic, checkpointable iterator over this host's part of each global batch."""

  def __init__(self, rows, *, batch_size: int, seed: int = 0, shuffle: bool = True,
               repeat: bool = True, process_index: int = 0, process_count: int = 1):
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in [0, process_count={process_count})")
    if batch_size % process_count:
      raise ValueError(f"global batch_size {batch_size} is not divisible by process_count "
                       f"{process_count}")
    if rows.num_rows == 0:
      raise ValueError(f"No rows to iterate over ({rows.index.get('source')}, "
                       f"{rows.index.get('split')})")
    self._rows = rows
    self.batch_size = batch_size
    self.local_batch_size = batch_size // process_count
    self.seed, self.shuffle, self.repeat = seed, shuffle, repeat
    self.process_index, self.process_count = process_index, process_count
    self.seq_len = rows.seq_len
    self.num_rows = rows.num_rows
    self.vocab_size = int(rows.index["vocab_size"])
    self.eos_id = int(rows.index["eos_id"])
    self.pad_id = int(rows.index["pad_id"])
    self.bos_id = int(rows.index["bos_id"])
    self.metadata = dict(rows.index)
    self._position = 0  # stream row at which the next global batch starts
    self._permutations: dict[int, np.ndarray] = {}

  def __iter__(self):
    return self

  def _row_ids(self, stream_positions: np.ndarray) -> np.ndarray:
    epochs, offsets = np.divmod(stream_positions, self.num_rows)
    if not self.shuffle:
      return offsets
    out = np.empty_like(offsets)
    for epoch in np.unique(epochs):
      if epoch not in self._permutations:
        if len(self._permutations) > 2:
          self._permutations.pop(min(self._permutations))
        self._permutations[int(epoch)] = np.random.default_rng(
            [self.seed, int(epoch)]).permutation(self.num_rows)
      selected = epochs == epoch
      out[selected] = self._permutations[int(epoch)][offsets[selected]]
    return out

  def __next__(self) -> dict[str, np.ndarray]:
    if not self.repeat and self._position >= self.num_rows:
      raise StopIteration
    start = self._position + self.process_index * self.local_batch_size
    positions = np.arange(start, start + self.local_batch_size, dtype=np.int64)
    self._position += self.batch_size
    if self.repeat:
      return self._rows.rows(self._row_ids(positions))
    # Finite pass: the last batch is filled with all-padding rows (loss_mask 0).
    valid = positions < self.num_rows
    batch = packing.empty_rows(self.local_batch_size, self.seq_len)
    if valid.any():
      read = self._rows.rows(self._row_ids(positions[valid]))
      for feature in packing.FEATURES:
        batch[feature][valid] = read[feature]
    return batch

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position; independent of process_index/count."""
    return {"position": int(self._position), "seed": self.seed, "shuffle": self.shuffle,
            "num_rows": self.num_rows, "batch_size": self.batch_size,
            "source": self.metadata.get("source"), "split": self.metadata.get("split")}

  def set_state(self, state: Mapping[str, Any]):
    for field in ("seed", "shuffle", "num_rows", "batch_size", "source", "split"):
      if field in state and state[field] != self.get_state()[field]:
        raise ValueError(f"Data iterator state field '{field}' = {state[field]!r} does not match "
                         f"this iterator's {self.get_state()[field]!r}; the data changed")
    self._position = int(state["position"])


def _default_process(process_index: Optional[int], process_count: Optional[int]):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return process_index, process_count


def _check_cache_matches(index: Mapping[str, Any], requested: Mapping[str, Any],
                         directory: pathlib.Path):
  for field in _ROW_SETTINGS:
    cached, wanted = index.get(field), requested[field]
    if field == "vocab" and cached and wanted:
      cached, wanted = os.path.basename(str(cached)), os.path.basename(str(wanted))
    if cached != wanted:
      raise ValueError(f"Cache {directory} was built with {field}={index.get(field)!r}, but the "
                       f"iterator asks for {field}={requested[field]!r}; rebuild the cache or "
                       f"change the setting")


@gin.configurable
def create_data_iterator(split: str = "train", *, source: str = "synthetic_arithmetic",
                         batch_size: int = 8, seq_len: int = 128, pack: bool = True,
                         loss_on_inputs: bool = False, seed: int = 0, shuffle: bool = True,
                         cache_dir: Optional[str] = None, vocab: str = vocabularies.BYTE_VOCAB_NAME,
                         process_index: Optional[int] = None,
                         process_count: Optional[int] = None, repeat: Optional[bool] = None,
                         feature_lengths: Optional[Mapping[str, int]] = None,
                         mixture_size: Optional[int] = None,
                         use_seqio: bool = False) -> DataIterator:
  """This host's iterator over batches of a registered task or mixture (see module docstring).

  Args:
    split: "train", "validation", "test", ... (the task's splits).
    source: a task or mixture name from `maxnucl.data.catalog` (and seqio's registry).
    batch_size: global batch size; each host yields batch_size // process_count rows.
    seq_len: tokens per row.
    pack: several examples per row (segment_ids / positions) or one example per row.
    loss_on_inputs: also train on the inputs (prompt) tokens.
    seed: shuffles examples before packing and the row order in each epoch.
    shuffle: False keeps the source order (evaluation).
    cache_dir: read `<cache_dir>/<source>/<split>/` written by `cache_task` (TF-free, files only).
    vocab: "byte" or the path of a SentencePiece model file (e.g. Gemma's tokenizer.model).
    process_index, process_count: this host among all (default jax.process_index()/count()).
    repeat: endless epochs (default: split == "train"); False = one pass, last batch padded.
    feature_lengths: optional {"inputs": n, "targets": m} truncation before packing.
    mixture_size: examples sampled from a mixture per pass (default: its tasks' total).
    use_seqio: build rows from the seqio tasks (`maxnucl.data.tasks`; needs TensorFlow).
  """
  for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"create_data_iterator.{name} = {value!r}: expected an integer >= 1")
  process_index, process_count = _default_process(process_index, process_count)
  repeat = split == "train" if repeat is None else repeat
  if cache_dir is not None:
    directory = caching.cache_split_dir(cache_dir, source, split)
    rows = caching.CachedRows(directory)
    _check_cache_matches(rows.index, {
        "source": source, "split": split, "seq_len": seq_len, "pack": pack,
        "loss_on_inputs": loss_on_inputs, "vocab": vocab,
        "feature_lengths": dict(feature_lengths) if feature_lengths else None}, directory)
  else:
    rows = build_packed_rows(source, split, seq_len=seq_len, pack=pack,
                             loss_on_inputs=loss_on_inputs, seed=seed, shuffle=shuffle,
                             vocab=vocab, feature_lengths=feature_lengths,
                             mixture_size=mixture_size, use_seqio=use_seqio)
  return DataIterator(rows, batch_size=batch_size, seed=seed, shuffle=shuffle, repeat=repeat,
                      process_index=process_index, process_count=process_count)
