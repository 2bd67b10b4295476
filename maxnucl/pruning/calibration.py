"""Calibration data and the per-layer statistics the data-aware methods need.

A calibration SOURCE is one of
  * a `.npy` file: int array [N, L] of token-id sequences (every position valid), or a 1-D token
    stream cut into rows of `seq_len + 1`;
  * a `.jsonl` file: one sequence per line, either `[id, ...]` or `{"tokens": [id, ...]}`
    (variable length; rows are right-padded with the model's pad id and masked out);
  * a registered task / mixture name, resolved lazily through
    `maxnucl.data.pipeline.create_data_iterator(split, source=NAME, batch_size=, seq_len=)`;
    with `cache_dir` (--data_cache_dir) the pipeline reads only the cached numpy shards
    `<cache_dir>/<NAME>/<split>/` written by its `cache_task`;
  * (library only) any iterable of batch dicts with at least `tokens` [B, L].
Files are untrusted input, read and checked whole when `iterate_batches` is called (before a
caller loads its model): integer ids only (a jsonl 6.5, "6", true or NaN is refused, not cast),
each in [0, vocab_size) compared before any cast (an int64 2^32 + 5 is not 5), an .npy's data
exactly the size its header declares; the error names the file and the row/column (.npy) or the
line/position (.jsonl).  Batches of every source are range-checked again where they meet the
model (`collect_stats`, `perplexity`).
A sequence s becomes inputs s[:-1] and next-token targets s[1:].  Batch dicts follow the data
pipeline's convention: `tokens`, `targets`, `loss_mask`, `segment_ids`, `positions` [B, L].

Statistics are gathered in one forward + backward pass per batch (whole model in memory):
  x  FFN input (the pre-FFN norm's output)          -> sum_n x_nr^2               [d]
  a  inner activation act(xU) * (xV)                -> sum_n a_nj, sum_n a_nj^2    [m]
  a*g with g = dL/da (L = the *summed* next-token NLL of the batch's loss tokens; taken as the
       gradient with respect to a multiplier of ones on a) -> sum_n (a_nj g_nj)^2  [m]
  a per sequence s: its mean over the sequence's tokens, squared and summed over the sequences
       -> sum_s (mean_{n in s} a_nj)^2 and sum_s (mean_{n in s} |a_nj|)^2  [m]  (`activation`)
over the tokens with loss_mask > 0.  A sequence is one segment of a row (a packed row holds
several; a file row is one); the per-sequence sums accumulate in O(m) whatever the number of
calibration rows, and a sequence without loss tokens adds nothing.  Rows (and packed segments)
do not attend to each other, so g at a token is the gradient of the summed NLL of its own
sequence: it does not depend on which other rows share its batch, and the statistics do not
depend on how the calibration data is batched (a batch-mean L would scale g by 1 / the batch's
token count).

On a mesh (`collect_stats(..., mesh=, rules=)`, `perplexity(..., mesh=, rules=)`; params restored
sharded by `checkpoints.load(path, mesh=, rules=)`, so no host holds the whole model), the jitted
passes run with the params' shardings, each batch becomes a global array sharded over the batch
axis (rows padded to a multiple of the batch shards with loss_mask 0,
`maxnucl.evaluation.perplexity.global_batch`) and the sums come back replicated.  Every process
of a multi-process run reads the whole of every batch (a registered task too: it is read as by a
single process), so all of them pass the same global batches and get the same statistics; the
results equal the single-device ones up to floating-point summation order.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Any, Iterable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from maxnucl import ffn, losses, models, sharding
from maxnucl.models.config import ModelConfig
from maxnucl.models.decoder import Decoder

FFN_INPUT_MODULES = ("pre_ffw_norm", "pre_norm")  # Gemma-2, PaLM (shared pre-norm)


@dataclasses.dataclass
class LayerStats:
  count: float  # number of (masked-in) tokens
  x_sq_sum: np.ndarray  # [d]
  a_sum: np.ndarray  # [m]
  a_sq_sum: np.ndarray  # [m]
  ag_sq_sum: np.ndarray  # [m]
  seq_mean_sq_sum: np.ndarray  # [m] sum over sequences of (mean over its tokens of a_nj)^2
  seq_abs_mean_sq_sum: np.ndarray  # [m] the same of |a_nj|

  @property
  def a_mean(self) -> np.ndarray:
    return self.a_sum / max(self.count, 1.0)

  @property
  def a_var(self) -> np.ndarray:
    return np.maximum(self.a_sq_sum / max(self.count, 1.0) - self.a_mean ** 2, 0.0)

  @property
  def loss_proxy(self) -> np.ndarray:
    """LP_j = 1/2 E_tokens[(a_nj g_nj)^2] (SCAR), per token: g_n = dL/da_n with L the summed
    token NLL, so a_nj g_nj is the first-order change of the calibration NLL when channel j is
    zeroed at token n alone, and E is the mean over all calibration tokens.  Independent of the
    calibration batch size (with the batch-mean NLL, LP scaled with 1 / tokens per batch^2)."""
    return 0.5 * self.ag_sq_sum / max(self.count, 1.0)

  def activation_importance(self, absolute: bool = False) -> np.ndarray:
    """Minitron's MLP neuron importance (Muralidharan et al. 2024, Sec. 2.2, F_neuron aggregated
    by L2 over the batch of the mean over the sequence): || (mean_{n in s} a_nj)_s ||_2 over the
    calibration sequences s; with `absolute`, of mean_{n in s} |a_nj| (NVIDIA ModelOpt's hook)."""
    return np.sqrt(self.seq_abs_mean_sq_sum if absolute else self.seq_mean_sq_sum)


class CalibrationError(ValueError):
  """A calibration / evaluation source cannot be read."""


# ---- sources ---------------------------------------------------------------------------------------

HELD_OUT = None  # `split` for held-out data: the source's "validation" split, else its "test"


def iterate_batches(source: Any, *, num_examples: int, batch_size: int = 8, seq_len: int = 128,
                    pad_id: int = 0, split: Optional[str] = "train",
                    cache_dir: Optional[str] = None, vocab: str = "byte",
                    vocab_size: Optional[int] = None) -> Iterator[dict[str, np.ndarray]]:
  """Batches (dicts of numpy [B, L]) from SOURCE (see the module docstring), at most
  `num_examples` rows in total.  `split`, `cache_dir` and `vocab` (a SentencePiece model path,
  e.g. Gemma's tokenizer.model, or "byte") apply to registered task names; `split=HELD_OUT` picks
  the task's validation split, or its test split if it has none.

  A .npy/.jsonl file is read and checked here, at the call, before any batch is asked for (so a
  caller refuses a bad file before it loads a model): integer ids only, each in
  [0, `vocab_size`) (the model's embedding rows; without it, [0, 2^31)), the .npy data exactly
  what its header declares; a CalibrationError names the file and the row/column or line/position.
  Batches of other sources are range-checked as they arrive when `vocab_size` is given."""
  if num_examples <= 0:
    raise CalibrationError(f"number of examples must be positive, got {num_examples}")
  label = "the calibration source"
  if isinstance(source, (str, os.PathLike)):
    path = pathlib.Path(source)
    label = str(source)
    if path.suffix in (".npy", ".jsonl"):
      batches = _file_batches(read_sequences(path, seq_len, vocab_size), batch_size, pad_id)
    elif path.exists():
      raise CalibrationError(f"calibration file {path}: unknown format (expected .npy or .jsonl)")
    else:
      batches = _registered_source(str(source), split, batch_size, seq_len, cache_dir, vocab)
  else:
    batches = iter(source() if callable(source) else source)
  return _first_rows(batches, num_examples, pad_id, vocab_size, label)


def _first_rows(batches, remaining: int, pad_id: int, vocab_size: Optional[int], label: str):
  for index, batch in enumerate(batches):
    batch = _complete(batch, pad_id)
    if vocab_size is not None:
      check_token_ids(batch, vocab_size, f"{label}, batch {index}")
    batch = {k: v[:remaining] for k, v in batch.items()}
    remaining -= batch["tokens"].shape[0]
    yield batch
    if remaining <= 0:
      return


# ---- calibration files (untrusted: every id checked before any is used) ------------------------

_INT32_LIMIT = 2 ** 31  # ids go to the model as int32: without a vocabulary size, this bounds them


def _id_range(vocab_size: Optional[int]) -> tuple[int, str]:
  if vocab_size is None:
    return _INT32_LIMIT, "[0, 2^31)"
  return int(vocab_size), f"[0, {int(vocab_size)}) (the model's vocabulary)"


def read_sequences(path: pathlib.Path, seq_len: int = 128,
                   vocab_size: Optional[int] = None) -> list[np.ndarray]:
  """The token-id sequences (int64, each >= 2 ids) of a .npy or .jsonl calibration file, every id
  checked to lie in [0, vocab_size) (module docstring); CalibrationError naming the file and the
  position otherwise."""
  path = pathlib.Path(path)
  if not path.exists():
    raise CalibrationError(f"calibration file {path} does not exist")
  if path.is_dir():
    raise CalibrationError(f"calibration file {path} is a directory, expected a "
                           f"{path.suffix} file")
  try:
    if path.suffix == ".npy":
      sequences = _npy_sequences(path, seq_len, vocab_size)
    else:
      sequences = _jsonl_sequences(path, vocab_size)
  except OSError as e:
    raise CalibrationError(f"calibration file {path}: cannot be read ({e.strerror or e})") from None
  if not sequences:
    raise CalibrationError(f"calibration file {path} holds no sequences")
  return sequences


def _read_npy(path: pathlib.Path) -> np.ndarray:
  """The array of an .npy file, refused unless its header is well-formed, its dtype an integer
  type and its data exactly as long as the header's shape (numpy itself ignores extra bytes)."""
  with open(path, "rb") as f:
    size = os.fstat(f.fileno()).st_size
    if size == 0:
      raise CalibrationError(f"{path}: empty file, expected an .npy array of token ids")
    head = f.read(6)
    f.seek(0)
    try:
      version = np.lib.format.read_magic(f)
      read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                     (2, 0): np.lib.format.read_array_header_2_0}.get(version)
      if read_header is None:
        raise ValueError(f"unsupported .npy format version {version}")
      shape, fortran_order, dtype = read_header(f)
    except (ValueError, SyntaxError, TypeError, KeyError, EOFError) as e:
      kind = " (it is a zip archive: an .npz?)" if head.startswith(b"PK") else ""
      raise CalibrationError(f"{path}: not an .npy file{kind} ({_one_line(e)})") from None
    if dtype.hasobject:
      raise CalibrationError(f"{path}: dtype {dtype} holds Python objects (pickled), expected "
                             f"integer token ids")
    if not np.issubdtype(dtype, np.integer):
      raise CalibrationError(f"{path}: expected integer token ids, got dtype {dtype}")
    count = 1
    for n in shape:
      count *= int(n)
    data_bytes = size - f.tell()
    if count * dtype.itemsize != data_bytes:
      raise CalibrationError(
          f"{path}: data size mismatch: the header's shape {tuple(shape)} of {dtype} needs "
          f"{count * dtype.itemsize} bytes of data, the file holds {data_bytes}")
    data = np.fromfile(f, dtype=dtype, count=count)
  return data.reshape(shape, order="F" if fortran_order else "C")


def _first_bad(data: np.ndarray, limit: int) -> Optional[tuple]:
  """Index of the first id outside [0, limit), compared in the ids' own dtype before any cast
  (an int64 2^32 + 5 must not become 5)."""
  if data.dtype.kind == "u":
    bad = data >= np.uint64(limit)
  else:
    bad = (data < 0) | (data.astype(np.int64) >= limit)
  if not bad.any():
    return None
  return tuple(int(i) for i in np.argwhere(bad)[0])


def _npy_sequences(path: pathlib.Path, seq_len: int, vocab_size: Optional[int]):
  data = _read_npy(path)
  limit, expected = _id_range(vocab_size)
  if data.ndim not in (1, 2) or (data.ndim == 2 and data.shape[1] < 2):
    raise CalibrationError(f"{path}: expected an array [N, L >= 2] or a 1-D token stream, got "
                           f"shape {data.shape}")
  bad = _first_bad(data, limit)
  if bad is not None:
    where = f"position {bad[0]}" if data.ndim == 1 else f"row {bad[0]}, column {bad[1]}"
    raise CalibrationError(f"{path}: {where}: token id {data[bad]} outside {expected}")
  if data.ndim == 1:
    rows = data.size // (seq_len + 1)
    if rows == 0:
      raise CalibrationError(f"{path}: a 1-D stream of {data.size} tokens, fewer than one row of "
                             f"--seq_len + 1 = {seq_len + 1}")
    data = data[:rows * (seq_len + 1)].reshape(rows, seq_len + 1)
  return list(data.astype(np.int64))


def _jsonl_sequences(path: pathlib.Path, vocab_size: Optional[int]) -> list[np.ndarray]:
  limit, expected = _id_range(vocab_size)
  sequences = []
  with open(path, "rb") as f:
    for line_no, raw in enumerate(f, 1):
      where = f"{path}, line {line_no}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        raise CalibrationError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
      if not line.strip():
        continue
      try:
        item = json.loads(line)
      except (ValueError, RecursionError) as e:
        raise CalibrationError(f"{where}: not JSON ({_one_line(e)})") from None
      ids = item.get("tokens") if isinstance(item, dict) else item
      if not isinstance(ids, list) or len(ids) < 2:
        raise CalibrationError(f"{where}: expected a JSON list of at least 2 token ids or "
                               f"{{\"tokens\": [...]}}, got {_short(item)}")
      for position, token in enumerate(ids):
        if type(token) is not int:  # JSON's true/false are bool, 6.0 a float: not ids
          raise CalibrationError(f"{where}, position {position}: {_short(token)} is not an "
                                 f"integer token id")
        if not 0 <= token < limit:
          raise CalibrationError(f"{where}, position {position}: token id {token} outside "
                                 f"{expected}")
      sequences.append(np.asarray(ids, np.int64))
  return sequences


def _short(value: Any, limit: int = 60) -> str:
  text = repr(value)
  return text if len(text) <= limit else text[:limit] + "..."


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def check_token_ids(batch: dict, vocab_size: int, where: str) -> None:
  """Refuse a batch whose tokens or targets hold an id outside [0, vocab_size): the embedding
  lookup would read past the table (NaN perplexity, garbage statistics)."""
  limit, expected = _id_range(vocab_size)
  for key in ("tokens", "targets"):
    if key in batch:
      ids = np.asarray(batch[key])
      if not np.issubdtype(ids.dtype, np.integer):
        raise CalibrationError(f"{where}: {key!r} of dtype {ids.dtype}, expected integer ids")
      bad = _first_bad(ids, limit) if ids.size else None
      if bad is not None:
        position = ", ".join(f"{axis} {i}" for axis, i in zip(("row", "column"), bad))
        raise CalibrationError(f"{where}, {position} of {key!r}: token id {ids[bad]} outside "
                               f"{expected}")


def _file_batches(sequences: list[np.ndarray], batch_size: int, pad_id: int):
  for start in range(0, len(sequences), batch_size):
    chunk = sequences[start:start + batch_size]
    length = max(len(s) for s in chunk)
    full = np.full((len(chunk), length), pad_id, np.int64)
    valid = np.zeros((len(chunk), length), bool)
    for r, s in enumerate(chunk):
      full[r, :len(s)] = s
      valid[r, :len(s)] = True
    yield {"tokens": full[:, :-1].astype(np.int32), "targets": full[:, 1:].astype(np.int32),
           "loss_mask": valid[:, 1:].astype(np.float32),
           "segment_ids": valid[:, :-1].astype(np.int32)}


def _registered_source(name: str, split: Optional[str], batch_size: int, seq_len: int,
                       cache_dir: Optional[str], vocab: str):
  try:
    from maxnucl.data import catalog, pipeline  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CalibrationError(
        f"calibration source {name!r} is not a .npy/.jsonl file and the data pipeline "
        f"(maxnucl.data.pipeline) is not available to resolve it as a data-source name: {e}"
    ) from None
  if split is HELD_OUT:
    try:
      splits = catalog.splits_of(name)
    except (KeyError, ValueError) as e:
      raise CalibrationError(f"data source {name!r} is not a .npy/.jsonl file nor a registered "
                             f"task or mixture: {e}") from None
    held_out = [s for s in ("validation", "test") if s in splits]
    if not held_out:
      raise CalibrationError(f"data source {name!r} has no validation or test split for held-out "
                             f"perplexity; its splits: {list(splits)}")
    split = held_out[0]
  cached = {} if cache_dir is None else {"cache_dir": str(cache_dir)}
  # Whole batches on every process (not each host's slice, as for training): the sharded passes
  # take the same global batch from every process.
  return pipeline.create_data_iterator(split, source=name, batch_size=batch_size,
                                       seq_len=seq_len, vocab=vocab, repeat=False,
                                       process_index=0, process_count=1, **cached)


def _complete(batch: dict, pad_id: int) -> dict[str, np.ndarray]:
  """Fill in targets / loss_mask / segment_ids / positions a minimal batch leaves out."""
  out = {k: np.asarray(v) for k, v in batch.items()
         if k in ("tokens", "targets", "loss_mask", "segment_ids", "positions")}
  if "tokens" not in out:
    raise CalibrationError(f"a calibration batch must contain 'tokens'; got keys {sorted(batch)}")
  if "targets" not in out:
    tokens = out.pop("tokens")
    out = {k: v[:, :-1] for k, v in out.items()}
    out["tokens"], out["targets"] = tokens[:, :-1], tokens[:, 1:]
  if "segment_ids" not in out:
    out["segment_ids"] = np.ones_like(out["tokens"], np.int32)
  if "loss_mask" not in out:
    out["loss_mask"] = ((out["segment_ids"] > 0) & (out["targets"] != pad_id)).astype(np.float32)
  if "positions" not in out:
    out["positions"] = np.asarray(models.positions_from_segments(jnp.asarray(out["segment_ids"])))
  return out


# ---- statistics --------------------------------------------------------------------------------

def sequence_mean_squares(a, weight, segment_ids):
  """(sum_s (mean_{n in s} a_nj)^2 [m], sum_s (mean_{n in s} |a_nj|)^2 [m]) over the sequences s
  of a batch: a [B, L, m], weight [B, L] (the loss mask; the means are weighted by it), a sequence
  = a maximal run of equal segment_ids [B, L] within a row.  Sequences of weight 0 add nothing.
  The sums are taken per sequence (jax.ops.segment_sum into B * L slots), so a row of packed
  examples counts as its examples, not as one sequence."""
  rows, length, width = a.shape
  starts = jnp.concatenate([jnp.ones((rows, 1), bool),
                            segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  slot = (jnp.arange(rows)[:, None] * length + jnp.cumsum(starts, axis=1) - 1).reshape(-1)
  w = weight.reshape(-1)
  tokens = jax.ops.segment_sum(w, slot, num_segments=rows * length)
  inverse = jnp.where(tokens > 0, 1.0 / jnp.where(tokens > 0, tokens, 1.0), 0.0)[:, None]

  def mean_squares(values):
    sums = jax.ops.segment_sum(values.reshape(-1, width) * w[:, None], slot,
                               num_segments=rows * length)
    return jnp.sum((sums * inverse) ** 2, axis=0)

  return mean_squares(a), mean_squares(jnp.abs(a))


def _batch_stats(cfg: ModelConfig, params, batch):
  """One batch's sums (see the module docstring) per FFN layer, and its loss-token count."""
  names = models.ffn_layer_names(cfg)
  mask = batch["loss_mask"].astype(jnp.float32)
  shape = batch["tokens"].shape
  ones = {n: jnp.ones(shape + (cfg.layer_ffn_widths[ffn.layer_index(n)],), jnp.float32)
          for n in names}

  def capture(module, method_name):
    return method_name == "__call__" and module.name in FFN_INPUT_MODULES

  def loss_fn(scale):
    logits, state = Decoder(cfg).apply(
        {"params": params}, batch["tokens"], batch["segment_ids"], batch["positions"], scale,
        mutable=["intermediates"], capture_intermediates=capture)
    # Summed, not the batch mean: a mean would scale g by 1 / (the batch's loss tokens), so LP
    # would depend on how the calibration rows are batched (see LayerStats.loss_proxy).
    loss = losses.nll(logits, {"targets": batch["targets"], "loss_mask": mask}, "sum")
    return loss, state["intermediates"]

  grads, inter = jax.grad(loss_fn, has_aux=True)(ones)
  stats = {}
  w = mask[..., None]
  for n in names:
    layer = inter[n]
    x = next(layer[k]["__call__"][0] for k in FFN_INPUT_MODULES if k in layer)
    a = layer["mlp"]["inner"][0].astype(jnp.float32)
    ag = grads[n]
    stats[n] = (jnp.sum(x.astype(jnp.float32) ** 2 * w, (0, 1)), jnp.sum(a * w, (0, 1)),
                jnp.sum(a * a * w, (0, 1)), jnp.sum(ag * ag * w, (0, 1)),
                *sequence_mean_squares(a, mask, batch["segment_ids"]))
  return stats, jnp.sum(mask)


_batch_stats_jit = jax.jit(_batch_stats, static_argnums=0)


@functools.lru_cache(maxsize=16)
def _stats_step(cfg: ModelConfig, mesh: Optional[Mesh], rules: Optional[sharding.Rules]):
  """`step(params, batch) -> (stats, count)`: on one device, or on `mesh` with replicated
  results (readable from every process) and activations constrained by `rules`."""
  if mesh is None:
    return functools.partial(_batch_stats_jit, cfg)
  from maxnucl.evaluation import perplexity as heldout  # pylint: disable=import-outside-toplevel
  jitted = jax.jit(functools.partial(_batch_stats, cfg),
                   out_shardings=NamedSharding(mesh, PartitionSpec()))

  def step(params, batch):
    with sharding.activate(mesh, rules):
      return jitted(heldout.place_params(cfg, params, mesh, rules), batch)
  return step


def _range_checked(batches: Iterable[dict], vocab_size: int, prefix: str = "") -> Iterator[dict]:
  """`batches`, each refused (CalibrationError) when an id lies outside [0, vocab_size): a
  generator or a registered task reaches the model only through here."""
  for index, batch in enumerate(batches):
    check_token_ids(batch, vocab_size, f"{prefix}batch {index}")
    yield batch


def collect_stats(cfg: ModelConfig, params: dict, batches: Iterable[dict], *,
                  mesh: Optional[Mesh] = None, rules: Optional[sharding.Rules] = None
                  ) -> dict[str, LayerStats]:
  """Per-FFN-layer LayerStats accumulated over `batches` (host batches, as `iterate_batches`
  yields them).  `mesh`/`rules`: run sharded (module docstring); `params` should then be the
  sharded arrays `checkpoints.load(path, mesh=mesh, rules=rules)` returns (host arrays are
  placed first)."""
  from maxnucl.evaluation import perplexity as heldout  # pylint: disable=import-outside-toplevel
  if mesh is not None and rules is None:
    rules = sharding.logical_axis_rules()
  step = _stats_step(cfg, mesh, rules)
  totals: Optional[dict] = None
  count = 0.0
  for batch in _range_checked(batches, cfg.vocab_size, "the calibration source, "):
    stats, n = step(params, heldout.global_batch(batch, mesh, rules))
    stats = jax.tree.map(lambda x: np.asarray(x, np.float64), stats)
    totals = stats if totals is None else jax.tree.map(np.add, totals, stats)
    count += float(n)
  if totals is None or count == 0:
    raise CalibrationError("the calibration source yielded no (unmasked) tokens")
  return {n: LayerStats(count, *v) for n, v in totals.items()}


def perplexity(cfg: ModelConfig, params: dict, batches: Iterable[dict], *,
               mesh: Optional[Mesh] = None, rules: Optional[sharding.Rules] = None
               ) -> dict[str, float]:
  """exp(mean next-token NLL over masked-in tokens): `maxnucl.evaluation.perplexity`'s held-out
  NLL, the one the trainer and the evaluator use (`mesh`/`rules` as in `collect_stats`)."""
  from maxnucl.evaluation import perplexity as heldout  # pylint: disable=import-outside-toplevel
  try:
    return heldout.heldout_nll(cfg, params, _range_checked(batches, cfg.vocab_size),
                               mesh=mesh, rules=rules)
  except ValueError as e:
    raise CalibrationError(f"the evaluation source: {e}") from None
