"""GSM8K: few-shot chain-of-thought accuracy (the NUCL paper's Table 1 metric).

Protocol (defaults; each a gin binding `gsm8k.<name>`):
  split "test"; `num_shots` = 5 exemplars drawn once (by `seed`) from the train split and put
  before every question as "Question: {question}\\nAnswer: {answer}\\n\\n"; the question follows as
  "Question: {question}\\nAnswer: "; greedy decoding of up to `max_new_tokens` = 256 tokens,
  stopping at "Question:" (the model starting the next exemplar) or EOS.
Metrics (percent):
  accuracy_strict    the number after "#### " in the output (the dataset's answer format);
  accuracy_flexible  the last number in the output.
Numbers are compared as numbers after removing "," and "$" and a trailing ".": "1,000.00" equals
"1000".  `source = "synthetic_arithmetic"` evaluates the built-in arithmetic problems instead
(same answer format; `question_template` "Q: {question}\\nA: " matches how they are trained);
the results are then named after them: "synthetic_arithmetic" in results.json, the printed
results and the metric keys (`synthetic_arithmetic/accuracy_strict` in training).
"""

from __future__ import annotations

import dataclasses
import decimal
import random
import re
from typing import Optional, Sequence

import gin

from maxnucl import decoding
from maxnucl.data import catalog, sources, synthetic
from maxnucl.evaluation.core import EvaluationError, LanguageModel, stored

_STRICT = re.compile(r"#### *(-?[$0-9.,]*[0-9])")
_NUMBER = re.compile(r"-?[$0-9.,]*[0-9]")


def normalize_number(text: str) -> Optional[decimal.Decimal]:
  """'1,000.00' -> Decimal(1000); '$5.' -> 5; None if `text` is not a number."""
  cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
  try:
    value = decimal.Decimal(cleaned)
  except decimal.InvalidOperation:
    return None
  return value if value.is_finite() else None


def strict_answer(text: str) -> Optional[str]:
  """The number after the first '#### ' (GSM8K's final-answer marker), or None."""
  match = _STRICT.search(text)
  return match.group(1) if match else None


def flexible_answer(text: str) -> Optional[str]:
  """The last number anywhere in the text, or None."""
  numbers = _NUMBER.findall(text)
  return numbers[-1] if numbers else None


def _same_number(prediction: Optional[str], reference: Optional[decimal.Decimal]) -> bool:
  if prediction is None or reference is None:
    return False
  value = normalize_number(prediction)
  return value is not None and value == reference


def score(prediction: str, reference: str) -> dict[str, bool]:
  """{"strict", "flexible"}: is the output's answer the reference's?  `reference` is the
  dataset's `answer` field (a worked solution ending in '#### <number>')."""
  marked = strict_answer(reference)
  if marked is None:
    raise EvaluationError(f"GSM8K reference has no '#### <number>' answer: {reference[-80:]!r}")
  target = normalize_number(marked)
  return {"strict": _same_number(strict_answer(prediction), target),
          "flexible": _same_number(flexible_answer(prediction), target)}


@gin.configurable("gsm8k")
@dataclasses.dataclass
class GSM8K:
  """The GSM8K benchmark (see the module docstring for the protocol)."""
  source: str = "gsm8k"  # or "synthetic_arithmetic"
  split: str = "test"
  num_shots: int = 5
  seed: int = 0
  question_template: str = "Question: {question}\nAnswer: "
  max_new_tokens: int = 256
  stop_strings: Sequence[str] = ("Question:",)

  def __post_init__(self):
    self.stop_strings = tuple(self.stop_strings)
    if self.source not in ("gsm8k", "synthetic_arithmetic"):
      raise EvaluationError(f"gsm8k.source = {self.source!r}; expected 'gsm8k' or "
                            f"'synthetic_arithmetic'")
    if not isinstance(self.num_shots, int) or self.num_shots < 0:
      raise EvaluationError(f"gsm8k.num_shots = {self.num_shots!r}; expected an integer >= 0")

  def _records(self, split: str) -> list[dict]:
    if self.source == "synthetic_arithmetic":
      settings = catalog.synthetic_arithmetic_settings()
      return synthetic.arithmetic_problems(settings["seed"], split, settings[split])
    records = sources.read_gsm8k(split)  # question and answer are strings
    for record in records:
      marked = strict_answer(record["answer"])
      if marked is None or normalize_number(marked) is None:
        answer = record["answer"]
        raise EvaluationError(
            f"{record.get('_location', 'gsm8k')}: field 'answer' = "
            f"{answer if len(answer) <= 60 else '...' + answer[-57:]!r}; expected a worked "
            f"solution ending in '#### <number>'")
    return records

  @property
  def name(self) -> str:
    """What the results are called (results.json, metric keys, eval/ folders): the data
    evaluated, "gsm8k" or "synthetic_arithmetic" (scored with GSM8K's format and metrics)."""
    return self.source

  def settings(self) -> dict:
    return dataclasses.asdict(self)

  def describe(self) -> str:
    """One line: what is evaluated and how."""
    return (f"{self.name}: {self.split} split, {self.num_shots}-shot, greedy; GSM8K's metrics: "
            f"accuracy_strict (the number after '####'), accuracy_flexible (the last number)")

  def few_shot_prefix(self) -> str:
    if not self.num_shots:
      return ""
    train = self._records("train")
    if len(train) < self.num_shots:
      where = train[0]["_location"].rsplit(":", 1)[0] + ": " if train and "_location" in (
          train[0]) else ""
      raise EvaluationError(f"{where}gsm8k.num_shots = {self.num_shots} but the train split has "
                            f"only {len(train)} examples")
    shots = random.Random(self.seed).sample(range(len(train)), self.num_shots)
    return "".join(self.question_template.format(question=train[i]["question"])
                   + f"{train[i]['answer']}\n\n" for i in shots)

  def examples(self) -> list[dict]:
    prefix = self.few_shot_prefix()
    return [{"id": f"{self.split}-{i}",
             "prompt": prefix + self.question_template.format(question=r["question"]),
             "reference": r["answer"]}
            for i, r in enumerate(self._records(self.split))]

  def predict(self, model: LanguageModel, examples: list[dict]) -> list[dict]:
    outputs = model.generate([e["prompt"] for e in examples], max_new_tokens=self.max_new_tokens,
                             stop_strings=self.stop_strings)
    return [self._record(example, output) for example, output in zip(examples, outputs)]

  def _record(self, example: dict, output: str) -> dict:
    answer = decoding.cut_at_stop(output, self.stop_strings)
    correct = score(answer, example["reference"])
    return {"id": example["id"], "prompt": example["prompt"], "output": output,
            "answer_strict": strict_answer(answer), "answer_flexible": flexible_answer(answer),
            "reference": strict_answer(example["reference"]),
            "correct_strict": correct["strict"], "correct_flexible": correct["flexible"]}

  def rescore(self, example: dict, record: dict) -> dict:
    """A resumed record as `predict` writes it from its stored output (core.check_resumed)."""
    return self._record(example, stored(record, "output", str, "a string"))

  def metrics(self, records: list[dict]) -> dict[str, float]:
    n = max(len(records), 1)
    return {"accuracy_strict": 100.0 * sum(r["correct_strict"] for r in records) / n,
            "accuracy_flexible": 100.0 * sum(r["correct_flexible"] for r in records) / n,
            "num_examples": len(records)}
