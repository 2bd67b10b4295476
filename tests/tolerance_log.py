"""How close each numeric comparison of the suite comes to its bound (the tolerance audit).

With `MAXNUCL_TOLERANCE_LOG=FILE` set, conftest.py installs `install(FILE)`: every
`np.testing.assert_allclose` and every `pytest.approx` comparison appends one JSON line to FILE
with the test, the comparing line and `ratio` = max |actual - expected| / (atol + rtol |expected|)
over the elements (0: equal; 1: at the bound; > 1: failed).  `python tests/tolerance_log.py FILE
[FILE ...]` prints every comparing line's largest ratio across the runs, largest first; the
suite's rule (tests/README.md) asks for every ratio <= 0.1.
"""

import collections
import json
import os
import sys
import traceback

import numpy as np

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def _call_site() -> str:
  """file:line of the innermost frame in a test module (not this file, not pytest's)."""
  for frame in reversed(traceback.extract_stack()[:-2]):
    if frame.filename.startswith(TESTS_DIR) and not frame.filename.endswith("tolerance_log.py"):
      return f"{os.path.relpath(frame.filename, TESTS_DIR)}:{frame.lineno}"
  return "?"


def _ratio(actual, expected, atol: float, rtol: float) -> float:
  try:
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    a, e = np.broadcast_arrays(a, e)
  except (TypeError, ValueError):
    return float("nan")
  finite = np.isfinite(a) & np.isfinite(e)
  if not finite.any():
    return 0.0
  difference = np.abs(a[finite] - e[finite])
  bound = atol + rtol * np.abs(e[finite])
  with np.errstate(divide="ignore", invalid="ignore"):
    ratios = np.where(difference == 0, 0.0, difference / bound)
  return float(ratios.max())


def install(path: str) -> None:
  """Wrap numpy's and pytest's comparisons to append their ratios to `path`."""
  from _pytest import approx as python_api  # pylint: disable=import-outside-toplevel

  def record(ratio: float, kind: str) -> None:
    line = {"test": os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0],
            "site": _call_site(), "kind": kind, "ratio": ratio,
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    with open(path, "a", encoding="utf-8") as f:
      f.write(json.dumps(line) + "\n")

  original_allclose = np.testing.assert_allclose

  def assert_allclose(actual, desired, rtol=1e-7, atol=0, *args, **kwargs):
    record(_ratio(actual, desired, atol, rtol), "assert_allclose")
    return original_allclose(actual, desired, rtol, atol, *args, **kwargs)

  np.testing.assert_allclose = assert_allclose

  original_eq = python_api.ApproxScalar.__eq__

  def approx_eq(self, actual):
    try:
      tolerance = float(self.tolerance)
      ratio = _ratio(actual, self.expected, tolerance, 0.0)
    except (TypeError, ValueError):
      ratio = float("nan")
    record(ratio, "approx")
    return original_eq(self, actual)

  python_api.ApproxScalar.__eq__ = approx_eq


def summarise(paths) -> list[tuple[str, float, int, str]]:
  """(site, largest ratio, comparisons, one test at that ratio) per comparing line."""
  largest = collections.defaultdict(lambda: (-1.0, 0, ""))
  for path in paths:
    with open(path, encoding="utf-8") as f:
      for line in f:
        row = json.loads(line)
        ratio = row["ratio"] if row["ratio"] == row["ratio"] else -1.0
        best, count, test = largest[row["site"]]
        largest[row["site"]] = (max(best, ratio), count + 1,
                                row["test"] if ratio > best else test)
  return sorted(((site, r, n, t) for site, (r, n, t) in largest.items()),
                key=lambda row: -row[1])


if __name__ == "__main__":
  for site, ratio, count, test in summarise(sys.argv[1:]):
    print(f"{ratio:10.3g}  {count:5d}  {site:40s} {test}")
