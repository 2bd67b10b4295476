"""The fuzz framework's own specification (tests/fuzzing.py): each outcome is told apart on
constructed readers, and the mutators are deterministic in their seed."""

import io
import logging
import sys
import time

import numpy as np

import fuzzing
import fuzz_table


def _reader(kind):
  def main(argv):
    path = argv[0]
    if kind == "refuses":
      print(f"error: {path}: field 'x' must be an integer", file=sys.stderr)
      return 2
    if kind == "refuses_unnamed":
      print("error: expected an integer", file=sys.stderr)
      return 2
    if kind == "raises":
      return {}["missing"]
    if kind == "hangs":
      while True:
        time.sleep(0.01)
    if kind == "writes_output":
      with open(argv[1], "w") as f:
        f.write("half")
      print(f"error: {path}: bad", file=sys.stderr)
      return 2
    if kind == "modifies_input":
      with open(path, "a") as f:
        f.write("!")
    return 0
  return main


def _outcome(kind, tmp_path, valid=None):
  source, output = tmp_path / "input.json", tmp_path / "out"
  source.write_text("{}")
  before = fuzzing.tree_digest(source)
  run = fuzzing.run_main(_reader(kind), [str(source), str(output)], timeout_s=0.5)
  return fuzzing.classify(run, [source.name], before, fuzzing.tree_digest(source), output,
                          valid)[0]


def test_each_outcome_is_told_apart(tmp_path):
  assert _outcome("accepts", tmp_path) == fuzzing.ACCEPTED
  assert _outcome("accepts", tmp_path, valid=lambda: "output holds NaN") == "silent"
  assert _outcome("refuses", tmp_path) == fuzzing.REFUSED
  assert _outcome("refuses_unnamed", tmp_path) == "unnamed"
  assert _outcome("raises", tmp_path) == "traceback"
  assert _outcome("hangs", tmp_path) == "hang"
  assert _outcome("writes_output", tmp_path) == "partial_output"
  assert _outcome("modifies_input", tmp_path) == "modified"


def test_mutants_are_deterministic_in_the_seed_and_differ_from_the_input():
  data, value = bytes(range(64)), {"a": 1, "b": [1.5, {"c": "x"}]}
  for make in (lambda rng: list(fuzzing.byte_mutants(data, rng, 50)),
               lambda rng: list(fuzzing.json_mutants(value, rng, 50)),
               lambda rng: list(fuzzing.text_mutants("a\nb\nc\n", rng, 50))):
    first, again = make(np.random.default_rng(7)), make(np.random.default_rng(7))
    assert first == again and first != make(np.random.default_rng(8))
  assert sum(m != data for _, m in fuzzing.byte_mutants(data, np.random.default_rng(0), 50)) >= 45
  # A perturbation can leave a number equal (0 * 1000): nearly all mutants still differ.
  assert sum(m != value for _, m in fuzzing.json_mutants(value, np.random.default_rng(0), 50)) >= 45


def test_the_table_sums_runs_of_a_reader():
  lines = ['{"reader": "r", "accepted": 2, "refused": 3}', '{"reader": "r", "refused": 1}',
           '{"reader": "q", "traceback": 1}']
  rows = fuzz_table.table(lines).splitlines()
  assert rows[2].startswith("| q | 1 | 0 | 0 | 1 |")
  assert rows[3].startswith("| r | 6 | 2 | 4 | 0 |")


def test_a_handler_left_on_a_closed_stream_does_not_turn_a_refusal_into_a_traceback(tmp_path):
  # An earlier test's logging handler bound to a stream closed since then: Python's logging
  # would print '--- Logging error ---' and a traceback into the captured stderr.
  closed = io.StringIO()
  stale = logging.StreamHandler(closed)
  closed.close()
  logging.getLogger().addHandler(stale)

  def main(argv):
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    logging.getLogger("maxnucl.x").warning("%s: no tokenizer metadata", argv[0])
    print(f"error: {argv[0]}: bad", file=sys.stderr)
    return 2
  try:
    source = tmp_path / "input.gguf"
    run = fuzzing.run_main(main, [str(source)], timeout_s=5)
  finally:
    logging.getLogger().removeHandler(stale)
  assert fuzzing.classify(run, [source.name], {}, {}) == (fuzzing.REFUSED,
                                                          f"error: {source}: bad")
  assert stale not in logging.getLogger().handlers
