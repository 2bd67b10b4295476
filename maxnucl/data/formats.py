"""Text-to-text formats: one raw record (see `sources.py`) -> examples {"inputs", "targets"}.

A decoder-only model sees `[BOS] inputs targets [EOS]` and, by default, is trained on the
targets only (`packing.py`).  Every formatter takes `(record, split)` and returns a list of
examples, because some tasks yield several examples per record (ReCoRD: one per answer in
training) or none (WSC training keeps only the correct referents, as T5 does).

Formats (T5's text-to-text style for SuperGLUE, `glue` / `record` / `wsc_simple` preprocessors):

  gsm8k      inputs  "Question: {question}\nAnswer: "
             targets "{answer}"  -- the released worked solution (with its <<a*b=c>> calculator
                                    annotations) ending in "#### <number>"
  mbpp       inputs  "You are an expert Python programmer, and here is your task: {text} Your code
                      should pass these tests:\n\n{test_list joined by \\n}\n[BEGIN]\n"
             targets "{code}"  (CRLF -> LF)
  mbpp_3shot inputs  three solved examples from the prompt split (task ids 2, 3, 4, as in Austin
                     et al. 2021), each "<prompt as above>{code}\n[DONE]\n\n", then the
                     question's prompt; targets "{code}"
  boolq      "boolq passage: {passage} question: {question}"            -> False | True
  cb         "cb hypothesis: {hypothesis} premise: {premise}"           -> entailment |
                                                                    contradiction | neutral
  copa       "copa choice1: {c1} choice2: {c2} premise: {p} question: {cause|effect}"
                                                                     -> choice1 | choice2
  multirc    "multirc question: {q} answer: {a} paragraph: {paragraph}" with T5's markup removal
             on the whole text: <br> -> " ", <b> and </b> removed, spacing kept
                                                                     -> False | True
  record     "record query: {query} entities: {e1}, {e2}, ... passage: {passage with
             '@highlight\\n' -> '. '}" -> an answer entity (train: one example per answer;
             eval: the first answer)
  rte / axb / axg  "rte hypothesis: {hypothesis} premise: {premise}"  -> entailment |
                                                                    not_entailment
             (axb's sentence1/sentence2 are premise/hypothesis)
  wic        "wic sentence1: {s1} sentence2: {s2} word: {word}"         -> False | True
  wsc        "wsc: {text with the pronoun marked as *pronoun*}"        -> the referent (span1)
             (train: correct referents only, T5's `wsc_simple`; eval: every example)

Unlabelled test records (label -1) get the target "" (they can be used for prediction only).
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

from maxnucl.data import sources

Example = dict[str, str]
Formatter = Callable[[sources.Record, str], list[Example]]


def _example(inputs: str, targets: str) -> Example:
  return {"inputs": inputs, "targets": targets}


# ---- GSM8K ---------------------------------------------------------------------------------------

def format_gsm8k(record: sources.Record, split: str) -> list[Example]:
  del split
  return [_example(f"Question: {record['question']}\nAnswer: ", record["answer"])]


def gsm8k_final_answer(text: str) -> str | None:
  """The number after the last '####' (commas removed), or None."""
  match = re.findall(r"####\s*(-?[\d,]*\.?\d+)", text)
  return match[-1].replace(",", "") if match else None


# ---- MBPP ----------------------------------------------------------------------------------------

MBPP_SHOT_TASK_IDS = (2, 3, 4)


def _mbpp_prompt(record: sources.Record) -> str:
  tests = "\n".join(record["test_list"])
  return (f"You are an expert Python programmer, and here is your task: {record['text']} "
          f"Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")


def _mbpp_code(record: sources.Record) -> str:
  return record["code"].replace("\r\n", "\n")


def format_mbpp(record: sources.Record, split: str) -> list[Example]:
  del split
  return [_example(_mbpp_prompt(record), _mbpp_code(record))]


def mbpp_few_shot_prefix(prompt_records: Sequence[sources.Record],
                         shot_task_ids: Sequence[int] = MBPP_SHOT_TASK_IDS,
                         source: str = "") -> str:
  """The solved examples that precede every 3-shot MBPP question (`source`: the file they come
  from, for the error message)."""
  by_id = {int(r["task_id"]): r for r in prompt_records}
  missing = [i for i in shot_task_ids if i not in by_id]
  if missing:
    raise sources.MalformedRecordError(
        f"{source + ': ' if source else ''}MBPP prompt split lacks the few-shot task ids "
        f"{missing} (need {list(shot_task_ids)})")
  return "".join(f"{_mbpp_prompt(by_id[i])}{_mbpp_code(by_id[i])}\n[DONE]\n\n"
                 for i in shot_task_ids)


def make_mbpp_few_shot_formatter(prefix: str) -> Formatter:
  def format_mbpp_few_shot(record: sources.Record, split: str) -> list[Example]:
    del split
    return [_example(prefix + _mbpp_prompt(record), _mbpp_code(record))]
  return format_mbpp_few_shot


# ---- SuperGLUE -----------------------------------------------------------------------------------

def _label_text(config: str, record: sources.Record) -> str:
  label = int(record["label"])
  return "" if label < 0 else sources.SUPER_GLUE_LABEL_NAMES[config][label]


def _join_fields(prefix: str, record: sources.Record, fields: Sequence[str]) -> str:
  return " ".join([prefix] + [f"{field}: {record[field]}" for field in fields])


def _glue_formatter(config: str, prefix: str, fields: Sequence[str]) -> Formatter:
  def format_glue(record: sources.Record, split: str) -> list[Example]:
    del split
    return [_example(_join_fields(prefix, record, fields), _label_text(config, record))]
  format_glue.__name__ = f"format_{config}"
  return format_glue


def format_axb(record: sources.Record, split: str) -> list[Example]:
  del split
  renamed = {"hypothesis": record["sentence2"], "premise": record["sentence1"]}
  return [_example(_join_fields("rte", renamed, ("hypothesis", "premise")),
                   _label_text("axb", record))]


def _remove_multirc_markup(text: str) -> str:
  """T5's `glue` preprocessor's two substitutions, applied to the whole joined inputs: <br> -> " ",
  <b> and </b> -> "".  The spacing they leave stays (a paragraph ending in <br> ends in a space);
  other tags stay too."""
  return re.sub(r"<(/)?b>", "", text.replace("<br>", " "))


def format_multirc(record: sources.Record, split: str) -> list[Example]:
  del split
  inputs = _join_fields("multirc", record, ("question", "answer", "paragraph"))
  return [_example(_remove_multirc_markup(inputs), _label_text("multirc", record))]


def format_record(record: sources.Record, split: str) -> list[Example]:
  passage = re.sub(r"(\.|\?|\!|\"|\')\n@highlight\n", r"\1 ", record["passage"])
  passage = passage.replace("\n@highlight\n", ". ")
  inputs = (f"record query: {record['query']} entities: {', '.join(record['entities'])} "
            f"passage: {passage}")
  answers = list(record["answers"])
  if split == "train":
    return [_example(inputs, answer) for answer in answers]
  return [_example(inputs, answers[0] if answers else "")]


def _mark_words(text: str, word_index: int, span: str, mark: str = "*") -> str:
  words = text.split(" ")
  length = max(1, len(span.split(" ")))
  if not 0 <= word_index <= len(words) - length:
    return text
  marked = f"{mark}{' '.join(words[word_index:word_index + length])}{mark}"
  return " ".join(words[:word_index] + [marked] + words[word_index + length:])


def format_wsc(record: sources.Record, split: str) -> list[Example]:
  if split == "train" and int(record["label"]) != 1:
    return []  # T5 trains on correct referents only: the target is the referent's text
  inputs = "wsc: " + _mark_words(record["text"], int(record["span2_index"]),
                                 record["span2_text"])
  return [_example(inputs, record["span1_text"])]


SUPER_GLUE_FORMATTERS: dict[str, Formatter] = {
    "boolq": _glue_formatter("boolq", "boolq", ("passage", "question")),
    "cb": _glue_formatter("cb", "cb", ("hypothesis", "premise")),
    "copa": _glue_formatter("copa", "copa", ("choice1", "choice2", "premise", "question")),
    "multirc": format_multirc,
    "record": format_record,
    "rte": _glue_formatter("rte", "rte", ("hypothesis", "premise")),
    "wic": _glue_formatter("wic", "wic", ("sentence1", "sentence2", "word")),
    "wsc": format_wsc,
    "axb": format_axb,
    "axg": _glue_formatter("axg", "rte", ("hypothesis", "premise")),
}
