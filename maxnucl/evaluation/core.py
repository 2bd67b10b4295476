"""What every benchmark shares: a model that turns text into text or scores, and the resumable
loop that writes `predictions.jsonl` and `results.json`.

    model = LanguageModel.load(checkpoint, vocab="tokenizer.model")
    results = run_benchmark(GSM8K(), model, "out/gsm8k", limit=100)

A benchmark (`Benchmark`) lists its examples (each with a unique "id"), turns a chunk of them into
prediction records with the model (one JSON object per example: id, prompt, raw output,
extracted answer, reference, correct/score, ...), and reduces all records to metrics.
`run_benchmark` appends each finished chunk to `predictions.jsonl` (flushed and fsynced), so an
interrupted run continues where it stopped: examples whose id is already there are skipped.
`run.json` records what decides them (`run_record`: benchmark, settings, checkpoint, limit); a
folder holding a run of other settings or a larger limit is refused (`check_resumable`).
Everything a run reads is validated before anything is loaded or written (`prepare_run`): the
benchmark's examples (its data files), run.json, and every resumed record, which the benchmark
scores again from its stored output and the reference (`rescore`); a record that disagrees is
refused, naming the file, the line and the field.
With several processes (maxnucl.distributed) every process runs the same loop (the model calls
are collective); process 0 alone reads and writes the files and shows the progress bar, and
sends the predictions it resumes to the others so that all evaluate the same examples.
The loop writes a local folder (it appends to predictions.jsonl, and a bucket object cannot be
appended to); `written_to(url)` gives one whose files are published to a URL when it is done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import tempfile
import time
from typing import Any, Iterable, Optional, Protocol, Sequence

import jax
import numpy as np

from maxnucl import decoding, distributed, outputs, paths
from maxnucl.data import sources, vocabularies
from maxnucl.models.config import ModelConfig

PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"
RUN = "run.json"


class EvaluationError(ValueError):
  """A benchmark cannot run as configured (the message names the setting or file)."""


@dataclasses.dataclass
class LanguageModel:
  """A model ready for evaluation: text prompts in, text or log-likelihoods out.

  Prompts are encoded as the trainer formats examples: [BOS] + tokens (`add_bos`; None: as the
  tokenizer's model expects, `vocabularies.bos_prefix`; SmolLM2, Qwen2: no BOS).  A prompt
  longer than the room left for generation loses its start (as the evaluation harnesses do).
  """
  cfg: ModelConfig
  params: dict
  tokenizer: vocabularies.Tokenizer
  batch_size: int = 16
  mesh: Any = None
  rules: Any = None
  add_bos: Optional[bool] = None

  def __post_init__(self):
    if self.add_bos is None:
      self.add_bos = self.tokenizer.add_bos

  @classmethod
  def load(cls, checkpoint: str, vocab: str = vocabularies.BYTE_VOCAB_NAME, *,
           dtype: Optional[str] = None, batch_size: int = 16, mesh=None,
           rules=None) -> "LanguageModel":
    from maxnucl.generate import load_model, load_tokenizer  # pylint: disable=import-outside-toplevel
    cfg, params = load_model(checkpoint, dtype=dtype, mesh=mesh, rules=rules)
    return cls(cfg, params, load_tokenizer(cfg, vocab), batch_size=batch_size, mesh=mesh,
               rules=rules)

  def encode(self, text: str) -> list[int]:
    ids = self.tokenizer.encode(text)
    return [self.tokenizer.bos_id] + ids if self.add_bos else ids

  def generate(self, prompts: Sequence[str], *, max_new_tokens: int,
               stop_strings: Sequence[str] = (), temperature: float = 0.0,
               top_p: Optional[float] = None, seed: int = 0) -> list[str]:
    """The text each prompt continues with, up to and including the first stop string (or
    EOS, or `max_new_tokens`); `cut_at_stop` removes the stop string.  `top_p`: nucleus
    sampling (with `temperature` > 0)."""
    room = self.cfg.max_positions - max_new_tokens
    if room < 1:
      raise EvaluationError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt within "
                            f"the model's max_positions {self.cfg.max_positions}")
    encoded = [self.encode(p)[-room:] for p in prompts]
    outputs = decoding.generate(
        self.cfg, self.params, encoded, max_new_tokens, temperature=temperature, top_p=top_p,
        seed=seed,
        stop_token_ids=[self.tokenizer.eos_id], stop_strings=list(stop_strings) or None,
        tokenizer=self.tokenizer, mesh=self.mesh, rules=self.rules, batch_size=self.batch_size)
    return [self.tokenizer.decode(tokens) for tokens in outputs]

  def loglikelihoods(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[float]:
    """log p(continuation | context) of each pair.  The continuation's tokens are those of
    context + continuation after the context's (tokenizers may merge across the boundary)."""
    context_ids, continuation_ids = [], []
    for context, continuation in zip(contexts, continuations):
      ctx = self.encode(context)
      cont = self.encode(context + continuation)[len(ctx):]
      ctx = ctx or [self.tokenizer.bos_id]  # something to condition the first token on
      keep = max(self.cfg.max_positions + 1 - len(cont), 1)  # left-truncate long contexts
      context_ids.append(ctx[-keep:])
      continuation_ids.append(cont)
    return decoding.score(self.cfg, self.params, context_ids, continuation_ids,
                          batch_size=self.batch_size, mesh=self.mesh, rules=self.rules)


class Benchmark(Protocol):
  """One evaluation protocol (GSM8K, MBPP, SuperGLUE, perplexity)."""
  name: str

  def examples(self) -> list[dict]:
    """The evaluation examples in a fixed order, each with a unique string "id"."""

  def predict(self, model: LanguageModel, examples: list[dict]) -> list[dict]:
    """One JSON-serialisable prediction record per example (same order), each with its "id"."""

  def metrics(self, records: list[dict]) -> dict[str, float]:
    """Metrics over the records of every example evaluated."""

  def settings(self) -> dict:
    """The settings that decide the predictions (a resumed run must use the same)."""

  # Optionally `describe() -> str`: one line saying what is evaluated and how, which
  # `python -m maxnucl.evaluate` prints before it starts; and `rescore(example, record) -> dict`:
  # the record `predict` would write for `example` given the resumed record's stored output
  # (and, where the verdict needs the model or the sandbox, its stored scores or verdict, checked
  # for consistency), raising EvaluationError("field 'x' = ...; expected ...") where a stored
  # value has the wrong type or range.  A resumed record must equal it (`check_resumed`).


@dataclasses.dataclass
class PreparedRun:
  """What a run reads, validated (`prepare_run`), before the model is loaded or a file written."""
  examples: list[dict]
  done: dict[str, dict]  # id -> resumed record
  run: dict  # run.json's content
  keep_bytes: Optional[int] = None  # predictions.jsonl's length without an interrupted last line
  available: int = 0  # the benchmark's examples before `limit`


def prepare_run(benchmark: Benchmark, output_dir: Optional[str | os.PathLike], *,
                limit: Optional[int] = None, checkpoint: str = "") -> PreparedRun:
  """The examples to evaluate (the benchmark's data files read and validated) and the records
  OUTPUT_DIR resumes (run.json and predictions.jsonl validated, every record scored again; none
  when `output_dir` is None); raises EvaluationError / MalformedRecordError naming the file, line
  and field.  Nothing is written.  With several processes, process 0 reads OUTPUT_DIR."""
  check_limit(limit)
  examples = benchmark.examples()
  available = len(examples)
  if limit is not None:
    examples = examples[:limit]
  ids = [str(e["id"]) for e in examples]
  if len(set(ids)) != len(ids):
    raise EvaluationError(f"benchmark {benchmark.name!r} has duplicate example ids")
  run = run_record(benchmark, checkpoint, limit)
  if output_dir is None:
    return PreparedRun(examples, {}, run, available=available)
  output_dir = _local_folder(output_dir)

  def resumed():
    check_resumable(output_dir, run)
    path = output_dir / PREDICTIONS
    lines, keep = read_prediction_lines(path)
    return {"done": check_resumed(benchmark, examples, lines, path), "keep": keep}

  read = from_primary(resumed)
  return PreparedRun(examples, read["done"], run, read["keep"], available)


def check_limit(limit: Optional[int], name: str = "limit") -> None:
  """Refuse a limit that is not None or an integer >= 1 (a slice would take 0 examples, or
  all but the last |limit|)."""
  if limit is not None and (type(limit) is not int or limit < 1):
    raise EvaluationError(f"{name} {limit!r}; expected an integer >= 1")


def run_benchmark(benchmark: Benchmark, model: LanguageModel, output_dir: str | os.PathLike, *,
                  limit: Optional[int] = None, chunk_size: Optional[int] = None,
                  progress: bool = True, checkpoint: str = "", gin_config: str = "",
                  write_files: bool = True, prepared: Optional[PreparedRun] = None) -> dict:
  """Evaluates (the first `limit` of) `benchmark.examples()`; returns the results dict.

  With `write_files`, records go to OUTPUT_DIR/predictions.jsonl as they are produced (examples
  already there are skipped: an interrupted run resumes) and the results to results.json (by
  process 0 only when several processes run; every process returns the same results).
  `prepared`: what `prepare_run` read and validated (default: read now, before any file is
  written).
  """
  start = time.time()
  prepared = prepared or prepare_run(benchmark, output_dir if write_files else None,
                                     limit=limit, checkpoint=checkpoint)
  examples, done = prepared.examples, prepared.done
  ids = [str(e["id"]) for e in examples]
  output_dir = _local_folder(output_dir) if write_files else pathlib.Path(output_dir)
  primary = distributed.is_primary()
  write_files = write_files and primary
  if write_files:  # only now, everything read having been validated
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_json_atomically(output_dir / RUN, prepared.run)  # new, the same, or a larger limit
    _repair_tail(output_dir / PREDICTIONS, prepared.keep_bytes)
  todo = [e for e in examples if str(e["id"]) not in done]
  resumed = len(examples) - len(todo)
  chunk_size = chunk_size or max(model.batch_size * 4, 16)
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(total=len(examples), initial=resumed, desc=benchmark.name, unit="ex",
             disable=not progress or not primary, dynamic_ncols=True)
  new: dict[str, dict] = {}
  # unbuffered: a failed write fails here, naming the file, not again when the file is closed
  with (output_dir / PREDICTIONS).open("ab", buffering=0) if write_files else _NullFile() as sink:
    for start_index in range(0, len(todo), chunk_size):
      chunk = todo[start_index:start_index + chunk_size]
      records = benchmark.predict(model, chunk)
      if [str(r["id"]) for r in records] != [str(e["id"]) for e in chunk]:
        raise EvaluationError(f"benchmark {benchmark.name!r} returned records out of order")
      for record in records:
        new[str(record["id"])] = record
      data = memoryview("".join(json.dumps(r, ensure_ascii=False) + "\n"
                                for r in records).encode())
      with outputs.naming_errors(output_dir / PREDICTIONS):
        while data:  # an unbuffered write may write less than asked
          data = data[sink.write(data):]
        if write_files:
          os.fsync(sink.fileno())
      bar.update(len(chunk))
  bar.close()
  records = [done.get(i) or new[i] for i in ids]
  results = {
      "benchmark": benchmark.name, "metrics": benchmark.metrics(records),
      "num_examples": len(records), "num_resumed": resumed, "limit": limit,
      "settings": benchmark.settings(), "checkpoint": str(checkpoint),
      "model": model.cfg.name, "gin_config": gin_config,
      "elapsed_s": round(time.time() - start, 3)}
  if write_files:
    _write_json_atomically(output_dir / RESULTS, results)
  return results


def _local_folder(output_dir: str | os.PathLike) -> pathlib.Path:
  """`output_dir` as a local folder; a URL is refused (pathlib would write a local folder named
  "gs:")."""
  if paths.is_url(output_dir):
    raise EvaluationError(f"{output_dir}: the evaluation loop writes a local folder; for a URL "
                          f"run it in `written_to(url)`")
  return pathlib.Path(output_dir)


@contextlib.contextmanager
def written_to(folder: str | os.PathLike, *, overwrite: bool = False):
  """The folder a benchmark run writes into: `folder` itself if local.  For a URL, a new local
  temporary folder whose files process 0 publishes to `folder` when the block ends without an
  error (`outputs.publish`: copied, results.json after run.json and predictions.jsonl, the
  commit marker last; an existing `folder` is replaced only with `overwrite`, else
  FileExistsError).  An error inside publishes nothing.  Nothing is resumed from a URL: the
  temporary folder starts empty."""
  if not paths.is_url(folder):
    yield folder
    return
  url = paths.as_path(folder)
  with tempfile.TemporaryDirectory(prefix="maxnucl-eval-") as local:
    yield pathlib.Path(local)
    if distributed.is_primary():
      outputs.publish(pathlib.Path(local), url, overwrite, last=(RUN, PREDICTIONS, RESULTS))


def _repair_tail(path: pathlib.Path, keep_bytes: Optional[int]) -> None:
  """Make predictions.jsonl end where a record ends, before records are appended: an
  interrupted last line is dropped (its example is evaluated again), and a complete last record
  without its newline (a run stopped between the two) gets it, so that the next record starts a
  line of its own."""
  if keep_bytes is None or not path.exists():
    return
  if path.stat().st_size > keep_bytes:
    logging.warning("%s: dropping the incomplete last line (the run was interrupted while "
                    "writing it); its example is evaluated again", path)
    os.truncate(path, keep_bytes)
  if keep_bytes:
    with path.open("rb+") as f:
      f.seek(keep_bytes - 1)
      if f.read(1) != b"\n":
        f.write(b"\n")
        f.flush()
        os.fsync(f.fileno())


def from_primary(compute):
  """`compute()` (JSON-serialisable) as process 0 computes it, on every process.  An
  EvaluationError or OSError raised there is raised there and, as an EvaluationError with its
  message, on every other process (none is left waiting).  A single process just calls it."""
  if jax.process_count() == 1:
    return compute()
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  payload, error = b"", None
  if distributed.is_primary():
    try:
      payload = json.dumps({"value": compute()}).encode()
    except (EvaluationError, OSError) as e:
      payload, error = json.dumps({"error": f"process 0: {e}"}).encode(), e
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
  buffer = np.zeros(size, np.uint8)
  buffer[:len(payload)] = np.frombuffer(payload, np.uint8)
  message = json.loads(bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer),
                                        np.uint8)))
  if error is not None:
    raise error
  if "error" in message:
    raise EvaluationError(message["error"])
  return message["value"]


def read_prediction_lines(path: pathlib.Path) -> tuple[list[tuple[int, dict]], int]:
  """([(line number, record)], the file's length in bytes without an interrupted last line) of a
  predictions.jsonl ([], 0 if there is none).  Only a last line without its newline that is not
  valid JSON counts as interrupted (a run killed while writing it); anything else that is not
  UTF-8 text or a JSON object is an EvaluationError naming the file and the line."""
  if not path.exists():
    return [], 0
  try:
    data = path.read_bytes()
  except OSError as e:
    raise EvaluationError(f"{path}: cannot be read ({e.strerror or e})") from None
  parts = data.split(b"\n")  # JSON lines end in "\n" only
  lines = [part + b"\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])
  out, keep = [], len(data)
  for number, raw in enumerate(lines, 1):
    where = f"{path}, line {number}"
    try:
      line = sources.decode_line(raw, where, EvaluationError)
      if not line.strip():
        continue
      record = sources.json_object(line, where, EvaluationError)
    except EvaluationError:
      if number == len(lines) and not raw.endswith(b"\n") and not _parses(raw):
        keep = len(data) - len(raw)  # a run killed while writing its last line
        break
      raise
    out.append((number, record))
  return out, keep


def _parses(raw: bytes) -> bool:
  try:
    json.loads(raw)
  except (ValueError, RecursionError):
    return False
  return True


def read_predictions(path: pathlib.Path) -> dict[str, dict]:
  """id -> record of a predictions.jsonl (an interrupted last line left out); a line that is not
  a JSON object with an "id" is an error naming the line."""
  lines, _ = read_prediction_lines(path)
  out = {}
  for number, record in lines:
    if "id" not in record:
      raise EvaluationError(f"{path}, line {number}: missing field 'id'")
    out[str(record["id"])] = record
  return out


def check_resumed(benchmark: Benchmark, examples: list[dict], lines: list[tuple[int, dict]],
                  path: pathlib.Path) -> dict[str, dict]:
  """id -> record of the resumed `lines`, each checked: its "id" one of `examples`' (once), and
  the record equal to what the benchmark's `rescore` makes of its stored output.  Raises
  EvaluationError naming the file, the line and the first field that disagrees."""
  by_id = {str(e["id"]): e for e in examples}
  done: dict[str, dict] = {}
  for number, record in lines:
    where = f"{path}, line {number}"
    key = record.get("id")
    if isinstance(key, int) and not isinstance(key, bool):
      key = str(key)  # a benchmark whose ids are numbers
    if not isinstance(key, str) or key not in by_id:
      shown = list(by_id)[:3]
      raise EvaluationError(f"{where}: field 'id' = {_shown(record.get('id'))}; expected one of "
                            f"the {len(by_id)} example ids of this run ({', '.join(shown)}"
                            f"{', ...' if len(by_id) > 3 else ''})")
    if key in done:
      raise EvaluationError(f"{where}: field 'id' = {key!r}; expected each example once (it "
                            f"was on an earlier line)")
    rescore = getattr(benchmark, "rescore", None)
    if rescore is not None:
      try:
        expected = json.loads(json.dumps(rescore(by_id[key], record)))
      except EvaluationError as e:
        raise EvaluationError(f"{where}: {e}") from None
      for field in sorted(set(expected) | set(record), key=lambda f: (f not in expected, f)):
        if _json_text(record.get(field, _MISSING)) != _json_text(expected.get(field, _MISSING)):
          raise EvaluationError(
              f"{where}: field {field!r} = {_shown(record.get(field, _MISSING))}; expected "
              f"{_shown(expected.get(field, _MISSING))} (scored again from the stored output "
              f"and the reference; pass --overwrite to evaluate afresh)")
    done[key] = record
  return done


class _Missing:
  def __repr__(self):
    return "(absent)"


_MISSING = _Missing()


def _json_text(value: Any) -> str:
  """Values compared as JSON spells them: true is not 1, 1.0 is not 1."""
  return "(absent)" if value is _MISSING else json.dumps(value, sort_keys=True)


def _shown(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 80 else text[:77] + "..."


def stored(record: dict, field: str, kind: type | tuple[type, ...], expected: str) -> Any:
  """A resumed record's field, checked to be a `kind` (never a bool where a number is meant);
  raises EvaluationError("field ... = ...; expected `expected`")."""
  value = record.get(field, _MISSING)
  if value is _MISSING:
    raise EvaluationError(f"missing field {field!r}")
  kinds = kind if isinstance(kind, tuple) else (kind,)
  if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
    raise EvaluationError(f"field {field!r} = {_shown(value)}; expected {expected}")
  return value


def stored_count(record: dict, field: str) -> float:
  """A stored count of tokens or a sum of NLLs: a finite number >= 0."""
  value = stored(record, field, (int, float), "a finite number >= 0")
  if not math.isfinite(value) or value < 0:
    raise EvaluationError(f"field {field!r} = {_shown(value)}; expected a finite number >= 0")
  return value


def run_record(benchmark: Benchmark, checkpoint: str, limit: Optional[int]) -> dict:
  """What decides a run's predictions and results (OUTPUT_DIR/run.json): a run resumes only the
  predictions of the same."""
  return {"benchmark": benchmark.name, "settings": benchmark.settings(),
          "checkpoint": str(checkpoint), "limit": limit}


def conflicting_settings(output_dir: str | os.PathLike, run: dict) -> dict[str, tuple]:
  """{setting: (value in OUTPUT_DIR/run.json, value in `run`)} of the settings that keep `run`
  from resuming what the folder holds, a benchmark's own as "settings.<name>" ({} when it holds
  no run).  A larger (or no) limit does not conflict: it reuses the predictions and adds more."""
  path = pathlib.Path(output_dir) / RUN
  if not path.exists():
    return {}
  there, now = _flat(read_run_record(path)), _flat(json.loads(json.dumps(run)))
  changed = {k: (there.get(k), now.get(k)) for k in sorted(set(there) | set(now))
             if json.dumps(there.get(k), sort_keys=True) != json.dumps(now.get(k), sort_keys=True)}
  if "limit" in changed:
    limit_there, limit_now = changed["limit"]
    if limit_now is None or (isinstance(limit_there, int) and isinstance(limit_now, int)
                             and limit_now > limit_there):
      del changed["limit"]
  return changed


RUN_FIELDS = ("benchmark", "settings", "checkpoint", "limit")


def read_run_record(path: pathlib.Path) -> dict:
  """OUTPUT_DIR/run.json as `run_record` writes it: a JSON object with the benchmark's name, its
  settings (an object), the checkpoint and the limit (null or an integer >= 1); anything else is
  an EvaluationError naming the file."""
  try:
    data = path.read_bytes()
  except OSError as e:
    raise EvaluationError(f"{path}: cannot be read ({e.strerror or e})") from None
  run = sources.json_object(sources.decode_line(data, str(path), EvaluationError), str(path),
                            EvaluationError)
  missing = [f for f in RUN_FIELDS if f not in run]
  if missing:
    raise EvaluationError(f"{path}: missing field(s) {', '.join(missing)}")
  checks = {"benchmark": (isinstance(run["benchmark"], str), "a string"),
            "settings": (isinstance(run["settings"], dict), "a JSON object"),
            "checkpoint": (isinstance(run["checkpoint"], str), "a string"),
            "limit": (run["limit"] is None or (type(run["limit"]) is int and run["limit"] >= 1),
                      "null or an integer >= 1")}
  for field, (ok, expected) in checks.items():
    if not ok:
      raise EvaluationError(f"{path}: field {field!r} = {_shown(run[field])}; expected "
                            f"{expected}")
  return run


def check_resumable(output_dir: str | os.PathLike, run: dict) -> None:
  """Refuse (EvaluationError, one line naming the folder and the differing settings) to write
  `run` into a folder that holds a run it cannot resume: its results would be replaced by those
  of fewer examples or other settings, or its predictions mixed with others."""
  changed = conflicting_settings(output_dir, run)
  if changed:
    differences = "; ".join(f"{k}: {there!r} there, {now!r} now"
                            for k, (there, now) in changed.items())
    raise EvaluationError(f"{output_dir} holds the evaluation of other settings ({differences}); "
                          f"pass --overwrite to replace it, or choose another --output")


def _flat(run: dict) -> dict:
  out = {k: v for k, v in run.items() if k != "settings"}
  out.update({f"settings.{k}": v for k, v in (run.get("settings") or {}).items()})
  return out


def _write_json_atomically(path: pathlib.Path, data: Any) -> None:
  outputs.write_file_atomically(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


class _NullFile:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False

  def write(self, data):
    return len(data)


def chunked(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
  for start in range(0, len(items), size):
    yield items[start:start + size]
