"""Seeded mutation fuzzing of readers: mutate an input, run the reader in-process, classify what
happened.

Every mutant must end in one of two ways: ACCEPTED (the reader succeeded and the caller's
`valid` check agrees its output is right, or the reference library accepts the mutant too) or
REFUSED (a one-line message naming the file, with the command's exit code 2). Anything else is a
defect: TRACEBACK (an exception escaped), HANG (over the time limit), MODIFIED (the input changed),
PARTIAL_OUTPUT (a refused run left something under the output name), UNNAMED (a refusal that does
not name the file), SILENT (accepted although the output is wrong or the reference library rejects
the input).

The mutators are deterministic given a `numpy.random.Generator`, so a failing mutant is reproduced
by its seed and index, which its name carries.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import signal
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

ACCEPTED, REFUSED = "accepted", "refused"
DEFECTS = ("traceback", "hang", "modified", "partial_output", "unnamed", "silent")

# Values a field of the wrong type or range is replaced with; JSON can spell all of them
# (NaN and Infinity as Python's json module writes them, which many readers accept).
WRONG_VALUES = (None, {}, [], True, False, "x", "", -1, 0, 1, 10**12, 2**63, -(10**12), 1.5,
                float("nan"), float("inf"), [1, 2], {"a": 1})


# ---------------------------------------------------------------------------------------------
# Mutators: (name, mutated value) pairs, deterministic in `rng`.
# ---------------------------------------------------------------------------------------------

def byte_mutants(data: bytes, rng: np.random.Generator, count: int,
                 region: Optional[tuple[int, int]] = None) -> Iterator[tuple[str, bytes]]:
  """`count` mutants of `data`: bit flips, bytes set to 0x00/0xff/random, truncation, a deleted,
  duplicated or inserted run. `region` = (start, end) confines the edits (e.g. to a header)."""
  start, end = region or (0, len(data))
  end = max(end, start + 1)
  for i in range(count):
    op = ("flip", "set", "truncate", "delete", "duplicate", "insert")[rng.integers(6)]
    at = int(rng.integers(start, min(end, len(data)) if len(data) > start else start + 1))
    b = bytearray(data)
    if op == "flip" and at < len(b):
      b[at] ^= 1 << int(rng.integers(8))
    elif op == "set" and at < len(b):
      b[at] = int(rng.choice([0x00, 0xff, int(rng.integers(256))]))
    elif op == "truncate":
      b = b[:at]
    elif op == "delete":
      del b[at:at + int(rng.integers(1, 9))]
    elif op == "duplicate":
      run = b[at:at + int(rng.integers(1, 9))]
      b[at:at] = run
    else:
      b[at:at] = bytes(rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8))
    yield f"{i}:{op}@{at}", bytes(b)


def json_paths(value: Any, prefix: tuple = ()) -> list[tuple]:
  """Every path (tuple of keys / indices) to a value inside nested dicts and lists."""
  paths = []
  if isinstance(value, dict):
    for k, v in value.items():
      paths.append(prefix + (k,))
      paths.extend(json_paths(v, prefix + (k,)))
  elif isinstance(value, list):
    for k, v in enumerate(value):
      paths.append(prefix + (k,))
      paths.extend(json_paths(v, prefix + (k,)))
  return paths


def _parent(value: Any, path: tuple) -> Any:
  for k in path[:-1]:
    value = value[k]
  return value


def json_mutants(value: Any, rng: np.random.Generator, count: int,
                 paths: Optional[Sequence[tuple]] = None) -> Iterator[tuple[str, Any]]:
  """`count` mutants of a JSON value: a field deleted, replaced by a value of another type or
  range (`WRONG_VALUES`), or a number perturbed (negated, off by one, scaled). `paths` restricts
  which fields are touched (default: all)."""
  paths = list(paths if paths is not None else json_paths(value))
  if not paths:
    return
  for i in range(count):
    path = paths[int(rng.integers(len(paths)))]
    mutant = copy.deepcopy(value)
    parent, key = _parent(mutant, path), path[-1]
    old = parent[key]
    op = ("delete", "wrong", "wrong", "perturb")[rng.integers(4)]
    if op == "delete":
      del parent[key]
      desc = "deleted"
    elif op == "perturb" and isinstance(old, (int, float)) and not isinstance(old, bool):
      new = (-old, old + 1, old - 1, old * 1000, old / 2)[rng.integers(5)]
      parent[key] = type(old)(new) if isinstance(old, int) and float(new).is_integer() else new
      desc = f"={parent[key]!r}"
    else:
      parent[key] = copy.deepcopy(WRONG_VALUES[int(rng.integers(len(WRONG_VALUES)))])
      desc = f"={parent[key]!r}"
    yield f"{i}:{'/'.join(map(str, path))}{desc}", mutant


def text_mutants(text: str, rng: np.random.Generator, count: int) -> Iterator[tuple[str, bytes]]:
  """Line-level mutants of a text file (as bytes): a line dropped, duplicated, truncated, emptied,
  swapped with the next, or given non-UTF-8 bytes."""
  lines = text.splitlines(keepends=True) or [""]
  for i in range(count):
    at = int(rng.integers(len(lines)))
    new = list(lines)
    op = ("drop", "duplicate", "truncate", "empty", "swap", "non_utf8")[rng.integers(6)]
    if op == "drop":
      del new[at]
    elif op == "duplicate":
      new.insert(at, new[at])
    elif op == "truncate":
      new[at] = new[at][:int(rng.integers(len(new[at]) + 1))]
    elif op == "empty":
      new[at] = "\n"
    elif op == "swap" and at + 1 < len(new):
      new[at], new[at + 1] = new[at + 1], new[at]
    encoded = [s.encode() for s in new]
    if op == "non_utf8":
      encoded[at] = b"\xff\xfe" + encoded[at]
    yield f"{i}:line{at + 1}:{op}", b"".join(encoded)


def dumps(value: Any) -> str:
  """JSON as Python writes it, NaN and Infinity included (the readers must refuse those)."""
  return json.dumps(value)


# ---------------------------------------------------------------------------------------------
# Running a reader and classifying the outcome.
# ---------------------------------------------------------------------------------------------

def tree_digest(path: os.PathLike) -> dict[str, str]:
  """sha256 of every file under `path` (or of `path` itself), by relative name."""
  path = Path(path)
  if path.is_file():
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
  if not path.exists():
    return {}
  return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(path.rglob("*")) if p.is_file()}


class _Hang(BaseException):
  """Raised by the alarm; a BaseException so that readers' `except Exception` does not eat it."""


@contextlib.contextmanager
def time_limit(seconds: float):
  def on_alarm(signum, frame):
    raise _Hang()
  previous = signal.signal(signal.SIGALRM, on_alarm)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


@dataclasses.dataclass
class Run:
  """What one in-process call of a command's `main(argv)` did."""
  exit_code: Optional[int]  # None when an exception escaped or it hung
  stdout: str
  stderr: str
  error: str = ""  # the escaped exception's traceback, or "hang"


def run_main(main: Callable[[Sequence[str]], int], argv: Sequence[str], timeout_s: float) -> Run:
  """Calls a CLI's `main(argv)` with stdout/stderr captured; SystemExit gives the exit code."""
  out, err = io.StringIO(), io.StringIO()
  code, error = None, ""
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _own_logging():
    try:
      with time_limit(timeout_s):
        code = main(list(argv))
        code = 0 if code is None else int(code)
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except _Hang:
      error = "hang"
    except Exception:  # noqa: BLE001 - classified below
      error = traceback.format_exc()
  return Run(code, out.getvalue(), err.getvalue(), error)


@contextlib.contextmanager
def _own_logging():
  """The root logger without the handlers earlier tests left on it (one bound to a stream that is
  closed by now prints '--- Logging error ---' and a traceback into the captured stderr): the
  command's own `logging.basicConfig` then installs its handler on this run's stderr."""
  root = logging.getLogger()
  saved, level = root.handlers[:], root.level
  root.handlers = []
  try:
    yield
  finally:
    root.handlers, root.level = saved, level


def refusal_lines(stderr: str) -> list[str]:
  """The message lines of a refusal: stderr without argparse's usage block, warnings and
  progress bars (tqdm writes carriage returns), which may precede the error line."""
  lines = [l for l in stderr.replace("\r", "\n").splitlines() if l.strip()]
  if lines and lines[0].startswith("usage:"):
    lines = lines[1:]
    while lines and lines[0].startswith(" "):
      lines = lines[1:]
  return [l for l in lines if not l.startswith("warning:") and "it/s" not in l
          and "s/it" not in l and not l.lstrip().startswith(("0%", "100%"))]


def classify(run: Run, names: Sequence[str], input_before: dict, input_after: dict,
             output: Optional[os.PathLike] = None,
             valid: Optional[Callable[[], Optional[str]]] = None) -> tuple[str, str]:
  """(outcome, detail) for one mutant's run.

  names: strings of which the refusal must contain at least one (the file's name, a field).
  valid: called after a successful run; returns None when the output is right, else why not.
  """
  if input_after != input_before:
    changed = sorted(set(input_before.items()) ^ set(input_after.items()))
    return "modified", str(changed[:3])
  if run.error == "hang":
    return "hang", ""
  if run.error:
    return "traceback", run.error.strip().splitlines()[-1]
  if run.exit_code == 0:
    problem = valid() if valid else None
    return ("silent", problem) if problem else (ACCEPTED, "")
  if output is not None and Path(output).exists():
    return "partial_output", str(output)
  lines = refusal_lines(run.stderr)
  if run.exit_code != 2 or len(lines) != 1:
    return "traceback", f"exit {run.exit_code}: {lines[-3:]}"
  if not any(str(n) in lines[0] for n in names):
    return "unnamed", lines[0]
  return REFUSED, lines[0]


@dataclasses.dataclass
class Tally:
  """Outcome counts for one reader, with the first few examples of each defect."""
  reader: str
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  examples: dict = dataclasses.field(default_factory=lambda: collections.defaultdict(list))

  def add(self, mutant: str, outcome: str, detail: str = ""):
    self.counts[outcome] += 1
    if outcome not in (ACCEPTED, REFUSED) and len(self.examples[outcome]) < 5:
      self.examples[outcome].append(f"{mutant}: {detail}")

  @property
  def defects(self) -> int:
    return sum(self.counts[d] for d in DEFECTS)

  def report(self) -> str:
    total = sum(self.counts.values())
    parts = [f"{self.reader}: {total} mutants"] + [
        f"{k} {self.counts[k]}" for k in (ACCEPTED, REFUSED) + DEFECTS if self.counts[k]]
    lines = [", ".join(parts)]
    for kind, examples in self.examples.items():
      lines += [f"  {kind}: {e}" for e in examples]
    return "\n".join(lines)

  def record(self):
    """Appends the counts to $MAXNUCL_FUZZ_RECORD (a jsonl file) when set: the docs' reliability
    table is made from it (`tests/fuzz_table.py`)."""
    target = os.environ.get("MAXNUCL_FUZZ_RECORD")
    if target:
      with open(target, "a") as f:
        f.write(json.dumps({"reader": self.reader, **dict(self.counts)}) + "\n")

  def assert_clean(self):
    self.record()
    print(self.report())
    assert self.defects == 0, self.report()


def is_finite_json(value: Any) -> bool:
  """True when no number inside `value` is NaN or infinite."""
  if isinstance(value, float):
    return math.isfinite(value)
  if isinstance(value, dict):
    return all(is_finite_json(v) for v in value.values())
  if isinstance(value, list):
    return all(is_finite_json(v) for v in value)
  return True
