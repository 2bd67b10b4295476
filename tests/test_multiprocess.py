"""Training with several real processes on CPU (localhost coordinator, gloo collectives).

The commands are the README's own: its two-process line is read from README.md and run with W,
PORT and I filled in, plus a few gin bindings that shorten the run.  References are the same
training in one process with four devices (the same (1, -1, 1) fsdp mesh, or another mesh for
the restores).
"""

import json
import os
import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import processes
from maxnucl import checkpoints, distributed, models, outputs
from tolerances import EPS32, decoder_terms, gradient_terms, magnitude, rounding_atol

REPO = pathlib.Path(__file__).resolve().parents[1]
SHORT = ["--gin_param=train_loop.num_steps = 4", "--gin_param=train_loop.log_every = 1",
         "--gin_param=train_loop.checkpoint_every = 2", "--gin_param=train_loop.eval_every = 0",
         "--gin_param=train_loop.async_checkpointing = False"]
TIMEOUT = 240


def _readme_command() -> list[str]:
  """The README's two-process command: [env assignments..., python, -m, maxnucl.train, ...]."""
  text = (REPO / "README.md").read_text()
  lines = [line for line in text.splitlines()
           if "--num_processes=2" in line and line.startswith("JAX_PLATFORMS=cpu")]
  assert len(lines) == 1, "README.md must show the two-process command exactly once"
  return shlex.split(lines[0])


def _split_env(words: list[str]) -> tuple[dict, list[str]]:
  env = {}
  while "=" in words[0] and not words[0].startswith("-"):
    key, value = words.pop(0).split("=", 1)
    env[key] = value
  return env, words


def _start_two(workdir, extra=(), heartbeat_s=None) -> list[subprocess.Popen]:
  port = processes.free_address().rsplit(":", 1)[1]
  procs = []
  for i in range(2):
    words = [w.replace("=W", f"={workdir}").replace("PORT", str(port))
             .replace("--process_id=I", f"--process_id={i}") for w in _readme_command()]
    env_extra, cmd = _split_env(words)
    assert cmd[:3] == ["python", "-m", "maxnucl.train"]
    cmd = [sys.executable] + cmd[1:] + list(extra)
    if heartbeat_s:
      cmd.append(f"--heartbeat_timeout_s={heartbeat_s}")
    env = dict(os.environ, **env_extra)
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  return procs


def _run_two(workdir, extra=()) -> list[tuple[int, str, str]]:
  procs = _start_two(workdir, extra)
  out = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=TIMEOUT)
      out.append((p.returncode, stdout, stderr))
  finally:
    for p in procs:
      p.kill()
  for rc, stdout, stderr in out:
    assert rc == 0, f"a process failed:\n{stdout}\n{stderr[-3000:]}"
  return out


def _run_one(workdir, devices=4, mesh="(1, -1, 1)", extra=()) -> tuple[str, str]:
  env = processes.cpu_env(devices)
  cmd = [sys.executable, "-m", "maxnucl.train", "--gin_file=gin/demo_cpu.gin",
         f"--gin_param=create_mesh.shape = {mesh}", f"--workdir={workdir}", *extra]
  p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=TIMEOUT)
  assert p.returncode == 0, f"{p.stdout}\n{p.stderr[-3000:]}"
  return p.stdout, p.stderr


def _losses(workdir) -> dict[int, float]:
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return {json.loads(l)["step"]: json.loads(l)["loss"] for l in lines}


def _assert_close(actual: dict, expected: dict, steps, resumed_at: int = 0):
  """The demo's losses (gemma2_tiny, 16 x 64 tokens): another mesh sums in other orders, so the
  loss of step k carries the roundings of a loss and of the k - 1 gradients before it (of those
  after `resumed_at`: a restored checkpoint is exact)."""
  cfg, tokens = models.get_config("gemma2_tiny"), 16 * 64
  loss_terms = decoder_terms(cfg, 64) + cfg.vocab_size + tokens
  for step in steps:
    updates = step - 1 - resumed_at
    np.testing.assert_allclose(
        actual[step], expected[step], err_msg=f"step {step}",
        rtol=EPS32 * (loss_terms + updates * gradient_terms(cfg, 64, tokens)))


def _crash_after_step_2(source, target):
  """A copy of workdir `source` as if the run had died right after its step-2 checkpoint."""
  shutil.copytree(source, target)
  shutil.rmtree(target / "checkpoints" / "4")
  lines = (target / "metrics.jsonl").read_text().splitlines()
  (target / "metrics.jsonl").write_text(
      "".join(l + "\n" for l in lines if json.loads(l)["step"] <= 2))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """One 4-step run with 2 processes x 2 devices and one with 1 process x 4 devices."""
  root = tmp_path_factory.mktemp("multiprocess")
  two = _run_two(root / "two", SHORT)
  _run_one(root / "one", extra=SHORT)
  return root, two


def test_two_processes_give_the_losses_of_one(runs):
  root, _ = runs
  one, two = _losses(root / "one"), _losses(root / "two")
  assert sorted(two) == [1, 2, 3, 4]
  _assert_close(two, one, [1, 2, 3, 4])


def test_only_process_0_prints_and_logs(runs):
  root, two = runs
  (rc0, out0, err0), (rc1, out1, err1) = two
  assert "finished at step 4" in out0 and "finished at step 4" not in out1
  bar = re.compile(r"^train: +\d+%\|", re.MULTILINE)             # the tqdm bar
  assert bar.search(err0) and not bar.search(err1)
  assert "[process 1/2]" in err1 and "[process 0/2]" in err0  # labelled log lines
  # one metrics.jsonl with each step once (process 1 writes none)
  assert list(_losses(root / "two")) == [1, 2, 3, 4]
  assert len(list((root / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_two_processes_resume_exactly(runs, tmp_path):
  root, _ = runs
  _crash_after_step_2(root / "two", tmp_path / "w")
  (rc, out, _), _ = _run_two(tmp_path / "w", SHORT)
  assert "resumed from step 2" in out
  _assert_close(_losses(tmp_path / "w"), _losses(root / "two"), [3, 4], resumed_at=2)


def test_two_process_checkpoint_restores_on_one_process_with_another_mesh(runs, tmp_path):
  root, _ = runs
  _crash_after_step_2(root / "two", tmp_path / "w")
  out, _ = _run_one(tmp_path / "w", devices=4, mesh="(2, 1, 2)", extra=SHORT)
  assert "resumed from step 2" in out
  _assert_close(_losses(tmp_path / "w"), _losses(root / "two"), [3, 4], resumed_at=2)


def test_one_process_checkpoint_restores_on_two_processes(runs, tmp_path):
  root, _ = runs
  _crash_after_step_2(root / "one", tmp_path / "w")
  (rc, out, _), _ = _run_two(tmp_path / "w", SHORT)
  assert "resumed from step 2" in out
  _assert_close(_losses(tmp_path / "w"), _losses(root / "one"), [3, 4], resumed_at=2)


EVAL_TASKS = ["--gin_param=train_loop.num_steps = 2", "--gin_param=train_loop.log_every = 1",
              "--gin_param=train_loop.checkpoint_every = 2",
              "--gin_param=train_loop.eval_every = 0",
              "--gin_param=train_loop.async_checkpointing = False",
              "--gin_param=import maxnucl.evaluation.gsm8k",
              "--gin_param=import maxnucl.evaluation.perplexity",
              "--gin_param=train_loop.eval_tasks = ['gsm8k', 'perplexity']",
              "--gin_param=train_loop.eval_tasks_limit = 4",
              "--gin_param=gsm8k.source = 'synthetic_arithmetic'",
              "--gin_param=gsm8k.num_shots = 0", "--gin_param=gsm8k.max_new_tokens = 8",
              "--gin_param=perplexity.seq_len = 64"]


def test_eval_tasks_on_two_processes_equal_one_process(tmp_path):
  """Benchmarks in the loop on 2 processes x 2 devices: the metrics and predictions of 1 process
  x 4 devices (the same mesh), each file written once, by process 0."""
  _run_two(tmp_path / "two", EVAL_TASKS)
  _run_one(tmp_path / "one", extra=EVAL_TASKS)
  logged = {}
  for run in ("one", "two"):
    lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2]
    logged[run] = {k: v for k, v in json.loads(lines[-1]).items() if "/" in k}
  arithmetic = [k for k in logged["one"] if k.startswith("synthetic_arithmetic/")]
  assert sorted(logged["two"]) == sorted(logged["one"]) and arithmetic
  # greedy decoding: the same tokens, hence the same answers and exact-match metrics
  assert {k: logged["two"][k] for k in arithmetic} == {k: logged["one"][k] for k in arithmetic}
  for run in ("one", "two"):
    folder = tmp_path / run / "eval" / "synthetic_arithmetic" / "step_2"
    assert sorted(p.name for p in folder.iterdir()) == ["predictions.jsonl", "results.json",
                                                        "run.json"]
  predictions = [(tmp_path / run / "eval" / "synthetic_arithmetic" / "step_2" /
                  "predictions.jsonl").read_text().splitlines() for run in ("one", "two")]
  assert len(predictions[1]) == 4 and predictions[1] == predictions[0]  # each example once
  # the held-out NLL: as the loss of a third step (_assert_close), the roundings of its own sum
  # over its tokens and those of the 2 gradients that made the params
  cfg, tokens = models.get_config("gemma2_tiny"), 16 * 64
  assert logged["two"]["perplexity/tokens"] == logged["one"]["perplexity/tokens"]
  rtol = EPS32 * (decoder_terms(cfg, 64) + cfg.vocab_size + logged["one"]["perplexity/tokens"]
                  + 2 * gradient_terms(cfg, 64, tokens))
  assert logged["two"]["perplexity/num_rows"] == logged["one"]["perplexity/num_rows"]
  np.testing.assert_allclose(logged["two"]["perplexity/nll"], logged["one"]["perplexity/nll"],
                             rtol=rtol)
  assert sorted(p.name for p in (tmp_path / "two" / "eval" / "perplexity" / "step_2").iterdir()
                ) == ["predictions.jsonl", "results.json", "run.json"]


def test_a_dead_process_stops_the_other_with_an_error(tmp_path):
  """Kill process 1 once training runs: process 0 exits with an error within the heartbeat
  timeout (plus slack), instead of waiting forever in a collective."""
  procs = _start_two(tmp_path / "w", ["--gin_param=train_loop.num_steps = 100000",
                                      "--gin_param=train_loop.log_every = 1",
                                      "--gin_param=train_loop.eval_every = 0"], heartbeat_s=5)
  metrics = tmp_path / "w" / "metrics.jsonl"
  try:
    deadline = time.monotonic() + TIMEOUT
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
      assert time.monotonic() < deadline, "training did not start"
      assert procs[0].poll() is None and procs[1].poll() is None
      time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    _, stderr = procs[0].communicate(timeout=90)
    waited = time.monotonic() - killed
  finally:
    for p in procs:
      p.kill()
  assert procs[0].returncode != 0
  assert waited < 60, f"process 0 took {waited:.0f} s to stop"
  assert re.search(r"another task died|tasks are unhealthy|stopped sending heartbeats", stderr), (
      stderr[-2000:])


# ---- settings (no processes started) --------------------------------------------------------------

def test_settings_from_flags_then_environment(monkeypatch):
  for names in distributed.ENVIRONMENT.values():
    for name in names:
      monkeypatch.delenv(name, raising=False)
  assert distributed.settings() is None
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:8476")
  monkeypatch.setenv("MAXNUCL_NUM_PROCESSES", "4")
  monkeypatch.setenv("MAXNUCL_PROCESS_ID", "3")
  assert distributed.settings() == {"coordinator_address": "10.0.0.2:8476", "num_processes": 4,
                                    "process_id": 3}
  assert distributed.settings(process_id=1)["process_id"] == 1  # a flag wins


@pytest.mark.parametrize("kwargs, message", [
    ({"coordinator_address": "localhost:1234"}, "also needed: --num_processes"),
    ({"coordinator_address": "localhost", "num_processes": 2, "process_id": 0}, "HOST:PORT"),
    ({"coordinator_address": "localhost:1", "num_processes": 2, "process_id": 2},
     r"--process_id = 2: expected an index in \[0, 2\)"),
    ({"coordinator_address": "localhost:1", "num_processes": 0, "process_id": 0},
     "--num_processes = 0: expected >= 1"),
])
def test_bad_settings_are_refused_naming_the_flag(monkeypatch, kwargs, message):
  for names in distributed.ENVIRONMENT.values():
    for name in names:
      monkeypatch.delenv(name, raising=False)
  with pytest.raises(distributed.DistributedError, match=message):
    distributed.settings(**kwargs)


def test_trainer_reports_incomplete_settings_in_one_line():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "maxnucl.train", "--gin_file=gin/demo_cpu.gin",
                      "--coordinator_address=localhost:1234"], cwd=REPO, env=env,
                     capture_output=True, text=True, timeout=120)
  assert p.returncode == 2
  assert p.stderr.strip().splitlines()[-1].startswith("error: multi-process settings are "
                                                      "incomplete")
  assert "Traceback" not in p.stderr


def _record_initialize(monkeypatch, on_tpu: bool) -> list:
  calls = []
  monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(distributed.jax.distributed, "initialize",
                      lambda **kwargs: calls.append(kwargs))
  monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: on_tpu)
  for names in distributed.ENVIRONMENT.values():
    for name in names:
      monkeypatch.delenv(name, raising=False)
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)  # the test session sets it to cpu
  return calls


def test_cloud_tpu_vm_initialises_without_flags(monkeypatch):
  calls = _record_initialize(monkeypatch, on_tpu=True)
  assert distributed.initialize(heartbeat_timeout_s=7) is True
  # no address, count or index: JAX discovers the slice's workers from the TPU metadata
  assert calls == [{"heartbeat_timeout_seconds": 7,
                    "initialization_timeout": distributed.DEFAULT_INITIALIZATION_TIMEOUT_S}]


def test_a_cpu_tool_on_a_tpu_vm_does_not_join_the_slice(monkeypatch):
  calls = _record_initialize(monkeypatch, on_tpu=True)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert distributed.initialize() is False and calls == []
  monkeypatch.setenv("JAX_PLATFORMS", "tpu,cpu")
  assert distributed.initialize() is True and len(calls) == 1


def test_elsewhere_without_flags_nothing_is_initialised(monkeypatch):
  calls = _record_initialize(monkeypatch, on_tpu=False)
  assert distributed.initialize() is False and calls == []
  assert distributed.initialize("localhost:1", 1, 0) is False and calls == []  # one process


def test_flags_are_passed_to_jax(monkeypatch):
  calls = _record_initialize(monkeypatch, on_tpu=True)
  monkeypatch.setattr(distributed, "_label_logs", lambda: None)
  monkeypatch.setattr(distributed.jax, "process_index", lambda: 1)
  monkeypatch.setattr(distributed.jax, "process_count", lambda: 2)
  assert distributed.initialize("10.1.2.3:8476", 2, 1) is True
  assert calls[0]["coordinator_address"] == "10.1.2.3:8476"
  assert (calls[0]["num_processes"], calls[0]["process_id"]) == (2, 1)


DECODE_SCRIPT = r"""
import argparse
import jax, numpy as np
from maxnucl import decoding, distributed, models, sharding
parser = argparse.ArgumentParser()
distributed.add_arguments(parser)
distributed.initialize_from_args(parser.parse_args())
cfg = models.get_config("gemma2_tiny", dtype="float32", param_dtype="float32")
params = jax.tree.map(np.asarray, models.init(cfg, jax.random.PRNGKey(3)))  # same on both
prompts = [[2, 5, 9], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5, 9, 0, 4, 5, 2], [2, 11]]
mesh = sharding.create_mesh((1, -1, 1))
rules = sharding.logical_axis_rules()
placed = jax.device_put(params, sharding.tree_shardings(models.logical_axes(cfg), params, mesh,
                                                        rules))
sharded = decoding.generate(cfg, placed, prompts, 12, stop_token_ids=[7], mesh=mesh, rules=rules)
local = decoding.generate(cfg, params, prompts, 12, stop_token_ids=[7])  # this process alone
scores = decoding.score(cfg, placed, prompts, [[3, 4], [5], [6, 7, 8]], mesh=mesh, rules=rules)
local_scores = decoding.score(cfg, params, prompts, [[3, 4], [5], [6, 7, 8]])
assert sharded == local, (sharded, local)
print("SCORES", list(map(float, scores)), list(map(float, local_scores)))
print("OK", jax.process_index(), len(mesh.devices.flat), sharded)
"""


def test_generation_and_scoring_span_two_processes():
  """decoding.generate / score on a mesh over both processes' devices equal one process alone."""
  results = processes.run(["-c", DECODE_SCRIPT], timeout=TIMEOUT)
  for code, _, stderr in results:
    assert code == 0, stderr[-3000:]
  lines = [next(l for l in stdout.splitlines() if l.startswith("OK")) for _, stdout, _ in results]
  cfg = models.get_config("gemma2_tiny")
  for _, stdout, _ in results:  # summed log-probabilities of up to 3 tokens after 17
    scores = next(l for l in stdout.splitlines() if l.startswith("SCORES"))[len("SCORES "):]
    sharded, local = (json.loads(part) for part in scores.replace("] [", "]|[").split("|"))
    np.testing.assert_allclose(sharded, local, rtol=0, atol=rounding_atol(
        magnitude(local), decoder_terms(cfg, 20) + cfg.vocab_size + 3))
  assert lines[0].split()[2] == "4"                  # the mesh spans both processes
  assert lines[0].split(" ", 3)[3] == lines[1].split(" ", 3)[3]   # the same tokens on both


SAVE_SCRIPT = r"""
import argparse
import jax, numpy as np
from maxnucl import checkpoints, distributed, models, outputs, paths, sharding
parser = argparse.ArgumentParser()
parser.add_argument("--url")
parser.add_argument("--local")
distributed.add_arguments(parser)
args = parser.parse_args()
distributed.initialize_from_args(args)
cfg = models.get_config("gemma2_tiny", dtype="float32", param_dtype="float32")
rng = np.random.default_rng(7)  # the same arrays on both processes (and in the test)
params = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                      models.abstract_params(cfg))
mesh = sharding.create_mesh((1, -1, 1))
placed = jax.device_put(params, sharding.tree_shardings(
    models.logical_axes(cfg), params, mesh, sharding.logical_axis_rules()))
split = sum(not leaf.is_fully_addressable for leaf in jax.tree.leaves(placed))
for target in (args.url, args.local):
  checkpoints.save(target, cfg, placed)
  committed = outputs.is_committed(paths.as_path(target)) if target == args.url else ""
  print("SAVED", target, split, committed, flush=True)
  try:
    checkpoints.save(target, cfg, placed)
  except FileExistsError as e:
    print("REFUSED", e, flush=True)
"""


def test_two_processes_save_one_sharded_checkpoint_to_a_url(tmp_path):
  """Both processes write their shards into the one temporary prefix process 0 chose; process 0
  publishes it; each returns once it is committed; a second save is refused on both alike.  One
  process then loads exactly the arrays both held (a local path, through Orbax's own
  multi-process save, too)."""
  url, local = f"file://{tmp_path / 'url_ckpt'}", tmp_path / "local_ckpt"
  results = processes.run(["-c", SAVE_SCRIPT, "--url", url, "--local", str(local)],
                          timeout=TIMEOUT)
  for code, _, stderr in results:
    assert code == 0, stderr[-3000:]
  for _, stdout, _ in results:
    lines = processes.printed_lines(stdout)
    saved = [l.split() for l in lines if l.startswith("SAVED")]
    assert [s[1] for s in saved] == [url, str(local)]
    assert int(saved[0][2]) > 0  # some arrays span both processes: no process holds them whole
    assert saved[0][3] == "True"  # committed when save returns, on each process
    refused = [l for l in lines if l.startswith("REFUSED")]
    assert refused == [f"REFUSED checkpoint {target} already exists; pass overwrite=True "
                       f"(--overwrite) to replace it" for target in (url, local)]
  cfg = models.get_config("gemma2_tiny", dtype="float32", param_dtype="float32")
  rng = np.random.default_rng(7)
  expected = jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                          models.abstract_params(cfg))
  assert (tmp_path / "url_ckpt" / outputs.COMMIT_MARKER).is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["local_ckpt", "url_ckpt"]  # no temporaries
  for target in (url, local):
    loaded_cfg, loaded = checkpoints.load(target)
    assert loaded_cfg == cfg
    flat, flat_expected = (jax.tree_util.tree_flatten_with_path(t)[0] for t in (loaded, expected))
    assert [k for k, _ in flat] == [k for k, _ in flat_expected]
    for (key, actual), (_, want) in zip(flat, flat_expected):
      assert np.asarray(actual).dtype == want.dtype, key
      np.testing.assert_array_equal(np.asarray(actual), want, err_msg=f"{target} {key}")
