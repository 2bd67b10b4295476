"""A full disk while a command writes: one line on stderr, naming the file being written (not an
input), exit status 1 (a failure while working; bad input is 2), and nothing half-written left
behind.

The disk is real: a small tmpfs mounted for the command alone, in a new user and mount namespace
(`unshare --mount --map-root-user`: no root needed), seeded with a copy of a folder and filled with
a filler file until exactly `free` bytes are left.  Writes then fail with ENOSPC as on a full disk.
What the tmpfs holds when the command ends is copied out for the test to look at.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from maxnucl import checkpoints, models
from maxnucl.conversion import convert
from maxnucl.evaluation import core

BIN = pathlib.Path(sys.executable).parent  # the console scripts (tests/test_cli_bad_input.py)
REPO = pathlib.Path(__file__).resolve().parent.parent
ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
PAGE = 4096
NO_SPACE = os.strerror(28)  # "No space left on device"

# $1 the mount point, $2 the folder copied onto it, $3 where its content goes afterwards, $4 the
# bytes left free, then the command.
_ON_TMPFS = r"""
disk=$1 seed=$2 after=$3 free=$4; shift 4
mount -t tmpfs -o size=8m tmpfs "$disk" || exit 97
cp -a "$seed"/. "$disk"/ || exit 98
dd if=/dev/zero of="$disk/.filler" bs=4096 2>/dev/null
truncate -s "-$free" "$disk/.filler" || exit 98
"$@"; status=$?
rm -f "$disk/.filler"
cp -a "$disk"/. "$after"/ || exit 98
exit $status
"""


def run_on_full_disk(argv, tmp_path, name, *, free=0, seed=None, timeout=600):
  """Runs `argv` with a nearly full disk at tmp_path/name/disk (see the module docstring) holding
  a copy of `seed`; returns (the finished process, the folder holding a copy of what the disk
  held at its end)."""
  root = tmp_path / name
  disk, after, empty = root / "disk", root / "after", root / "empty"
  for folder in (disk, after, empty):
    folder.mkdir(parents=True)
  proc = subprocess.run(
      ["unshare", "--mount", "--map-root-user", "sh", "-c", _ON_TMPFS, "sh", str(disk),
       str(seed or empty), str(after), str(free), *map(str, argv)],
      capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)
  if proc.returncode in (97, 98) or proc.stderr.startswith("unshare:"):
    pytest.fail(f"could not make a small tmpfs in a user and mount namespace (the sandbox's "
                f"tests need them too): {proc.stderr.strip()}")
  return proc, after


def _failure_lines(stderr):
  """The lines that speak of the failure: the error line, tracebacks, background reports."""
  return [line for line in stderr.splitlines()
          if any(s in line for s in (NO_SPACE, "RESOURCE_EXHAUSTED", "Traceback", "exception"))]


def assert_one_line_naming(proc, written):
  """Exit 1, and the only line about the failure is the last one, `error: ...` (after the
  command's name, for some) naming a file below (or at) `written`."""
  assert proc.returncode == 1, proc.stderr[-3000:]
  last = proc.stderr.rstrip("\n").splitlines()[-1]
  assert _failure_lines(proc.stderr) == [last], proc.stderr[-5000:]
  assert re.match(r"(maxnucl-\w+: )?error: ", last) and NO_SPACE in last, last
  assert str(written) in last, last
  return last


def _files(folder):
  return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  cfg = models.get_config("gemma2_tiny")
  path = tmp_path_factory.mktemp("tiny") / "ckpt"
  checkpoints.save(path, cfg, models.init(cfg, jax.random.PRNGKey(0)))
  return path


def test_trainer_on_a_full_disk_exits_1_in_one_line_naming_the_checkpoint_file(tmp_path):
  """Orbax's background writers printed ~460 lines of tracebacks (and asyncio its "Task
  exception was never retrieved") before the trainer's last line, which exited 2."""
  disk = tmp_path / "train" / "disk"
  proc, after = run_on_full_disk(
      [sys.executable, "-m", "maxnucl.train", "--gin_file=gin/demo_cpu.gin",
       "--gin_param=train_loop.num_steps = 2", "--gin_param=train_loop.checkpoint_every = 2",
       "--gin_param=train_loop.log_every = 1", "--gin_param=train_loop.eval_every = 100",
       f"--workdir={disk / 'run'}"], tmp_path, "train", free=64 * PAGE)
  assert_one_line_naming(proc, disk / "run" / "checkpoints")
  assert "config.gin" in _files(after / "run")  # it got as far as the first checkpoint


def test_hf_to_maxnucl_on_a_full_disk_names_the_output_file_not_the_input(tmp_path,
                                                                         tiny_checkpoint):
  """hf-to-maxnucl blamed the input: "error: HF/model.safetensors: tensor ...: RESOURCE_EXHAUSTED
  ..." (exit 2)."""
  hf = tmp_path / "hf"
  convert.maxnucl_to_hf(tiny_checkpoint, hf)
  disk = tmp_path / "convert" / "disk"
  proc, after = run_on_full_disk(
      [BIN / "maxnucl-convert", "hf-to-maxnucl", "--input", hf, "--output", disk / "ckpt"],
      tmp_path, "convert", free=64 * PAGE)
  line = assert_one_line_naming(proc, disk)
  assert str(hf) not in line
  assert _files(after) == []  # the temporary output removed


def test_pruner_report_on_a_full_disk_is_not_half_written_and_the_rerun_is_not_refused(
    tmp_path, tiny_checkpoint):
  """A half-written 8 KiB report.json stayed, and the pruned checkpoint too, so the rerun was
  refused because its output existed."""
  seed = tmp_path / "seed"
  seed.mkdir()
  (seed / "report.json").write_text('{"an": "earlier report"}\n')
  pruned = tmp_path / "pruned"
  disk = tmp_path / "prune" / "disk"
  argv = [BIN / "maxnucl-prune", "--input", tiny_checkpoint, "--output", pruned, "--method",
          "entropy", "--ratio", "0.25", "--report", disk / "report.json"]
  proc, after = run_on_full_disk(argv, tmp_path, "prune", free=PAGE, seed=seed)
  assert_one_line_naming(proc, disk / "report.json")
  assert _files(after) == ["report.json"]  # no temporary beside it
  assert (after / "report.json").read_bytes() == (seed / "report.json").read_bytes()
  assert not pruned.exists()
  disk = tmp_path / "prune_again" / "disk"
  argv[-1] = disk / "report.json"
  proc, after = run_on_full_disk(argv, tmp_path, "prune_again", free=256 * PAGE, seed=seed)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads((after / "report.json").read_text())["num_removed"] > 0


def test_evaluator_on_a_full_disk_fails_in_one_line_at_every_file_and_then_resumes(
    tmp_path, tiny_checkpoint):
  """The first run has no free page, each next one a page, starting from what the last left:
  each file (run.json, predictions.jsonl, results.json; 1 page each here) fails once, naming
  itself, and leaves no temporary (`.results.json.tmp-PID` stayed); the run that has room
  resumes every prediction and has the results of a run on a roomy disk."""
  doc = tmp_path / "doc.txt"
  doc.write_text("Outgoing connections of feed-forward neurons.\n" * 40)

  def command(out):
    return [BIN / "maxnucl-evaluate", "--gin_file=gin/eval/perplexity.gin",
            "--gin_param=perplexity.seq_len = 64", f"--gin_param=perplexity.source = '{doc}'",
            "--batch_size", "4", f"--checkpoint={tiny_checkpoint}", f"--output={out}",
            "--no_progress"]

  roomy = subprocess.run(list(map(str, command(tmp_path / "roomy"))), capture_output=True,
                         text=True, timeout=600, env=ENV, cwd=REPO)
  assert roomy.returncode == 0, roomy.stderr[-3000:]
  named, seed = [], None
  for attempt in range(5):
    name = f"attempt_{attempt}"
    disk = tmp_path / name / "disk"
    proc, after = run_on_full_disk(command(disk / "eval"), tmp_path, name,
                                   free=PAGE if attempt else 0, seed=seed)
    if proc.returncode == 0:
      break
    line = assert_one_line_naming(proc, disk / "eval")
    named.append(next(f for f in (core.RUN, core.PREDICTIONS, core.RESULTS) if f in line))
    assert not [f for f in _files(after) if ".tmp-" in f], _files(after)
    seed = after
  else:
    pytest.fail(f"still failing after {attempt + 1} runs: {proc.stderr[-2000:]}")
  assert named == [core.RUN, core.PREDICTIONS, core.RESULTS]
  results = json.loads((after / "eval" / core.RESULTS).read_text())
  expected = json.loads((tmp_path / "roomy" / core.RESULTS).read_text())
  assert results["metrics"] == expected["metrics"]
  assert results["num_examples"] == results["num_resumed"] == expected["num_examples"]


def test_analyzer_on_a_full_disk_names_each_file_and_leaves_only_whole_ones(tmp_path,
                                                                          tiny_checkpoint):
  """The analyzer named its output directory, not the plot it was writing, and left a torn PNG
  under its final name.  With more room on each run (four pages more) it fails at each file in
  turn, each time naming it and leaving only whole files, until it finishes."""
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  named = []
  for attempt in range(12):
    name = f"attempt_{attempt}"
    disk = tmp_path / name / "disk"
    proc, after = run_on_full_disk(
        [BIN / "maxnucl-analyze", "--input", tiny_checkpoint, "--output_dir", disk / "analysis",
         "--methods", "entropy,magnitude"], tmp_path, name, free=4 * attempt * PAGE)
    written = _files(after)
    assert not [f for f in written if ".tmp-" in f], written
    for png in (after / "analysis").glob("*.png"):
      assert matplotlib.image.imread(png).ndim == 3, png  # whole: it decodes
    if proc.returncode == 0:
      break
    line = assert_one_line_naming(proc, disk / "analysis")
    named.append(line.split(" while writing ")[1].split(";")[0])
    assert "analysis/analysis.json" not in written  # written last: there only when finished
  else:
    pytest.fail(f"still failing with {4 * attempt} free pages: {proc.stderr[-2000:]}")
  assert json.loads((after / "analysis" / "analysis.json").read_text())["methods"] == [
      "entropy", "magnitude"]
  assert named[0] == str(disk.parent.parent / "attempt_0" / "disk" / "analysis" /
                         "entropy_histograms.png")  # the first file it writes, named


def test_data_cache_on_a_full_disk_names_the_shard_and_leaves_no_torn_one(tmp_path):
  """numpy's write failure carries no errno ("N requested and M written") and gin re-raises the
  error without its file name: the message said "while writing the output", and a torn shard
  stayed under its final name."""
  fixtures = REPO / "tests" / "fixtures" / "data"
  for free in (0, 2 * PAGE):
    name = f"free_{free}"
    disk = tmp_path / name / "disk"
    proc, after = run_on_full_disk(
        [BIN / "maxnucl-data", "cache", "--source=gsm8k", "--split=test", "--seq_len=64",
         f"--cache_dir={disk / 'cache'}", f"--data_dir={fixtures}"], tmp_path, name, free=free)
    line = assert_one_line_naming(proc, disk / "cache" / "gsm8k" / "test" / "shard-00000.")
    written = _files(after)
    assert not [f for f in written if ".tmp" in f or f.endswith("index.json")], written
    for shard in (after / "cache" / "gsm8k" / "test").glob("*.npy"):
      assert shard.name not in line
      assert np.load(shard).ndim == 2  # whole: it loads


def test_reproduction_on_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path):
  """The study named its run directory and left `.settings.json.tmp-PID` behind."""
  for free in (0, 8 * PAGE):
    name = f"free_{free}"
    disk = tmp_path / name / "disk"
    proc, after = run_on_full_disk(
        [sys.executable, "tools/reproduce.py", "--quick", "--output", disk / "run", "--stages",
         "data", "--no_report"], tmp_path, name, free=free)
    line = assert_one_line_naming(proc, disk / "run")
    if free == 0:  # the first file the run writes
      assert f"writing {disk / 'run' / 'settings.json'};" in line, line
    else:  # the corpus (larger than the disk), in its temporary directory, named as such
      corpus = disk / "run" / "data" / "corpus"
      assert f"/train.jsonl (the temporary output of {corpus})" in line, line
    assert not [f for f in _files(after) if ".tmp-" in f], _files(after)


def test_a_temporary_file_of_a_process_that_is_gone_is_swept_by_the_next_write(tmp_path):
  """A `.results.json.tmp-PID` of a killed evaluator stayed forever; that of a live process is
  left alone."""
  out = tmp_path / "out"
  out.mkdir()
  results = out / core.RESULTS
  make = ("import sys, time; from maxnucl import outputs; "
          "outputs.temporary_sibling(sys.argv[1]).write_text('{'); print('made', flush=True); "
          "time.sleep(float(sys.argv[2]))")
  gone = subprocess.run([sys.executable, "-c", make, str(results), "0"], env=ENV, cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert gone.returncode == 0, gone.stderr
  [stale] = out.iterdir()
  with subprocess.Popen([sys.executable, "-c", make, str(results), "600"], env=ENV, cwd=REPO,
                        stdout=subprocess.PIPE, text=True) as alive:
    try:
      assert alive.stdout.readline() == "made\n"
      [live] = set(out.iterdir()) - {stale}
      core._write_json_atomically(results, {})  # what the evaluator writes results.json with
      assert not stale.exists() and live.exists()
    finally:
      alive.kill()
  assert json.loads(results.read_text()) == {}
  assert sorted(p.name for p in out.iterdir()) == sorted([live.name, core.RESULTS])
