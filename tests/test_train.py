"""Specification of the trainer (maxnucl/train.py): learning, exact resume, sharding invariance,
gradient accumulation, NUCL alpha = 0, metrics, error exits.  Tiny 2-layer Gemma-2, CPU."""

import functools
import json
import os
import pathlib
import shutil
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from maxnucl import checkpoints
from maxnucl import models
from maxnucl import sharding
from maxnucl import train
from tolerances import EPS32, decoder_terms, gradient_terms, magnitude, rounding_atol

REPO = pathlib.Path(__file__).resolve().parent.parent
BASE_FILES = ["gin/base.gin", "gin/models/gemma2_tiny.gin", "gin/data/synthetic.gin",
              "gin/optimizers/adamw.gin", "gin/schedules/constant.gin"]
TINY = [
    "model_config.num_layers = 2",
    "DATA_SEQ_LEN = 32",
    "DATA_BATCH_SIZE = 8",
    "learning_rate_schedule.peak_learning_rate = 3e-3",
    "learning_rate_schedule.warmup_steps = 2",
    "train_loop.progress_bar = False",
    "train_loop.eval_every = 0",
    "train_loop.log_every = 1",
    "train_loop.checkpoint_every = 100",
]
TIMING_KEYS = {"step_time_s", "tokens_per_s", "tflops_per_device", "mfu"}
REQUIRED_KEYS = {"step", "loss", "nll", "nucl_mstd", "outgoing_entropy", "learning_rate",
                 "grad_norm", "tokens_per_s", "tflops_per_device", "mfu"}


def single_device_mesh():
  return sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1])


def run(workdir, *bindings, mesh=None):
  """A fresh gin config (base + tiny model + synthetic data + AdamW) and one train_loop call."""
  gin.clear_config()
  train.parse_gin(BASE_FILES, TINY + list(bindings))
  return train.train_loop(workdir, mesh=mesh or single_device_mesh())


def losses_of(result):
  return [r["loss"] for r in result["history"]]


def read_metrics(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text()
          .splitlines()]


def assert_trees_close(a, b, atol=0.0):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=atol,
                               err_msg=jax.tree_util.keystr(path))


def assert_losses_close(result, reference):
  """The losses of two runs of TINY that sum in other orders: the loss of step k carries a loss's
  roundings (a logit's path, the log-softmax over the vocabulary, the mean over the batch's
  tokens) and those of the k - 1 gradients before it, which the parameters' updates compound:
  (k - 1) x gradient_terms.  (NUCL at alpha 0.01 adds a row's d_model + 2, far fewer.)"""
  cfg, length, tokens = models.get_config("gemma2_tiny", num_layers=2), 32, 8 * 32
  loss_terms = decoder_terms(cfg, length) + cfg.vocab_size + tokens
  assert [r["step"] for r in result["history"]] == [r["step"] for r in reference["history"]]
  for record, expected in zip(result["history"], reference["history"]):
    updates = record["step"] - 1
    np.testing.assert_allclose(
        record["loss"], expected["loss"], err_msg=f"step {record['step']}",
        rtol=EPS32 * (loss_terms + updates * gradient_terms(cfg, length, tokens)))


@pytest.fixture(scope="module")
def nucl_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("nucl_run")
  result = run(workdir, "total_loss.terms = {'nucl_mstd': 0.01}", "train_loop.num_steps = 30",
               "train_loop.log_every = 5", "train_loop.eval_every = 15",
               "train_loop.eval_batches = 2")
  return result


def test_tiny_model_loss_falls_over_30_steps(nucl_run):
  nll = [r["nll"] for r in nucl_run["history"]]
  assert len(nll) == 6
  assert nll[-1] < nll[0] - 1.0, nll
  evals = [r["eval_loss"] for r in nucl_run["history"] if "eval_loss" in r]
  assert len(evals) == 2 and evals[1] < evals[0]


def test_metrics_jsonl_has_required_keys_and_tensorboard_files_exist(nucl_run):
  workdir = nucl_run["workdir"]
  records = read_metrics(workdir)
  assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
  for record in records:
    assert REQUIRED_KEYS <= set(record), REQUIRED_KEYS - set(record)
    assert record["mfu"] is None  # CPU: no peak FLOP/s known
    assert record["tflops_per_device"] > 0 and record["tokens_per_s"] > 0
  assert "eval_loss" in records[2] and "eval_loss" in records[5]
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "config.gin").exists() and (workdir / "operative_config.gin").exists()


def test_the_metrics_writer_leaves_torch_unimported_and_still_writes_events(tmp_path):
  """tensorboardX imports torch when it is installed (about 2 s in every training process);
  the trainer's writer keeps it out, and tensorboardX still writes scalars."""
  code = ("import sys; from maxnucl import train; w = train._summary_writer_class()(sys.argv[1]);"
          " w.add_scalar('loss', 2.5, 7); w.close(); print('torch' in sys.modules)")
  done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                        text=True, check=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert done.stdout.split("\n")[-2] == "False"
  from tensorboard.compat.proto import event_pb2  # pylint: disable=import-outside-toplevel
  (events,) = tmp_path.glob("events.out.tfevents.*")
  data, scalars = events.read_bytes(), []
  while data:  # TFRecord framing: length (8 bytes), its CRC (4), the record, its CRC (4)
    length = int.from_bytes(data[:8], "little")
    event = event_pb2.Event.FromString(data[12:12 + length])
    scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    data = data[16 + length:]
  assert scalars == [(7, "loss", 2.5)]
  import torch  # pylint: disable=import-outside-toplevel
  assert train._summary_writer_class()(str(tmp_path / "with_torch")) is not None  # as usual
  assert sys.modules["torch"] is torch


def test_training_checkpoint_is_readable_by_checkpoints_load(nucl_run):
  cfg, params = checkpoints.load(nucl_run["workdir"] / "checkpoints" / "30")
  assert cfg == nucl_run["cfg"]
  assert_trees_close(params, nucl_run["state"]["params"])


def test_resume_after_kill_continues_the_same_trajectory(tmp_path):
  # Dropout on, so the resumed run must also restore the RNG stream and the data position.
  common = ["model_config.dropout_rate = 0.1", "train_loop.checkpoint_every = 4",
            "train_loop.log_every = 2", "total_loss.terms = {'nucl_mstd': 0.01}"]
  straight = run(tmp_path / "straight", *common, "train_loop.num_steps = 12")
  # Interrupted: stops after step 6 and loses the step-6 checkpoint (killed before it was
  # written), so the restart resumes from step 4 and must rewrite metrics for steps 5-6.
  run(tmp_path / "killed", *common, "train_loop.num_steps = 6")
  shutil.rmtree(tmp_path / "killed" / "checkpoints" / "6")
  resumed = run(tmp_path / "killed", *common, "train_loop.num_steps = 12")

  strip = lambda records: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]
  expected = strip(read_metrics(tmp_path / "straight"))
  assert [r["step"] for r in expected] == [2, 4, 6, 8, 10, 12]
  assert strip(read_metrics(tmp_path / "killed")) == expected
  # bit-identical: a restored checkpoint is exact and the steps after it are the same programs
  assert_trees_close(resumed["state"]["params"], straight["state"]["params"])
  assert_trees_close(resumed["state"]["opt_state"], straight["state"]["opt_state"])


SHARDING_STEPS = ["train_loop.num_steps = 4", "total_loss.terms = {'nucl_mstd': 0.01}"]


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
  return run(tmp_path_factory.mktemp("one_device"), *SHARDING_STEPS)


@pytest.mark.parametrize("shape", [(1, 8, 1), (1, 4, 2)], ids=["fsdp", "fsdp_tensor"])
def test_sharded_meshes_give_the_losses_of_one_device(tmp_path, shape, one_device_run):
  steps, one = SHARDING_STEPS, one_device_run
  mesh = sharding.create_mesh(shape)
  many = run(tmp_path / "many", *steps, mesh=mesh)
  assert_losses_close(many, one)
  # Not derived (tests/README.md lists it): AdamW divides each gradient entry by its own running
  # RMS, so a rounding-sized change of an entry near 0 can move its update by up to 2 x the
  # learning rate; the bound that derives (2 x the summed learning rates, 1.5e-2) would hide a
  # wrong gradient.  The losses above carry the derived check; this literal sits 30x above what
  # was measured here (tests/tolerance_log.py).
  assert_trees_close(many["state"]["params"], one["state"]["params"], atol=1e-5)
  # Params and optimizer state really are sharded over the mesh.
  for tree in (many["state"]["params"], many["state"]["opt_state"]):
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(tree))


def test_nucl_alpha_zero_equals_a_run_without_the_term(tmp_path):
  without = run(tmp_path / "without", "train_loop.num_steps = 3", "total_loss.terms = {}")
  zero = run(tmp_path / "zero", "train_loop.num_steps = 3",
             "total_loss.terms = {'nucl_mstd': 0.0}")
  assert [r["nll"] for r in zero["history"]] == [r["nll"] for r in without["history"]]
  assert "nucl_mstd" in zero["history"][0]
  assert_trees_close(zero["state"]["params"], without["state"]["params"])


def test_gradient_accumulation_2x4_equals_batch_8(tmp_path):
  whole = run(tmp_path / "whole", "train_loop.num_steps = 3")
  accumulated = run(tmp_path / "acc", "train_loop.num_steps = 3",
                    "train_loop.accumulation_steps = 2")
  # a mean loss: a logit's roundings, the log-softmax's, and the sum over the batch's tokens
  cfg = models.get_config("gemma2_tiny", num_layers=2)  # TINY's model
  np.testing.assert_allclose(losses_of(accumulated), losses_of(whole),
                             rtol=EPS32 * (decoder_terms(cfg, 32) + cfg.vocab_size + 8 * 32))
  # not derived: AdamW's params (test_sharded_meshes_give_the_losses_of_one_device)
  assert_trees_close(accumulated["state"]["params"], whole["state"]["params"], atol=2e-5)


def _sgd_keeping_the_gradient(learning_rate):
  """SGD whose optimizer state is the gradient it was given, so a test can read it back."""
  def update(grads, state, params=None):
    del state, params
    return jax.tree.map(lambda g: -learning_rate * g, grads), grads
  return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params), update)


def _unequal_loss_token_batch(vocab_size, rows=8, length=16):
  """Loss tokens per row 16, 3, 9, 0, 12, 1, 6, 0: microbatches of 2 steps hold 43 and 4 of them,
  of 4 steps 28, 4, 15 and 0 (rows 3 and 7: a microbatch without any loss token)."""
  rng = np.random.default_rng(0)
  counts = np.array([16, 3, 9, 0, 12, 1, 6, 0])
  return {"tokens": rng.integers(3, vocab_size, (rows, length)).astype(np.int32),
          "targets": rng.integers(3, vocab_size, (rows, length)).astype(np.int32),
          "loss_mask": (np.arange(length) < counts[:, None]).astype(np.float32),
          "segment_ids": np.ones((rows, length), np.int32),
          "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))}


@pytest.mark.parametrize("normalization", ["mean", "sum"])
def test_accumulated_step_equals_the_whole_batch_step_with_nucl(normalization):
  """One step on the same global batch with 1, 2 and 4 microbatches, NUCL alpha > 0 and a z-loss:
  the same gradients, updated params and logged metrics (alpha must not grow with the number of
  microbatches, and 'mean' is the mean over the global batch's tokens, not of microbatch means).
  Also for a batch without loss tokens (e.g. padding): NLL 0, the step is NUCL's alone."""
  cfg = models.get_config("gemma2_tiny", num_layers=2)
  params = models.init(cfg, jax.random.PRNGKey(0))
  unequal = _unequal_loss_token_batch(cfg.vocab_size)
  batches = {"unequal": unequal, "none": dict(unequal, loss_mask=0 * unequal["loss_mask"])}
  tx = _sgd_keeping_the_gradient(0.1)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  gin.clear_config()
  gin.bind_parameter("total_loss.terms", {"nucl_mstd": 0.5})
  gin.bind_parameter("total_loss.normalization", normalization)
  gin.bind_parameter("total_loss.z_loss_weight", 1e-2)
  try:
    steps = {}
    for a in (1, 2, 4):
      step_fn = jax.jit(functools.partial(train.train_step, cfg=cfg, tx=tx,
                                          schedule=optax.constant_schedule(0.1),
                                          accumulation_steps=a))
      for name, batch in batches.items():
        steps[name, a] = step_fn(state, batch, jax.random.PRNGKey(1))
  finally:
    gin.clear_config()

  # The microbatches sum the same terms in another order: a gradient entry differs by at most the
  # roundings of its path (gradient_terms) times the largest entry; a loss metric by those of a
  # loss; grad_norm also sums every parameter's square.  The SGD update moves params by 0.1 x
  # the gradient, so they differ by 0.1 x the gradients' bound plus the update's own rounding.
  # (alpha growing with the number of microbatches was off by 0.5 of the largest gradient.)
  tokens = int(unequal["loss_mask"].sum())
  terms = gradient_terms(cfg, unequal["tokens"].shape[1], tokens)
  parameters = sum(x.size for x in jax.tree.leaves(params))
  for name in batches:
    whole_state, whole_metrics = steps[name, 1]
    grads = whole_state["opt_state"]
    scale = magnitude(*jax.tree.leaves(grads))
    assert float(whole_metrics["nucl_mstd"]) != 0.0 and scale > 0
    grads_atol = rounding_atol(scale, terms)
    params_atol = 0.1 * grads_atol + rounding_atol(magnitude(*jax.tree.leaves(params)), 2)
    for a in (2, 4):
      acc_state, acc_metrics = steps[name, a]
      assert set(acc_metrics) == set(whole_metrics)
      for key in whole_metrics:
        rtol = EPS32 * (terms + (parameters if key == "grad_norm" else 0))
        np.testing.assert_allclose(acc_metrics[key], whole_metrics[key], rtol=rtol,
                                   err_msg=f"{key}, {name} loss tokens, {a} microbatches")
      assert_trees_close(acc_state["opt_state"], grads, atol=grads_atol)
      assert_trees_close(acc_state["params"], whole_state["params"], atol=params_atol)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path,
                                                                                    capsys):
  run(tmp_path, "train_loop.num_steps = 4", "train_loop.checkpoint_every = 2")
  # Restart with a learning rate of 1e30: the first resumed step (5) makes the params' norm
  # overflow float32 (an infinite rate is refused before anything runs).
  gin.clear_config()
  code = train.main(["--workdir", str(tmp_path)] + [f"--gin_file={f}" for f in BASE_FILES]
                    + [f"--gin_param={b}" for b in TINY + [
                        "train_loop.num_steps = 8", "train_loop.checkpoint_every = 2",
                        "create_mesh.shape = (-1, 1, 1)",
                        "learning_rate_schedule.warmup_steps = 0",
                        "learning_rate_schedule.peak_learning_rate = 1e30"]]
                    + ["--allow_config_change"])
  err = capsys.readouterr().err
  assert code != 0
  assert "at step 5" in err and "non-finite" in err, err
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()
                if p.name.isdigit()) == [2, 4]
  assert str(tmp_path / "checkpoints" / "4") in err
  assert max(r["step"] for r in read_metrics(tmp_path)) == 4


def _cli(*args, cwd=REPO):
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  return subprocess.run([sys.executable, "-m", "maxnucl.train", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=120)


def test_cli_bad_gin_file_exits_nonzero_naming_it(tmp_path):
  bad = tmp_path / "broken.gin"
  bad.write_text("train_loop.num_steps = = 3\n")
  proc = _cli(f"--gin_file={bad}", f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert "broken.gin" in proc.stderr, proc.stderr
  proc = _cli(f"--gin_file={tmp_path / 'absent.gin'}")
  assert proc.returncode != 0 and "absent.gin" in proc.stderr


def test_cli_unknown_binding_exits_nonzero_naming_it(tmp_path):
  proc = _cli("--gin_file=gin/demo_cpu.gin", "--gin_param=train_loop.num_stepz = 3",
              f"--workdir={tmp_path}")
  assert proc.returncode != 0
  assert "num_stepz" in proc.stderr, proc.stderr


def test_cli_missing_init_checkpoint_exits_nonzero_naming_it(tmp_path):
  missing = tmp_path / "no_such_checkpoint"
  proc = _cli("--gin_file=gin/demo_cpu.gin", f"--gin_param=train_loop.init_checkpoint = "
              f"'{missing}'", f"--workdir={tmp_path / 'run'}")
  assert proc.returncode != 0
  assert str(missing) in proc.stderr, proc.stderr


def test_resume_with_a_different_optimizer_exits_naming_the_checkpoint(tmp_path, capsys):
  run(tmp_path, "train_loop.num_steps = 2", "train_loop.checkpoint_every = 2")
  gin.clear_config()
  args = (["--gin_file=gin/base.gin", "--gin_file=gin/models/gemma2_tiny.gin",
           "--gin_file=gin/data/synthetic.gin", "--gin_file=gin/optimizers/adafactor.gin",
           "--gin_file=gin/schedules/constant.gin"]
          + [f"--gin_param={b}" for b in TINY + ["train_loop.num_steps = 4",
                                                 "create_mesh.shape = (1, 1, 1)"]])
  code = train.main(["--workdir", str(tmp_path)] + args)
  err = capsys.readouterr().err
  assert code != 0
  # The changed optimizer is named among the changed bindings ...
  assert "create_optimizer.name: 'adamw' -> 'adafactor'" in err, err
  # ... and when the change is allowed, the checkpoint that cannot hold it is named.
  gin.clear_config()
  code = train.main(["--workdir", str(tmp_path), "--allow_config_change"] + args)
  err = capsys.readouterr().err
  assert code != 0
  assert f"cannot resume from {tmp_path / 'checkpoints' / '2'}" in err, err
