"""Specification of logit distillation (maxnucl/losses/distill.py, the `distill_kl` loss term and
the trainer's frozen teacher): the term against a float64 reference, a student equal to its
teacher, one device = a mesh, exact resume, a pruned student recovering from its unpruned
teacher, refused settings.  Tiny 2-layer Gemma-2, CPU."""

import functools
import json
import pathlib

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tensorboard.backend.event_processing import event_accumulator

from maxnucl import checkpoints
from maxnucl import losses
from maxnucl import models
from maxnucl import sharding
from maxnucl import train
from maxnucl.pruning import prune_ffn_neurons
from tolerances import (EPS32, EPS_BF16, bf16_rounding_sites, decoder_terms, gradient_terms,
                        magnitude, rounding_atol, typical_rounding_atol)

BASE_FILES = ["gin/base.gin", "gin/models/gemma2_tiny.gin", "gin/data/synthetic.gin",
              "gin/optimizers/adamw.gin", "gin/schedules/constant.gin"]
TINY = ["model_config.num_layers = 2", "DATA_SEQ_LEN = 32", "DATA_BATCH_SIZE = 8",
        "learning_rate_schedule.peak_learning_rate = 3e-3",
        "learning_rate_schedule.warmup_steps = 0", "train_loop.progress_bar = False",
        "train_loop.eval_every = 0", "train_loop.log_every = 1",
        "train_loop.checkpoint_every = 100", "train_loop.async_checkpointing = False"]
TIMING_KEYS = {"step_time_s", "tokens_per_s", "tflops_per_device", "mfu"}


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def one_device():
  return sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1])


def run(workdir, *bindings, mesh=None):
  gin.clear_config()
  train.parse_gin(BASE_FILES, TINY + list(bindings))
  return train.train_loop(workdir, mesh=mesh or one_device())


def read_metrics(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
          .splitlines()]


def assert_trees_equal(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def teacher_and_student(tmp_path_factory):
  """A teacher trained 30 steps on the synthetic data and its student: the teacher with 3/4 of
  every layer's FFN neurons removed (magnitude), a physically smaller checkpoint."""
  root = tmp_path_factory.mktemp("distill")
  gin.clear_config()
  run(root / "teacher", "train_loop.num_steps = 30")
  gin.clear_config()
  teacher = root / "teacher" / "checkpoints" / "30"
  prune_ffn_neurons(teacher, root / "student", method="magnitude", ratio=0.75)
  return root / "teacher", root / "student"  # the teacher as a workdir: its latest step


def distilling(teacher, student, *more):
  return (f"train_loop.init_checkpoint = '{student}'", f"distill.teacher = '{teacher}'",
          "total_loss.nll_weight = 0.0", *more)


# ---- the term against a float64 reference -------------------------------------------------------

def np_kl(teacher_logits, student_logits, temperature):
  """T^2 KL(softmax(t/T) || softmax(s/T)) per token in float64, with the log-softmaxes."""
  def log_softmax(x):
    x = np.asarray(x, np.float64) / temperature
    shifted = x - x.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  log_p, log_q = log_softmax(teacher_logits), log_softmax(student_logits)
  return temperature ** 2 * np.sum(np.exp(log_p) * (log_p - log_q), -1), log_p, log_q


def kl_token_atol(log_p, log_q, temperature, vocab):
  """A token's T^2 sum_v p_v (lp_v - lq_v) in float32: each log-softmax entry carries the
  division by T, the max, the V-term sum of exps and its log (V + 4 roundings of values up to
  its magnitude M); sum_v p_v (2 e) = 2 e; exp(lp) is off by (|lp| + 2) eps relative, and the
  V products and additions round values of sum_v p_v |lp_v - lq_v| = S."""
  m = magnitude(log_p, log_q)
  e = rounding_atol(m, vocab + 4)
  s = float(np.max(np.sum(np.exp(log_p) * np.abs(log_p - log_q), -1)))
  return temperature ** 2 * (2 * e + rounding_atol(s, vocab + m + 4))


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.5])
def test_distill_kl_matches_a_float64_reference_with_temperature_and_mask(temperature):
  rng = np.random.default_rng(3)
  shape = (3, 7, 23)
  teacher = jnp.asarray(rng.normal(size=shape) * 3.0, jnp.float32)
  student = jnp.asarray(rng.normal(size=shape) * 3.0, jnp.float32)
  mask = np.asarray(rng.random(shape[:2]) < 0.6, np.float32)
  batch = {"loss_mask": jnp.asarray(mask)}
  kl, log_p, log_q = np_kl(teacher, student, temperature)
  token_atol = kl_token_atol(log_p, log_q, temperature, shape[-1])
  np.testing.assert_allclose(losses.token_kl(teacher, student, temperature), kl, rtol=0,
                             atol=token_atol)
  expected = np.sum(kl * mask) / np.sum(mask)
  # the masked mean: T + 2 roundings of the mean of |KL| (reduce_tokens)
  atol = token_atol + rounding_atol(expected, mask.size + 2)
  got = losses.distill_kl(teacher, student, batch, temperature)
  np.testing.assert_allclose(got, expected, rtol=0, atol=atol)
  # masked-out positions do not count: changing their logits changes nothing, bit for bit
  noisy = jnp.where(batch["loss_mask"][..., None] > 0, student, student + 50.0)
  np.testing.assert_array_equal(losses.distill_kl(teacher, noisy, batch, temperature), got)

  # through the registry: the term reads distill.temperature and the teacher logits in the batch
  gin.parse_config([f"distill.temperature = {temperature}"])
  cfg = models.get_config("gemma2_tiny", num_layers=2, vocab_size=shape[-1])
  targets = jnp.asarray(rng.integers(0, shape[-1], shape[:2]), jnp.int32)
  batch = dict(batch, targets=targets, **{losses.TEACHER_LOGITS: teacher})
  total, metrics = losses.total_loss({}, student, batch, cfg, terms={"distill_kl": 2.0},
                                     nll_weight=0.5)
  np.testing.assert_array_equal(metrics["distill_kl"], got)
  parts = 0.5 * float(metrics["nll"]) + 2.0 * float(got)
  np.testing.assert_allclose(total, parts, rtol=0, atol=rounding_atol(abs(parts), 3))


def test_kl_of_identical_logits_is_zero_and_a_batch_without_loss_tokens_gives_zero():
  logits = jnp.asarray(np.random.default_rng(4).normal(size=(2, 5, 13)) * 4.0, jnp.float32)
  batch = {"loss_mask": jnp.ones((2, 5), jnp.float32)}
  assert float(losses.distill_kl(logits, logits, batch, 1.7)) == 0.0
  empty = {"loss_mask": jnp.zeros((2, 5), jnp.float32)}
  assert float(losses.distill_kl(logits, logits + 1.0 * jnp.arange(13), empty)) == 0.0


# ---- the trainer's teacher ----------------------------------------------------------------------

def test_a_student_that_is_a_copy_of_its_teacher_has_kl_0_and_gradient_0():
  cfg = models.get_config("gemma2_tiny", num_layers=2)
  params = models.init(cfg, jax.random.PRNGKey(0))
  rng = np.random.default_rng(5)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (4, 16)), jnp.int32)
  batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, axis=1),
           "loss_mask": jnp.ones((4, 16), jnp.float32),
           "segment_ids": jnp.ones((4, 16), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(16), (4, 16))}
  gin.parse_config(["total_loss.terms = {'distill_kl': 1.0}", "total_loss.nll_weight = 0.0"])

  @jax.jit
  def grads(student, teacher):
    return jax.grad(lambda p: train.loss_fn(p, batch, None, cfg, teacher=teacher,
                                            teacher_cfg=cfg), has_aux=True)(student)

  copy_grads, metrics = grads(params, params)
  # NLL-only gradients of the same model: the scale a rounding-level gradient is measured against
  gin.parse_config(["total_loss.terms = {}", "total_loss.nll_weight = 1.0"])
  nll_grads, _ = grads(params, None)
  # The student's and the teacher's logits are the same program on the same params: equal up to
  # a logit's roundings, so KL <= T^2 sum_v p |lp - lq| with |lp - lq| up to 2 of them.
  logits = models.apply(cfg, params, tokens)
  log_z_terms = decoder_terms(cfg, 16) + cfg.vocab_size
  kl_atol = rounding_atol(2 * magnitude(jax.nn.log_softmax(logits)), log_z_terms)
  np.testing.assert_allclose(metrics["distill_kl"], 0.0, rtol=0, atol=kl_atol)
  # dKL/ds = p (sum_v p - 1) + (q - p): rounding-sized (V roundings of sum p, the logits' own)
  # where the NLL's dNLL/ds = q - onehot is O(1); the backward pass through the model is the
  # same linear map for both, so the gradients' ratio is bounded by those roundings.
  nll_scale = magnitude(*jax.tree.leaves(nll_grads))
  atol = rounding_atol(nll_scale, gradient_terms(cfg, 16, 4 * 16))
  for (path, g) in jax.tree_util.tree_flatten_with_path(copy_grads)[0]:
    np.testing.assert_allclose(g, 0.0, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_accumulated_distillation_step_equals_the_whole_batch_step():
  """The teacher runs on each microbatch inside the step: with 2 and 4 microbatches of unequal
  loss-token counts (one with none) the KL, NLL and loss metrics and the gradients are the
  whole batch's (4 microbatches; test_train checks 2 and 4 without a teacher).  The teacher has other FFN widths than the student (a pruned student)."""
  student_cfg = models.get_config("gemma2_tiny", num_layers=2, ffn_widths=(64, 128))
  teacher_cfg = models.get_config("gemma2_tiny", num_layers=2)
  params = models.init(student_cfg, jax.random.PRNGKey(0))
  teacher = models.init(teacher_cfg, jax.random.PRNGKey(1))
  rng = np.random.default_rng(0)
  rows, length = 8, 16
  counts = np.array([16, 3, 9, 0, 12, 1, 6, 0])  # per row; the 4 microbatches: 28, 4, 15, 0
  batch = {"tokens": rng.integers(3, student_cfg.vocab_size, (rows, length)).astype(np.int32),
           "targets": rng.integers(3, student_cfg.vocab_size, (rows, length)).astype(np.int32),
           "loss_mask": (np.arange(length) < counts[:, None]).astype(np.float32),
           "segment_ids": np.ones((rows, length), np.int32),
           "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))}

  def keep_gradient(grads, state, params=None):  # SGD whose state is the gradient it was given
    del state, params
    return jax.tree.map(lambda g: -0.1 * g, grads), grads
  tx = optax.GradientTransformation(lambda p: jax.tree.map(jnp.zeros_like, p), keep_gradient)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  gin.parse_config(["total_loss.terms = {'distill_kl': 1.0, 'nucl_mstd': 0.5}",
                    "total_loss.nll_weight = 0.25", "distill.temperature = 2.0"])
  steps = {}
  for a in (1, 4):
    step_fn = jax.jit(functools.partial(train.train_step, cfg=student_cfg, tx=tx,
                                        schedule=optax.constant_schedule(0.1),
                                        accumulation_steps=a, teacher_cfg=teacher_cfg))
    steps[a] = step_fn(state, batch, jax.random.PRNGKey(1), teacher)
  # as test_train's accumulation test: a loss's or a gradient entry's roundings (gradient_terms,
  # the teacher's log-softmax adding a vocabulary's), of the largest value
  terms = gradient_terms(student_cfg, length, int(counts.sum())) + student_cfg.vocab_size
  whole_state, whole = steps[1]
  assert float(whole["distill_kl"]) > 0.1
  grads_atol = rounding_atol(magnitude(*jax.tree.leaves(whole_state["opt_state"])), terms)
  for a in (4,):
    acc_state, acc = steps[a]
    for key in ("distill_kl", "nll", "nucl_mstd", "loss"):
      np.testing.assert_allclose(acc[key], whole[key], rtol=EPS32 * terms, err_msg=f"{key}, {a}")
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(acc_state["opt_state"])[0],
                            jax.tree.leaves(whole_state["opt_state"])):
      np.testing.assert_allclose(x, y, rtol=0, atol=grads_atol,
                                 err_msg=f"{jax.tree_util.keystr(path)}, {a} microbatches")


def test_a_pruned_student_learns_from_its_unpruned_teacher_with_nucl_in_the_same_run(
    teacher_and_student, tmp_path):
  teacher, student = teacher_and_student
  result = run(tmp_path / "run", *distilling(
      teacher, student, "total_loss.terms = {'distill_kl': 1.0, 'nucl_mstd': 0.01}",
      "train_loop.num_steps = 12", "train_loop.accumulation_steps = 2",
      "learning_rate_schedule.peak_learning_rate = 1e-3"))
  kl = [r["distill_kl"] for r in result["history"]]
  # the pruned student starts away from its teacher and the KL falls to half or less
  assert kl[0] > 0.05 and max(kl[-3:]) < 0.5 * kl[0], kl
  assert all(r["nll"] > 0 and r["nucl_mstd"] < 0 for r in result["history"])
  # nll_weight 0: the loss is the KL plus alpha NUCL, the NLL is reported without weight.  Each
  # microbatch's loss rounds twice (the product, the sum), and the loss, the KL and NUCL are each
  # accumulated over the 2 microbatches (2 products and 2 sums): 14 roundings of the values.
  for r in result["history"]:
    parts = r["distill_kl"] + 0.01 * r["nucl_mstd"]
    scale = magnitude(r["distill_kl"], 0.01 * r["nucl_mstd"], parts)
    np.testing.assert_allclose(r["loss"], parts, rtol=0, atol=rounding_atol(scale, 14))
  records = read_metrics(tmp_path / "run")
  assert [r["distill_kl"] for r in records] == kl
  tags = set()
  for events in (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"):
    acc = event_accumulator.EventAccumulator(str(events))
    acc.Reload()
    tags |= set(acc.Tags()["scalars"])
  assert {"distill_kl", "nll", "nucl_mstd"} <= tags
  # the student kept its pruned widths and the checkpoint it wrote is a plain model checkpoint
  cfg, _ = checkpoints.load(tmp_path / "run" / "checkpoints" / "12")
  assert cfg.ffn_widths == checkpoints.load_config(student).ffn_widths == (64, 64)


def test_resume_with_a_teacher_from_a_pruned_init_checkpoint_is_bit_identical(
    teacher_and_student, tmp_path):
  teacher, student = teacher_and_student
  common = distilling(teacher, student, "total_loss.terms = {'distill_kl': 1.0}",
                      "model_config.dropout_rate = 0.1", "distill.temperature = 2.0",
                      "train_loop.checkpoint_every = 2")
  straight = run(tmp_path / "straight", *common, "train_loop.num_steps = 4")
  run(tmp_path / "resumed", *common, "train_loop.num_steps = 2")
  resumed = run(tmp_path / "resumed", *common, "train_loop.num_steps = 4")
  strip = lambda records: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]
  assert strip(read_metrics(tmp_path / "resumed")) == strip(read_metrics(tmp_path / "straight"))
  assert_trees_equal(resumed["state"]["params"], straight["state"]["params"])
  assert_trees_equal(resumed["state"]["opt_state"], straight["state"]["opt_state"])
  # the teacher is not in the checkpoint; the step it was read from is recorded
  step = tmp_path / "resumed" / "checkpoints" / "4"
  assert not (step / "teacher").exists()
  recorded = json.loads((step / "train_state" / "metadata").read_text())["teacher"]
  assert recorded == str(teacher / "checkpoints" / "30")


@pytest.fixture
def loaded_teachers(monkeypatch):
  """The trainer's `_Teacher`s, each appended once it has loaded its params."""
  loaded = []
  original = train._Teacher.load

  def spy(self, *args):
    original(self, *args)
    loaded.append(self)
  monkeypatch.setattr(train._Teacher, "load", spy)
  return loaded


def test_a_mesh_of_8_devices_gives_the_losses_of_one_device(teacher_and_student, tmp_path,
                                                          loaded_teachers):
  teacher, student = teacher_and_student
  steps = distilling(teacher, student, "total_loss.terms = {'distill_kl': 1.0}",
                     "total_loss.nll_weight = 0.5", "train_loop.num_steps = 3")
  one = run(tmp_path / "one", *steps)
  many = run(tmp_path / "many", *steps, mesh=sharding.create_mesh((2, 2, 2)))
  # the teacher lives on the student's mesh, sharded by the same rules
  _, on_mesh = loaded_teachers
  leaves = jax.tree.leaves(on_mesh.params)
  assert any(not x.sharding.is_fully_replicated for x in leaves)
  assert all(x.sharding.mesh.devices.size == 8 for x in leaves)
  # a loss's roundings (a logit's path, the log-softmaxes over the vocabulary, the means over
  # the batch's tokens) plus those of the updates before it (test_train.assert_losses_close)
  cfg = checkpoints.load_config(student)
  loss_terms = decoder_terms(cfg, 32) + 2 * cfg.vocab_size + 8 * 32
  for record, expected in zip(many["history"], one["history"]):
    terms = loss_terms + (record["step"] - 1) * gradient_terms(cfg, 32, 8 * 32)
    for key in ("loss", "nll", "distill_kl"):
      np.testing.assert_allclose(record[key], expected[key], rtol=0, err_msg=key,
                                 atol=rounding_atol(magnitude(expected["nll"]), terms))


def test_a_bfloat16_teacher_is_held_in_bfloat16_and_gives_its_logits_to_bf16_rounding(
    teacher_and_student, tmp_path, loaded_teachers):
  teacher, student = teacher_and_student
  result = run(tmp_path / "bf16", *distilling(teacher, student, "train_loop.num_steps = 1",
                                              "total_loss.terms = {'distill_kl': 1.0}",
                                              "distill.teacher_dtype = 'bfloat16'"))
  assert np.isfinite(result["history"][0]["distill_kl"])
  (half,) = loaded_teachers
  assert {x.dtype for x in jax.tree.leaves(half.params)} == {jnp.dtype("bfloat16")}
  assert half.cfg.dtype == half.cfg.param_dtype == "bfloat16"
  # its logits are the float32 teacher's up to bfloat16 rounding: every operation's output and
  # every kernel on a logit's path rounded to 8 bits (as test_gemma2_parity's bf16 params)
  cfg, params = checkpoints.load(checkpoints.resolve(teacher))
  tokens = jnp.asarray(np.random.default_rng(6).integers(3, cfg.vocab_size, (4, 32)), jnp.int32)
  batch = {"tokens": tokens, "segment_ids": jnp.ones_like(tokens),
           "positions": jnp.broadcast_to(jnp.arange(32), (4, 32))}
  reference = np.asarray(train.teacher_logits(params, batch, cfg))
  ours = np.asarray(train.teacher_logits(half.params, batch, half.cfg))
  assert ours.dtype == np.float32
  sites = bf16_rounding_sites(cfg) + 7 * cfg.num_layers + 1
  err = np.abs(ours - reference)
  np.testing.assert_allclose(err.max(), 0.0,
                             atol=rounding_atol(magnitude(reference), sites, EPS_BF16))
  np.testing.assert_allclose(err.mean(), 0.0,
                             atol=typical_rounding_atol(magnitude(reference), sites, EPS_BF16))


@pytest.mark.parametrize("bindings,message", [
    (["total_loss.terms = {{'distill_kl': 1.0}}"],
     "total_loss.terms has 'distill_kl' but there is no teacher: bind distill.teacher"),
    (["distill.teacher = '{teacher}'"],
     "distill.teacher is set but total_loss.terms has no 'distill_kl'"),
    (["distill.teacher = '{other_vocab}'", "total_loss.terms = {{'distill_kl': 1.0}}"],
     "has vocab_size 400 but the student 'gemma2_tiny' has 384: distillation needs the same "
     "vocabulary"),
    (["distill.teacher = '{teacher}'", "total_loss.terms = {{'distill_kl': 1.0}}",
      "distill.temperature = 0.0"], "distill.temperature = 0.0: expected a finite number > 0"),
    (["distill.teacher = '{teacher}'", "total_loss.terms = {{'distill_kl': 1.0}}",
      "distill.teacher_dtype = 'float16'"], "distill.teacher_dtype = 'float16': expected one of"),
    (["distill.teacher = '{tmp}/no_teacher'", "total_loss.terms = {{'distill_kl': 1.0}}"],
     "no_teacher"),
    (["total_loss.nll_weight = -1.0"], "total_loss.nll_weight = -1.0: expected a finite number"),
])
def test_bad_distillation_settings_are_one_line_errors_and_create_nothing(
    bindings, message, teacher_and_student, tmp_path, capsys):
  teacher, _ = teacher_and_student
  other_vocab = tmp_path / "other_vocab"
  cfg = models.get_config("gemma2_tiny", num_layers=2, vocab_size=400)
  checkpoints.save(other_vocab, cfg, models.init(cfg, jax.random.PRNGKey(0)))
  workdir = tmp_path / "run"
  args = [f"--gin_param={b}" for b in TINY]
  names = {"teacher": teacher, "other_vocab": other_vocab, "tmp": tmp_path}
  args += [f"--gin_param={b.format(**names)}" for b in bindings]
  assert train.main([f"--gin_file={f}" for f in BASE_FILES] + args
                    + [f"--workdir={workdir}"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and message in err, err
  assert not workdir.exists()


def test_a_resume_with_another_teacher_is_refused_naming_the_binding(teacher_and_student,
                                                                     tmp_path, capsys):
  teacher, student = teacher_and_student
  common = ["total_loss.terms = {'distill_kl': 1.0}", "train_loop.num_steps = 1"]
  run(tmp_path / "run", *distilling(teacher, student, *common))
  other = teacher / "checkpoints" / "30"  # the same step, named otherwise: still another binding
  gin.clear_config()
  args = [f"--gin_file={f}" for f in BASE_FILES] + [f"--gin_param={b}" for b in TINY]
  args += [f"--gin_param={b}" for b in distilling(other, student, *common)]
  assert train.main(args + ["--gin_param=train_loop.num_steps = 2",
                            f"--workdir={tmp_path / 'run'}"]) == 2
  err = capsys.readouterr().err
  assert "distill.teacher" in err and str(other) in err


# ---- the recovery config (gin/recover_tiny.gin, the twin of gin/recover_smollm2.gin) -------------

def test_the_tiny_recover_config_distils_logs_per_domain_nll_and_resumes(teacher_and_student,
                                                                         tmp_path, capsys):
  from maxnucl.data import corpus  # pylint: disable=import-outside-toplevel
  teacher, student = teacher_and_student
  # a small code corpus: the standard library's email package in 60 files of 1500 characters
  # (named by number, so the split of each is the same on every Python), some held out
  source = "".join(p.read_text() for p in sorted((corpus.python_stdlib_dir() / "email")
                                                 .glob("*.py")))
  root = tmp_path / "code"
  root.mkdir()
  for i in range(60):
    (root / f"module_{i}.py").write_text(source[i * 1500:(i + 1) * 1500])
  corpus_dir = tmp_path / "corpus"
  corpus.prepare_corpus(root, corpus_dir, shares=(0.4, 0.2, 0.2, 0.2))
  prose = tmp_path / "prose.txt"
  prose.write_text("The teacher is frozen; the student learns its distribution over the next "
                   "token, which carries more than the one token the data shows.\n" * 8)
  workdir = tmp_path / "recover"
  bindings = (f"STUDENT = '{student}'", f"TEACHER = '{teacher}'",
              f"TEXT_CORPUS_DIR = '{corpus_dir}'", f"PROSE_TEXT = '{prose}'", "EVAL_EVERY = 2",
              "EVAL_ROWS = 2", "train_loop.progress_bar = False",
              "train_loop.async_checkpointing = False", "train_loop.log_every = 2")
  args = ["--gin_file=gin/recover_tiny.gin", f"--workdir={workdir}"]
  args += [f"--gin_param={b}" for b in bindings]
  gin.clear_config()
  assert train.main(args + ["--gin_param=train_loop.num_steps = 2"]) == 0
  gin.clear_config()
  assert train.main(args + ["--gin_param=train_loop.num_steps = 4"]) == 0
  assert "resumed from step 2" in capsys.readouterr().out
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == [2, 4]
  for record in records:
    assert record["distill_kl"] > 0 and record["nll_code/nll"] > 0 and record["nll_prose/nll"] > 0
  # the recovered student is a plain checkpoint with the pruned widths
  cfg, params = checkpoints.load(checkpoints.resolve(workdir))
  assert cfg.ffn_widths == checkpoints.load_config(student).ffn_widths
  assert params["layers_0"]["mlp"]["out"].shape[0] == cfg.ffn_widths[0]


def test_a_resume_whose_teacher_step_moved_on_is_warned_about(caplog, tmp_path):
  """A workdir teacher resolves to its latest step, which can change between a run and its
  resume (the binding itself stays the same, so run_guard lets it pass): the recorded step and
  the new one are named."""
  cfg = models.get_config("gemma2_tiny", num_layers=2)
  teacher = train._Teacher(tmp_path / "teacher" / "checkpoints" / "40", cfg)
  recorded = {"teacher": str(tmp_path / "teacher" / "checkpoints" / "30")}
  with caplog.at_level("WARNING", logger="maxnucl.train"):
    teacher.check_resumed(recorded, "RUN/checkpoints/4")
  assert ("RUN/checkpoints/4 was trained with distill.teacher "
          f"{tmp_path}/teacher/checkpoints/30; resuming with "
          f"{tmp_path}/teacher/checkpoints/40") in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING", logger="maxnucl.train"):
    teacher.check_resumed({"teacher": str(teacher.path)}, "RUN/checkpoints/4")
  assert not caplog.text
