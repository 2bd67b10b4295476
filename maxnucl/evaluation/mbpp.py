"""MBPP: 3-shot Python program synthesis, pass@1 by running the tests in a sandbox.

Protocol (Austin et al. 2021, as the NUCL paper uses it; gin bindings `mbpp.<name>`):
  evaluation on task ids 11-510 (split "test"); the three solved examples with task ids 2, 3, 4
  precede every question, each as the question's prompt followed by its code and "\\n[DONE]\\n\\n";
  the question's prompt is
    "You are an expert Python programmer, and here is your task: {text} Your code should pass
     these tests:\\n\\n{tests, one per line}\\n[BEGIN]\\n"
  greedy decoding of up to `max_new_tokens` = 512 tokens, stopping at "[DONE]" or EOS.
A sample passes when `test_setup_code`, the generated code (up to "[DONE]", a leading "[BEGIN]"
removed) and every assert of `test_list` run to their end in the sandbox
(`maxnucl.evaluation.execution.check_programs`, `timeout_s` each, in parallel).
Metric: pass_at_1 (percent).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import gin

from maxnucl import decoding
from maxnucl.data import formats, sources
from maxnucl.evaluation import execution
from maxnucl.evaluation.core import EvaluationError, LanguageModel, stored


def extract_code(output: str, stop_strings: Sequence[str] = ("[DONE]",)) -> str:
  """The program in a model output: up to the stop string, without a leading [BEGIN]."""
  code = decoding.cut_at_stop(output, stop_strings)
  stripped = code.lstrip()
  if stripped.startswith("[BEGIN]"):
    code = stripped[len("[BEGIN]"):]
  return code.strip("\n")


def stored_verdict(record: dict) -> dict:
  """A resumed record's sandbox verdict (status, stderr) as `execution.check_programs` gives it:
  passed exactly when the status is "passed"."""
  status = stored(record, "status", str, f"one of {list(execution.STATUSES)}")
  if status not in execution.STATUSES:
    raise EvaluationError(f"field 'status' = {status!r}; expected one of "
                          f"{list(execution.STATUSES)}")
  return {"passed": status == "passed", "status": status,
          "stderr": stored(record, "stderr", str, "a string")}


def test_program(record: dict, code: str) -> str:
  """The whole program run for one sample: setup code, the solution, then the asserts."""
  return "\n".join(part for part in (record.get("test_setup_code", ""), code,
                                     "\n".join(record["test_list"])) if part) + "\n"


@gin.configurable("mbpp")
@dataclasses.dataclass
class MBPP:
  """The MBPP benchmark (see the module docstring for the protocol)."""
  split: str = "test"
  num_shots: int = 3
  shot_task_ids: Sequence[int] = formats.MBPP_SHOT_TASK_IDS
  max_new_tokens: int = 512
  stop_strings: Sequence[str] = ("[DONE]",)
  timeout_s: float = 3.0
  workers: Optional[int] = None  # parallel sandboxed programs; None = every CPU core
  name: str = "mbpp"

  def __post_init__(self):
    self.stop_strings = tuple(self.stop_strings)
    self.shot_task_ids = tuple(self.shot_task_ids)
    if self.num_shots not in (0, len(self.shot_task_ids)):
      raise EvaluationError(f"mbpp.num_shots = {self.num_shots}; expected 0 or the number of "
                            f"mbpp.shot_task_ids ({len(self.shot_task_ids)})")

  def settings(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("name", "workers")}

  def examples(self) -> list[dict]:
    prefix = ""
    if self.num_shots:
      prefix = formats.mbpp_few_shot_prefix(sources.read_mbpp("prompt"), self.shot_task_ids,
                                            source=str(sources.mbpp_file()))
    records = sources.read_mbpp(self.split)
    if not records:
      ids = sources.MBPP_SPLIT_TASK_IDS[self.split]
      raise EvaluationError(f"{sources.mbpp_file()}: no task of split {self.split!r} (task ids "
                            f"{ids.start}-{ids.stop - 1})")
    out = []
    for record in records:
      prompt = formats.format_mbpp(record, self.split)[0]["inputs"]
      out.append({"id": f"task-{record['task_id']}", "prompt": prefix + prompt,
                  "record": {k: record[k] for k in ("task_id", "test_list", "test_setup_code")}})
    return out

  def predict(self, model: LanguageModel, examples: list[dict]) -> list[dict]:
    outputs = model.generate([e["prompt"] for e in examples], max_new_tokens=self.max_new_tokens,
                             stop_strings=self.stop_strings)
    codes = [extract_code(o, self.stop_strings) for o in outputs]
    programs = [test_program(e["record"], c) for e, c in zip(examples, codes)]
    results = execution.check_programs(programs, timeout_s=self.timeout_s, workers=self.workers)
    return [self._record(e, o, r) for e, o, r in zip(examples, outputs, results)]

  def _record(self, example: dict, output: str, result: dict) -> dict:
    return {"id": example["id"], "prompt": example["prompt"], "output": output,
            "answer": extract_code(output, self.stop_strings),
            "reference": example["record"]["test_list"], "correct": bool(result["passed"]),
            "status": result["status"], "stderr": result.get("stderr", "")[-2000:]}

  def rescore(self, example: dict, record: dict) -> dict:
    """A resumed record as `predict` writes it from its stored output and its stored sandbox
    verdict (not run again: "correct" must agree with "status")."""
    return self._record(example, stored(record, "output", str, "a string"),
                        stored_verdict(record))

  def metrics(self, records: list[dict]) -> dict[str, float]:
    n = max(len(records), 1)
    statuses: dict[str, int] = {}
    for r in records:
      statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {"pass_at_1": 100.0 * sum(r["correct"] for r in records) / n,
            "num_examples": len(records),
            **{f"status/{k}": v for k, v in sorted(statuses.items())}}
