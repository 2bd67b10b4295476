"""Synthetic arithmetic word problems: pure Python, deterministic from (seed, split, index).

Every answer is a short worked solution (one line per operation) ending in "#### <number>", the
GSM8K answer format, so the same metric applies.  Examples are short (under 112 bytes with the
prompt) so that a 128-token byte-vocabulary row holds at least one.  This is the trainer's
built-in data source: it needs no files, no TensorFlow and no network.
"""

from __future__ import annotations

import random

_NAMES = ("Ada", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jia")
_ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stamps", "shells", "cards")


def _add_then_remove(rng: random.Random) -> tuple[str, str]:
  name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
  start, gained = rng.randint(2, 60), rng.randint(1, 40)
  after_gain = start + gained
  lost = rng.randint(0, after_gain)
  result = after_gain - lost
  question = f"{name} has {start} {item}, gets {gained} more and gives away {lost}. How many now?"
  answer = f"{start} + {gained} = {after_gain}\n{after_gain} - {lost} = {result}\n#### {result}"
  return question, answer


def _groups(rng: random.Random) -> tuple[str, str]:
  name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
  boxes, per_box, extra = rng.randint(2, 12), rng.randint(2, 15), rng.randint(0, 20)
  in_boxes = boxes * per_box
  result = in_boxes + extra
  question = f"{name} fills {boxes} boxes with {per_box} {item} each, plus {extra} loose. Total?"
  answer = f"{boxes} * {per_box} = {in_boxes}\n{in_boxes} + {extra} = {result}\n#### {result}"
  return question, answer


def _share(rng: random.Random) -> tuple[str, str]:
  name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
  friends, each = rng.randint(2, 9), rng.randint(1, 12)
  total = friends * each
  question = f"{name} splits {total} {item} equally among {friends} friends. How many each?"
  answer = f"{total} / {friends} = {each}\n#### {each}"
  return question, answer


_TEMPLATES = (_add_then_remove, _groups, _share)


def arithmetic_problem(seed: int, split: str, index: int) -> dict[str, str]:
  """Problem number `index` of `split`: {"question": str, "answer": str ending '#### <n>'}."""
  rng = random.Random(f"maxnucl-synthetic-arithmetic/{seed}/{split}/{index}")
  question, answer = rng.choice(_TEMPLATES)(rng)
  return {"question": question, "answer": answer}


def format_arithmetic_problem(problem: dict[str, str]) -> dict[str, str]:
  """{"inputs": "Q: <question>\\nA: ", "targets": <the worked solution>}."""
  return {"inputs": f"Q: {problem['question']}\nA: ", "targets": problem["answer"]}


def arithmetic_problems(seed: int, split: str, num_examples: int) -> list[dict[str, str]]:
  return [arithmetic_problem(seed, split, i) for i in range(num_examples)]
