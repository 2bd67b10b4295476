"""The TF-free catalog of tasks and mixtures: a name -> how to get its text examples.

A task is a name, its splits and a function `split -> list of {"inputs", "targets"}` (raw
records from `sources.py` through a formatter from `formats.py`).  A mixture is a list of
(task, rate).  `maxnucl.data.tasks` registers exactly these tasks and mixtures with seqio; the
TF-free pipeline (`pipeline.py`) reads them from here directly.

Registered names:
  synthetic_arithmetic                     train, test
  gsm8k                                    train, test
  mbpp                                     prompt, train, validation, test  (0-shot prompt)
  mbpp_3shot                               validation, test  (3-shot evaluation prompt)
  super_glue_{boolq,cb,copa,multirc,record,rte,wic,wsc}_v102   train, validation, test
  super_glue_{axb,axg}_v102                test  (evaluation only)
  super_glue_v102_proportional             mixture, rates `SUPER_GLUE_V102_PROPORTIONAL_RATES`
  text_corpus                              train, validation, test  (a prepared local corpus,
  text_corpus_finetune                     train, test               maxnucl.data.corpus)
  text_corpus_finetune_arithmetic          mixture 1:1 of the two above's train/test
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import gin
import numpy as np

from maxnucl.data import corpus
from maxnucl.data import formats
from maxnucl.data import sources
from maxnucl.data import synthetic

Example = formats.Example


@dataclasses.dataclass(frozen=True)
class TextTask:
  """A named task: `examples(split)` returns its text examples in the source's order."""

  name: str
  splits: tuple[str, ...]
  examples_fn: Callable[[str], list[Example]]
  description: str = ""

  def examples(self, split: str) -> list[Example]:
    if split not in self.splits:
      raise ValueError(f"Task '{self.name}' has no split '{split}'; splits: {list(self.splits)}")
    examples = self.examples_fn(split)
    if not examples:
      raise ValueError(f"Task '{self.name}' split '{split}' has no examples (check its files)")
    return examples


@dataclasses.dataclass(frozen=True)
class TextMixture:
  """A named mixture: examples are drawn from task i with probability rate_i / sum(rates)."""

  name: str
  task_rates: tuple[tuple[str, float], ...]
  description: str = ""

  def tasks_for_split(self, split: str) -> list[tuple[TextTask, float]]:
    pairs = [(get_task(name), rate) for name, rate in self.task_rates]
    pairs = [(task, rate) for task, rate in pairs if split in task.splits and rate > 0]
    if not pairs:
      raise ValueError(f"No task of mixture '{self.name}' has split '{split}'")
    return pairs


TASKS: dict[str, TextTask] = {}
MIXTURES: dict[str, TextMixture] = {}


def register_task(task: TextTask) -> TextTask:
  if task.name in TASKS or task.name in MIXTURES:
    raise ValueError(f"Task or mixture '{task.name}' is already registered")
  TASKS[task.name] = task
  return task


def register_mixture(mixture: TextMixture) -> TextMixture:
  if mixture.name in TASKS or mixture.name in MIXTURES:
    raise ValueError(f"Task or mixture '{mixture.name}' is already registered")
  for task_name, _ in mixture.task_rates:
    get_task(task_name)
  MIXTURES[mixture.name] = mixture
  return mixture


def get_task(name: str) -> TextTask:
  if name not in TASKS:
    raise KeyError(f"Unknown task '{name}'; registered tasks: {sorted(TASKS)}")
  return TASKS[name]


def get_task_or_mixture(name: str) -> TextTask | TextMixture:
  if name in TASKS:
    return TASKS[name]
  if name in MIXTURES:
    return MIXTURES[name]
  raise KeyError(f"Unknown task or mixture '{name}'; registered: "
                 f"{sorted(TASKS) + sorted(MIXTURES)}")


def splits_of(name: str) -> tuple[str, ...]:
  entry = get_task_or_mixture(name)
  if isinstance(entry, TextTask):
    return entry.splits
  return tuple(sorted({s for task_name, _ in entry.task_rates for s in get_task(task_name).splits}))


# ---- mixture sampling ----------------------------------------------------------------------------

def mixture_task_choices(rates: Sequence[float], num_examples: int, seed: int) -> np.ndarray:
  """Index of the task each of `num_examples` mixture examples is drawn from, int64[num]."""
  rates = np.asarray(rates, dtype=np.float64)
  rng = np.random.default_rng([seed, 0x6D6978])  # "mix": a stream apart from the shuffles
  return rng.choice(len(rates), size=num_examples, p=rates / rates.sum())


def mixture_examples(mixture: TextMixture, split: str, *, seed: int, shuffle: bool,
                     num_examples: Optional[int] = None) -> list[tuple[str, Example]]:
  """`num_examples` (task name, example) pairs sampled from the mixture's tasks by rate.

  Each task's examples are used in (seeded, if `shuffle`) order and cycled when exhausted.
  `num_examples` defaults to the total number of examples of the member tasks, roughly one
  epoch of the mixture.
  """
  pairs = mixture.tasks_for_split(split)
  per_task = []
  for index, (task, _) in enumerate(pairs):
    examples = task.examples(split)
    if not examples:
      raise ValueError(f"Task '{task.name}' of mixture '{mixture.name}' has no '{split}' examples")
    if shuffle:
      order = np.random.default_rng([seed, index]).permutation(len(examples))
      examples = [examples[i] for i in order]
    per_task.append(examples)
  if num_examples is None:
    num_examples = sum(len(e) for e in per_task)
  choices = mixture_task_choices([rate for _, rate in pairs], num_examples, seed)
  cursors = [0] * len(pairs)
  sampled = []
  for choice in choices.tolist():
    examples = per_task[choice]
    sampled.append((pairs[choice][0].name, examples[cursors[choice] % len(examples)]))
    cursors[choice] += 1
  return sampled


def text_examples(name: str, split: str, *, seed: int, shuffle: bool,
                  mixture_size: Optional[int] = None) -> list[Example]:
  """The examples of a task (shuffled with `seed` if `shuffle`) or a sample of a mixture."""
  entry = get_task_or_mixture(name)
  if isinstance(entry, TextMixture):
    return [example for _, example in mixture_examples(entry, split, seed=seed, shuffle=shuffle,
                                                       num_examples=mixture_size)]
  examples = entry.examples(split)
  if shuffle:
    order = np.random.default_rng([seed, 0]).permutation(len(examples))
    examples = [examples[i] for i in order]
  return examples


# ---- built-in tasks ------------------------------------------------------------------------------

def _from_records(read: Callable[[str], list[sources.Record]],
                  formatter: formats.Formatter) -> Callable[[str], list[Example]]:
  def examples(split: str) -> list[Example]:
    return [example for record in read(split) for example in formatter(record, split)]
  return examples


@gin.configurable
def synthetic_arithmetic_settings(seed: int = 0, num_train_examples: int = 10_000,
                                  num_test_examples: int = 1_000) -> dict:
  """Size and seed of the generated problem sets (the iterator's seed only shuffles them)."""
  return {"seed": seed, "train": num_train_examples, "test": num_test_examples}


def _synthetic_arithmetic_examples(split: str) -> list[Example]:
  settings = synthetic_arithmetic_settings()
  problems = synthetic.arithmetic_problems(settings["seed"], split, settings[split])
  return [synthetic.format_arithmetic_problem(problem) for problem in problems]


def _mbpp_3shot_examples(split: str) -> list[Example]:
  formatter = formats.make_mbpp_few_shot_formatter(
      formats.mbpp_few_shot_prefix(sources.read_mbpp("prompt")))
  return _from_records(sources.read_mbpp, formatter)(split)


SUPER_GLUE_TRAIN_TASKS = ("boolq", "cb", "copa", "multirc", "record", "rte", "wic", "wsc")
SUPER_GLUE_EVAL_ONLY_TASKS = ("axb", "axg")

# T5's super_glue_v102_proportional: rate = number of training examples the task yields after
# preprocessing (MultiRC: one per answer; ReCoRD: one per answer; WSC: correct referents only).
# T5 also mixes in DPR (1322), which has no counterpart here; axb/axg (rate 0) are eval only.
SUPER_GLUE_V102_PROPORTIONAL_RATES = {
    "super_glue_boolq_v102": 9427,
    "super_glue_cb_v102": 250,
    "super_glue_copa_v102": 400,
    "super_glue_multirc_v102": 27243,
    "super_glue_record_v102": 138854,
    "super_glue_rte_v102": 2490,
    "super_glue_wic_v102": 5428,
    "super_glue_wsc_v102": 259,
}


def super_glue_task_name(config: str) -> str:
  return f"super_glue_{config}_v102"


def _register_builtins():
  register_task(TextTask(
      "synthetic_arithmetic", ("train", "test"), _synthetic_arithmetic_examples,
      "Generated arithmetic word problems in GSM8K's format (no files, no TensorFlow)."))
  register_task(TextTask(
      "gsm8k", sources.GSM8K_SPLITS, _from_records(sources.read_gsm8k, formats.format_gsm8k),
      "Grade-school math: question -> worked solution ending in '#### <number>'."))
  register_task(TextTask(
      "mbpp", tuple(sources.MBPP_SPLIT_TASK_IDS),
      _from_records(sources.read_mbpp, formats.format_mbpp),
      "MBPP, zero-shot prompt -> code (fine-tuning)."))
  register_task(TextTask(
      "mbpp_3shot", ("validation", "test"), _mbpp_3shot_examples,
      "MBPP, 3-shot prompt from the prompt split -> code (evaluation)."))
  for config in SUPER_GLUE_TRAIN_TASKS + SUPER_GLUE_EVAL_ONLY_TASKS:
    read = lambda split, config=config: sources.read_super_glue(config, split)
    register_task(TextTask(
        super_glue_task_name(config), sources.super_glue_splits(config),
        _from_records(read, formats.SUPER_GLUE_FORMATTERS[config]),
        f"SuperGLUE {config} (v1.0.2) in T5's text-to-text format."))
  register_mixture(TextMixture(
      "super_glue_v102_proportional", tuple(SUPER_GLUE_V102_PROPORTIONAL_RATES.items()),
      "SuperGLUE tasks mixed in proportion to their training examples (T5)."))
  register_task(TextTask(
      "text_corpus", ("train", "validation", "test"), corpus.language_modelling_examples,
      "A prepared local text corpus (maxnucl.data.corpus; $MAXNUCL_TEXT_CORPUS), whole text."))
  register_task(TextTask(
      "text_corpus_finetune", ("train", "test"),
      lambda split: corpus.language_modelling_examples("finetune" if split == "train" else split),
      "The prepared corpus's finetune files as the train split (test: its test files)."))
  register_mixture(TextMixture(
      "text_corpus_finetune_arithmetic",
      (("text_corpus_finetune", 1.0), ("synthetic_arithmetic", 1.0)),
      "Held-out corpus files and synthetic arithmetic, 1:1 (tools/reproduce.py fine-tuning)."))


_register_builtins()
