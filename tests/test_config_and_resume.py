"""Refused gin configurations (unread macros, wrong types, nonsensical values: one-line errors,
nothing created) and robust resume (a torn metrics line, a corrupted checkpoint, TensorBoard
without duplicate steps)."""

import importlib
import json
import pathlib
import sys

import gin
import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from maxnucl import gin_config, sharding, train

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = ["model_config.num_layers = 2", "DATA_SEQ_LEN = 32", "DATA_BATCH_SIZE = 8",
        "train_loop.progress_bar = False", "train_loop.eval_every = 0",
        "train_loop.log_every = 1", "train_loop.checkpoint_every = 2",
        "train_loop.async_checkpointing = False"]


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_unread_macro_is_refused_naming_the_closest_known_macro():
  with pytest.raises(gin_config.GinConfigError, match=r"NUCL_ALPH \(did you mean NUCL_ALPHA\?\)"):
    gin_config.parse(["gin/demo_cpu.gin"], ["NUCL_ALPH = 1000.0"])


@pytest.mark.parametrize("binding,message", [
    ("NUCL_ALPH = 1000.0", "gin macro(s) defined but read by nothing: NUCL_ALPH"),
    ("train_loop.num_steps = 'five'", "gin binding train_loop.num_steps = 'five': expected int"),
    ("learning_rate_schedule.peak_learning_rate = 'fast'",
     "gin binding learning_rate_schedule.peak_learning_rate = 'fast': expected float"),
    ("DATA_SEQ_LEN = 'long'", "gin binding create_data_iterator.seq_len = 'long': expected int"),
    ("train_loop.checkpoint_every = 0", "train_loop.checkpoint_every = 0: expected an integer >= 1"),
    ("train_loop.num_steps = -3", "train_loop.num_steps = -3: expected an integer >= 1"),
    ("train_loop.eval_every = -1", "train_loop.eval_every = -1: expected an integer >= 0"),
    # Values that trained wrongly (gradient ascent, zero loss tokens) or failed with a traceback
    # or after the workdir was created.
    ("create_optimizer.grad_clip_norm = -1.0",
     "create_optimizer.grad_clip_norm = -1.0: expected a number > 0, or None for no clipping"),
    ("create_optimizer.weight_decay = -0.1",
     "create_optimizer.weight_decay = -0.1: expected a finite number >= 0"),
    ("learning_rate_schedule.peak_learning_rate = -0.01",
     "learning_rate_schedule.peak_learning_rate = -0.01: expected a finite number >= 0"),
    ("learning_rate_schedule.warmup_steps = -5",
     "learning_rate_schedule.warmup_steps = -5: expected an integer >= 0"),
    ("learning_rate_schedule.final_fraction = 2.0",
     "learning_rate_schedule.final_fraction = 2.0: expected a number in [0, 1]"),
    ("DATA_BATCH_SIZE = 0", "create_data_iterator.batch_size = 0: expected an integer >= 1"),
    ("DATA_SEQ_LEN = 0", "create_data_iterator.seq_len = 0: expected an integer >= 1"),
    ("DATA_SEQ_LEN = 1024", "create_data_iterator.seq_len = 1024 is longer than model "
     "'gemma2_tiny''s max_positions 512"),
    ("NUCL_ALPHA = 'a'", "total_loss.terms['nucl_mstd'] = 'a': expected a finite number >= 0"),
    ("NUCL_ALPHA = -1.0", "total_loss.terms['nucl_mstd'] = -1.0: expected a finite number >= 0"),
    ("total_loss.terms = {'nucl_bogus': %NUCL_ALPHA}", "total_loss.terms: 'nucl_bogus' is not a "
     "registered loss term"),
    ("total_loss.normalization = 'bogus'", "total_loss.normalization = 'bogus': expected one of"),
    ("total_loss.z_loss_weight = -1.0",
     "total_loss.z_loss_weight = -1.0: expected a finite number >= 0"),
    ("model_config.vocab_size = 10", "data vocabulary has 259 ids but model 'gemma2_tiny' has "
     "vocab_size 10"),
    ("train_loop.eval_split = 'nope'", "split 'nope'"),
    ("train_loop.num_steps = (1", "gin binding(s) 'train_loop.num_steps = (1': EOF in "
     "multi-line statement (an unclosed bracket or quote?)"),
])
def test_bad_bindings_give_a_one_line_error_and_create_nothing(binding, message, tmp_path,
                                                               capsys):
  workdir = tmp_path / "run"
  assert train.main(["--gin_file=gin/demo_cpu.gin", f"--gin_param={binding}",
                     f"--workdir={workdir}"]) == 2
  err = capsys.readouterr().err.strip()
  assert err == f"error: {err[len('error: '):]}" and "\n" not in err
  assert message in err
  assert not workdir.exists()


def test_an_unclosed_bracket_in_a_gin_file_is_one_line_naming_the_file(tmp_path, capsys):
  gin_file = tmp_path / "run.gin"
  gin_file.write_text("include 'gin/demo_cpu.gin'\ntrain_loop.num_steps = [1, 2\n")
  assert train.main([f"--gin_file={gin_file}", f"--workdir={tmp_path / 'run'}"]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and str(gin_file) in err and "unclosed bracket" in err
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("existed", [False, True])
def test_a_run_refused_after_creating_its_workdir_removes_only_what_it_created(
    existed, tmp_path, capsys, monkeypatch):
  workdir = tmp_path / "run"
  if existed:
    workdir.mkdir()
    (workdir / "notes.txt").write_text("the user's")

  def fail(*args, what, **kwargs):
    raise ValueError(f"cannot compile {what}")
  monkeypatch.setattr(train.compilation, "compile_announced", fail)
  assert train.main(["--gin_file=gin/demo_cpu.gin", *(f"--gin_param={b}" for b in TINY),
                     f"--workdir={workdir}"]) == 2
  assert "cannot compile the train step" in capsys.readouterr().err
  if existed:  # a directory the user made is left as it was, with what the run wrote
    assert (workdir / "notes.txt").read_text() == "the user's"
    assert (workdir / "config.gin").exists()
  else:
    assert not workdir.exists()


@pytest.mark.parametrize("gin_file", sorted(str(p.relative_to(REPO)) for p in
                                            list(REPO.glob("gin/*.gin"))
                                            + list(REPO.glob("gin/eval/*.gin"))))
def test_every_shipped_run_file_passes_the_checks(gin_file):
  importlib.import_module("maxnucl.evaluate")  # registers the benchmarks the eval files bind
  gin_config.parse([gin_file], [])


# ---- resume -----------------------------------------------------------------------------------

def _train(workdir, steps):
  gin.clear_config()
  gin_config.parse(["gin/demo_cpu.gin"], TINY + [f"train_loop.num_steps = {steps}"])
  mesh = sharding.create_mesh((1, 1, 1), devices=jax.devices()[:1])
  try:
    return train.train_loop(workdir, mesh=mesh)
  finally:
    gin.clear_config()


def _corrupt(step_dir: pathlib.Path) -> None:
  """Flip bytes of the largest params data file (the arrays' chunks)."""
  data = max((p for p in (step_dir / "params").rglob("*") if p.is_file() and p.parent.name == "d"),
             key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  for i in range(len(raw) // 3, len(raw), 97):
    raw[i] ^= 0xFF
  data.write_bytes(bytes(raw))


def _metrics(workdir):
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_torn_last_metrics_line_does_not_block_resume(tmp_path, caplog):
  _train(tmp_path, 4)
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 5, "loss": 1.2')  # the process died while writing
  _train(tmp_path, 6)
  assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
  assert "metrics.jsonl: dropping its incomplete last line" in caplog.text


@pytest.mark.own_process  # Orbax leaves reads of the corrupted step running
def test_corrupted_checkpoint_falls_back_to_the_previous_one_exactly(tmp_path, caplog, capsys):
  straight = _train(tmp_path / "straight", 6)
  interrupted = tmp_path / "interrupted"
  _train(interrupted, 4)
  _corrupt(interrupted / "checkpoints" / "4")
  resumed = _train(interrupted, 6)
  assert "checkpoints/4 is corrupted: array params/" in caplog.text
  assert "resuming from the previous checkpoint, step 2" in caplog.text
  assert f"resumed from step 2 ({interrupted / 'checkpoints' / '2'})" in capsys.readouterr().out
  assert (interrupted / "checkpoints" / "corrupted_step_4").is_dir()  # moved aside, not deleted
  for a, b in zip(jax.tree.leaves(straight["state"]["params"]),
                  jax.tree.leaves(resumed["state"]["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert [r["loss"] for r in _metrics(interrupted)] == [r["loss"] for r in _metrics(
      tmp_path / "straight")]
  # TensorBoard (installed with the package: the `tensorboard --logdir` the trainer prints works)
  # reads the logged scalars; the steps logged again after the restored one replace the old ones.
  assert (pathlib.Path(sys.executable).parent / "tensorboard").exists()
  accumulator = event_accumulator.EventAccumulator(str(interrupted / "tensorboard"))
  accumulator.Reload()
  steps = [e.step for e in accumulator.Scalars("loss")]
  assert steps == [1, 2, 3, 4, 5, 6]
  losses = [e.value for e in accumulator.Scalars("loss")]
  # exact: both hold the float32 loss the trainer computed (TensorBoard as float32, metrics.jsonl
  # as the float64 it converts to exactly)
  np.testing.assert_array_equal(losses, [r["loss"] for r in _metrics(interrupted)])


def test_on_resume_tensorboard_holds_exactly_the_kept_metrics_lines(tmp_path):
  """A killed run's event files need not hold what its metrics.jsonl holds: tensorboardX writes
  events from a queue in its own thread, so the last steps' can be lost (step 4 was, once, in
  CI), and steps after the restored one can be there. Constructed: metrics.jsonl has steps 1-4,
  the events steps 1, 2 (with other values) and 6; resumed at step 4 and logging step 5,
  TensorBoard must read steps 1-5 with metrics.jsonl's values."""
  lines = [{"step": s, "loss": 2.0 - s / 8, "learning_rate": s / 64} for s in range(1, 5)]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
  stale = train._summary_writer_class()(str(tmp_path / "tensorboard"))
  for step, loss in [(1, 9.0), (2, 9.0), (6, 9.0)]:
    stale.add_scalar("loss", loss, step)
  stale.close()
  # as a previous run's file: earlier in name (the time it was made) than the resumed run's
  [made] = (tmp_path / "tensorboard").iterdir()
  made.rename(made.with_name("events.out.tfevents.0000000001.killed-run"))
  log = train._MetricsLog(tmp_path, resume_step=4)
  log.write({"step": 5, "loss": 1.25, "learning_rate": 5 / 64})
  log.close()
  accumulator = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  accumulator.Reload()
  expected = lines + [{"step": 5, "loss": 1.25, "learning_rate": 5 / 64}]
  for tag in ("loss", "learning_rate"):
    # float32 in TensorBoard: these values (multiples of 1/64 below 2) are exact in it
    assert [(e.step, e.value) for e in accumulator.Scalars(tag)] == [
        (r["step"], r[tag]) for r in expected], tag


@pytest.mark.own_process  # Orbax leaves reads of the corrupted step running
def test_corrupted_only_checkpoint_is_named_in_a_clear_error(tmp_path):
  _train(tmp_path, 2)
  _corrupt(tmp_path / "checkpoints" / "2")
  with pytest.raises(train.TrainingError,
                     match=r"checkpoints/2 is corrupted: array params/\S+ cannot be read.*no "
                           r"earlier checkpoint"):
    _train(tmp_path, 4)


# ---- the data command line: one-line errors, exit code 2 ---------------------------------------

@pytest.mark.parametrize("args,message", [
    (["cache", "--source", "nope", "--cache_dir", "C"], "error: Unknown task or mixture 'nope'"),
    (["cache", "--source", "synthetic_arithmetic", "--cache_dir", "C",
      "--feature_lengths", "{inputs: 3}"], "error: --feature_lengths '{inputs: 3}': not JSON"),
    (["cache", "--source", "synthetic_arithmetic", "--cache_dir", "C",
      "--feature_lengths", '{"inputs": -1}'], "error: --feature_lengths '{\"inputs\": -1}': expected positive"),
    (["cache", "--source", "gsm8k", "--split", "test", "--cache_dir", "C",
      "--data_dir", "/nonexistent"], "error: Dataset 'gsm8k' not found"),
])
def test_data_command_errors_are_short_and_exit_2(args, message, tmp_path, capsys, monkeypatch):
  from maxnucl.data import cli, sources  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(sources, "_tfds_builder_prepared", lambda name: False)
  monkeypatch.delenv(sources.DATA_DIR_ENV, raising=False)
  args = [str(tmp_path / a) if a == "C" else a for a in args]
  assert cli.main(args) == 2
  err = capsys.readouterr().err
  assert err.startswith(message) and "Traceback" not in err and "In call to" not in err


def test_rerunning_a_finished_run_says_it_is_complete_with_its_last_metrics(tmp_path, capsys):
  args = ["--gin_file=gin/demo_cpu.gin", f"--workdir={tmp_path}"] + [
      f"--gin_param={b}" for b in TINY + ["train_loop.num_steps = 2"]]
  assert train.main(args) == 0
  first = capsys.readouterr().out
  assert "finished at step 2: loss " in first
  gin.clear_config()  # a second command in the same process
  assert train.main(args) == 0
  again = capsys.readouterr().out
  last = _metrics(tmp_path)[-1]
  assert f"already complete at step 2 (nothing to do); last logged step 2: loss {last['loss']:.4g}" \
      in again
  assert "None" not in again


def test_data_command_help_lists_the_commands_and_exits_0(capsys):
  from maxnucl.data import cli  # pylint: disable=import-outside-toplevel
  assert cli.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert all(command in out for command in ("cache", "train_sentencepiece", "list"))
