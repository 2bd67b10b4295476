"""A seeded mutation fuzz of the evaluator's readers (issue 28, item 9): the benchmarks' data files
(GSM8K, MBPP, every SuperGLUE task, a HumanEval problems file) and the files a run resumes
(predictions.jsonl, run.json), each mutant run through `python -m maxnucl.evaluate`'s main
in-process (tests/fuzzing.py classifies each outcome).

Specifies: every mutant is either ACCEPTED validly or REFUSED with exit 2 and one line naming the
mutated file (or, for run.json's settings, the output folder); never a traceback, a hang, a
modified input or a partial output (a refused run leaves no output folder; a refused resume leaves
the folder byte for byte as it was).  Valid means:
  - data: a reference parser accepts the mutant and the run evaluated exactly what it makes of
    it.  GSM8K, MBPP, HumanEval: `json` per line and each benchmark's documented field types
    (tests/fuzz_evaluation's `reference_*`), the prompts and references of predictions.jsonl equal
    those built from the reference's records; SuperGLUE: TensorFlow Datasets' own SuperGLUE
    builder (`SuperGlue._generate_examples` over the released file, its declared feature types
    and its ClassLabel), whose records the reader's must equal field by field;
  - resume: the results equal those of the unmutated run (a record that was dropped, or the
    interrupted last line, is evaluated again by the same scripted model).
Most runs replace the model (`LanguageModel.load`) by a scripted one, and the MBPP / HumanEval
sandbox by a scripted verdict, so that a mutant costs milliseconds: what is fuzzed is what the
evaluator reads.  A smaller set runs end to end on a tiny random checkpoint.
"""

from __future__ import annotations

import gzip
import json
import pathlib
import random
import shutil
import types
import zlib

import gin
import numpy as np
import pytest

import fuzzing
from maxnucl import evaluate, models
from maxnucl.data import formats, sources
from maxnucl.evaluation import core, execution, gsm8k, humaneval

SEED = 28
TIMEOUT_S = 120.0
FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"
GSM8K_SHOTS = 2  # the fixture's train split has 3 problems
SUPER_GLUE_FILES = {task: f"super_glue/{directory}/{files.get('validation', files['test'])}"
                    for task, (directory, files) in sources.SUPER_GLUE_FILES.items()}


class Invalid(Exception):
  """The reference parser rejects the input."""


def require(condition, why: str):
  if not condition:
    raise Invalid(why)


# ---- a scripted model and sandbox ----------------------------------------------------------------

def _hash(text: str) -> int:
  return zlib.crc32(text.encode("utf-8", "surrogatepass"))


class ScriptedModel:
  """Answers depend on the prompt only (a resumed example is answered as before)."""

  def __init__(self):
    self.cfg, self.batch_size = models.get_config("gemma2_tiny"), 4

  def generate(self, prompts, *, max_new_tokens, stop_strings=(), temperature=0.0, top_p=None,
               seed=0):
    del max_new_tokens, temperature, top_p, seed
    answers = ("True", "entailment", "choice2", "Paris", "the trophy", "#### 6", "return x")
    return [f" {answers[_hash(p) % len(answers)]}\n#### {_hash(p) % 7}\n"
            + "".join(stop_strings[:1]) for p in prompts]

  def loglikelihoods(self, contexts, continuations):
    return [-float(_hash(c + x) % 1000) / 10 for c, x in zip(contexts, continuations)]


def scripted_check_programs(programs, *, timeout_s=3.0, workers=None, **unused):
  del timeout_s, workers, unused
  return [{"passed": _hash(p) % 2 == 0, "status": "passed" if _hash(p) % 2 == 0 else "failed",
           "reason": "", "stderr": "" if _hash(p) % 2 == 0 else "AssertionError"}
          for p in programs]


@pytest.fixture
def scripted(monkeypatch):
  """The scripted model and sandbox in place of the real ones."""
  model = ScriptedModel()
  monkeypatch.setattr(core.LanguageModel, "load", classmethod(lambda cls, *a, **k: model))
  monkeypatch.setattr(execution, "check_programs", scripted_check_programs)


@pytest.fixture
def data_root(tmp_path, monkeypatch):
  """A copy of tests/fixtures/data that the datasets are read from (never TFDS)."""
  root = tmp_path / "data"
  shutil.copytree(FIXTURES, root)
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(root))
  monkeypatch.setattr(sources, "_tfds_builder_prepared", lambda name: False)
  return root


def evaluate_main(argv):
  gin.clear_config()
  try:
    return evaluate.main(argv)
  finally:
    gin.clear_config()


def command(benchmark: str, checkpoint, *params: str) -> list[str]:
  return [f"--gin_file=gin/eval/{benchmark}.gin", f"--checkpoint={checkpoint}", "--no_progress",
          "--batch_size", "4", *[f"--gin_param={p}" for p in params]]


# ---- mutants -------------------------------------------------------------------------------------

def record_mutants(text: str, rng, per_record: int):
  """json_mutants of each line's record in turn (the other lines as they are)."""
  lines = text.splitlines()
  for i, line in enumerate(lines):
    if line.strip():
      for name, mutant in fuzzing.json_mutants(json.loads(line), rng, per_record):
        new = lines[:i] + [fuzzing.dumps(mutant)] + lines[i + 1:]
        yield f"line{i + 1}:{name}", ("\n".join(new) + "\n").encode()


def data_mutants(text: str, rng, per_record: int, per_file: int):
  yield from record_mutants(text, rng, per_record)
  yield from fuzzing.text_mutants(text, rng, per_file)


def jsonl_lines(data: bytes) -> list[dict]:
  """The reference reading of a JSON-lines file: UTF-8, one JSON object per non-blank line."""
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise Invalid(f"not UTF-8: {e}") from None
  records = []
  for line in text.split("\n"):
    if line.strip():
      try:
        record = json.loads(line)
      except ValueError as e:
        raise Invalid(f"not JSON: {e}") from None
      require(isinstance(record, dict), "not an object")
      records.append(record)
  require(records, "no records")
  return records


def fuzz_data(tally, mutated: pathlib.Path, mutants, argv, valid, work: pathlib.Path,
              watched: pathlib.Path):
  """Each mutant written over `mutated`, then the command run with a fresh --output; `valid()`
  checks an accepted run's output folder.  `watched`: what must not change."""
  original = mutated.read_bytes()
  try:
    for i, (name, data) in enumerate(mutants):
      mutated.write_bytes(data)
      out = work / f"out{i}"
      before = fuzzing.tree_digest(watched)
      run = fuzzing.run_main(evaluate_main, argv + [f"--output={out}"], TIMEOUT_S)
      outcome, detail = fuzzing.classify(run, [str(mutated)], before,
                                         fuzzing.tree_digest(watched), output=out,
                                         valid=lambda: valid(out))
      tally.add(f"{mutated.name}:{name}", outcome, detail)
      shutil.rmtree(out, ignore_errors=True)
  finally:
    mutated.write_bytes(original)


def predictions(out: pathlib.Path) -> list[dict]:
  return [json.loads(l) for l in (out / core.PREDICTIONS).read_text().splitlines() if l.strip()]


def same_run(out: pathlib.Path, expected: list[tuple]) -> str | None:
  """None when predictions.jsonl holds exactly the `expected` (prompt, reference) pairs."""
  got = [(r["prompt"], r["reference"]) for r in predictions(out)]
  if got != expected:
    return f"evaluated {got[:2]}... ; the reference parser gives {expected[:2]}..."
  return None


def checked(reference, out, compare) -> str | None:
  try:
    expected = reference()
  except Invalid as e:
    return f"accepted, but the reference rejects it: {e}"
  return compare(out, expected)


# ---- GSM8K ---------------------------------------------------------------------------------------

def reference_gsm8k(root: pathlib.Path) -> list[tuple]:
  """(prompt, reference answer) of each test problem, from `json` and GSM8K's documented fields:
  question and answer strings, the answer ending in '#### <number>'."""
  def records(split):
    out = jsonl_lines((root / "gsm8k" / f"{split}.jsonl").read_bytes())
    for r in out:
      require(isinstance(r.get("question"), str) and isinstance(r.get("answer"), str), "types")
      final = gsm8k.strict_answer(r["answer"])
      require(final is not None and gsm8k.normalize_number(final) is not None, "no #### answer")
    return out
  train, test = records("train"), records("test")
  require(len(train) >= GSM8K_SHOTS, "too few shots")
  shots = random.Random(0).sample(range(len(train)), GSM8K_SHOTS)
  prefix = "".join(f"Question: {train[i]['question']}\nAnswer: {train[i]['answer']}\n\n"
                   for i in shots)
  return [(f"{prefix}Question: {r['question']}\nAnswer: ", gsm8k.strict_answer(r["answer"]))
          for r in test]


def test_fuzz_gsm8k_data(data_root, scripted, tiny_checkpoint, tmp_path):
  tally = fuzzing.Tally("evaluation data: GSM8K jsonl")
  rng = np.random.default_rng(SEED)
  argv = command("gsm8k", tiny_checkpoint, f"gsm8k.num_shots = {GSM8K_SHOTS}")
  for split in ("test", "train"):
    path = data_root / "gsm8k" / f"{split}.jsonl"
    fuzz_data(tally, path, list(data_mutants(path.read_text(), rng, 20, 30)), argv,
              lambda out: checked(lambda: reference_gsm8k(data_root), out, same_run),
              tmp_path, data_root)
  tally.assert_clean()


# ---- MBPP ----------------------------------------------------------------------------------------

def reference_mbpp(root: pathlib.Path) -> list[tuple]:
  """(prompt, tests) of each test-split task from `json` and MBPP's released field types: task_id
  an integer (unique), text / code / test_setup_code strings, test_list a non-empty list of
  strings, challenge_test_list a list of strings."""
  records = jsonl_lines((root / "mbpp" / "mbpp.jsonl").read_bytes())
  for r in records:
    require(type(r.get("task_id")) is int, "task_id")
    require(all(isinstance(r.get(f), str) for f in ("text", "code", "test_setup_code")), "text")
    for field in ("test_list", "challenge_test_list"):
      require(isinstance(r.get(field), list) and all(isinstance(t, str) for t in r[field]), field)
    require(r["test_list"], "no tests")
  ids = [r["task_id"] for r in records]
  require(len(set(ids)) == len(ids), "duplicate task ids")
  by_id = {r["task_id"]: r for r in records}
  require(all(i in by_id for i in formats.MBPP_SHOT_TASK_IDS), "few-shot tasks missing")
  prefix = "".join(formats.format_mbpp(by_id[i], "prompt")[0]["inputs"]
                   + by_id[i]["code"].replace("\r\n", "\n") + "\n[DONE]\n\n"
                   for i in formats.MBPP_SHOT_TASK_IDS)
  test = sorted((r for r in records if 11 <= r["task_id"] <= 510), key=lambda r: r["task_id"])
  require(test, "no test tasks")
  return [(prefix + formats.format_mbpp(r, "test")[0]["inputs"], r["test_list"]) for r in test]


def test_fuzz_mbpp_data(data_root, scripted, tiny_checkpoint, tmp_path):
  tally = fuzzing.Tally("evaluation data: MBPP jsonl")
  rng = np.random.default_rng(SEED + 1)
  path = data_root / "mbpp" / "mbpp.jsonl"
  fuzz_data(tally, path, list(data_mutants(path.read_text(), rng, 12, 40)),
            command("mbpp", tiny_checkpoint),
            lambda out: checked(lambda: reference_mbpp(data_root), out, same_run),
            tmp_path, data_root)
  tally.assert_clean()


# ---- HumanEval -----------------------------------------------------------------------------------

def reference_humaneval(data: bytes) -> list[tuple]:
  """(prompt, canonical solution) of each problem: `json` per line (after gzip's decompression
  for a gzipped file), the five fields strings, the entry point a Python name, task ids
  unique."""
  if data[:2] == b"\x1f\x8b":
    try:
      data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
      raise Invalid(f"gzip: {e}") from None
  problems = jsonl_lines(data)
  for p in problems:
    require(all(isinstance(p.get(f), str) for f in humaneval.PROBLEM_FIELDS), "fields")
    require(p["entry_point"].isidentifier(), "entry_point")
  ids = [p["task_id"] for p in problems]
  require(len(set(ids)) == len(ids), "duplicate task ids")
  return [(p["prompt"], p["canonical_solution"]) for p in problems]


def test_fuzz_humaneval_problems(scripted, tiny_checkpoint, tmp_path):
  tally = fuzzing.Tally("evaluation data: HumanEval problems")
  rng = np.random.default_rng(SEED + 2)
  text = "".join(json.dumps(p) + "\n" for p in humaneval.load_problems()[:3])
  for name, mutants in (("problems.jsonl", list(data_mutants(text, rng, 25, 30))),
                        ("problems.jsonl.gz", list(fuzzing.byte_mutants(
                            gzip.compress(text.encode(), mtime=0), rng, 30)))):
    path = tmp_path / name
    path.write_bytes(mutants[0][1])
    fuzz_data(tally, path, mutants,
              command("humaneval", tiny_checkpoint, f"humaneval.problems_file = '{path}'"),
              lambda out, path=path: checked(lambda: reference_humaneval(path.read_bytes()),
                                             out, same_run),
              tmp_path, path)
  tally.assert_clean()


# ---- SuperGLUE -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tfds_super_glue():
  """TensorFlow Datasets' SuperGLUE builder module (its released-file parser is the reference)."""
  sources.hide_accelerators_from_tensorflow()
  from tensorflow_datasets.text import super_glue  # pylint: disable=import-outside-toplevel
  return super_glue


def reference_super_glue(tfds_sg, task: str, data: bytes, split: str,
                         scratch: pathlib.Path) -> list[dict]:
  """The records TFDS's SuperGLUE builder makes of a released file (blank lines left out, as
  JSON lines), with its declared feature types: Text features strings, int32 features integers
  (JSON numbers without a fraction, not booleans), labels through its ClassLabel."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  jsonl_lines(data)  # UTF-8, JSON objects
  text = "".join(l + "\n" for l in data.decode().split("\n") if l.strip())
  config = {c.name: c for c in tfds_sg.SuperGlue.BUILDER_CONFIGS}[task]
  labels = tfds.features.ClassLabel(names=config.label_classes)
  path = scratch / f"reference_{task}.jsonl"
  path.write_text(text)
  tfds_split = tfds.Split.TEST if split == "test" else tfds.Split.VALIDATION
  try:
    generate = tfds_sg.SuperGlue._generate_examples  # pylint: disable=protected-access
    examples = [e for _, e in generate(types.SimpleNamespace(builder_config=config), str(path),
                                        tfds_split)]
  except Exception as e:  # pylint: disable=broad-except  # the reference rejects it
    raise Invalid(f"TFDS: {type(e).__name__}: {e}") from None

  def int32(value):
    return type(value) is int and -2**31 <= value < 2**31

  ints = {"wsc": ("span1_index", "span2_index"),
          "wic": ("start1", "start2", "end1", "end2")}.get(task, ())
  out = []
  for example in examples:
    for feature in config.features:
      value = example[feature]
      if feature in ("entities", "answers"):
        require(all(isinstance(v, str) for v in value), feature)
      elif feature not in ints:
        require(isinstance(value, str), feature)
    require(all(int32(example[f]) for f in ints), "int32 features")
    idx = example["idx"]
    require(all(int32(v) for v in idx.values()) if isinstance(idx, dict) else int32(idx), "idx")
    if "label" in example:
      if example["label"] != -1:
        try:
          example["label"] = labels.encode_example(example["label"])
        except Exception as e:  # pylint: disable=broad-except
          raise Invalid(f"label: {e}") from None
    out.append(example)
  return out


def same_super_glue_records(ours: list[dict], theirs: list[dict]) -> str | None:
  """Field by field on TFDS's features; ReCoRD's entities and answers as sets (TFDS sorts them,
  the reader keeps the file's order)."""
  if len(ours) != len(theirs):
    return f"{len(ours)} records; TFDS reads {len(theirs)}"
  for i, (mine, reference) in enumerate(zip(ours, theirs)):
    for key, value in reference.items():
      got = mine.get(key)
      if key in ("entities", "answers"):
        got, value = sorted(got), sorted(value)
      if got != value:
        return f"record {i} {key}: {got!r}; TFDS reads {value!r}"
  return None


def test_fuzz_super_glue_data(data_root, scripted, tiny_checkpoint, tmp_path, tfds_super_glue):
  """Every task's evaluation file, the nested MultiRC / ReCoRD / WSC records included."""
  tally = fuzzing.Tally("evaluation data: SuperGLUE jsonl")
  rng = np.random.default_rng(SEED + 3)
  for task, relative in SUPER_GLUE_FILES.items():
    split = "test" if task in ("axb", "axg") else "validation"
    path = data_root / relative
    per_record = 60 if task in ("multirc", "record") else 30 if task == "wsc" else 20

    def valid(out, task=task, split=split, path=path):
      del out
      try:
        theirs = reference_super_glue(tfds_super_glue, task, path.read_bytes(), split, tmp_path)
      except Invalid as e:
        return f"accepted, but the reference rejects it: {e}"
      return same_super_glue_records(sources.read_super_glue(task, split), theirs)

    fuzz_data(tally, path, list(data_mutants(path.read_text(), rng, per_record, 8)),
              command("superglue", tiny_checkpoint, f"superglue.tasks = ['{task}']"),
              valid, tmp_path, data_root)
  tally.assert_clean()


# ---- resume files --------------------------------------------------------------------------------

def finished_runs(tiny_checkpoint, work: pathlib.Path) -> dict[str, tuple]:
  """name -> (argv, output folder) of finished runs of the scripted model to resume."""
  runs = {
      "gsm8k": command("gsm8k", tiny_checkpoint, f"gsm8k.num_shots = {GSM8K_SHOTS}"),
      "superglue_rank": command("superglue", tiny_checkpoint, "superglue.method = 'rank'",
                                "superglue.tasks = ['cb', 'multirc', 'record', 'wsc']"),
      "superglue": command("superglue", tiny_checkpoint, "superglue.tasks = ['copa', 'wsc']"),
      "mbpp": command("mbpp", tiny_checkpoint),
      "humaneval": command("humaneval", tiny_checkpoint, "humaneval.num_samples = 3",
                           "humaneval.temperature = 0.8", "evaluate.limit = 3"),
  }
  out = {}
  for name, argv in runs.items():
    folder = work / f"base_{name}"
    run = fuzzing.run_main(evaluate_main, argv + [f"--output={folder}"], TIMEOUT_S)
    assert run.exit_code == 0, (name, run.stderr, run.error)
    out[name] = (argv, folder)
  return out


# What the model gave (its text, its scores of the candidates): a resumed record keeps them as
# stored, with everything derived from them (answers, verdicts, the ranked choice) scored again.
MODEL_FIELDS = ("output", "scores")


def _derived(record: dict) -> dict:
  return {k: v for k, v in record.items() if k not in MODEL_FIELDS}


def fuzz_resume(tally, base: pathlib.Path, argv, name: str, mutants, work: pathlib.Path):
  """Each mutant of the file `name` in a copy of the finished run `base`, resumed."""
  expected = json.loads((base / core.RESULTS).read_text())
  records = {r["id"]: r for r in predictions(base)}
  for i, (label, data) in enumerate(mutants):
    out = work / f"resume{i}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(base, out)
    (out / name).write_bytes(data)
    before = fuzzing.tree_digest(out)
    run = fuzzing.run_main(evaluate_main, argv + [f"--output={out}"], TIMEOUT_S)

    def valid(out=out):
      results = json.loads((out / core.RESULTS).read_text())
      if results["metrics"] != expected["metrics"]:
        return f"metrics {results['metrics']}; the unmutated run's {expected['metrics']}"
      final = {r["id"]: r for r in predictions(out)}
      if {k: _derived(r) for k, r in final.items()} != {k: _derived(r) for k, r in
                                                         records.items()}:
        return "predictions.jsonl differs from the unmutated run's"
      return None

    after = before if run.exit_code == 0 else fuzzing.tree_digest(out)
    outcome, detail = fuzzing.classify(run, [str(out)], before, after, valid=valid)
    tally.add(f"{base.name}/{name}:{label}", outcome, detail)
    shutil.rmtree(out, ignore_errors=True)


def test_fuzz_resumed_predictions(data_root, scripted, tiny_checkpoint, tmp_path):
  tally = fuzzing.Tally("resume: predictions.jsonl")
  rng = np.random.default_rng(SEED + 4)
  for name, (argv, base) in finished_runs(tiny_checkpoint, tmp_path).items():
    text = (base / core.PREDICTIONS).read_text()
    per_record = max(4, 60 // len(text.splitlines()))
    fuzz_resume(tally, base, argv, core.PREDICTIONS,
                list(data_mutants(text, rng, per_record, 16)), tmp_path)
    for bad in (b"[1, 2]\n", b"12\n", b"null\n"):  # the cases
      fuzz_resume(tally, base, argv, core.PREDICTIONS, [("literal", bad + text.encode())],
                  tmp_path)
  tally.assert_clean()


def test_fuzz_resumed_run_record(data_root, scripted, tiny_checkpoint, tmp_path):
  tally = fuzzing.Tally("resume: run.json")
  rng = np.random.default_rng(SEED + 5)
  for name, (argv, base) in finished_runs(tiny_checkpoint, tmp_path).items():
    data = (base / core.RUN).read_bytes()
    run = json.loads(data)
    mutants = [(label, fuzzing.dumps(m).encode()) for label, m in
               fuzzing.json_mutants(run, rng, 40 if name == "gsm8k" else 10)]
    mutants += list(fuzzing.byte_mutants(data, rng, 16 if name == "gsm8k" else 4))
    mutants += [("list", b"[]"), ("truncated", data[:len(data) // 2])]
    fuzz_resume(tally, base, argv, core.RUN, mutants, tmp_path)
  tally.assert_clean()


# ---- end to end on a tiny model ------------------------------------------------------------------

def test_fuzz_end_to_end_on_a_tiny_model(data_root, tiny_checkpoint, tmp_path):
  """A few data and resume mutants through the whole command: the real model and decoding."""
  tally = fuzzing.Tally("evaluation end to end (tiny model)")
  rng = np.random.default_rng(SEED + 6)
  argv = command("gsm8k", tiny_checkpoint, f"gsm8k.num_shots = {GSM8K_SHOTS}",
                 "gsm8k.max_new_tokens = 3")
  path = data_root / "gsm8k" / "test.jsonl"
  fuzz_data(tally, path, list(data_mutants(path.read_text(), rng, 2, 4)), argv,
            lambda out: checked(lambda: reference_gsm8k(data_root), out, same_run),
            tmp_path, data_root)
  base = tmp_path / "base"
  run = fuzzing.run_main(evaluate_main, argv + [f"--output={base}"], TIMEOUT_S)
  assert run.exit_code == 0, (run.stderr, run.error)
  text = (base / core.PREDICTIONS).read_text()
  fuzz_resume(tally, base, argv, core.PREDICTIONS, list(data_mutants(text, rng, 2, 4)), tmp_path)
  tally.assert_clean()
