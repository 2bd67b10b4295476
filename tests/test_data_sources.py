"""Specification of the dataset readers and text formats, on fixture files in released formats."""

import json
import re
import os
import pathlib
import subprocess
import sys
import textwrap

import gin
import pytest

from maxnucl.data import catalog
from maxnucl.data import formats
from maxnucl.data import sources

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"


pytestmark = pytest.mark.usefixtures("offline_data")  # tests/conftest.py


EXPECTED_SPLIT_SIZES = {
    "gsm8k": {"train": 3, "test": 2},
    "mbpp": {"prompt": 4, "test": 2, "train": 3, "validation": 2},
    "mbpp_3shot": {"test": 2, "validation": 2},
    "super_glue_boolq_v102": {"train": 3, "validation": 1, "test": 1},
    "super_glue_cb_v102": {"train": 3, "validation": 1, "test": 1},
    "super_glue_copa_v102": {"train": 2, "validation": 1, "test": 1},
    "super_glue_multirc_v102": {"train": 3, "validation": 3, "test": 3},  # one per answer
    "super_glue_record_v102": {"train": 2, "validation": 1, "test": 1},  # train: per answer
    "super_glue_rte_v102": {"train": 2, "validation": 1, "test": 1},
    "super_glue_wic_v102": {"train": 2, "validation": 1, "test": 1},
    "super_glue_wsc_v102": {"train": 1, "validation": 1, "test": 1},  # train: referents only
    "super_glue_axb_v102": {"test": 2},
    "super_glue_axg_v102": {"test": 2},
    "text_corpus": {"train": 4, "validation": 2, "test": 2},  # language modelling: no inputs
    "text_corpus_finetune": {"train": 2, "test": 2},
}
LANGUAGE_MODELLING = ("text_corpus", "text_corpus_finetune")


def test_every_registered_file_task_reads_every_split_from_fixtures():
  assert set(EXPECTED_SPLIT_SIZES) | {"synthetic_arithmetic"} == set(catalog.TASKS)
  for name, sizes in EXPECTED_SPLIT_SIZES.items():
    task = catalog.get_task(name)
    assert set(task.splits) == set(sizes), name
    for split, size in sizes.items():
      examples = task.examples(split)
      assert len(examples) == size, (name, split)
      for example in examples:
        assert isinstance(example["inputs"], str) and isinstance(example["targets"], str)
        if name in LANGUAGE_MODELLING:
          assert example["inputs"] == "" and example["targets"].strip(), (name, split)
        else:
          assert example["inputs"], (name, split)


def test_gsm8k_input_is_the_question_and_target_the_worked_solution():
  example = catalog.get_task("gsm8k").examples("train")[0]
  assert example["inputs"] == ("Question: Mia has 3 boxes of 4 crayons. How many crayons does "
                               "she have?\nAnswer: ")
  assert example["targets"].endswith("\n#### 12")
  assert "<<3*4=12>>" in example["targets"]
  assert formats.gsm8k_final_answer(example["targets"]) == "12"
  assert formats.gsm8k_final_answer("so #### 1,000") == "1000"


def test_mbpp_splits_follow_task_ids_and_target_is_code():
  ids = {split: [int(r["task_id"]) for r in sources.read_mbpp(split)]
         for split in sources.MBPP_SPLIT_TASK_IDS}
  assert ids == {"prompt": [1, 2, 3, 4], "test": [11, 12], "train": [511, 512, 513],
                 "validation": [601, 602]}
  example = catalog.get_task("mbpp").examples("train")[0]
  assert example["targets"] == "def mirror(x):\n  return x * 1"
  assert example["inputs"].startswith("You are an expert Python programmer, and here is your "
                                      "task: Write a function to mirror a number.")
  assert example["inputs"].endswith("assert mirror(3) == 3\n[BEGIN]\n")


def test_mbpp_3shot_prompt_holds_prompt_tasks_2_3_4_then_the_question():
  example = catalog.get_task("mbpp_3shot").examples("test")[0]
  prompt = example["inputs"]
  assert prompt.count("[BEGIN]") == 4 and prompt.count("[DONE]") == 3
  assert prompt.index("def echo") < prompt.index("def same") < prompt.index("def copy_int")
  assert "def ident" not in prompt  # task 1 is not a shot
  assert "\r" not in prompt
  assert prompt.endswith("assert keep(3) == 3\n[BEGIN]\n")
  assert example["targets"] == "def keep(x):\n  return x"


@pytest.mark.parametrize("name, split, inputs, targets", [
    ("super_glue_boolq_v102", "train", "boolq passage: The Sun is the star at the center of the "
     "Solar System. question: is the sun a star", "True"),
    ("super_glue_cb_v102", "train", "cb hypothesis: Kim visited Paris. premise: Kim never "
     "visited Paris.", "contradiction"),
    ("super_glue_copa_v102", "train", "copa choice1: The liquid froze. choice2: The liquid "
     "spilled. premise: I tipped the bottle. question: effect", "choice2"),
    ("super_glue_multirc_v102", "train", "multirc question: What did Ann plant? answer: A "
     "flower paragraph: Sent 1: Ann planted a tree. Sent 2: It grew tall in two years. ",
     "False"),
    ("super_glue_rte_v102", "train", "rte hypothesis: Ana lives in Rome. premise: Ana lives in "
     "Lisbon.", "not_entailment"),
    ("super_glue_wic_v102", "train", "wic sentence1: I run every morning. sentence2: They run "
     "to the shop. word: run", "True"),
    ("super_glue_wsc_v102", "train", "wsc: The trophy does not fit into the suitcase because "
     "*it* is too large .", "The trophy"),
    ("super_glue_axb_v102", "test", "rte hypothesis: Some birds flew. premise: No birds flew.",
     "not_entailment"),
    ("super_glue_axg_v102", "test", "rte hypothesis: The nurse was late. premise: The nurse "
     "called the doctor because she was late.", "not_entailment"),
])
def test_super_glue_t5_text_to_text_format(name, split, inputs, targets):
  assert {"inputs": inputs, "targets": targets} in catalog.get_task(name).examples(split)


def test_record_lists_entities_replaces_highlights_and_trains_on_every_answer():
  train = catalog.get_task("super_glue_record_v102").examples("train")
  assert [e["targets"] for e in train] == ["Eiffel Tower", "Paris"]
  assert train[0]["inputs"] == (
      "record query: Tourists climbed the @placeholder again. entities: CNN, Eiffel Tower, "
      "France, Paris passage: Paris (CNN) The Eiffel Tower reopened on Monday. The tower in Paris "
      "reopened. Visitors returned to France")
  assert catalog.get_task("super_glue_record_v102").examples("test")[0]["targets"] == ""


def test_unlabelled_test_records_have_empty_targets():
  assert catalog.get_task("super_glue_boolq_v102").examples("test")[0]["targets"] == ""


def test_gin_data_dir_binding_is_searched_before_the_environment(tmp_path, monkeypatch):
  monkeypatch.delenv(sources.DATA_DIR_ENV)
  (tmp_path / "gsm8k").mkdir()
  (tmp_path / "gsm8k" / "test.jsonl").write_text(
      json.dumps({"question": "1+1?", "answer": "#### 2"}) + "\n")
  gin.bind_parameter("data_roots.data_dir", str(tmp_path))
  assert catalog.get_task("gsm8k").examples("test") == [
      {"inputs": "Question: 1+1?\nAnswer: ", "targets": "#### 2"}]


def test_a_dataset_missing_from_tfds_is_reported_without_tfds_warnings_or_tensorflow(tmp_path):
  """Looking for a dataset that is in no data root nor in TFDS's data_dir (here empty, and one
  holding only an unprepared folder) gives the one error, not TFDS's "Variant folder ... has no
  dataset_info.json" warning, and never imports TensorFlow for it (a fresh process, logging as
  the command lines set it up)."""
  (tmp_path / "tfds_partial" / "super_glue" / "cb").mkdir(parents=True)
  code = textwrap.dedent("""
      import logging, sys
      import gin
      from maxnucl.data import catalog, sources
      logging.basicConfig(level=logging.WARNING)
      for task, data_dir in (("gsm8k", "tfds_empty"), ("super_glue_cb_v102", "tfds_partial")):
        gin.bind_parameter("tfds_data_dir.data_dir", f"{sys.argv[1]}/{data_dir}")
        try:
          catalog.get_task(task).examples("test")
        except sources.DatasetNotFoundError:
          print("not found:", task)
      print("tensorflow imported:", "tensorflow" in sys.modules)
      """)
  (tmp_path / "tfds_empty").mkdir()
  env = {**os.environ, sources.DATA_DIR_ENV: str(tmp_path / "no_data")}
  done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                        text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines() == ["not found: gsm8k", "not found: super_glue_cb_v102",
                                      "tensorflow imported: False"]
  assert done.stderr == ""


def test_missing_dataset_names_dataset_places_and_expected_files(tmp_path, monkeypatch):
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
  with pytest.raises(sources.DatasetNotFoundError) as error:
    catalog.get_task("gsm8k").examples("train")
  message = str(error.value)
  assert "'gsm8k'" in message
  assert str(tmp_path / "gsm8k" / "train.jsonl") in message
  assert "gsm8k/train.jsonl" in message and "TFDS builder 'gsm8k'" in message
  with pytest.raises(sources.DatasetNotFoundError, match=r"super_glue/copa[\s\S]*COPA/val.jsonl"):
    catalog.get_task("super_glue_copa_v102").examples("validation")
  with pytest.raises(sources.DatasetNotFoundError, match=r"'mbpp'[\s\S]*mbpp/mbpp.jsonl"):
    catalog.get_task("mbpp").examples("train")


def test_missing_dataset_with_no_data_dir_says_none_set(monkeypatch):
  monkeypatch.delenv(sources.DATA_DIR_ENV)
  with pytest.raises(sources.DatasetNotFoundError, match=r"\(none set\)"):
    sources.read_gsm8k("test")


def test_malformed_json_line_names_file_and_line(tmp_path, monkeypatch):
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
  (tmp_path / "gsm8k").mkdir()
  path = tmp_path / "gsm8k" / "train.jsonl"
  path.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n\n{not json\n")
  with pytest.raises(sources.MalformedRecordError, match=rf"{path}:3: not valid JSON"):
    sources.read_gsm8k("train")


def test_missing_field_names_file_line_and_field(tmp_path, monkeypatch):
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
  (tmp_path / "gsm8k").mkdir()
  path = tmp_path / "gsm8k" / "test.jsonl"
  path.write_text(json.dumps({"question": "q"}) + "\n")
  with pytest.raises(sources.MalformedRecordError, match=rf"{path}:1: missing field\(s\) "
                     r"\['answer'\]"):
    sources.read_gsm8k("test")


def test_unknown_super_glue_label_names_file_line_and_allowed_labels(tmp_path, monkeypatch):
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
  directory = tmp_path / "super_glue" / "CB"
  directory.mkdir(parents=True)
  (directory / "train.jsonl").write_text(
      json.dumps({"premise": "p", "hypothesis": "h", "label": "maybe", "idx": 0}) + "\n")
  with pytest.raises(sources.MalformedRecordError,
                     match=r"train.jsonl:1: field 'label' = 'maybe'; expected one of"):
    sources.read_super_glue("cb", "train")


def test_unknown_split_and_unknown_name_list_what_exists():
  with pytest.raises(ValueError, match=r"no split 'validation'.*\['train', 'test'\]"):
    catalog.get_task("gsm8k").examples("validation")
  with pytest.raises(KeyError, match="super_glue_v102_proportional"):
    catalog.get_task_or_mixture("glue")


def test_prepared_tfds_builder_is_used_when_no_local_file_exists(tmp_path, monkeypatch):
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
  monkeypatch.setattr(sources, "_tfds_builder_prepared", lambda name: name == "super_glue/cb")
  read = []

  def fake_read_tfds(name, split):  # TFDS's feature schema: label is a class index
    read.append((name, split))
    return [{"premise": "p", "hypothesis": "h", "label": 2, "idx": 0}]

  monkeypatch.setattr(sources, "read_tfds", fake_read_tfds)
  assert catalog.get_task("super_glue_cb_v102").examples("train") == [
      {"inputs": "cb hypothesis: h premise: p", "targets": "neutral"}]
  assert read == [("super_glue/cb", "train")]
  with pytest.raises(sources.DatasetNotFoundError, match="TFDS builder 'super_glue/rte'"):
    catalog.get_task("super_glue_rte_v102").examples("train")


def test_empty_file_or_empty_split_is_an_error_not_an_empty_dataset(tmp_path, monkeypatch):
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
  (tmp_path / "gsm8k").mkdir()
  (tmp_path / "gsm8k" / "test.jsonl").write_text("\n")
  with pytest.raises(sources.MalformedRecordError, match=r"test.jsonl: the file holds no records"):
    catalog.get_task("gsm8k").examples("test")
  (tmp_path / "mbpp").mkdir()
  (tmp_path / "mbpp" / "mbpp.jsonl").write_text(
      (FIXTURES / "mbpp" / "mbpp.jsonl").read_text().splitlines()[0] + "\n")  # task 1 only
  with pytest.raises(ValueError, match=r"Task 'mbpp' split 'train' has no examples"):
    catalog.get_task("mbpp").examples("train")


# ---- records are validated field by field (issue 28) ----------------------------------------

def _write_records(root, relative, records):
  path = root / relative
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _refusal(read, match):
  with pytest.raises(sources.MalformedRecordError) as info:
    read()
  message = str(info.value)
  assert "\n" not in message and re.search(match, message), message
  return message


def test_a_text_field_of_another_type_is_refused_naming_file_line_and_field(tmp_path,
                                                                            monkeypatch):
  """`"question": null` became the prompt "Question: None"; a number or list the same."""
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
  good = {"question": "q?", "answer": "a\n#### 1"}
  for wrong in (None, 6, ["q"], {"a": 1}, True):
    path = _write_records(tmp_path, "gsm8k/test.jsonl", [good, {**good, "question": wrong}])
    _refusal(lambda: sources.read_gsm8k("test"),
             rf"^{re.escape(str(path))}:2: field 'question' = .*; expected a string$")
    path = _write_records(tmp_path, "gsm8k/test.jsonl", [{**good, "answer": wrong}])
    _refusal(lambda: sources.read_gsm8k("test"), rf"^{re.escape(str(path))}:1: field 'answer'")
  mbpp = json.loads((FIXTURES / "mbpp" / "mbpp.jsonl").read_text().splitlines()[0])
  for field, wrong in (("text", None), ("code", 3), ("test_list", "assert f(1)"),
                       ("test_list", [None]), ("test_list", []), ("task_id", "12"),
                       ("task_id", True), ("test_setup_code", None),
                       ("challenge_test_list", None)):
    path = _write_records(tmp_path, "mbpp/mbpp.jsonl", [{**mbpp, field: wrong}])
    _refusal(lambda: sources.read_mbpp("prompt"),
             rf"^{re.escape(str(path))}:1: field '{field}(\[0\])?' = ")


def test_mbpp_task_ids_are_unique(tmp_path, monkeypatch):
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
  mbpp = json.loads((FIXTURES / "mbpp" / "mbpp.jsonl").read_text().splitlines()[0])
  path = _write_records(tmp_path, "mbpp/mbpp.jsonl", [mbpp, mbpp])
  _refusal(lambda: sources.read_mbpp("prompt"),
           rf"^{re.escape(str(path))}:2: field 'task_id' = 1; .*line 1")


SUPER_GLUE_WRONG = [  # (task, file, field path in the released record, wrong value)
    ("boolq", "BoolQ/val.jsonl", ("passage",), None),
    ("boolq", "BoolQ/val.jsonl", ("label",), "yes"),
    ("boolq", "BoolQ/val.jsonl", ("idx",), "0"),
    ("cb", "CB/val.jsonl", ("premise",), 3),
    ("cb", "CB/val.jsonl", ("label",), True),  # a boolean is no CB class (it was "contradiction")
    ("cb", "CB/val.jsonl", ("label",), 2),
    ("copa", "COPA/val.jsonl", ("question",), "because"),
    ("copa", "COPA/val.jsonl", ("label",), 2),
    ("copa", "COPA/val.jsonl", ("choice2",), ["x"]),
    ("rte", "RTE/val.jsonl", ("hypothesis",), {}),
    ("wic", "WiC/val.jsonl", ("word",), None),
    ("wic", "WiC/val.jsonl", ("start1",), 99),
    ("wic", "WiC/val.jsonl", ("end2",), "16"),
    ("wsc", "WSC/val.jsonl", ("target",), "x"),
    ("wsc", "WSC/val.jsonl", ("target", "span2_index"), 99),
    ("wsc", "WSC/val.jsonl", ("target", "span1_index"), -1),
    ("wsc", "WSC/val.jsonl", ("target", "span1_text"), 1),
    ("wsc", "WSC/val.jsonl", ("label",), "True"),
    ("multirc", "MultiRC/val.jsonl", ("passage", "questions"), {"a": 1}),
    ("multirc", "MultiRC/val.jsonl", ("passage", "questions", 0, "answers"), None),
    ("multirc", "MultiRC/val.jsonl", ("passage", "questions", 0, "answers", 1), "A flower"),
    ("multirc", "MultiRC/val.jsonl", ("passage", "questions", 0, "answers", 1, "label"), 2),
    ("multirc", "MultiRC/val.jsonl", ("passage", "questions", 1, "idx"), 0),  # a second q0
    ("multirc", "MultiRC/val.jsonl", ("passage", "text"), None),
    ("record", "ReCoRD/val.jsonl", ("passage", "entities"), [1, 2]),
    ("record", "ReCoRD/val.jsonl", ("passage", "entities", 0, "end"), 1000),
    ("record", "ReCoRD/val.jsonl", ("passage", "entities", 0, "start"), 5),  # after its end
    ("record", "ReCoRD/val.jsonl", ("qas", 0, "answers", 0, "text"), None),
    ("record", "ReCoRD/val.jsonl", ("qas", 0, "query"), 7),
    ("record", "ReCoRD/val.jsonl", ("qas",), "q"),
    ("axb", "AX-b/AX-b.jsonl", ("sentence1",), None),
    ("axg", "AX-g/AX-g.jsonl", ("label",), "maybe"),
]


@pytest.mark.parametrize("task, name, field, wrong", SUPER_GLUE_WRONG)
def test_a_super_glue_field_of_wrong_type_or_range_is_refused_naming_file_line_and_field(
    task, name, field, wrong, tmp_path, monkeypatch):
  """Each task's released schema: field names, types, labels in the task's label set, indices
  and spans inside their text (a nested wrong type was a TypeError traceback)."""
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
  records = [json.loads(l) for l in (FIXTURES / "super_glue" / name).read_text().splitlines()]
  parent = records[0]
  for key in field[:-1]:
    parent = parent[key]
  parent[field[-1]] = wrong
  path = _write_records(tmp_path, f"super_glue/{name}", records)
  split = "test" if task in ("axb", "axg") else "validation"
  where = "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in field).lstrip(".")
  if task == "multirc" and field[-1] == "idx":
    where = "passage.questions[1]"
  _refusal(lambda: sources.read_super_glue(task, split),
           rf"^{re.escape(str(path))}:1: field '{re.escape(where)}[^']*' = ")


def test_a_label_missing_outside_the_test_split_is_refused(tmp_path, monkeypatch):
  """Only test files are unlabelled (as TFDS asserts); a validation record without a label was
  read as unlabelled and the task lost its metrics."""
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
  record = {"premise": "p", "hypothesis": "h", "idx": 0}
  path = _write_records(tmp_path, "super_glue/CB/val.jsonl", [record])
  _refusal(lambda: sources.read_super_glue("cb", "validation"),
           rf"^{re.escape(str(path))}:1: missing field\(s\) \['label'\]")
  _write_records(tmp_path, "super_glue/CB/test.jsonl", [record])
  assert sources.read_super_glue("cb", "test")[0]["label"] == -1


def test_non_utf8_bytes_are_refused_naming_file_and_line(tmp_path, monkeypatch):
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(tmp_path))
  path = tmp_path / "gsm8k" / "test.jsonl"
  path.parent.mkdir()
  path.write_bytes(b'{"question": "q", "answer": "#### 1"}\n\xff\xfe{"question": "q"}\n')
  _refusal(lambda: sources.read_gsm8k("test"),
           rf"^{re.escape(str(path))}:2: not UTF-8 text \(byte 0xff at column 1\)$")
