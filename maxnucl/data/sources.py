"""Locating and reading each dataset's released files, or its TFDS builder (never downloading).

Local files are looked up under each data root, in order: the gin binding `data_roots.data_dir`,
then the `MAXNUCL_DATA_DIR` environment variable.  Expected layouts (as released):

  GSM8K      <root>/gsm8k/{train,test}.jsonl               (or <root>/grade_school_math/data/)
             fields: question, answer
  MBPP       <root>/mbpp/mbpp.jsonl                        (or <root>/mbpp.jsonl)
             fields: task_id, text, code, test_list, test_setup_code, challenge_test_list
  SuperGLUE  <root>/super_glue/<Task>/{train,val,test}.jsonl  (or <root>/SuperGLUE/<Task>/)
             <Task> in BoolQ CB COPA MultiRC ReCoRD RTE WiC WSC; AX-b/AX-b.jsonl, AX-g/AX-g.jsonl

If no local file is found and TensorFlow Datasets has the builder already prepared (gsm8k,
super_glue/<config>) in `data_roots.tfds_data_dir`, records are read from TFDS.  Otherwise
`DatasetNotFoundError` names the dataset, every place searched and the expected file names.

Readers return plain Python records (dicts of str / int / list) in the *TFDS feature schema*
(e.g. MultiRC one record per answer, SuperGLUE labels as class indices), so one formatter in
`formats.py` serves both sources.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Callable, Optional, Sequence

import gin

DATA_DIR_ENV = "MAXNUCL_DATA_DIR"

Record = dict[str, Any]


class DatasetNotFoundError(FileNotFoundError):
  """A dataset's files are in none of the places searched."""


class MalformedRecordError(ValueError):
  """A line of a dataset file is not valid JSON or lacks a field."""


@gin.configurable
def data_roots(data_dir: Optional[str] = None) -> list[pathlib.Path]:
  """Directories searched for local dataset files: gin `data_dir`, then $MAXNUCL_DATA_DIR."""
  roots = []
  for candidate in (data_dir, os.environ.get(DATA_DIR_ENV)):
    if candidate and pathlib.Path(candidate) not in roots:
      roots.append(pathlib.Path(candidate))
  return roots


@gin.configurable
def tfds_data_dir(data_dir: Optional[str] = None) -> Optional[str]:
  """Where prepared TFDS builders are looked for (None: TFDS's default, ~/tensorflow_datasets)."""
  return data_dir


def find_dataset_file(dataset: str, relative_paths: Sequence[str],
                      tfds_name: Optional[str] = None) -> Optional[pathlib.Path]:
  """First existing `<root>/<relative_path>`; None if a prepared TFDS builder should be used.

  Raises DatasetNotFoundError naming the dataset, the places searched and the expected files.
  """
  searched = []
  for root in data_roots():
    for relative in relative_paths:
      path = root / relative
      if path.is_file():
        return path
      searched.append(str(path))
  if tfds_name is not None and _tfds_builder_prepared(tfds_name):
    return None
  roots_text = ", ".join(str(r) for r in data_roots()) or "(none set)"
  lines = [f"Dataset '{dataset}' not found.",
           f"  Data roots (gin data_roots.data_dir, then ${DATA_DIR_ENV}): {roots_text}",
           f"  Expected file (relative to a data root): {' or '.join(relative_paths)}"]
  if searched:
    lines.append("  Searched: " + ", ".join(searched))
  if tfds_name is not None:
    lines.append(f"  TFDS builder '{tfds_name}': not prepared in "
                 f"{tfds_data_dir() or 'the default TFDS data_dir'} (or TFDS not installed); "
                 "maxnucl never downloads.")
  raise DatasetNotFoundError("\n".join(lines))


def read_jsonl(path: pathlib.Path, required_fields: Sequence[str] = ()) -> list[Record]:
  """All records of a JSON-lines file; blank lines are skipped.

  Raises MalformedRecordError naming the file, the line number and what is wrong: bytes that are
  not UTF-8, a line that is not a JSON object, a missing field.
  """
  records = []
  with open(path, "rb") as f:
    for line_number, raw in enumerate(f, start=1):
      where = f"{path}:{line_number}"
      line = decode_line(raw, where, MalformedRecordError)
      if not line.strip():
        continue
      record = json_object(line, where, MalformedRecordError)
      missing = [field for field in required_fields if field not in record]
      if missing:
        raise MalformedRecordError(f"{where}: missing field(s) {missing}; expected fields "
                                   f"{list(required_fields)}")
      record["_location"] = where
      records.append(record)
  if not records:
    raise MalformedRecordError(f"{path}: the file holds no records")
  return records


def decode_line(raw: bytes, where: str, error: type = ValueError) -> str:
  """`raw` as UTF-8 text, or `error` naming `where` (file and line) and the first bad byte."""
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise error(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column "
                f"{len(raw[:e.start].decode('utf-8', 'replace')) + 1})") from None


def json_object(text: str, where: str, error: type = ValueError) -> dict:
  """The JSON object `text` holds, or `error` naming `where` and what is wrong (invalid JSON with
  its position, nesting too deep for the parser, a value that is not an object)."""
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    position = f"line {e.lineno} column {e.colno}" if e.lineno > 1 else f"column {e.colno}"
    raise error(f"{where}: not valid JSON ({e.msg}, {position})") from None
  except RecursionError:
    raise error(f"{where}: not valid JSON (nested too deeply)") from None
  if not isinstance(value, dict):
    raise error(f"{where}: expected a JSON object, got {type(value).__name__}")
  return value


def _field_error(record: Record, message: str) -> MalformedRecordError:
  return MalformedRecordError(f"{record.get('_location', '<record>')}: {message}")


# ---- field checks: each returns the value or raises naming file, line and field -----------------

INT32_MAX = 2**31 - 1  # TFDS stores indices as int32


def _shown(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _wrong(record: Record, field: str, value: Any, expected: str) -> MalformedRecordError:
  return _field_error(record, f"field '{field}' = {_shown(value)}; expected {expected}")


def _get(record: Record, container: dict, key: str, field: str) -> Any:
  if key not in container:
    raise _field_error(record, f"missing field '{field}'")
  return container[key]


def _text(record: Record, container: dict, key: str, field: Optional[str] = None) -> str:
  """A string field (a number, null, list or object is refused: it would be formatted into the
  prompt as "None", "6", "['q']")."""
  value = _get(record, container, key, field or key)
  if not isinstance(value, str):
    raise _wrong(record, field or key, value, "a string")
  return value


def _integer(record: Record, container: dict, key: str, field: Optional[str] = None,
             low: int = 0, high: int = INT32_MAX) -> int:
  """An integer field in [low, high] (a boolean, float or string is refused)."""
  value = _get(record, container, key, field or key)
  if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
    raise _wrong(record, field or key, value, f"an integer in [{low}, {high}]")
  return value


def _object(record: Record, container: dict, key: str, field: Optional[str] = None) -> dict:
  value = _get(record, container, key, field or key)
  if not isinstance(value, dict):
    raise _wrong(record, field or key, value, "a JSON object")
  return value


def _list(record: Record, container: dict, key: str, field: Optional[str] = None,
          nonempty: bool = False) -> list:
  value = _get(record, container, key, field or key)
  if not isinstance(value, list) or (nonempty and not value):
    raise _wrong(record, field or key, value, "a non-empty list" if nonempty else "a list")
  return value


def _items(record: Record, items: list, field: str, kind: str) -> list:
  """The elements of a list field, each checked to be a `kind` ("object" or "string")."""
  expected = {"object": dict, "string": str}[kind]
  for i, item in enumerate(items):
    if not isinstance(item, expected):
      raise _wrong(record, f"{field}[{i}]", item, f"a JSON {kind}" if kind == "object" else
                   "a string")
  return items


# ---- TFDS (only when the builder is already prepared; imports TensorFlow) -----------------------

_TFDS_DATASET_INFO = "dataset_info.json"  # what TFDS writes into each prepared version's folder


def _tfds_builder_prepared(name: str) -> bool:
  """Whether TFDS has `name` ("gsm8k", "super_glue/boolq") prepared in its data_dir.  TFDS (and
  with it TensorFlow) is asked only where a local data_dir holds a prepared version of it,
  `<data_dir>/<name>/<version>/dataset_info.json`: TFDS's own check logs a warning ("Variant
  folder ... has no dataset_info.json") for every dataset that is not there, which a user who
  never ran `tfds build` cannot act on.  A URL data_dir is left to TFDS."""
  data_dir = tfds_data_dir() or os.environ.get("TFDS_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), "tensorflow_datasets")  # TFDS's default
  if "://" not in str(data_dir) and not any(
      pathlib.Path(data_dir, name).glob(f"*/{_TFDS_DATASET_INFO}")):
    return False
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    return False
  try:
    return tfds.builder(name, data_dir=tfds_data_dir()).is_prepared()
  except Exception:  # pylint: disable=broad-except  # unknown builder, bad dir: not available
    return False


def hide_accelerators_from_tensorflow():
  """Keeps TensorFlow (tf.data, seqio, TFDS) off GPUs/TPUs so it never takes JAX's memory."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      # Devices were already initialised (or the kind is unknown): then they must be hidden.
      if tf.config.get_visible_devices(kind):
        raise RuntimeError(f"TensorFlow already initialised with visible {kind}s; import "
                           "maxnucl.data.tasks before any other TensorFlow use") from None


def _decode(value):
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, dict):
    return {k: _decode(v) for k, v in value.items()}
  if hasattr(value, "tolist"):
    return _decode(value.tolist())
  if isinstance(value, list):
    return [_decode(v) for v in value]
  return value


def read_tfds(name: str, split: str) -> list[Record]:
  """Records of a prepared TFDS builder as Python values (bytes decoded to str)."""
  hide_accelerators_from_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  dataset = tfds.load(name, split=split, data_dir=tfds_data_dir(), download=False,
                      shuffle_files=False)
  records = []
  for i, example in enumerate(tfds.as_numpy(dataset)):
    record = _decode(example)
    record["_location"] = f"tfds:{name}/{split}[{i}]"
    records.append(record)
  return records


# ---- GSM8K ---------------------------------------------------------------------------------------

GSM8K_SPLITS = ("train", "test")


def read_gsm8k(split: str) -> list[Record]:
  """GSM8K records {question, answer}; answer is the worked solution ending in '#### <n>'."""
  _check_split("gsm8k", split, GSM8K_SPLITS)
  path = find_dataset_file("gsm8k", [f"gsm8k/{split}.jsonl",
                                     f"grade_school_math/data/{split}.jsonl"],
                           tfds_name="gsm8k")
  if path is None:
    return read_tfds("gsm8k", split)
  records = read_jsonl(path, required_fields=("question", "answer"))
  for record in records:
    _text(record, record, "question")
    _text(record, record, "answer")
  return records


# ---- MBPP ----------------------------------------------------------------------------------------

# Conventional split by task id (Austin et al., 2021).
MBPP_SPLIT_TASK_IDS = {
    "prompt": range(1, 11),
    "test": range(11, 511),
    "train": range(511, 601),
    "validation": range(601, 975),
}
MBPP_FIELDS = ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list")


def read_mbpp(split: str) -> list[Record]:
  """MBPP records of one split (chosen by task id), sorted by task id."""
  _check_split("mbpp", split, tuple(MBPP_SPLIT_TASK_IDS))
  path = mbpp_file()
  task_ids = MBPP_SPLIT_TASK_IDS[split]
  records, seen = [], {}
  for record in read_jsonl(path, required_fields=MBPP_FIELDS):
    _check_mbpp(record)
    task_id = record["task_id"]
    if task_id in seen:
      raise _wrong(record, "task_id", task_id, f"a task id not used before (line {seen[task_id]})")
    seen[task_id] = record["_location"].rsplit(":", 1)[1]
    if task_id in task_ids:
      records.append(record)
  return sorted(records, key=lambda r: r["task_id"])


def mbpp_file() -> pathlib.Path:
  """The released mbpp.jsonl (all splits)."""
  return find_dataset_file("mbpp", ["mbpp/mbpp.jsonl", "mbpp.jsonl"])


def _check_mbpp(record: Record) -> None:
  """Released types: task_id an integer, text/code/test_setup_code strings, test_list a
  non-empty list of assert strings (a task without tests would pass any program),
  challenge_test_list a list of strings."""
  _integer(record, record, "task_id")
  for field in ("text", "code", "test_setup_code"):
    _text(record, record, field)
  _items(record, _list(record, record, "test_list", nonempty=True), "test_list", "string")
  _items(record, _list(record, record, "challenge_test_list"), "challenge_test_list", "string")


# ---- SuperGLUE -----------------------------------------------------------------------------------

# TFDS config name -> (released directory, released split files).
SUPER_GLUE_FILES = {
    "boolq": ("BoolQ", {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}),
    "cb": ("CB", {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}),
    "copa": ("COPA", {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}),
    "multirc": ("MultiRC", {"train": "train.jsonl", "validation": "val.jsonl",
                            "test": "test.jsonl"}),
    "record": ("ReCoRD", {"train": "train.jsonl", "validation": "val.jsonl",
                          "test": "test.jsonl"}),
    "rte": ("RTE", {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}),
    "wic": ("WiC", {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}),
    "wsc": ("WSC", {"train": "train.jsonl", "validation": "val.jsonl", "test": "test.jsonl"}),
    "axb": ("AX-b", {"test": "AX-b.jsonl"}),
    "axg": ("AX-g", {"test": "AX-g.jsonl"}),
}

# Class names in TFDS's label order; released files spell labels as these strings or booleans.
SUPER_GLUE_LABEL_NAMES = {
    "boolq": ("False", "True"),
    "cb": ("entailment", "contradiction", "neutral"),
    "copa": ("choice1", "choice2"),
    "multirc": ("False", "True"),
    "rte": ("entailment", "not_entailment"),
    "wic": ("False", "True"),
    "wsc": ("False", "True"),
    "axb": ("entailment", "not_entailment"),
    "axg": ("entailment", "not_entailment"),
}


def super_glue_splits(config: str) -> tuple[str, ...]:
  return tuple(SUPER_GLUE_FILES[config][1])


def read_super_glue(config: str, split: str) -> list[Record]:
  """SuperGLUE records of one task in TFDS's schema (label = class index, -1 when unlabelled)."""
  if config not in SUPER_GLUE_FILES:
    raise ValueError(f"Unknown SuperGLUE task '{config}'; known: {sorted(SUPER_GLUE_FILES)}")
  _check_split(f"super_glue/{config}", split, super_glue_splits(config))
  directory, files = SUPER_GLUE_FILES[config]
  filename = files[split]
  path = find_dataset_file(f"super_glue/{config}",
                           [f"super_glue/{directory}/{filename}",
                            f"SuperGLUE/{directory}/{filename}", f"{directory}/{filename}"],
                           tfds_name=f"super_glue/{config}")
  if path is None:
    return read_tfds(f"super_glue/{config}", split)
  raw = read_jsonl(path)
  flatten = _SUPER_GLUE_FLATTENERS.get(config, _flat_super_glue_record)
  flat = [one for record in raw for one in flatten(config, record, split)]
  if config == "multirc":
    _check_multirc_groups(raw)
  if not flat:
    raise MalformedRecordError(f"{path}: the file holds no {config} examples (no question with "
                               f"an answer)")
  return flat


# How the released files spell labels: the class names (the entailment tasks), 0/1 (COPA's
# choice1 / choice2, MultiRC's answers; booleans too, which TFDS reads alike) or booleans.
_NAMED_LABELS = ("cb", "rte", "axb", "axg")
_NUMBERED_LABELS = ("copa", "multirc")


def _label_index(config: str, record: Record, container: dict, field: str, split: str) -> int:
  """Released label -> TFDS class index; -1 where a test file has none (only test files are
  unlabelled, as TFDS asserts).  A boolean is no CB/RTE class and a class name no boolean."""
  key = field.rsplit(".", 1)[-1]
  if key not in container:
    if split == "test":
      return -1
    raise _field_error(record, f"missing field(s) {[field]} (only test files are unlabelled)")
  label = container[key]
  names = SUPER_GLUE_LABEL_NAMES[config]
  if config in _NAMED_LABELS:
    if isinstance(label, str) and label in names:
      return names.index(label)
    raise _wrong(record, field, label, f"one of {list(names)}")
  if isinstance(label, bool) or (config in _NUMBERED_LABELS and type(label) is int
                                 and label in (0, 1)):
    return int(label)
  raise _wrong(record, field, label, {"copa": "0 (choice1) or 1 (choice2)",
                                      "multirc": "0 or 1"}.get(config, "true or false"))


_SUPER_GLUE_REQUIRED = {  # the text fields of the flat tasks (TFDS's features)
    "boolq": ("question", "passage"),
    "cb": ("premise", "hypothesis"),
    "copa": ("premise", "choice1", "choice2", "question"),
    "rte": ("premise", "hypothesis"),
    "wic": ("word", "sentence1", "sentence2"),
    "axb": ("sentence1", "sentence2"),
    "axg": ("premise", "hypothesis"),
}
COPA_QUESTIONS = ("cause", "effect")


def _require(record: Record, fields: Sequence[str]):
  missing = [f for f in fields if f not in record]
  if missing:
    raise _field_error(record, f"missing field(s) {missing}; expected fields {list(fields)}")


def _flat_super_glue_record(config: str, record: Record, split: str) -> list[Record]:
  _require(record, _SUPER_GLUE_REQUIRED[config] + ("idx",))
  for field in _SUPER_GLUE_REQUIRED[config]:
    _text(record, record, field)
  _integer(record, record, "idx")
  if config == "copa" and record["question"] not in COPA_QUESTIONS:
    raise _wrong(record, "question", record["question"], f"one of {list(COPA_QUESTIONS)}")
  if config == "wic":  # the word's character span in each sentence (end exclusive)
    for n in ("1", "2"):
      end = _integer(record, record, f"end{n}", high=len(record[f"sentence{n}"]))
      _integer(record, record, f"start{n}", high=end)
  flat = {k: v for k, v in record.items() if k != "label"}
  flat["label"] = _label_index(config, record, record, "label", split)
  return [flat]


def _flat_wsc(config: str, record: Record, split: str) -> list[Record]:
  """The released record with its `target` spans lifted to the top, as in TFDS; each span's word
  index must lie inside the text (words split at spaces, as the formats mark them)."""
  _require(record, ("text", "target", "idx"))
  text = _text(record, record, "text")
  target = _object(record, record, "target")
  words = len(text.split(" "))
  flat = {"text": text}
  for span in ("span1", "span2"):
    flat[f"{span}_text"] = _text(record, target, f"{span}_text", f"target.{span}_text")
    flat[f"{span}_index"] = _integer(record, target, f"{span}_index", f"target.{span}_index",
                                     high=words - 1)
  flat.update(label=_label_index(config, record, record, "label", split),
              idx=_integer(record, record, "idx"), _location=record["_location"])
  return [flat]


def _flat_multirc(config: str, record: Record, split: str) -> list[Record]:
  """One released paragraph -> one record per (question, answer), as in TFDS."""
  _require(record, ("passage", "idx"))
  paragraph_idx = _integer(record, record, "idx")
  passage = _object(record, record, "passage")
  text = _text(record, passage, "text", "passage.text")
  questions = _items(record, _list(record, passage, "questions", "passage.questions"),
                     "passage.questions", "object")
  flat = []
  for i, question in enumerate(questions):
    where = f"passage.questions[{i}]"
    question_text = _text(record, question, "question", f"{where}.question")
    question_idx = _integer(record, question, "idx", f"{where}.idx")
    answers = _items(record, _list(record, question, "answers", f"{where}.answers"),
                     f"{where}.answers", "object")
    for j, answer in enumerate(answers):
      at = f"{where}.answers[{j}]"
      flat.append({"paragraph": text, "question": question_text,
                   "answer": _text(record, answer, "text", f"{at}.text"),
                   "label": _label_index(config, record, answer, f"{at}.label", split),
                   "idx": {"paragraph": paragraph_idx, "question": question_idx,
                           "answer": _integer(record, answer, "idx", f"{at}.idx")},
                   "_location": record["_location"]})
  return flat


def _check_multirc_groups(records: list[Record]) -> None:
  """A question is one (paragraph idx, question idx) pair: its answers are scored together (em),
  so two questions with the same pair would be merged."""
  seen = {}
  for record in records:
    for i, question in enumerate(record["passage"]["questions"]):
      key = (record["idx"], question["idx"])
      if key in seen:
        raise _wrong(record, f"passage.questions[{i}].idx", question["idx"],
                     f"a question idx not used before in paragraph idx {record['idx']} "
                     f"(there: {seen[key]})")
      seen[key] = record["_location"]


def _flat_record(config: str, record: Record, split: str) -> list[Record]:
  """One released ReCoRD passage -> one record per query, as in TFDS (entities and answers
  deduplicated and sorted).  Entity spans are character offsets, end inclusive, inside the
  passage."""
  del config
  _require(record, ("passage", "qas", "idx"))
  passage_idx = _integer(record, record, "idx")
  passage = _object(record, record, "passage")
  text = _text(record, passage, "text", "passage.text")
  spans = _items(record, _list(record, passage, "entities", "passage.entities"),
                 "passage.entities", "object")
  entities = []
  for i, span in enumerate(spans):
    end = _integer(record, span, "end", f"passage.entities[{i}].end", high=len(text) - 1)
    start = _integer(record, span, "start", f"passage.entities[{i}].start", high=end)
    entity = text[start:end + 1]  # released spans are end-inclusive
    if entity not in entities:
      entities.append(entity)
  flat = []
  for j, qa in enumerate(_items(record, _list(record, record, "qas"), "qas", "object")):
    where = f"qas[{j}]"
    if "answers" not in qa and split != "test":
      raise _field_error(record, f"missing field(s) {[where + '.answers']} (only test files "
                                 f"are unlabelled)")
    answers = []
    for i, answer in enumerate(_items(record, _list(record, qa, "answers", f"{where}.answers")
                                      if "answers" in qa else [], f"{where}.answers", "object")):
      answer_text = _text(record, answer, "text", f"{where}.answers[{i}].text")
      if answer_text not in answers:
        answers.append(answer_text)
    flat.append({"passage": text, "query": _text(record, qa, "query", f"{where}.query"),
                 "entities": sorted(entities), "answers": sorted(answers),  # as TFDS does
                 "idx": {"passage": passage_idx,
                         "query": _integer(record, qa, "idx", f"{where}.idx")},
                 "_location": record["_location"]})
  return flat


_SUPER_GLUE_FLATTENERS: dict[str, Callable[[str, Record, str], list[Record]]] = {
    "wsc": _flat_wsc, "multirc": _flat_multirc, "record": _flat_record,
}


def _check_split(dataset: str, split: str, splits: Sequence[str]):
  if split not in splits:
    raise ValueError(f"Dataset '{dataset}' has no split '{split}'; splits: {list(splits)}")
