"""SuperGLUE: the metric functions (by hand and against T5's own implementations), prediction by
generation and by rank classification, and whole runs through `core.run_benchmark`.

The end-to-end tests read the SuperGLUE-format files in tests/fixtures/evaluation/super_glue
(a few validation records per task, chosen so that the metrics below can be worked out by hand).
"""

import pathlib
import random
import types
import warnings

import jax
import pytest

from maxnucl import models
from maxnucl.data import catalog, sources, vocabularies
from maxnucl.evaluation import core, metrics, superglue
from tolerances import EPS64, rounding_atol

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "evaluation"

# Metrics are float64 arithmetic on integer counts (exact): two computations of one (ours and
# T5's scikit-learn / numpy, or a worked-out fraction) differ by the roundings of the mean over
# the examples and of the formula: at most 16 operations (scikit-learn's macro F1 over 3
# classes: precision, recall, F1 per class, their mean; times 100).
FORMULA_OPS = 16
# The fixtures' runs: at most 8 examples a task, each scored with up to 5 operations (SQuAD F1)
# and summed, the formula's, a task score's mean of 2 metrics and the average of 8 task scores.
FIXTURE_TERMS = 8 * 6 + FORMULA_OPS + 2 + 8


def approx64(expected, terms, scale=100.0):
  """pytest.approx within `terms` float64 roundings of values up to `scale` (100 for a
  percentage, 1 for a fraction): tests/tolerances.py with EPS64."""
  return pytest.approx(expected, rel=0, abs=rounding_atol(scale, terms, EPS64))


@pytest.fixture
def superglue_data(evaluation_data):
  """SuperGLUE is read from tests/fixtures/evaluation (never TFDS), with a clean gin config."""
  yield evaluation_data


@pytest.fixture(scope="module")
def t5():
  """T5's metric and postprocessor modules: the independent reference (t5==0.9.4, no deps)."""
  from t5.data import postprocessors, preprocessors  # pylint: disable=import-outside-toplevel
  from t5.data import glue_utils  # pylint: disable=import-outside-toplevel
  from t5.evaluation import metrics as t5_metrics  # pylint: disable=import-outside-toplevel
  return types.SimpleNamespace(metrics=t5_metrics, postprocessors=postprocessors,
                               preprocessors=preprocessors, glue_utils=glue_utils)


class FakeModel:
  """A `LanguageModel` stand-in: `answer(prompt)` is generated (with whitespace around it, which
  the benchmark strips), `score(context, continuation)` is the log-likelihood; calls are
  recorded to check batching."""

  def __init__(self, answer=None, score=None):
    self.cfg = types.SimpleNamespace(name="fake")
    self.batch_size = 4
    self.answer, self.score = answer, score
    self.calls = []

  def generate(self, prompts, *, max_new_tokens, stop_strings=()):
    self.calls.append(("generate", len(prompts), max_new_tokens, tuple(stop_strings)))
    return [f" {self.answer(p)}\n" for p in prompts]

  def loglikelihoods(self, contexts, continuations):
    self.calls.append(("loglikelihoods", len(contexts)))
    return [self.score(c, x) for c, x in zip(contexts, continuations)]


def run(benchmark, model, **kwargs):
  return core.run_benchmark(benchmark, model, "unused", write_files=False, progress=False,
                            **kwargs)


# ---- metric functions by hand --------------------------------------------------------------------

def test_accuracy_counts_invalid_predictions_as_wrong():
  assert metrics.accuracy([1, 0, 1, 1], [1, 1, -1, 1]) == 0.5


def test_cb_macro_f1_counts_a_class_never_predicted_as_zero():
  # classes 0 1 2; class 2 is in the references but never predicted.
  references = [0, 0, 1, 2, 2, 1]
  predictions = [0, 1, 1, 0, 0, 1]
  # class 0: TP 1 FP 2 FN 1 -> 2/5; class 1: TP 2 FP 1 FN 0 -> 4/5; class 2: TP 0 -> 0.
  assert metrics.mean_multiclass_f1(references, predictions, 3) == (
      approx64((2 / 5 + 4 / 5 + 0) / 3, len(references) + FORMULA_OPS, scale=1.0))
  # A class absent from references and predictions alike also counts (F1 0), as in T5.
  assert metrics.mean_multiclass_f1([0, 1], [0, 1], 3) == approx64(2 / 3, 2 + FORMULA_OPS,
                                                                   scale=1.0)


def test_binary_f1_counts_an_invalid_prediction_against_the_reference():
  # TP: i0; FN: i1 (predicted 0), i2 (invalid, reference 1); FP: i3 (invalid, reference 0).
  assert metrics.binary_f1([1, 1, 1, 0, 0], [1, 0, -1, -1, 0]) == approx64(
      2 / (2 + 1 + 2), 5 + FORMULA_OPS, scale=1.0)
  assert metrics.binary_f1([0, 0], [0, 0]) == 0.0


def test_matthews_correlation_of_a_binary_confusion_matrix():
  # TP 3, TN 2, FP 1, FN 2: (3*2 - 1*2) / sqrt(4 * 5 * 3 * 4)
  references = [1, 1, 1, 1, 1, 0, 0, 0]
  predictions = [1, 1, 1, 0, 0, 0, 0, 1]
  assert metrics.matthews_correlation(references, predictions) == approx64(
      4 / 240 ** 0.5, len(references) + FORMULA_OPS, scale=1.0)
  assert metrics.matthews_correlation([0, 1, 0], [0, 0, 0]) == 0.0  # constant prediction
  assert metrics.matthews_correlation([0, 1, 1, 0], [1, 0, 0, 1]) == approx64(
      -1.0, 4 + FORMULA_OPS, scale=1.0)


def test_multirc_exact_match_needs_every_answer_of_a_question_right():
  groups = ["p0/q0", "p0/q0", "p0/q0", "p0/q1", "p0/q1", "p1/q2"]
  references = [1, 0, 1, 1, 0, 0]
  predictions = [1, 0, 0, 1, 0, 0]  # q0 has one wrong answer out of three
  assert metrics.grouped_exact_match(groups, references, predictions) == approx64(
      2 / 3, len(references) + FORMULA_OPS, scale=1.0)
  # Same question idx in two paragraphs: two groups when the group names the paragraph.
  assert metrics.grouped_exact_match(["0/0", "1/0"], [1, 1], [1, 0]) == 0.5


def test_squad_normalisation_ignores_case_punctuation_articles_and_spacing():
  assert metrics.normalize_squad("  The Eiffel-Tower, in  Paris! ") == "eiffeltower in paris"
  assert metrics.squad_exact_match("an apple", "Apple.") == 1.0
  # prediction "paris" vs "Paris Saint-Germain" -> tokens {paris} vs {paris, saintgermain}
  assert metrics.squad_f1("Paris Saint-Germain", "paris") == approx64(2 * 1 * 0.5 / 1.5,
                                                                     FORMULA_OPS, scale=1.0)
  assert metrics.squad_f1("Paris", "London") == 0.0


def test_record_scores_the_best_of_several_gold_answers():
  answers = ["Eiffel Tower", "Paris"]
  # The prediction matches the second answer exactly.
  assert metrics.max_over_references(metrics.squad_exact_match, answers, "paris") == 1.0
  assert metrics.max_over_references(metrics.squad_exact_match, answers, "tower") == 0.0
  # "tower in paris" (3 tokens): vs "eiffel tower" P 1/3 R 1/2 -> 0.4; vs "paris" P 1/3 R 1 -> 0.5
  assert metrics.max_over_references(metrics.squad_f1, answers, "the tower in Paris") == (
      approx64(0.5, FORMULA_OPS, scale=1.0))
  with pytest.raises(ValueError, match="no reference answers"):
    metrics.max_over_references(metrics.squad_f1, [], "x")


def test_metric_functions_reject_mismatched_or_empty_inputs():
  with pytest.raises(ValueError, match="2 references but 1 predictions"):
    metrics.accuracy([0, 1], [0])
  with pytest.raises(ValueError, match="no examples"):
    metrics.binary_f1([], [])


def test_wsc_names_referent_ignores_determiners_and_case_but_not_possessives():
  assert superglue.names_referent("The Trophy", "trophy") == 1
  assert superglue.names_referent("fuzzy bunny", "the bunny") == 1
  assert superglue.names_referent("Bob", "Bob's hat") == 0
  assert superglue.names_referent("the suitcase", "The trophy") == 0
  assert superglue.names_referent("  the ", "The trophy") == -1


# ---- metric functions against T5 ---------------------------------------------------------------

def _random_labels(rng, n, num_classes, invalid_rate=0.15):
  return [-1 if rng.random() < invalid_rate else rng.randrange(num_classes) for _ in range(n)]


@pytest.mark.filterwarnings("ignore::UserWarning")  # scikit-learn's undefined-metric warnings
def test_classification_metrics_equal_t5s_on_random_labels(t5):
  rng = random.Random(0)
  f1_3class = t5.metrics.mean_multiclass_f1(num_classes=3)
  mcc = t5.metrics.sklearn_metrics_wrapper("matthews_corrcoef",
                                           metric_post_process_fn=lambda x: 100 * x)
  for trial in range(200):
    n = rng.randrange(1, 30)
    num_classes = 2 if trial % 2 else 3
    references = [rng.randrange(num_classes) for _ in range(n)]
    predictions = _random_labels(rng, n, num_classes)
    terms = n + FORMULA_OPS
    assert 100 * metrics.accuracy(references, predictions) == approx64(
        t5.metrics.accuracy(references, predictions)["accuracy"], terms)
    assert 100 * metrics.matthews_correlation(references, predictions) == approx64(
        mcc(references, predictions)["matthews_corrcoef"], terms)
    if num_classes == 3:
      assert 100 * metrics.mean_multiclass_f1(references, predictions, 3) == approx64(
          f1_3class(references, predictions)["mean_3class_f1"], terms)
    else:
      assert 100 * metrics.binary_f1(references, predictions) == approx64(
          t5.metrics.multirc_f1_over_all_answers(
              [{"value": v} for v in references], [{"value": v} for v in predictions])["f1"],
          terms)


def test_multirc_exact_match_equals_t5s_group_mean_of_all_match(t5):
  rng = random.Random(1)
  t5_em = t5.metrics.mean_group_metric(t5.metrics.all_match)
  for _ in range(100):
    n = rng.randrange(1, 25)
    groups = [rng.randrange(6) for _ in range(n)]
    references = [rng.randrange(2) for _ in range(n)]
    predictions = [r if rng.random() < 0.8 else rng.choice([-1, 1 - r]) for r in references]
    expected = t5_em([{"value": r, "group": g} for r, g in zip(references, groups)],
                     [{"value": p} for p in predictions])["exact_match"]
    assert 100 * metrics.grouped_exact_match(groups, references, predictions) == (
        approx64(expected, n + FORMULA_OPS))


def test_record_f1_and_em_equal_t5s_deduplicated_squad(t5):
  rng = random.Random(2)
  words = ["the", "a", "Paris", "paris,", "Tower", "Eiffel", "tower!", "an", "New", "York",
           "new-york", "Saint-Germain", "  ", "U.S.", "us"]
  phrase = lambda: " ".join(rng.choice(words) for _ in range(rng.randrange(1, 4)))
  t5_record = t5.metrics.deduplicate_metric(t5.metrics.squad)
  for _ in range(50):
    n = rng.randrange(1, 12)
    answers = [[phrase() for _ in range(rng.randrange(1, 4))] for _ in range(n)]
    predictions = [rng.choice(a) if rng.random() < 0.3 else phrase() for a in answers]
    expected = t5_record([{"value": a, "group": (0, i)} for i, a in enumerate(answers)],
                         [{"value": p} for p in predictions])
    for ours, theirs in ((metrics.squad_f1, "f1"), (metrics.squad_exact_match, "em")):
      value = sum(metrics.max_over_references(ours, a, p)
                  for a, p in zip(answers, predictions)) / n
      # a mean of n answers' scores of up to 5 operations each (SQuAD F1)
      assert 100 * value == approx64(expected[theirs], 6 * n + FORMULA_OPS)


def test_wsc_names_referent_equals_t5s_wsc_simple(t5):
  referents = ["The trophy", "the brown suitcase", "Bob's hat", "Susan", "fuzzy bunny"]
  predictions = ["", " ", "trophy", "The Trophy", "suitcase", "brown suitcase", "Bob", "Bob's",
                 "bob's hat", "Susan", "susan ", "Joan", "the bunny", "fuzzy bunny rabbit", "his"]
  for referent in referents:
    for prediction in predictions:
      expected = t5.postprocessors.wsc_simple(
          prediction, example={"targets_pretokenized": referent.encode()})
      assert superglue.names_referent(prediction, referent) == expected, (prediction, referent)


def test_wsc_rank_format_equals_t5s_wsc_preprocessor(t5, superglue_data):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  for split in ("validation", "train"):
    for record in sources.read_super_glue("wsc", split):
      features = {k: tf.constant(record[k]) for k in
                  ("text", "span1_text", "span1_index", "span2_text", "span2_index", "label",
                   "idx")}
      dataset = t5.preprocessors.wsc(tf.data.Dataset.from_tensors(features))
      expected = next(iter(dataset))["inputs"].numpy().decode()
      assert superglue.wsc_classification_inputs(record) == expected


# ---- formats against T5's preprocessors ---------------------------------------------------------

def _t5_examples(config: str, path: pathlib.Path, split: str, tfds_dir: pathlib.Path) -> list:
  """T5's examples of one released file, independently of maxnucl: TFDS's own SuperGLUE reader
  (`_generate_examples` run on the file: nothing is downloaded), then the preprocessors that
  t5.data.tasks registers for `super_glue_<config>_v102` (WSC: the `wsc_simple` tasks; AX-b
  rekeyed as RTE), tokenization left out."""
  # pylint: disable=import-outside-toplevel
  import functools
  import tensorflow as tf
  from t5.data import glue_utils, preprocessors
  from tensorflow_datasets.text import super_glue as tfds_glue
  # pylint: enable=import-outside-toplevel
  builder = tfds_glue.SuperGlue(config="wsc.fixed" if config == "wsc" else config,
                                data_dir=str(tfds_dir))
  if config == "wsc":
    steps = [functools.partial(preprocessors.wsc_simple, correct_referent_only=split == "train")]
  elif config == "axb":
    steps = [functools.partial(preprocessors.rekey, key_map={
        "premise": "sentence1", "hypothesis": "sentence2", "label": "label", "idx": "idx"}),
             glue_utils.get_glue_text_preprocessor(builder.builder_config)]
  else:
    steps = [glue_utils.get_glue_text_preprocessor(builder.builder_config)]
  examples = []
  for _, record in builder._generate_examples(str(path), split):  # pylint: disable=protected-access
    if config == "record":
      labelled = bool(record["answers"])
      for key in ("entities", "answers"):
        record[key] = tf.constant(record[key], tf.string, shape=[len(record[key])])
    else:
      record["label"] = builder.info.features["label"].encode_example(record["label"])
      labelled = record["label"] >= 0 or config == "wsc"  # wsc_simple: always the referent
    dataset = tf.data.Dataset.from_tensors(record)
    for step in steps:
      dataset = step(dataset)
    per_record = [{"inputs": e["inputs"].numpy().decode(),
                   "targets": e["targets"].numpy().decode() if labelled else ""}
                  for e in dataset]
    # ReCoRD outside training: one example per query, T5's first (its metric deduplicates the
    # per-answer examples by query idx, keeping the first)
    examples += per_record[:1] if config == "record" and split != "train" else per_record
  return examples


@pytest.mark.parametrize("fixture_root", ["offline_data", "evaluation_data"])
def test_every_config_formats_as_t5s_preprocessors_exactly(t5, fixture_root, request,
                                                            tmp_path):
  """Every SuperGLUE config's examples (inputs and targets, MultiRC's markup and spacing included)
  are the strings T5's preprocessors make of the same released files; unlabelled test records get
  "" where T5 writes "<unk>" (docs/data.md)."""
  del t5  # the fixture checks that the t5 package imports
  root = request.getfixturevalue(fixture_root) / "super_glue"
  compared = 0
  for config, (directory, files) in sources.SUPER_GLUE_FILES.items():
    for split, filename in files.items():
      path = root / directory / filename
      if not path.exists():
        continue
      ours = catalog.get_task(catalog.super_glue_task_name(config)).examples(split)
      assert ours == _t5_examples(config, path, split, tmp_path), (config, split)
      compared += 1
  assert compared >= 10


# ---- examples ----------------------------------------------------------------------------------

def test_examples_are_the_registered_tasks_inputs_and_targets(superglue_data):
  benchmark = superglue.SuperGLUE()
  examples = benchmark.examples()
  assert len({e["id"] for e in examples}) == len(examples)
  for task in superglue.TASKS:
    ours = [(e["prompt"], e["target"]) for e in examples if e["task"] == task]
    registered = catalog.get_task(catalog.super_glue_task_name(task)).examples(
        benchmark.split_of(task))
    assert ours == [(e["inputs"], e["targets"]) for e in registered], task
  assert benchmark.split_of("axb") == benchmark.split_of("axg") == "test"
  assert benchmark.split_of("cb") == "validation"


def test_few_shot_prompts_start_with_training_examples(superglue_data):
  rte_train = {f"{e['inputs']}{e['targets']}\n\n"
               for e in catalog.get_task("super_glue_rte_v102").examples("train")}
  for method in ("generate", "rank"):
    examples = superglue.SuperGLUE(tasks=("rte", "axb", "wsc"), num_shots=2,
                                   method=method).examples()
    for example in examples:
      shots = example["prompt"].split("\n\n")[:2]
      if example["task"] in ("rte", "axb"):  # AX-b borrows RTE's training examples
        assert {s + "\n\n" for s in shots} <= rte_train
      elif method == "generate":  # WSC's training format: correct referents only
        assert all(s.startswith("wsc: ") and s.endswith(("The city", "The fish"))
                   for s in shots), shots
      else:
        assert all(s.startswith("wsc text: ") and s.endswith(("True", "False")) for s in shots)
  with pytest.raises(core.EvaluationError, match="num_shots = 9 but the rte train split"):
    superglue.SuperGLUE(tasks=("rte",), num_shots=9).examples()


def test_settings_errors_name_the_setting(superglue_data):
  with pytest.raises(core.EvaluationError, match=r"superglue.tasks = \['cb', 'mnli'\]"):
    superglue.SuperGLUE(tasks=["cb", "mnli"])
  with pytest.raises(core.EvaluationError, match="superglue.method = 'sample'"):
    superglue.SuperGLUE(method="sample")
  with pytest.raises(core.EvaluationError, match="superglue.split = 'dev'"):
    superglue.SuperGLUE(split="dev")


# ---- prediction and metrics through run_benchmark -----------------------------------------------

CONSTANT_ANSWERS = {"boolq": "True", "cb": "entailment", "copa": "choice1", "multirc": "True",
                    "record": "Paris", "rte": "entailment", "wic": "False", "wsc:": "the trophy"}


def constant_answer(prompt):
  """The same answer to every question of a task (AX-b/AX-g prompts start with "rte")."""
  return next(answer for prefix, answer in CONSTANT_ANSWERS.items() if prompt.startswith(prefix))


# Worked out from the fixture labels (see tests/fixtures/evaluation/super_glue).
EXPECTED_CONSTANT = {
    "boolq/accuracy": 100 * 3 / 6,  # labels T F F T T F
    "cb/accuracy": 100 * 3 / 6,  # 3 entailment, 2 contradiction, 1 neutral
    "cb/f1_macro": 100 * (6 / 9 + 0 + 0) / 3,  # entailment: TP 3 FP 3 FN 0
    "copa/accuracy": 100 * 2 / 4,  # labels 0 1 1 0
    "multirc/f1a": 100 * 10 / 13,  # 5 True, 3 False answers: TP 5 FP 3
    "multirc/em": 100 * 1 / 4,  # only the one-answer question (True) is all right
    "record/f1": 100 * (1 + 0 + 2 / 3) / 3,  # "Paris" is q0's second answer; 1/2 of PSG
    "record/em": 100 * 1 / 3,
    "rte/accuracy": 100 * 2 / 4,
    "wic/accuracy": 100 * 3 / 4,  # labels F T F F
    "wsc/accuracy": 100 * 3 / 4,  # "the trophy" names only the trophy (right), not Susan (wrong)
    "axb/matthews": 0.0,  # a constant prediction
    "axg/accuracy": 100 * 2 / 4,
}


def test_constant_answers_give_the_hand_computed_metrics(superglue_data):
  results = run(superglue.SuperGLUE(), FakeModel(answer=constant_answer))
  got = results["metrics"]
  for key, value in EXPECTED_CONSTANT.items():
    assert got[key] == approx64(value, FIXTURE_TERMS), key
  scores = [50, (50 + 200 / 9) / 2, 50, (1000 / 13 + 25) / 2, (500 / 9 + 100 / 3) / 2, 50, 75, 75]
  assert got["average"] == approx64(sum(scores) / 8, FIXTURE_TERMS)
  assert got["cb/score"] == approx64(scores[1], FIXTURE_TERMS)
  counts = {"boolq": 6, "cb": 6, "copa": 4, "multirc": 8, "record": 3, "rte": 4, "wic": 4,
            "wsc": 4, "axb": 4, "axg": 4}
  assert {t: got[f"{t}/num_examples"] for t in counts} == counts


def test_stop_strings_cut_the_generated_answer(superglue_data):
  model = FakeModel(answer=lambda prompt: "True. Because the passage says so")
  results = run(superglue.SuperGLUE(tasks=("boolq",), stop_strings=["."], max_new_tokens=7),
                model)
  assert results["metrics"]["boolq/accuracy"] == approx64(50, FIXTURE_TERMS)
  assert model.calls == [("generate", 6, 7, (".",))]


def _oracle(benchmark):
  """Generation and scoring models that always give the right answer."""
  examples = benchmark.examples()
  answer = {e["prompt"]: e["target"] for e in examples if e["task"] != "wsc"}
  # WSC's simple format asks for the pronoun's referent: the candidate of the True record.
  answer.update({e["prompt"]: e["candidate_referent"] for e in examples
                 if e["task"] == "wsc" and e["label"] == 1})
  return answer, {e["prompt"]: e["target"] for e in examples}


@pytest.mark.parametrize("method", ["generate", "rank"])
def test_right_answers_score_100_on_every_metric(superglue_data, method):
  benchmark = superglue.SuperGLUE(method=method)
  answer, target = _oracle(benchmark)
  model = FakeModel(answer=answer.get,
                    score=lambda context, continuation: 0.0 if continuation == target[context]
                    else -1.0)
  got = run(benchmark, model, chunk_size=1000)["metrics"]
  assert {k: v for k, v in got.items() if not k.endswith("num_examples")} == approx64(
      {**{k: 100.0 for k in EXPECTED_CONSTANT},
       **{f"{t}/score": 100.0 for t in superglue.AVERAGED_TASKS}, "average": 100.0},
      FIXTURE_TERMS)
  assert len(model.calls) == 1  # one batched call for the whole chunk


def test_rank_classification_picks_the_highest_loglikelihood(superglue_data):
  table = {"False": -2.0, "True": -0.5, "entailment": -3.0, "contradiction": -0.1,
           "neutral": -5.0, "not_entailment": -1.0, "choice1": -0.7, "choice2": -0.2}

  def score(context, continuation):
    if context.startswith("record"):  # "CNN" (an entity, never the answer) wins
      return -1.0 if continuation == "CNN" else -4.0 - len(continuation)
    return table[continuation]

  model = FakeModel(score=score)
  benchmark = superglue.SuperGLUE(method="rank")
  examples = benchmark.examples()
  results = run(benchmark, model, chunk_size=10)
  # One batched call per chunk of 10 examples, with every candidate of each.
  assert model.calls == [("loglikelihoods", sum(len(e["candidates"]) for e in chunk))
                         for chunk in core.chunked(examples, 10)]
  got = results["metrics"]
  assert got["boolq/accuracy"] == approx64(100 * 3 / 6, FIXTURE_TERMS)  # always True
  assert got["cb/accuracy"] == approx64(100 * 2 / 6, FIXTURE_TERMS)  # always contradiction
  assert got["copa/accuracy"] == approx64(100 * 2 / 4, FIXTURE_TERMS)  # always choice2
  assert got["axb/matthews"] == 0.0  # always not_entailment
  assert got["record/em"] == 0.0  # always "CNN"
  assert got["wsc/accuracy"] == approx64(100 * 2 / 4, FIXTURE_TERMS)  # always True


def test_rank_records_hold_every_candidates_loglikelihood(superglue_data):
  rng = random.Random(3)
  scores = {}

  def score(context, continuation):
    return scores.setdefault((context, continuation), rng.uniform(-10, 0))

  benchmark = superglue.SuperGLUE(method="rank")
  records = benchmark.predict(FakeModel(score=score), benchmark.examples())
  for record in records:
    best = max(record["scores"], key=record["scores"].get)
    assert record["answer"] == record["output"] == best
    assert record["scores"] == {c: scores[(record["prompt"], c)] for c in record["scores"]}
  wsc = [r for r in records if r["task"] == "wsc"]
  assert all(r["prompt"].startswith("wsc text: ") and set(r["scores"]) == {"False", "True"}
             for r in wsc)


@pytest.mark.filterwarnings("ignore::UserWarning")  # scikit-learn's undefined-metric warnings
@pytest.mark.parametrize("seed", range(8))
def test_benchmark_metrics_equal_t5s_metrics_on_random_outputs(superglue_data, t5, seed):
  """Random generations (a class, a word that is none, nothing, a partial ReCoRD answer) scored
  by the benchmark and by T5's own postprocessors and metrics."""
  benchmark = superglue.SuperGLUE()
  examples = benchmark.examples()
  options = {}
  for e in examples:
    choices = [e["candidate_referent"], "the city"] if e["task"] == "wsc" else e["candidates"]
    if e["task"] == "record":  # partly right answers
      choices = choices + ["tower", "The Saint-Germain club", "paris, france"]
    options.setdefault(e["prompt"], {"maybe", ""}).update(choices)
  rng = random.Random(seed)
  model = FakeModel(answer=lambda prompt: rng.choice(sorted(options[prompt])))
  predictions = benchmark.predict(model, examples)
  pp, m = t5.postprocessors, t5.metrics
  expected = {}
  for task in superglue.TASKS:
    rs = [r for r in predictions if r["task"] == task]
    outputs = [r["output"].strip() for r in rs]
    names = sources.SUPER_GLUE_LABEL_NAMES.get(task)
    if task == "multirc":
      values = m.multirc_f1_over_all_answers(
          [{"value": r["label"]} for r in rs], [pp.multirc(o) for o in outputs])
      values.update(m.mean_group_metric(m.all_match)(
          [{"value": r["label"], "group": r["group"]} for r in rs],
          [pp.multirc(o) for o in outputs]))
      expected.update({"multirc/f1a": values["f1"], "multirc/em": values["exact_match"]})
    elif task == "record":
      values = m.deduplicate_metric(m.squad)(
          [{"value": r["reference"], "group": r["id"]} for r in rs],
          [pp.record(o) for o in outputs])
      expected.update({"record/f1": values["f1"], "record/em": values["em"]})
    elif task == "wsc":
      predicted = [pp.wsc_simple(o, example={"targets_pretokenized": r["candidate_referent"]})
                   for o, r in zip(outputs, rs)]
      expected["wsc/accuracy"] = m.accuracy([r["label"] for r in rs], predicted)["accuracy"]
    else:
      predicted = [pp.string_label_to_class_id(o, label_classes=names) for o in outputs]
      labels = [r["label"] for r in rs]
      if task == "axb":  # GLUE's (CoLA's) Matthews correlation
        mcc = m.sklearn_metrics_wrapper("matthews_corrcoef",
                                        metric_post_process_fn=lambda x: 100 * x)
        expected["axb/matthews"] = mcc(labels, predicted)["matthews_corrcoef"]
      elif task == "cb":
        expected["cb/accuracy"] = m.accuracy(labels, predicted)["accuracy"]
        expected["cb/f1_macro"] = m.mean_multiclass_f1(num_classes=3)(
            labels, predicted)["mean_3class_f1"]
      else:
        expected[f"{task}/accuracy"] = m.accuracy(labels, predicted)["accuracy"]
  ours = benchmark.metrics(predictions)
  assert {k: ours[k] for k in expected} == approx64(expected, FIXTURE_TERMS)
  assert set(expected) == {k for k in ours if not k.endswith(("/num_examples", "/score"))
                           and k != "average"}


def test_average_needs_all_eight_tasks(superglue_data):
  results = run(superglue.SuperGLUE(tasks=("cb", "axb")), FakeModel(answer=constant_answer))
  assert "average" not in results["metrics"]
  assert results["metrics"]["cb/f1_macro"] == approx64(EXPECTED_CONSTANT["cb/f1_macro"],
                                                       FIXTURE_TERMS)


def test_unlabelled_test_split_gets_predictions_but_no_metrics(offline_data):
  del offline_data  # tests/fixtures/data has unlabelled SuperGLUE test files
  results = run(superglue.SuperGLUE(tasks=("cb", "record"), split="test"),
                FakeModel(answer=lambda prompt: "entailment"))
  assert results["metrics"] == {"cb/num_examples": 1, "record/num_examples": 1}


# ---- a real (tiny, random) model -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
  cfg = models.get_config("gemma2_tiny")
  params = models.init(cfg, jax.random.PRNGKey(0))
  return core.LanguageModel(cfg, params, vocabularies.ByteTokenizer(), batch_size=16)


@pytest.mark.parametrize("method", ["generate", "rank"])
def test_tiny_model_runs_every_task(superglue_data, tiny_model, method, tmp_path):
  benchmark = superglue.SuperGLUE(method=method, max_new_tokens=4)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    results = core.run_benchmark(benchmark, tiny_model, tmp_path, progress=False, chunk_size=64)
  records = core.read_predictions(tmp_path / core.PREDICTIONS)
  assert len(records) == len(benchmark.examples()) == results["num_examples"]
  got = results["metrics"]
  for task in superglue.TASKS:
    task_records = [r for r in records.values() if r["task"] == task]
    assert task_records and got[f"{task}/num_examples"] == len(task_records)
    assert all(isinstance(r["output"], str) for r in task_records)
  for key, value in got.items():
    low = -100.0 if key == "axb/matthews" else 0.0
    assert key.endswith("num_examples") or low <= value <= 100.0, key
  assert 0.0 <= got["average"] <= 100.0
  if method == "rank":
    assert all(r["answer"] in r["scores"] for r in records.values())
