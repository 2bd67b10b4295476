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

  Raises MalformedRecordError naming the file, the line number and the missing field.
  """
  records = []
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise MalformedRecordError(f"{path}:{line_number}: not valid JSON ({e.msg})") from e
      if not isinstance(record, dict):
        raise MalformedRecordError(f"{path}:{line_number}: expected a JSON object, got "
                                   f"{type(record).__name__}")
      missing = [field for field in required_fields if field not in record]
      if missing:
        raise MalformedRecordError(f"{path}:{line_number}: missing field(s) {missing}; "
                                   f"expected fields {list(required_fields)}")
      record["_location"] = f"{path}:{line_number}"
      records.append(record)
  if not records:
    raise MalformedRecordError(f"{path}: the file holds no records")
  return records


def _field_error(record: Record, message: str) -> MalformedRecordError:
  return MalformedRecordError(f"{record.get('_location', '<record>')}: {message}")


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
  return read_jsonl(path, required_fields=("question", "answer"))


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
  path = find_dataset_file("mbpp", ["mbpp/mbpp.jsonl", "mbpp.jsonl"])
  task_ids = MBPP_SPLIT_TASK_IDS[split]
  records = [r for r in read_jsonl(path, required_fields=MBPP_FIELDS)
             if int(r["task_id"]) in task_ids]
  return sorted(records, key=lambda r: int(r["task_id"]))


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
  return [flat for record in raw for flat in flatten(config, record)]


def _label_index(config: str, record: Record) -> int:
  """Released label (string, bool or int; absent in test files) -> TFDS class index."""
  if "label" not in record:
    return -1
  label = record["label"]
  names = SUPER_GLUE_LABEL_NAMES[config]
  if isinstance(label, bool):
    return int(label)
  if isinstance(label, int) and 0 <= label < len(names):
    return label
  if isinstance(label, str) and label in names:
    return names.index(label)
  raise _field_error(record, f"field 'label' = {label!r}; expected one of {list(names)}")


_SUPER_GLUE_REQUIRED = {
    "boolq": ("question", "passage"),
    "cb": ("premise", "hypothesis"),
    "copa": ("premise", "choice1", "choice2", "question"),
    "rte": ("premise", "hypothesis"),
    "wic": ("word", "sentence1", "sentence2"),
    "axb": ("sentence1", "sentence2"),
    "axg": ("premise", "hypothesis"),
}


def _require(record: Record, fields: Sequence[str]):
  missing = [f for f in fields if f not in record]
  if missing:
    raise _field_error(record, f"missing field(s) {missing}; expected fields {list(fields)}")


def _flat_super_glue_record(config: str, record: Record) -> list[Record]:
  _require(record, _SUPER_GLUE_REQUIRED[config])
  flat = {k: v for k, v in record.items() if k != "label"}
  flat["label"] = _label_index(config, record)
  flat.setdefault("idx", -1)
  return [flat]


def _flat_wsc(config: str, record: Record) -> list[Record]:
  _require(record, ("text", "target"))
  target = record["target"]
  _require({**target, "_location": record["_location"]},
           ("span1_text", "span1_index", "span2_text", "span2_index"))
  return [{"text": record["text"], "span1_text": target["span1_text"],
           "span1_index": target["span1_index"], "span2_text": target["span2_text"],
           "span2_index": target["span2_index"], "label": _label_index(config, record),
           "idx": record.get("idx", -1), "_location": record["_location"]}]


def _flat_multirc(config: str, record: Record) -> list[Record]:
  """One released paragraph -> one record per (question, answer), as in TFDS."""
  del config
  _require(record, ("passage",))
  passage = record["passage"]
  _require({**passage, "_location": record["_location"]}, ("text", "questions"))
  flat = []
  for question in passage["questions"]:
    for answer in question["answers"]:
      flat.append({"paragraph": passage["text"], "question": question["question"],
                   "answer": answer["text"],
                   "label": int(answer["label"]) if "label" in answer else -1,
                   "idx": {"paragraph": record.get("idx", -1),
                           "question": question.get("idx", -1), "answer": answer.get("idx", -1)},
                   "_location": record["_location"]})
  return flat


def _flat_record(config: str, record: Record) -> list[Record]:
  """One released ReCoRD passage -> one record per query, as in TFDS."""
  del config
  _require(record, ("passage", "qas"))
  passage = record["passage"]
  text = passage["text"]
  entities = []
  for span in passage.get("entities", []):
    entity = text[span["start"]:span["end"] + 1]  # released spans are end-inclusive
    if entity not in entities:
      entities.append(entity)
  flat = []
  for qa in record["qas"]:
    answers = []
    for answer in qa.get("answers", []):
      if answer["text"] not in answers:
        answers.append(answer["text"])
    flat.append({"passage": text, "query": qa["query"], "entities": entities, "answers": answers,
                 "idx": {"passage": record.get("idx", -1), "query": qa.get("idx", -1)},
                 "_location": record["_location"]})
  return flat


_SUPER_GLUE_FLATTENERS: dict[str, Callable[[str, Record], list[Record]]] = {
    "wsc": _flat_wsc, "multirc": _flat_multirc, "record": _flat_record,
}


def _check_split(dataset: str, split: str, splits: Sequence[str]):
  if split not in splits:
    raise ValueError(f"Dataset '{dataset}' has no split '{split}'; splits: {list(splits)}")
