"""MBPP: the standard 3-shot prompt, code extraction, and pass@1 through the sandbox — reference
solutions pass, wrong and hostile ones fail without stopping the evaluation."""

import json
import pathlib
import re

import pytest

from maxnucl import models
from maxnucl.evaluation import core, mbpp
from tolerances import EPS64, rounding_atol

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "evaluation"
RECORDS = {r["task_id"]: r for r in map(json.loads,
                                         (FIXTURES / "mbpp" / "mbpp.jsonl").read_text().splitlines())}
TEST_IDS = [11, 12, 13, 14, 15, 16]


@pytest.fixture
def mbpp_data(evaluation_data):
  yield evaluation_data


def _prompt(record):
  tests = "\n".join(record["test_list"])
  return (f"You are an expert Python programmer, and here is your task: {record['text']} Your "
          f"code should pass these tests:\n\n{tests}\n[BEGIN]\n")


def test_prompt_is_the_standard_three_shot_format(mbpp_data):
  del mbpp_data
  examples = mbpp.MBPP().examples()
  assert [e["id"] for e in examples] == [f"task-{i}" for i in TEST_IDS]
  shots = "".join(_prompt(RECORDS[i]) + RECORDS[i]["code"].replace("\r\n", "\n") + "\n[DONE]\n\n"
                  for i in (2, 3, 4))
  for example, task_id in zip(examples, TEST_IDS):
    assert example["prompt"] == shots + _prompt(RECORDS[task_id])


@pytest.mark.parametrize("output,code", [
    ("def f():\n  return 1\n[DONE]\n\nYou are an expert", "def f():\n  return 1"),
    ("[BEGIN]\ndef f():\n  return 1\n[DONE]", "def f():\n  return 1"),
    ("def f():\n  return 1", "def f():\n  return 1"),  # no [DONE]: everything (EOS stopped it)
])
def test_code_is_the_output_up_to_done(output, code):
  assert mbpp.extract_code(output) == code


class _ScriptedModel:
  """Answers each MBPP prompt with code chosen by the question's task text."""

  def __init__(self, answer):
    self.answer, self.batch_size, self.cfg = answer, 4, models.get_config("gemma2_tiny")

  def generate(self, prompts, *, max_new_tokens, stop_strings=(), **unused):
    out = []
    for prompt in prompts:
      text = re.findall(r"here is your task: (.*?) Your code", prompt)[-1]
      record = next(r for r in RECORDS.values() if r["text"] == text)
      out.append(self.answer(record) + "\n[DONE]")
    return out


def _run(answer, tmp_path=None):
  return core.run_benchmark(mbpp.MBPP(timeout_s=5.0), _ScriptedModel(answer), tmp_path or "",
                            write_files=tmp_path is not None, progress=False)


def test_reference_solutions_pass(mbpp_data):
  del mbpp_data
  results = _run(lambda r: r["code"])  # task 15 needs its test_setup_code (FACTOR = 3)
  assert results["metrics"]["pass_at_1"] == 100.0
  assert results["metrics"]["status/passed"] == len(TEST_IDS)


def test_wrong_and_hostile_programs_fail_and_the_evaluation_continues(mbpp_data, tmp_path):
  del mbpp_data
  outside = tmp_path / "keep.txt"
  outside.write_text("precious")
  hostile = {
      11: "def add(a, b):\n  return a - b",  # wrong answer
      12: "import sys\nsys.exit(0)",  # exits before the asserts run
      13: "while True:\n  pass",  # never ends
      14: f"import os\nos.remove({str(outside)!r})\ndef vowels(s):\n  return 0",
      15: None,  # the reference solution: passes
      16: "def is_even(n):\n  return n % 2 == 0\nimport os\nos._exit(0)",  # right code, then exits
  }
  results = _run(lambda r: hostile[r["task_id"]] or r["code"], tmp_path / "out")
  records = [json.loads(l) for l in (tmp_path / "out" / core.PREDICTIONS).read_text().splitlines()]
  by_id = {r["id"]: r for r in records}
  assert [r["correct"] for r in records] == [False, False, False, False, True, False]
  assert by_id["task-11"]["status"] == "failed" and "AssertionError" in by_id["task-11"]["stderr"]
  assert by_id["task-12"]["status"] == "early_exit"
  assert by_id["task-13"]["status"] == "timeout"
  assert by_id["task-16"]["status"] == "early_exit"
  assert outside.read_text() == "precious"  # the sandbox could not delete it
  # a float64 mean of 6 zeros and ones, times 100: 6 additions, the division and the product
  assert results["metrics"]["pass_at_1"] == pytest.approx(100.0 / 6, rel=0,
                                                          abs=rounding_atol(100.0, 8, EPS64))


def test_tiny_model_end_to_end(mbpp_data, arithmetic_checkpoint, tmp_path):
  """A real (arithmetic-trained) model writes no working Python: every sample is run and fails."""
  del mbpp_data
  model = core.LanguageModel.load(str(arithmetic_checkpoint), "byte", batch_size=8)
  bench = mbpp.MBPP(max_new_tokens=32)
  results = core.run_benchmark(bench, model, tmp_path, progress=False)
  assert results["num_examples"] == len(TEST_IDS)
  assert results["metrics"]["pass_at_1"] == 0.0
  records = [json.loads(l) for l in (tmp_path / core.PREDICTIONS).read_text().splitlines()]
  assert len(records) == len(TEST_IDS)
  assert all(r["status"] in ("failed", "early_exit", "timeout") for r in records)
