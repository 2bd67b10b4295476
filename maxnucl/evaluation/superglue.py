"""SuperGLUE: the eight tasks and the two diagnostics, in T5's text-to-text format, scored as T5.

Examples are the registered tasks' (`super_glue_<task>_v102` in `maxnucl.data.catalog`): the raw
records of `sources.read_super_glue` through `formats.SUPER_GLUE_FORMATTERS`, in their evaluation
format (one example per record; ReCoRD's target is its first answer, every answer is kept for
scoring).  The model's prompt is the T5 `inputs` string, preceded by `num_shots` solved training
examples ("{inputs}{targets}\\n\\n" each, drawn once per task by `seed`; AX-b and AX-g take theirs
from RTE, as T5 casts them as RTE).  Prompt and answer are joined without a separator, exactly
as the trainer joins inputs and targets.

Splits: `split` (default "validation": the test labels are hidden) for the eight tasks; AX-b and
AX-g are released as a labelled test split only, and always use it.

Prediction (`method`, gin `superglue.method`):
  "generate"  greedy decoding of up to `max_new_tokens`, cut at `stop_strings` (EOS always
              stops), whitespace stripped; the text is the answer, e.g. "True", "entailment",
              "choice2", a ReCoRD entity.  A text that names no class is wrong (T5's
              `string_label_to_class_id` with default -1).  WSC uses T5's `wsc_simple` format: the
              model names the pronoun's referent and `names_referent` (T5's `wsc_simple`
              postprocessor) decides whether that is the candidate span1; the example is right
              when this agrees with the label.
  "rank"      rank classification: every candidate answer is scored as the continuation of the
              prompt (sum of token log-probabilities, no length normalisation, as T5's
              `rank_classification`) and the highest wins (the first on a tie).  Candidates are
              the targets T5's format can give the example: the label names for the
              classification tasks (BoolQ, MultiRC, WiC: False/True; CB: entailment /
              contradiction / neutral; RTE, AX-b, AX-g: entailment / not_entailment; COPA:
              choice1 / choice2, its T5 targets); ReCoRD: the passage's entities.  WSC's simple
              format has a single target (the referent), so WSC is ranked in T5's other format
              (`preprocessors.wsc`, `wsc_classification_inputs`): "wsc text: ..." with the
              candidate marked "* ... *" and the pronoun "# ... #", candidates False / True.

Metrics (T5's `SUPERGLUE_METRICS`, x 100; keys "<task>/<metric>"):
  boolq accuracy; cb accuracy, f1_macro (mean F1 over the 3 classes); copa accuracy;
  multirc f1a (F1 over all answers, True positive), em (a question is right when all its
  answers are; questions grouped by paragraph and question idx: T5 groups by the question idx
  alone, which the released files number across paragraphs, so the groups agree); record f1,
  em (per query the best over its gold answers, SQuAD normalisation); rte, wic, wsc accuracy;
  axb matthews; axg accuracy.  Also "<task>/num_examples"; for the eight tasks "<task>/score",
  the mean of the task's metrics; and "average", the SuperGLUE score (the paper's rule): the
  mean over the eight tasks of their scores (AX-b and AX-g are diagnostics, not averaged),
  reported only when all eight were evaluated.
  A task whose records are unlabelled (the test split) gets its num_examples only.
  With `limit`, a MultiRC question may be cut off part-way: its em then covers the answers seen.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import random
from typing import Callable, Sequence

import gin

from maxnucl import decoding
from maxnucl.data import catalog, formats, sources
from maxnucl.evaluation import metrics
from maxnucl.evaluation.core import EvaluationError, LanguageModel, stored

TASKS = ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc", "axb", "axg")
AVERAGED_TASKS = TASKS[:8]  # the SuperGLUE score; AX-b and AX-g are diagnostics
DIAGNOSTIC_SPLIT = "test"  # AX-b and AX-g: the only (and labelled) split released
SHOT_TASK = {"axb": "rte", "axg": "rte"}  # where few-shot examples come from, when not the task
SHOT_SEPARATOR = "\n\n"
METHODS = ("generate", "rank")
_FORMAT_SPLIT = "validation"  # formatters give one evaluation example per record for any split


# ---- WSC: T5's two formats -----------------------------------------------------------------------

_DETERMINERS = frozenset({"a", "an", "few", "her", "his", "each", "every", "many", "much", "my",
                          "our", "some", "that", "the", "their", "these", "this", "those",
                          "which", "whose", "your"})


def _without_determiners(text: str) -> str:
  return " ".join(w for w in text.strip().lower().split(" ") if w not in _DETERMINERS)


def names_referent(prediction: str, referent: str) -> int:
  """1 if a generated WSC referent names `referent` (the candidate span1), 0 if not, -1 if the
  prediction is empty (never matches a label).  T5's `wsc_simple` postprocessor: case and
  determiners ignored, one word set contains the other ("fuzzy bunny" names "bunny"), but a
  possessive must match a possessive ("Bob" does not name "Bob's hat")."""
  prediction = _without_determiners(prediction)
  if not prediction:
    return -1
  referent = _without_determiners(referent)
  if ("'" in prediction) != ("'" in referent):
    return 0
  predicted, gold = set(prediction.split(" ")), set(referent.split(" "))
  return int(predicted <= gold or gold <= predicted)


def _mark_span(text: str, span: str, word_index: int, mark: str) -> str:
  """`span` at word `word_index` of `text` surrounded by "{mark} ... {mark}"; `text` unchanged
  when the span is not there (as T5's regular expression leaves it)."""
  words = text.split(" ")
  if word_index < 0 or word_index > len(words):
    return text
  prefix = "".join(w + " " for w in words[:word_index])
  rest = text[len(prefix):]
  if not rest.startswith(span):
    return text
  return f"{prefix}{mark} {span} {mark}{rest[len(span):]}"


def wsc_classification_inputs(record: sources.Record) -> str:
  """T5's `preprocessors.wsc` inputs: "wsc text: " + the text with the candidate (span1) marked
  "* span1 *" and the pronoun (span2) "# span2 #"; its targets are the labels False / True."""
  text = _mark_span(record["text"], record["span1_text"], int(record["span1_index"]), "*")
  span2_index = int(record["span2_index"])
  if int(record["span1_index"]) < span2_index:
    span2_index += 2  # the two marks inserted before it are words too
  text = _mark_span(text, record["span2_text"], span2_index, "#")
  return f"wsc text: {text}"


# ---- examples ------------------------------------------------------------------------------------

def _label_names(task: str) -> tuple[str, ...]:
  return sources.SUPER_GLUE_LABEL_NAMES[task]


def _inputs_and_target(task: str, record: sources.Record, method: str) -> tuple[str, str]:
  """The prompt text and T5 target of one record in the evaluation format."""
  if task == "wsc" and method == "rank":
    label = int(record["label"])
    return wsc_classification_inputs(record), _label_names("wsc")[label] if label >= 0 else ""
  formatted = formats.SUPER_GLUE_FORMATTERS[task](record, _FORMAT_SPLIT)
  if len(formatted) != 1:
    raise EvaluationError(f"{record.get('_location', task)}: the {task} format gave "
                          f"{len(formatted)} evaluation examples for one record; expected 1")
  return formatted[0]["inputs"], formatted[0]["targets"]


def _example(task: str, split: str, index: int, record: sources.Record, prefix: str,
             method: str) -> dict:
  """What prediction and scoring need of one record (JSON-serialisable)."""
  inputs, target = _inputs_and_target(task, record, method)
  example = {"id": f"{task}/{split}/{index}", "task": task, "prompt": prefix + inputs,
             "target": target}
  if task == "record":
    example["answers"] = list(record["answers"])
    example["candidates"] = list(record["entities"])
    if method == "rank" and not example["candidates"]:
      raise EvaluationError(f"{record.get('_location', 'ReCoRD')}: a ReCoRD query without "
                            "entities cannot be rank-classified")
    return example
  example["label"] = int(record["label"])
  example["candidates"] = list(_label_names(task))
  if task == "multirc":
    idx = record["idx"]
    example["group"] = f"{idx['paragraph']}/{idx['question']}"
  if task == "wsc":
    example["candidate_referent"] = record["span1_text"]
  return example


# ---- scoring one prediction ----------------------------------------------------------------------

def _scored(example: dict, output: str, answer: str, method: str) -> dict:
  """The prediction record of `example` whose extracted answer is `answer`."""
  task = example["task"]
  record = {"id": example["id"], "task": task, "prompt": example["prompt"], "output": output}
  if task == "record":
    answers = example["answers"]
    f1 = metrics.max_over_references(metrics.squad_f1, answers, answer) if answers else None
    em = (metrics.max_over_references(metrics.squad_exact_match, answers, answer)
          if answers else None)
    record.update(answer=answer, reference=answers, f1=f1, exact_match=em, correct=em == 1.0)
    return record
  names = _label_names(task)
  if task == "wsc" and method == "generate":
    prediction = names_referent(answer, example["candidate_referent"])
    record.update(generated_referent=answer, candidate_referent=example["candidate_referent"])
    answer = names[prediction] if prediction >= 0 else ""
  else:
    prediction = names.index(answer) if answer in names else -1
  label = example["label"]
  record.update(answer=answer, reference=names[label] if label >= 0 else "", label=label,
                prediction=prediction, correct=label >= 0 and prediction == label)
  if task == "multirc":
    record["group"] = example["group"]
  return record


def _ranked(example: dict, scores: list[float], method: str) -> dict:
  """The prediction record of `example` whose candidates scored `scores`: the highest wins (the
  first on a tie)."""
  best = example["candidates"][max(range(len(scores)), key=lambda i: scores[i])]
  record = _scored(example, best, best, method)
  record["scores"] = dict(zip(example["candidates"], scores))
  return record


def _is_labelled(record: dict) -> bool:
  return bool(record["reference"]) if record["task"] == "record" else record["label"] >= 0


# ---- metrics per task (fractions; x 100 in `SuperGLUE.metrics`) ----------------------------------

def _labels(records):
  return [r["label"] for r in records], [r["prediction"] for r in records]


def _accuracy(records: list[dict]) -> dict[str, float]:
  return {"accuracy": metrics.accuracy(*_labels(records))}


def _cb(records: list[dict]) -> dict[str, float]:
  labels, predictions = _labels(records)
  return {"accuracy": metrics.accuracy(labels, predictions),
          "f1_macro": metrics.mean_multiclass_f1(labels, predictions, num_classes=3)}


def _multirc(records: list[dict]) -> dict[str, float]:
  labels, predictions = _labels(records)
  return {"f1a": metrics.binary_f1(labels, predictions),
          "em": metrics.grouped_exact_match([r["group"] for r in records], labels, predictions)}


def _record(records: list[dict]) -> dict[str, float]:
  def mean_best(metric):
    return sum(metrics.max_over_references(metric, r["reference"], r["answer"])
               for r in records) / len(records)
  return {"f1": mean_best(metrics.squad_f1), "em": mean_best(metrics.squad_exact_match)}


def _matthews(records: list[dict]) -> dict[str, float]:
  return {"matthews": metrics.matthews_correlation(*_labels(records))}


TASK_METRICS: dict[str, Callable[[list[dict]], dict[str, float]]] = {
    "boolq": _accuracy, "cb": _cb, "copa": _accuracy, "multirc": _multirc, "record": _record,
    "rte": _accuracy, "wic": _accuracy, "wsc": _accuracy, "axb": _matthews, "axg": _accuracy,
}


def task_metrics(records: list[dict]) -> dict[str, float]:
  """Per-task metrics (x 100) of prediction records, the tasks' scores and the SuperGLUE
  average (see the module docstring)."""
  by_task: dict[str, list[dict]] = {}
  for record in records:
    by_task.setdefault(record["task"], []).append(record)
  out: dict[str, float] = {}
  scores = {}
  for task in [t for t in TASKS if t in by_task]:
    task_records = by_task[task]
    out[f"{task}/num_examples"] = len(task_records)
    if not all(_is_labelled(r) for r in task_records):
      logging.warning("SuperGLUE %s: unlabelled examples (test split?); no metrics", task)
      continue
    values = {name: 100.0 * value for name, value in TASK_METRICS[task](task_records).items()}
    out.update({f"{task}/{name}": value for name, value in values.items()})
    if task in AVERAGED_TASKS:
      scores[task] = sum(values.values()) / len(values)
      out[f"{task}/score"] = scores[task]
  if set(scores) == set(AVERAGED_TASKS):
    out["average"] = sum(scores.values()) / len(scores)
  else:
    logging.info("SuperGLUE average not reported: it needs scores of all of %s; have %s",
                 list(AVERAGED_TASKS), sorted(scores))
  return out


# ---- the benchmark -------------------------------------------------------------------------------

@gin.configurable("superglue")
@dataclasses.dataclass
class SuperGLUE:
  """The SuperGLUE benchmark (see the module docstring for the protocol).

  `split` applies to the eight tasks; AX-b and AX-g always use "test", their only split.
  """
  tasks: Sequence[str] = TASKS
  split: str = "validation"
  method: str = "generate"  # or "rank"
  max_new_tokens: int = 32
  stop_strings: Sequence[str] = ()
  num_shots: int = 0
  seed: int = 0
  name: str = "superglue"

  def __post_init__(self):
    self.tasks = tuple(self.tasks)
    self.stop_strings = tuple(self.stop_strings)
    unknown = [t for t in self.tasks if t not in TASKS]
    if unknown or not self.tasks or len(set(self.tasks)) != len(self.tasks):
      raise EvaluationError(f"superglue.tasks = {list(self.tasks)}; expected distinct names "
                            f"from {list(TASKS)}")
    if self.method not in METHODS:
      raise EvaluationError(f"superglue.method = {self.method!r}; expected one of "
                            f"{list(METHODS)}")
    if not isinstance(self.num_shots, int) or self.num_shots < 0:
      raise EvaluationError(f"superglue.num_shots = {self.num_shots!r}; expected an integer >= 0")
    for task in self.tasks:
      splits = catalog.get_task(catalog.super_glue_task_name(task)).splits
      if self.split_of(task) not in splits:
        raise EvaluationError(f"superglue.split = {self.split!r}: task "
                              f"{catalog.super_glue_task_name(task)} has splits {list(splits)}")

  def split_of(self, task: str) -> str:
    """The split evaluated for `task`: `split`, but "test" for AX-b and AX-g."""
    return DIAGNOSTIC_SPLIT if task in ("axb", "axg") else self.split

  def settings(self) -> dict:
    return {k: v for k, v in dataclasses.asdict(self).items() if k != "name"}

  def few_shot_prefix(self, task: str) -> str:
    """`num_shots` solved training examples of `task` (RTE's for AX-b/AX-g), drawn by `seed`."""
    if not self.num_shots:
      return ""
    source = SHOT_TASK.get(task, task)
    pool = []
    for record in sources.read_super_glue(source, "train"):
      if source == "wsc" and self.method == "rank":
        pool.append(_inputs_and_target("wsc", record, "rank"))
      else:  # the training format: WSC keeps correct referents, ReCoRD one per answer
        pool.extend((e["inputs"], e["targets"])
                    for e in formats.SUPER_GLUE_FORMATTERS[source](record, "train")[:1])
    if len(pool) < self.num_shots:
      raise EvaluationError(f"superglue.num_shots = {self.num_shots} but the {source} train "
                            f"split gives only {len(pool)} examples")
    shots = random.Random(self.seed).sample(range(len(pool)), self.num_shots)
    return "".join(pool[i][0] + pool[i][1] + SHOT_SEPARATOR for i in shots)

  def examples(self) -> list[dict]:
    out = []
    for task in self.tasks:
      split = self.split_of(task)
      prefix = self.few_shot_prefix(task)
      out.extend(_example(task, split, i, record, prefix, self.method)
                 for i, record in enumerate(sources.read_super_glue(task, split)))
    return out

  def predict(self, model: LanguageModel, examples: list[dict]) -> list[dict]:
    if self.method == "generate":
      outputs = model.generate([e["prompt"] for e in examples],
                               max_new_tokens=self.max_new_tokens, stop_strings=self.stop_strings)
      return [_scored(e, o, decoding.cut_at_stop(o, self.stop_strings).strip(), self.method)
              for e, o in zip(examples, outputs)]
    contexts = [e["prompt"] for e in examples for _ in e["candidates"]]
    continuations = [c for e in examples for c in e["candidates"]]
    loglikelihoods = model.loglikelihoods(contexts, continuations)
    records, start = [], 0
    for example in examples:
      scores = loglikelihoods[start:start + len(example["candidates"])]
      start += len(example["candidates"])
      records.append(_ranked(example, [float(s) for s in scores], self.method))
    return records

  def rescore(self, example: dict, record: dict) -> dict:
    """A resumed record as `predict` writes it: the answer cut again from the stored output
    ("generate"), or chosen again from the stored scores of the candidates ("rank"), and scored
    against the reference."""
    if self.method == "generate":
      output = stored(record, "output", str, "a string")
      return _scored(example, output, decoding.cut_at_stop(output, self.stop_strings).strip(),
                     self.method)
    scores = stored(record, "scores", dict, "an object of the candidates' log-likelihoods")
    if list(scores) != list(example["candidates"]) or not all(
        isinstance(v, float) and math.isfinite(v) for v in scores.values()):
      raise EvaluationError(f"field 'scores' = {str(scores)[:60]}; expected a finite "
                            f"log-likelihood for each of {example['candidates'][:5]}")
    return _ranked(example, list(scores.values()), self.method)

  def metrics(self, records: list[dict]) -> dict[str, float]:
    return task_metrics(records)

