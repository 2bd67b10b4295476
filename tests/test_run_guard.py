"""One trainer per workdir (a lock naming its holder, released when the holder dies; a lease in a
bucket), a resumed run's configuration kept unless a change is allowed and recorded, and a failed
run that exits even when a thread would keep it alive (maxnucl/run_guard.py, maxnucl/train.py)."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import gin
import pytest

import processes
from maxnucl import paths, run_guard, train

from test_config_and_resume import TINY, clean_gin  # noqa: F401  (the fixture is autouse)

REPO = pathlib.Path(__file__).resolve().parent.parent


def _train_args(workdir, *bindings):
  return (["--gin_file=gin/demo_cpu.gin", f"--workdir={workdir}"]
          + [f"--gin_param={b}" for b in TINY + list(bindings)])


def _main(workdir, *bindings, flags=()):
  gin.clear_config()
  return train.main(_train_args(workdir, *bindings) + list(flags))


# ---- the lock -----------------------------------------------------------------------------------

def _hold_lock(workdir) -> subprocess.Popen:
  """A process that holds the workdir's lock until killed."""
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from maxnucl import paths, run_guard; "
       "lock = run_guard.Lock(paths.as_path(sys.argv[1])).acquire(); print('held', flush=True); "
       "time.sleep(600)", str(workdir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  return holder


def test_a_second_trainer_is_refused_naming_the_holder_until_the_holder_dies(tmp_path, capsys):
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = _hold_lock(workdir)
  try:
    assert _main(workdir, "train_loop.num_steps = 2") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "is in use by another trainer" in err
    assert f"pid {holder.pid}" in err and str(workdir / "trainer.lock") in err
    assert not (workdir / "checkpoints").exists()  # nothing written beside the holder's run
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  # The kernel released the dead holder's lock: the workdir is free.
  assert _main(workdir, "train_loop.num_steps = 2") == 0


def test_two_trainers_started_together_one_runs_and_one_is_refused(tmp_path):
  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "maxnucl.train"] + _train_args(workdir,
                                                                   "train_loop.num_steps = 4")
  procs = [subprocess.Popen(command, cwd=REPO, env=processes.cpu_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
  codes = sorted(code for code, _ in results)
  assert codes == [0, 2], results
  refused = next(err for code, err in results if code == 2)
  assert "is in use by another trainer" in refused
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text()
           .splitlines()]
  assert steps == [1, 2, 3, 4]  # one run's lines, none twice
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "4"]


def test_a_bucket_lock_is_a_lease_taken_over_once_it_runs_out(tmp_path, caplog):
  workdir = paths.as_path(f"file://{tmp_path}/run")
  workdir.mkdir(parents=True)
  first = run_guard.Lock(workdir).acquire()
  try:
    second = run_guard.Lock(workdir)
    second.holder = dict(second.holder, pid=second.holder["pid"] + 1)  # another process
    with pytest.raises(run_guard.WorkdirInUse, match=r"in use by another trainer \(host .*, pid "
                       rf"{first.holder['pid']}.*lease on .*trainer.lock runs until"):
      second.acquire()
  finally:
    first.release()
  assert not (workdir / "trainer.lock").exists()  # released: the object is removed
  # A holder that died without releasing: its lease ran out, so the lock is taken over.
  (workdir / "trainer.lock").write_text(json.dumps(
      {"host": "elsewhere", "pid": 7, "since": "2026-01-01T00:00:00+00:00", "token": "old",
       "expires": time.time() - 1}))
  with run_guard.Lock(workdir) as lock:
    assert json.loads((workdir / "trainer.lock").read_text())["pid"] == lock.holder["pid"]
  assert "taking over the lock of host elsewhere, pid 7" in caplog.text


# ---- the configuration of a resumed run ---------------------------------------------------------

def test_a_resume_with_other_bindings_is_refused_and_keeps_the_recorded_config(tmp_path, capsys):
  workdir = tmp_path / "run"
  assert _main(workdir, "train_loop.num_steps = 2") == 0
  recorded = (workdir / "config.gin").read_bytes()
  capsys.readouterr()
  for change, listed in [
      ("learning_rate_schedule.peak_learning_rate = 0.02",
       "learning_rate_schedule.peak_learning_rate: 0.01 -> 0.02"),
      ("model_config.num_layers = 3", "model_config.num_layers: 2 -> 3")]:
    assert _main(workdir, "train_loop.num_steps = 4", change) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "at step 2" in err and listed in err, err
    assert "--allow_config_change" in err
    assert (workdir / "config.gin").read_bytes() == recorded
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]


def test_an_allowed_change_is_recorded_with_its_step_and_then_is_the_runs_config(tmp_path,
                                                                                 capsys):
  workdir = tmp_path / "run"
  assert _main(workdir, "train_loop.num_steps = 2") == 0
  recorded = (workdir / "config.gin").read_bytes()
  new_rate = "learning_rate_schedule.peak_learning_rate = 0.02"
  assert _main(workdir, "train_loop.num_steps = 4", new_rate,
               flags=["--allow_config_change"]) == 0
  (record,) = [json.loads(l) for l in (workdir / "config_changes.jsonl").read_text().splitlines()]
  assert record["step"] == 2
  assert record["changes"] == {"learning_rate_schedule.peak_learning_rate": ["0.01", "0.02"]}
  assert (workdir / "config.gin").read_bytes() == recorded  # the start is kept
  # The allowed change is now the run's configuration: resuming with it needs no flag, and
  # going back to the start's value is a change again.
  assert _main(workdir, "train_loop.num_steps = 6", new_rate) == 0
  capsys.readouterr()
  assert _main(workdir, "train_loop.num_steps = 8") == 2
  assert "peak_learning_rate: 0.02 -> 0.01" in capsys.readouterr().err


def test_run_control_bindings_may_change_on_resume():
  started = "train_loop.num_steps = 2\ntrain_loop.log_every = 1\nNUCL_ALPHA = 0.01\n"
  assert run_guard.config_changes(started, "train_loop.num_steps = 9\ntrain_loop.log_every = "
                                  "5\nNUCL_ALPHA = 0.01\n") == {}
  assert run_guard.config_changes(started, "train_loop.num_steps = 2\ntrain_loop.log_every = "
                                  "1\n") == {"NUCL_ALPHA": (0.01, "<unset>")}


# ---- exiting ------------------------------------------------------------------------------------

def test_a_failed_run_exits_although_a_thread_would_keep_it_alive(tmp_path):
  # A failing run whose background thread never finishes (as Orbax's writers blocked on a
  # failed save did): the process still exits, with the failure's code.
  program = (
      "import threading, sys\n"
      "from maxnucl import train\n"
      "def failing_loop(workdir, **kwargs):\n"
      "  threading.Thread(target=threading.Event().wait, name='blocked-writer').start()\n"
      "  raise train.TrainingError('the save failed')\n"
      "train.train_loop = failing_loop\n"
      "sys.argv = ['maxnucl-train'] + sys.argv[1:]\n"
      "train.exit_process(train.main(sys.argv[1:]), grace_s=1.0)\n")
  proc = subprocess.run([sys.executable, "-c", program, "--gin_file=gin/demo_cpu.gin",
                         f"--workdir={tmp_path / 'run'}"], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=processes.cpu_env(1))
  assert proc.returncode == 2, proc.stderr
  assert "error: the save failed" in proc.stderr
  assert "exiting without waiting for threads still running: blocked-writer" in proc.stderr
