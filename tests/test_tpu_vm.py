"""tools/tpu_vm.py against a fake `gcloud` first on PATH.

The fake records each call's argv as one JSON line.  With FAKE_WORKER_HOME set it also plays one
TPU worker whose home is that directory: `scp` copies the file there and `ssh --command=C` runs C
with `bash -c`, as sshd would, so setup, train and logs execute their real remote commands (with a
fake `python3.11` whose venv's python records its argv instead of running anything).
"""

import importlib.util
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tarfile
import time

import pytest

from maxnucl import tpu_vm
from tolerances import EPS64

REPO = pathlib.Path(__file__).resolve().parent.parent
TOOL = REPO / "tools" / "tpu_vm.py"
WHERE = ["--name", "nucl", "--zone", "us-west4-a", "--project", "my-proj"]

FAKE_GCLOUD = """\
#!{python}
import json, os, shutil, subprocess, sys
args = sys.argv[1:]
with open(os.environ["FAKE_GCLOUD_RECORD"], "a") as record:
  record.write(json.dumps(args) + "\\n")
home = os.environ.get("FAKE_WORKER_HOME")
if home and args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
  shutil.copy(args[4], os.path.join(home, args[5].split(":", 1)[1]))
if home and args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
  [command] = [a.split("=", 1)[1] for a in args if a.startswith("--command=")]
  sys.exit(subprocess.run(["bash", "-c", command], env=dict(os.environ, HOME=home)).returncode)
sys.exit(int(os.environ.get("FAKE_GCLOUD_EXIT", "0")))
"""

# The worker's python3.11: `-m venv DIR` makes DIR/bin/python a copy of the recorder below.
FAKE_PYTHON311 = """\
#!{python}
import os, shutil, sys
if sys.argv[1:3] == ["-m", "venv"]:
  os.makedirs(os.path.join(sys.argv[3], "bin"))
  shutil.copy(os.environ["FAKE_RECORDER"], os.path.join(sys.argv[3], "bin", "python"))
"""

# The venv's python: records argv (and the working directory), prints a line, exits 0.
RECORDER = """\
#!{python}
import json, os, sys
with open(os.environ["FAKE_PYTHON_RECORD"], "a") as record:
  record.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd()}}) + "\\n")
print("fake python ran", sys.argv[1:3])
"""


def _script(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text.format(python=sys.executable))
  path.chmod(0o755)
  return path


@pytest.fixture
def fake(tmp_path):
  """Environment for the tool: the fake gcloud (and python3.11) first on PATH, no zone/project
  variables; `fake.calls()` reads the recorded gcloud argvs."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _script(bin_dir / "gcloud", FAKE_GCLOUD)
  _script(bin_dir / "python3.11", FAKE_PYTHON311)
  recorder = _script(tmp_path / "recorder.py", RECORDER)

  class Fake:
    record = tmp_path / "gcloud_calls.jsonl"
    python_record = tmp_path / "python_calls.jsonl"
    home = tmp_path / "worker_home"
    env = {k: v for k, v in os.environ.items()
           if k not in (tpu_vm.ZONE_ENV, tpu_vm.PROJECT_ENV)}
    env.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
               FAKE_GCLOUD_RECORD=str(record), FAKE_PYTHON_RECORD=str(python_record),
               FAKE_RECORDER=str(recorder))

    def run(self, *args, worker=False, **env):
      environment = dict(self.env, **env)
      if worker:
        self.home.mkdir(exist_ok=True)
        environment["FAKE_WORKER_HOME"] = str(self.home)
      return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=tmp_path,
                            env=environment, capture_output=True, text=True, timeout=120)

    def calls(self):
      if not self.record.exists():
        return []
      return [json.loads(line) for line in self.record.read_text().splitlines()]

    def python_calls(self):
      return [json.loads(line) for line in self.python_record.read_text().splitlines()]

  return Fake()


def _ok(proc):
  assert proc.returncode == 0, proc.stdout + proc.stderr
  return proc


def _shell_words(command):
  """The words of a shell command line as the shell splits them: quotes removed, and the
  operators (; & | > < && ...) words of their own."""
  lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
  lexer.whitespace_split = True
  return list(lexer)


def _command_of(call):
  """The remote command of a recorded `ssh` call."""
  [command] = [a.split("=", 1)[1] for a in call if a.startswith("--command=")]
  return command


# ---- the gcloud calls of each command ------------------------------------------------------------

def test_create_makes_a_tpu_vm_with_the_generations_runtime(fake):
  _ok(fake.run("create", *WHERE, "--accelerator_type", "v5litepod-16"))
  assert fake.calls() == [["compute", "tpus", "tpu-vm", "create", "nucl", "--zone=us-west4-a",
                           "--project=my-proj", "--accelerator-type=v5litepod-16",
                           "--version=v2-alpha-tpuv5-lite"]]


@pytest.mark.parametrize("accelerator,runtime", [("v4-32", "tpu-ubuntu2204-base"),
                                                 ("v5p-8", "v2-alpha-tpuv5"),
                                                 ("v6e-256", "v2-alpha-tpuv6e")])
def test_each_generation_gets_its_default_runtime_and_spot_is_passed(fake, accelerator, runtime):
  _ok(fake.run("create", *WHERE, "--accelerator_type", accelerator, "--spot"))
  [call] = fake.calls()
  assert call[:5] == ["compute", "tpus", "tpu-vm", "create", "nucl"]
  assert f"--accelerator-type={accelerator}" in call and f"--version={runtime}" in call
  assert call[-1] == "--spot"


def test_queued_create_requests_a_queued_resource_whose_node_has_the_name(fake):
  _ok(fake.run("create", *WHERE, "--accelerator_type", "v5litepod-64", "--queued", "--reserved",
               "--runtime_version", "v2-alpha-tpuv5-lite-custom"))
  assert fake.calls() == [["compute", "tpus", "queued-resources", "create", "nucl",
                           "--node-id=nucl", "--zone=us-west4-a", "--project=my-proj",
                           "--accelerator-type=v5litepod-64",
                           "--runtime-version=v2-alpha-tpuv5-lite-custom", "--reserved"]]


def test_spot_and_reserved_exclude_each_other(fake):
  proc = fake.run("create", *WHERE, "--accelerator_type", "v5litepod-8", "--spot", "--reserved")
  assert proc.returncode == 2 and "not allowed with argument" in proc.stderr
  assert fake.calls() == []


@pytest.mark.parametrize("command,queued,expected", [
    ("status", False, ["compute", "tpus", "tpu-vm", "describe", "nucl"]),
    ("status", True, ["compute", "tpus", "queued-resources", "describe", "nucl"]),
    ("delete", False, ["compute", "tpus", "tpu-vm", "delete", "nucl", "--quiet"]),
    ("delete", True, ["compute", "tpus", "queued-resources", "delete", "nucl", "--force",
                      "--quiet"]),
])
def test_status_and_delete_address_the_vm_or_the_queued_resource(fake, command, queued, expected):
  _ok(fake.run(command, *WHERE, *(["--queued"] if queued else [])))
  [call] = fake.calls()
  location = ["--zone=us-west4-a", "--project=my-proj"]
  assert [a for a in call if a not in location] == expected
  assert call[5:7] == location


def test_zone_and_project_fall_back_to_the_gcloud_environment_variables(fake):
  _ok(fake.run("status", "--name", "nucl", CLOUDSDK_COMPUTE_ZONE="europe-west4-b",
               CLOUDSDK_CORE_PROJECT="from-env"))
  assert fake.calls()[0][5:] == ["--zone=europe-west4-b", "--project=from-env"]


# ---- setup, train, logs on a fake worker --------------------------------------------------------

def test_setup_copies_the_checkout_and_installs_it_with_the_pinned_jax_tpu(fake):
  _ok(fake.run("setup", *WHERE, worker=True))
  scp, ssh = fake.calls()
  assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in scp
  assert scp[5] == f"nucl:{tpu_vm.REMOTE_TARBALL}"
  assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "nucl"] and "--worker=all" in ssh
  # On the worker: the checkout, without what git ignores, and the tarball removed.
  checkout = fake.home / "maxnucl"
  assert (checkout / "setup.py").read_text() == (REPO / "setup.py").read_text()
  assert (checkout / "maxnucl" / "tpu_vm.py").is_file()
  assert (checkout / "gin" / "base.gin").is_file()
  copied = {p.relative_to(checkout).parts[0] for p in checkout.rglob("*")}
  assert not copied & {".git", ".venv", "build", "dist"}
  assert not list(checkout.rglob("__pycache__")) and not list(checkout.rglob("*.egg-info"))
  assert not (fake.home / tpu_vm.REMOTE_TARBALL).exists()
  # pip installed it editable with jax[tpu] of requirements.txt's jax version.
  jax_version = re.search(r"^jax==(\S+)", (REPO / "requirements.txt").read_text(), re.M).group(1)
  pip = [c for c in fake.python_calls() if c["argv"][:3] == ["-m", "pip", "install"]]
  assert [c["argv"] for c in pip][-1] == [
      "-m", "pip", "install", "-q", "-e", "./maxnucl", f"jax[tpu]=={jax_version}", "-f",
      tpu_vm.LIBTPU_RELEASES]


def test_setup_replaces_an_older_copy_on_the_worker(fake):
  stale = fake.home / "maxnucl" / "removed_since.py"
  stale.parent.mkdir(parents=True)
  stale.write_text("old")
  _ok(fake.run("setup", *WHERE, worker=True))
  assert not stale.exists() and (fake.home / "maxnucl" / "setup.py").is_file()


def test_train_runs_the_trainer_on_all_workers_with_its_output_in_the_log(fake):
  _ok(fake.run("setup", *WHERE, worker=True))  # makes the fake venv
  fake.python_record.unlink()
  args = ["--gin_file=gin/gemma2_9b_gsm8k.gin", "--workdir=gs://bucket/runs/9b"]
  proc = _ok(fake.run("train", *WHERE, "--", *args, worker=True))
  ssh = fake.calls()[-1]
  assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "nucl"] and "--worker=all" in ssh
  [call] = fake.python_calls()
  assert call["argv"] == ["-m", "maxnucl.train", *args]
  assert pathlib.Path(call["cwd"]) == fake.home / "maxnucl"
  log = (fake.home / "maxnucl_logs" / "train.log").read_text()
  assert "fake python ran" in log and "fake python ran" in proc.stdout  # tee: both
  assert "not a gs:// URL" not in proc.stderr

  logs = _ok(fake.run("logs", *WHERE, "--worker", "0", worker=True))
  assert "--worker=0" in fake.calls()[-1]
  hostname = subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip()
  assert f"{hostname}: fake python ran" in logs.stdout


def test_a_local_workdir_is_warned_about(fake):
  proc = _ok(fake.run("train", *WHERE, "--dry_run", "--", "--gin_file=gin/demo_cpu.gin",
                      "--workdir=/tmp/run"))
  assert "not a gs:// URL" in proc.stderr


def test_detached_train_returns_and_the_trainer_keeps_running_in_the_background(fake):
  _ok(fake.run("setup", *WHERE, worker=True))
  fake.python_record.unlink()
  proc = _ok(fake.run("train", *WHERE, "--detach", "--log", "nucl_a100", "--env",
                      "MAXNUCL_DATA_DIR=my data", "--", "--gin_file=x.gin", worker=True))
  assert "started, log ~/maxnucl_logs/nucl_a100.log" in proc.stdout
  assert "nohup" in _command_of(fake.calls()[-1])
  log = fake.home / "maxnucl_logs" / "nucl_a100.log"
  for _ in range(100):
    if log.exists() and "fake python ran" in log.read_text():
      break
    time.sleep(0.1)
  assert "fake python ran" in log.read_text()
  assert fake.python_calls()[-1]["argv"] == ["-m", "maxnucl.train", "--gin_file=x.gin"]


def test_run_starts_any_program_of_the_checkout_logged_under_its_name(fake):
  evaluate = _ok(fake.run("run", *WHERE, "--dry_run", "--", "-m", "maxnucl.evaluate", "--limit=5"))
  words = _shell_words(_command_of(shlex.split(evaluate.stdout)))
  assert words[words.index("-m") - 1:words.index("-m") + 3] == [
      "$HOME/maxnucl_venv/bin/python", "-m", "maxnucl.evaluate", "--limit=5"]
  assert "$HOME/maxnucl_logs/maxnucl.evaluate.log" in words
  prune = _ok(fake.run("run", *WHERE, "--dry_run", "--", "tools/prune_checkpoint.py"))
  assert "$HOME/maxnucl_logs/prune_checkpoint.log" in _shell_words(
      _command_of(shlex.split(prune.stdout)))
  assert fake.calls() == []


# ---- quoting: the trainer's arguments reach the worker as literal words -------------------------

HOSTILE = ["--gin_param=train_loop.num_steps = 5; rm -rf ~",
           "--gin_param=GEMMA2_CHECKPOINT = 'it''s $(id) `id` \"x\" $HOME'",
           "--workdir=gs://bucket/runs/a b&c|d>e"]


def test_hostile_trainer_arguments_round_trip_through_the_remote_shell_words(fake):
  _ok(fake.run("train", *WHERE, "--", "--gin_file=gin/gemma2_9b_gsm8k.gin", *HOSTILE))
  words = _shell_words(_command_of(fake.calls()[-1]))
  for argument in HOSTILE:
    assert argument in words, (argument, words)
  assert "rm" not in words and "~" not in words  # never a command word of its own


def test_hostile_trainer_arguments_reach_the_program_unchanged_when_executed(fake, tmp_path):
  _ok(fake.run("setup", *WHERE, worker=True))
  fake.python_record.unlink()
  canary = ["--gin_param=train_loop.num_steps = 5; touch ~/injected_1",
            "--gin_param=X = 'it''s $(touch ~/injected_2) `touch ~/injected_3`'",
            "--gin_param=Y = \"$HOME\" & touch ~/injected_4"]
  _ok(fake.run("train", *WHERE, "--", *canary, worker=True))
  assert fake.python_calls()[-1]["argv"] == ["-m", "maxnucl.train", *canary]
  assert not list(fake.home.glob("injected_*"))


def test_dry_run_prints_each_call_as_a_shell_line_and_calls_nothing(fake):
  proc = _ok(fake.run("train", *WHERE, "--dry_run", "--", *HOSTILE))
  assert not fake.record.exists()
  [line] = proc.stdout.splitlines()
  argv = shlex.split(line)  # one line = one call, quoted for a local shell
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "nucl"]
  words = _shell_words(_command_of(argv))
  assert all(argument in words for argument in HOSTILE)

  setup = _ok(fake.run("setup", *WHERE, "--dry_run"))
  assert not fake.record.exists()
  assert [shlex.split(line)[4] for line in setup.stdout.splitlines()] == ["scp", "ssh"]


def test_the_stop_pattern_matches_the_venv_programs_but_not_its_own_command():
  command = tpu_vm.stop_remote_command()
  [pattern] = [w for w in _shell_words(command) if "bin/python" in w]
  assert re.search(pattern, "/home/me/maxnucl_venv/bin/python -m maxnucl.train --gin_file=x")
  assert not re.search(pattern, command)


# ---- errors ------------------------------------------------------------------------------------

@pytest.mark.parametrize("missing,flag,variable", [
    (["--zone", "us-west4-a"], "--project", "CLOUDSDK_CORE_PROJECT"),
    (["--project", "my-proj"], "--zone", "CLOUDSDK_COMPUTE_ZONE")])
def test_missing_project_or_zone_exits_2_naming_the_flag_and_the_variable(fake, missing, flag,
                                                                           variable):
  proc = fake.run("status", "--name", "nucl", *missing)
  assert proc.returncode == 2
  [line] = proc.stderr.splitlines()
  assert line.startswith("error: ") and flag in line and variable in line
  assert fake.calls() == []


@pytest.mark.parametrize("accelerator", ["v5e-16", "v5litepod-12", "v4-12", "v7x-8", "tpu"])
def test_an_unknown_accelerator_type_exits_2_listing_the_known_forms(fake, accelerator):
  proc = fake.run("create", *WHERE, "--accelerator_type", accelerator)
  assert proc.returncode == 2
  assert f"--accelerator_type {accelerator!r}" in proc.stderr
  assert "v5litepod-N" in proc.stderr and "v5p-N" in proc.stderr and "v6e-N" in proc.stderr
  assert fake.calls() == []


def test_v5e_written_as_such_is_pointed_to_its_gcloud_spelling(fake):
  proc = fake.run("create", *WHERE, "--accelerator_type", "v5e-16")
  assert "v5litepod-16" in proc.stderr


def test_accelerator_types_count_chips_and_hosts():
  v5e = tpu_vm.parse_accelerator_type("v5litepod-16")
  assert (v5e.generation.name, v5e.chips, v5e.hosts) == ("v5e", 16, 4)
  assert tpu_vm.parse_accelerator_type("v5litepod-8").hosts == 1
  v4 = tpu_vm.parse_accelerator_type("v4-32")  # 32 TensorCores = 16 chips = 4 hosts
  assert (v4.chips, v4.hosts) == (16, 4)
  assert tpu_vm.parse_accelerator_type("v5p-8").chips == 4


def test_the_generations_peak_flops_are_those_the_trainer_uses_for_mfu():
  from maxnucl import flops  # pylint: disable=import-outside-toplevel
  by_kind = dict(flops.PEAK_FLOPS_BY_DEVICE_KIND)
  kinds = {"v4": "TPU v4", "v5e": "TPU v5 lite", "v5p": "TPU v5p", "v6e": "TPU v6"}
  assert {name: g.peak_bf16_flops for name, g in tpu_vm.GENERATIONS.items()} == {
      name: by_kind[kind] for name, kind in kinds.items()}


def test_a_failing_gcloud_call_exits_nonzero_naming_it_and_stops_there(fake):
  proc = fake.run("setup", *WHERE, FAKE_GCLOUD_EXIT="7")
  assert proc.returncode == 1
  assert "exit status 7" in proc.stderr
  assert "gcloud compute tpus tpu-vm scp" in proc.stderr
  assert "nucl:maxnucl-src.tar.gz" in proc.stderr
  assert len(fake.calls()) == 1  # the ssh after the failed scp never ran


def test_train_without_trainer_arguments_and_arguments_for_other_commands_are_refused(fake):
  proc = fake.run("train", *WHERE)
  assert proc.returncode == 2 and "after --" in proc.stderr
  proc = fake.run("status", *WHERE, "--", "--gin_file=x.gin")
  assert proc.returncode == 2 and "status takes no arguments after --" in proc.stderr
  assert fake.calls() == []


@pytest.mark.parametrize("command,program,flag", [
    ("train", ["--gin_file=x.gin"], "--dry_run"),
    ("train", ["--gin_file=x.gin"], "--detach"),
    ("train", ["--gin_file=x.gin"], "--zone=us-central1-a"),
    ("run", ["-m", "maxnucl.evaluate"], "--dry_run"),
    ("run", ["-m", "maxnucl.evaluate"], "--worker=0"),
])
def test_a_launcher_flag_after_the_double_dash_is_refused_and_gcloud_never_runs(fake, command,
                                                                               program, flag):
  proc = fake.run(command, *WHERE, "--", *program, flag)
  assert proc.returncode == 2, proc.stderr
  name = flag.split("=")[0]
  assert proc.stderr.strip() == (f"error: {name} after --: it is a flag of `{command}` itself, "
                                 f"and everything after -- goes to the program on the workers; "
                                 f"put it before --")
  assert fake.calls() == []


@pytest.mark.parametrize("args,named", [
    (["train", "--remote_dir", "../elsewhere", "--", "--gin_file=x"], "--remote_dir"),
    (["train", "--env", "1BAD=x", "--", "--gin_file=x"], "--env"),
    (["logs", "--worker", "0;reboot"], "--worker"),
    (["logs", "--log", "../../etc/passwd"], "--log"),
])
def test_values_that_would_leave_their_place_on_the_worker_are_refused(fake, args, named):
  command, *rest = args
  proc = fake.run(command, *WHERE, *rest)
  assert proc.returncode == 2 and named in proc.stderr
  assert fake.calls() == []


def test_a_missing_gcloud_is_named_with_where_to_get_it(fake, tmp_path):
  proc = fake.run("status", *WHERE, PATH=str(tmp_path / "nowhere"))
  assert proc.returncode == 1
  assert "gcloud not found on PATH" in proc.stderr


def test_the_tarball_holds_the_checkouts_files_under_relative_names(tmp_path):
  names = tpu_vm.source_files(REPO)
  assert "setup.py" in names and "maxnucl/tpu_vm.py" in names
  assert not [n for n in names if n.startswith((".git/", ".venv/")) or "__pycache__" in n]
  tarball = tmp_path / "src.tar.gz"
  tpu_vm.pack(REPO, names[:5], tarball)
  with tarfile.open(tarball) as archive:
    assert archive.getnames() == names[:5]


# ---- benchmarks/tpu_plan.py: the numbers of docs/tpu.md ---------------------------------------

def _tpu_plan():
  spec = importlib.util.spec_from_file_location("tpu_plan", REPO / "benchmarks" / "tpu_plan.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_planned_meshes_satisfy_the_trainers_and_the_pipelines_divisibility():
  plan = _tpu_plan()
  assert plan.choose_mesh(32, 8, 16, 1) == ((1, 16, 2), 16)
  assert plan.choose_mesh(256, 64, 16, 1) == ((1, 64, 4), 64)  # 16 rows cannot cover 64 hosts
  for chips in (1, 4, 8, 16, 32, 64, 128, 256):
    accelerator = tpu_vm.parse_accelerator_type(f"v5litepod-{chips}")
    for batch, accumulation in ((16, 1), (16, 2), (48, 1)):
      (data, fsdp, tensor), planned = plan.choose_mesh(chips, accelerator.hosts, batch,
                                                       accumulation)
      assert data * fsdp * tensor == chips
      assert planned % accelerator.hosts == 0 and planned % batch == 0
      assert (planned // accumulation) % (data * fsdp) == 0


def test_the_plan_shards_the_params_over_the_chips_and_times_the_step_by_the_flops_formula():
  from maxnucl import flops  # pylint: disable=import-outside-toplevel
  plan = _tpu_plan()
  run = plan.read_run("gin/demo_cpu.gin")
  row = plan.plan(run, tpu_vm.parse_accelerator_type("v5litepod-8"), mfu=0.4)
  assert row["mesh"] == (1, 8, 1) and row["rows_per_chip"] == run["batch"] // 8
  itemsize = 4 if run["cfg"].param_dtype == "float32" else 2
  all_bytes = row["parameters"] * itemsize
  per_chip = row["gib_per_chip"]["params"] * plan.GIB
  assert all_bytes / 8 <= per_chip < all_bytes / 8 * 1.1  # only the small norm scales replicated
  expected = flops.training_flops_per_step(run["cfg"], run["batch"], run["seq_len"]) / (
      8 * 197e12 * 0.4)
  # the same float64 formula (a product of a few integers, two divisions) evaluated in another order
  assert row["step_s"] == pytest.approx(expected, rel=8 * EPS64, abs=0)


# ---- flags that become gcloud arguments: checked against gcloud's formats --------------------------

def _dry_run(capsys, *args, env=None, monkeypatch=None):
  """main(args) in-process with --dry_run: (exit code, stdout lines, stderr lines)."""
  if monkeypatch is not None:
    for name in (tpu_vm.ZONE_ENV, tpu_vm.PROJECT_ENV):
      monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
      monkeypatch.setenv(name, value)
  try:
    code = tpu_vm.main([*map(str, args), "--dry_run"])
  except SystemExit as exit_:
    code = exit_.code
  out, err = capsys.readouterr()
  return code, out.splitlines(), [line for line in err.splitlines() if line.strip()]


CREATE = ["create", "--accelerator_type", "v5litepod-16"]


@pytest.mark.parametrize("flag, value", [
    ("--zone", "us west"), ("--zone", "--project=x"), ("--zone", ""), ("--zone", "US-WEST4-A"),
    ("--zone", "us-west4"), ("--zone", "us-west4-a "), ("--zone", "us-west4-a\n"),
    ("--project", "my proj"), ("--project", "--zone=x"), ("--project", ""),
    ("--project", "abc"), ("--project", "My-Proj"), ("--project", "p" * 31),
    ("--project", "proj-"), ("--project", "1proj"),
    ("--runtime_version", ""), ("--runtime_version", "v2 alpha"),
    ("--runtime_version", "--zone=x"), ("--runtime_version", "V2-ALPHA"),
    ("--accelerator_type", "v5litepod-\u0661\u0666"), ("--accelerator_type", " v5litepod-16"),
    ("--accelerator_type", "v5litepod-016"),
    ("--name", "Nucl"), ("--name", "nucl-"),
])
def test_create_refuses_a_flag_gcloud_would_not_take_naming_it(capsys, monkeypatch, flag, value):
  """`--zone='us west'`, `--zone=--project=x` and `--runtime_version ''` used to reach gcloud
  (or silently become the default): each is refused in one line naming the flag and the value,
  and no gcloud call is printed."""
  flags = {"--name": "nucl", "--zone": "us-west4-a", "--project": "my-proj",
           "--accelerator_type": "v5litepod-16", flag: value}
  args = ["create"] + [f"{name}={given}" for name, given in flags.items()]
  code, out, err = _dry_run(capsys, *args, monkeypatch=monkeypatch)
  assert code == 2 and out == [], (out, err)
  assert len(err) == 1 and err[0].startswith("error: "), err
  assert flag in err[0] and repr(value) in err[0], err[0]


@pytest.mark.parametrize("variable, value", [(tpu_vm.ZONE_ENV, "us west"),
                                             (tpu_vm.PROJECT_ENV, "My Project")])
def test_a_malformed_zone_or_project_variable_is_refused_naming_it(capsys, monkeypatch, variable,
                                                                   value):
  env = {tpu_vm.ZONE_ENV: "us-west4-a", tpu_vm.PROJECT_ENV: "my-proj", variable: value}
  code, out, err = _dry_run(capsys, "status", "--name", "nucl", env=env, monkeypatch=monkeypatch)
  assert code == 2 and out == []
  assert len(err) == 1 and variable in err[0] and repr(value) in err[0], err


@pytest.mark.parametrize("zone, project, runtime", [
    ("us-central2-b", "my-proj", "tpu-ubuntu2204-base"),
    ("europe-west4-a", "google.com:my-proj", "v2-alpha-tpuv5-lite"),
    ("northamerica-northeast1-a", "a12345", "tpu-vm-tf-2.16.1-pjrt"),
    ("us-east5-a", "p" * 30, "v2-alpha-tpuv6e"),
])
def test_gcloud_formats_are_accepted_and_passed_unchanged(capsys, monkeypatch, zone, project,
                                                          runtime):
  code, out, err = _dry_run(capsys, *CREATE, "--name", "nucl", "--zone", zone, "--project",
                            project, "--runtime_version", runtime, monkeypatch=monkeypatch)
  assert code == 0, err
  [line] = out
  assert shlex.split(line) == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "nucl", f"--zone={zone}",
      f"--project={project}", "--accelerator-type=v5litepod-16", f"--version={runtime}"]


@pytest.mark.parametrize("args, flag", [
    (["setup", "--python="], "--python"),
    (["setup", "--python=python3; reboot"], "--python"),
    (["setup", "--extras=eval]"], "--extras"),
    (["setup", "--extras=eval,"], "--extras"),
])
def test_setup_refuses_an_interpreter_or_extra_that_is_not_a_name(capsys, monkeypatch, args, flag):
  code, out, err = _dry_run(capsys, *args, *WHERE, monkeypatch=monkeypatch)
  assert code == 2 and out == [], (out, err)
  assert len(err) == 1 and flag in err[0], err
