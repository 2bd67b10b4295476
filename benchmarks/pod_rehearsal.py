"""A TPU pod rehearsed on one machine: the commands of docs/tpu.md's "Rehearsing a pod on one
machine", run in order and timed, with 2 processes x 4 simulated CPU devices for the slice's
workers and a Cloud Storage emulator (fake-gcs-server, tests/gcs_emulator.py) for the bucket.

The commands are read from the page (the ```bash block after the `<!-- pod rehearsal` marker),
so what runs is what the page tells a pod user: convert a checkpoint into the bucket, train with
NUCL on every worker, kill one worker, restart all, resume, evaluate in the loop, prune from the
bucket to the bucket, evaluate the pruned model, export it to Hugging Face from the bucket.
Placeholders filled in: BUCKET (a fresh bucket on the emulator), HF_DIR (a tiny Gemma-2 in
Hugging Face's format, written here), PORT (a free port per multi-process step), I (the process
index) and PID1 (process 1 of the run started with `&`).

Each step's effect is checked in the bucket (ValueError naming the step when it is not there),
and a table of the steps' times is printed.  Without --quick an uninterrupted run of the same
training command follows, and the resumed run's losses must equal its losses at every step.

    python benchmarks/pod_rehearsal.py
    python benchmarks/pod_rehearsal.py --quick --json rehearsal.json
    python benchmarks/pod_rehearsal.py --quick --bucket gs://b   # a bucket the caller's clients
                                                                 # already reach (the test's)
Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).absolute().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import arguments  # noqa: E402  pylint: disable=wrong-import-position

PAGE = REPO / "docs" / "tpu.md"
MARKER = "<!-- pod rehearsal"
NUM_PROCESSES = 2
STEP_TIMEOUT_S = 600


# ---- the page's commands --------------------------------------------------------------------------

def page_commands(page: pathlib.Path = PAGE) -> list[str]:
  """The commands of the ```bash block after the marker: comment lines dropped, continuation
  lines joined; a command's trailing comment is kept (the kill line's says when)."""
  text = page.read_text(encoding="utf-8")
  start = text.find(MARKER)
  match = re.search(r"```bash\n(.*?)```", text[start:], re.S) if start >= 0 else None
  if match is None:
    raise SystemExit(f"{page}: no ```bash block after {MARKER!r}")
  commands, pending = [], ""
  for line in match.group(1).splitlines():
    if not pending and (not line.strip() or line.lstrip().startswith("#")):
      continue
    pending += line.strip()
    if pending.endswith("\\"):
      pending = pending[:-1].rstrip() + " "
      continue
    commands.append(pending)
    pending = ""
  return commands


def _option(command: str, name: str) -> str:
  """The value of `--name=V` or `--name V` in a command (ValueError naming both if absent)."""
  words = shlex.split(command, comments=True)
  for i, word in enumerate(words):
    if word.startswith(f"{name}="):
      return word.split("=", 1)[1]
    if word == name and i + 1 < len(words):
      return words[i + 1]
  raise ValueError(f"docs/tpu.md's pod rehearsal command has no {name}: {command}")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


# ---- running them ---------------------------------------------------------------------------------

class Rehearsal:
  """Runs the commands in order against `bucket` from the repository root, keeping what the
  checks need (the background run's processes, the metrics logged before the kill)."""

  def __init__(self, bucket: str, hf_dir: pathlib.Path, environment: dict,
               logs: pathlib.Path):
    self.bucket, self.hf_dir, self.logs = bucket, hf_dir, logs
    self.environment = dict(environment, PYTHONUNBUFFERED="1", PATH=(
        f"{pathlib.Path(sys.executable).parent}{os.pathsep}{environment.get('PATH', '')}"))
    self.background: list[subprocess.Popen] = []
    self.source_cfg = None  # the model written to HF_DIR
    self.train_command, self.num_steps = "", 0
    self.steps: list[dict] = []
    self.facts: dict = {}

  def fill(self, command: str, port: int | None = None, process: int | None = None) -> str:
    text = command.replace("gs://BUCKET", self.bucket).replace("HF_DIR", str(self.hf_dir))
    if port is not None:
      text = text.replace("localhost:PORT", f"localhost:{port}")
    if process is not None:
      text = text.replace("--process_id=I", f"--process_id={process}")
    return text

  def start(self, command: str) -> list[subprocess.Popen]:
    """One bash per process for a `--process_id=I` command, else one."""
    port = _free_port()
    texts = ([self.fill(command, port, i) for i in range(NUM_PROCESSES)]
             if "--process_id=I" in command else [self.fill(command)])
    procs = []
    for i, text in enumerate(texts):
      # output into files, not pipes: a pipe nobody reads while the run goes would block it
      name = self.logs / f"step{len(self.steps) + 1}_process{i}"
      with open(f"{name}.out", "w") as out, open(f"{name}.err", "w") as err:
        # its own process group, which `kill -9 PID1` and the clean-up kill whole
        procs.append(subprocess.Popen(["bash", "-c", text.rstrip(" &")], cwd=REPO,
                                      env=self.environment, stdout=out, stderr=err,
                                      start_new_session=True))
      procs[-1].output_name = name
    return procs

  def run(self, command: str) -> None:
    start = time.perf_counter()
    if command.startswith("kill "):
      outputs = self.kill(command)
    else:
      procs = self.start(command)
      if command.endswith("&"):
        self.background = procs
        outputs = []
      else:
        outputs = _wait(procs, command)
        failed = [i for i, (code, _, _) in enumerate(outputs) if code]
        if failed:
          code, stdout, stderr = outputs[failed[0]]
          raise RuntimeError(f"step failed (process {failed[0]}, exit {code}): {command}\n"
                             f"{stdout[-2000:]}\n{stderr[-4000:]}")
    step = {"command": command, "label": step_label(command),
            "processes": NUM_PROCESSES if "--process_id=I" in command else 1,
            "seconds": time.perf_counter() - start}
    step["checked"] = check_step(self, command, outputs)
    step["seconds_with_check"] = time.perf_counter() - start
    self.steps.append(step)
    print(f"{step['seconds']:7.1f} s  {_short(command)}\n          {step['checked']}",
          flush=True)

  def kill(self, command: str) -> list[tuple[int, str, str]]:
    """`kill -9 PID1  # ... once gs://BUCKET/.../checkpoints/N is committed`: waits for that
    commit and for a logged step after N (so the killed run logged steps the resumed one
    repeats), SIGKILLs process 1, then waits for process 0 to stop on its own."""
    from maxnucl import outputs, paths  # pylint: disable=import-outside-toplevel
    if len(self.background) != NUM_PROCESSES:
      raise ValueError(f"{command}: expected a multi-process command started with & before it")
    match = re.search(r"(gs://BUCKET\S*/checkpoints/(\d+))", command)
    if match is None:
      raise ValueError(f"{command}: expected '# ... once gs://BUCKET/.../checkpoints/N is "
                       "committed'")
    checkpoint = paths.as_path(self.fill(match.group(1)))
    workdir = checkpoint.parent.parent
    after = int(match.group(2))
    def ready() -> bool:
      fresh_listings()
      return outputs.is_committed(checkpoint) and max(_logged_steps(workdir), default=0) > after

    deadline = time.monotonic() + STEP_TIMEOUT_S
    while not ready():
      for i, p in enumerate(self.background):
        if p.poll() is not None:
          raise RuntimeError(f"process {i} ended (exit {p.returncode}) before it could be "
                             f"killed:\n{_printed(p)[1][-4000:]}")
      if time.monotonic() > deadline:
        raise RuntimeError(f"no committed {checkpoint} in {STEP_TIMEOUT_S} s")
      time.sleep(0.2)
    _kill(self.background[1])
    self.facts["logged_before_kill"] = _logged(workdir)
    killed = time.monotonic()
    outputs_ = _wait(self.background, command)
    self.facts["survivor_stopped_s"] = time.monotonic() - killed
    self.background = []
    return outputs_


def _wait(procs, command) -> list[tuple[int, str, str]]:
  """(exit status, stdout, stderr) of each process, once all have ended."""
  try:
    for p in procs:
      p.wait(timeout=STEP_TIMEOUT_S)
    return [(p.returncode, *_printed(p)) for p in procs]
  except subprocess.TimeoutExpired as error:
    raise RuntimeError(f"step ran over {STEP_TIMEOUT_S} s: {command}") from error
  finally:
    for p in procs:
      _kill(p)
      p.wait()


def _printed(process: subprocess.Popen) -> tuple[str, str]:
  """What a process started by `Rehearsal.start` wrote: (stdout, stderr)."""
  name = process.output_name
  return (pathlib.Path(f"{name}.out").read_text(errors="replace"),
          pathlib.Path(f"{name}.err").read_text(errors="replace"))


def _kill(process: subprocess.Popen) -> None:
  """SIGKILL to the process's group (bash and the program it runs)."""
  with contextlib.suppress(ProcessLookupError):
    os.killpg(process.pid, signal.SIGKILL)


def _short(command: str, width: int = 100) -> str:
  return command if len(command) <= width else command[:width - 3] + "..."


def _logged(workdir) -> list[dict]:
  """metrics.jsonl's rows ([] while it is missing or being rewritten)."""
  try:
    text = (workdir / "metrics.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]
  except (ValueError, FileNotFoundError):
    return []


def _logged_steps(workdir) -> list[int]:
  return [row["step"] for row in _logged(workdir)]


# ---- each step's effect ---------------------------------------------------------------------------

def fresh_listings() -> None:
  """Forgets gcsfs's cached listings in this process: another process wrote the bucket since
  (a listing cached while checkpoints/8 did not exist yet would hide it)."""
  try:
    import gcsfs  # pylint: disable=import-outside-toplevel
  except ImportError:  # tf.io.gfile caches nothing
    return
  for filesystem in list(gcsfs.GCSFileSystem._cache.values()):  # pylint: disable=protected-access
    filesystem.invalidate_cache()


def _fail(command: str, what: str):
  raise ValueError(f"pod rehearsal step `{_short(command)}`: {what}")


def _committed(command: str, url: str):
  from maxnucl import outputs, paths  # pylint: disable=import-outside-toplevel
  path = paths.as_path(url)
  if not outputs.is_committed(path):
    _fail(command, f"{url} is not committed (no {outputs.COMMIT_MARKER})")
  return path


def _committed_steps(workdir) -> list[int]:
  from maxnucl import outputs  # pylint: disable=import-outside-toplevel
  folder = workdir / "checkpoints"
  return sorted(int(p.name) for p in folder.iterdir()
                if p.name.isdigit() and outputs.is_committed(p)) if folder.exists() else []


def step_kind(command: str) -> str:
  """Which of the rehearsal's steps a command of the page is (ValueError if none)."""
  words = shlex.split(command, comments=True)
  if words[:1] == ["kill"]:
    return "kill"
  for kind, word in (("convert", "hf-to-maxnucl"), ("inspect", "inspect"),
                     ("train", "maxnucl.train"), ("prune", "tools/prune_checkpoint.py"),
                     ("evaluate", "maxnucl.evaluate"), ("export", "maxnucl-to-hf")):
    if word in words:
      return "start" if kind == "train" and command.endswith("&") else kind
  _fail(command, "no check for this command (benchmarks/pod_rehearsal.py step_kind)")


def check_step(rehearsal: Rehearsal, command: str, outputs: list) -> str:
  """Checks what `command` left in the bucket; a one-line summary of it."""
  fresh_listings()
  return CHECKS[step_kind(command)](rehearsal, command, outputs)


def _check_converted(rehearsal: Rehearsal, command: str, outputs: list) -> str:
  """The converted checkpoint is committed in the bucket, with the source's layers."""
  from maxnucl import checkpoints  # pylint: disable=import-outside-toplevel
  del outputs
  url = rehearsal.fill(_option(command, "--output"))
  _committed(command, url)
  cfg, source = checkpoints.load_config(url), rehearsal.source_cfg
  if (cfg.num_layers, cfg.ffn_dim) != (source.num_layers, source.ffn_dim):
    _fail(command, f"{url} holds {cfg.num_layers} layers of width {cfg.ffn_dim}; expected "
                   f"the source's {source.num_layers} of {source.ffn_dim}")
  rehearsal.facts["converted"] = url
  return f"{url}: committed, {cfg.num_layers} layers, FFN width {cfg.ffn_dim}"


def _check_inspected(rehearsal: Rehearsal, command: str, outputs: list) -> str:
  del rehearsal
  printed = outputs[0][1]
  if "ffn" not in printed.lower():
    _fail(command, f"printed no FFN widths:\n{printed[-2000:]}")
  return f"printed {len(printed.splitlines())} lines"


def _check_started(rehearsal: Rehearsal, command: str, outputs: list) -> str:
  del command, outputs
  return f"started on {len(rehearsal.background)} processes"


def _check_killed(rehearsal: Rehearsal, command: str, outputs: list) -> str:
  """Process 1 died of the SIGKILL; process 0 stopped with an error that says so; at least one
  checkpoint was committed before."""
  from maxnucl import paths  # pylint: disable=import-outside-toplevel
  facts = rehearsal.facts
  (code0, _, err0), (code1, _, _) = outputs
  facts["exits_at_kill"] = [code0, code1]
  if code1 != -signal.SIGKILL or code0 == 0:
    _fail(command, f"expected process 1 killed (-9) and process 0 failed; exits {code1}, "
                   f"{code0}")
  if not re.search(r"another task died|tasks are unhealthy|stopped sending heartbeats", err0):
    _fail(command, f"process 0 did not report its partner's death:\n{err0[-2000:]}")
  workdir = paths.as_path(rehearsal.fill(_option(rehearsal.train_command, "--workdir")))
  facts["committed_at_kill"] = _committed_steps(workdir)
  if not facts["committed_at_kill"]:
    _fail(command, f"no committed checkpoint in {workdir}")
  logged = [row["step"] for row in facts["logged_before_kill"]]
  return (f"process 1 killed after step {max(logged)} was logged (checkpoints "
          f"{facts['committed_at_kill']} committed); process 0 exited {code0} "
          f"{facts['survivor_stopped_s']:.1f} s later")


def _check_pruned(rehearsal: Rehearsal, command: str, outputs: list) -> str:
  """The pruned checkpoint is committed, each layer `--ratio` narrower than the input's."""
  from maxnucl import checkpoints  # pylint: disable=import-outside-toplevel
  del outputs
  url = rehearsal.fill(_option(command, "--output"))
  _committed(command, url)
  ratio = float(_option(command, "--ratio"))
  source = checkpoints.load_config(rehearsal.fill(_option(command, "--input")))
  widths = list(checkpoints.load_config(url).layer_ffn_widths)
  expected = [round(w * (1 - ratio)) for w in source.layer_ffn_widths]
  if widths != expected:
    _fail(command, f"{url}: FFN widths {widths}; expected {expected} ({ratio:.0%} of "
                   f"{list(source.layer_ffn_widths)} removed)")
  rehearsal.facts["pruned_widths"] = widths
  return f"{url}: committed, FFN widths {source.layer_ffn_widths[0]} -> {widths}"


def _check_evaluated(rehearsal: Rehearsal, command: str, outputs: list) -> str:
  """results.json is committed in the bucket with a finite NLL over some rows."""
  del outputs
  url = rehearsal.fill(_option(command, "--output"))
  results = json.loads((_committed(command, url) / "results.json").read_text())
  nll = results["metrics"].get("nll")
  if not (results["num_examples"] > 0 and nll is not None and math.isfinite(nll) and nll > 0):
    _fail(command, f"{url}/results.json: {results['num_examples']} examples, nll {nll}")
  rehearsal.facts["pruned_nll"] = nll
  return f"{url}/results.json: nll {nll:.4f} over {results['num_examples']} rows"


def _check_exported(rehearsal: Rehearsal, command: str, outputs: list) -> str:
  """The Hugging Face export is committed, with the pruned width and its safetensors."""
  del outputs
  url = rehearsal.fill(_option(command, "--output"))
  path = _committed(command, url)
  config = json.loads((path / "config.json").read_text())
  weights = sorted(p.name for p in path.iterdir() if p.name.endswith(".safetensors"))
  width = rehearsal.facts["pruned_widths"][0]
  if config.get("intermediate_size") != width or not weights:
    _fail(command, f"{url}: intermediate_size {config.get('intermediate_size')} (expected "
                   f"{width}), weights {weights}")
  return (f"{url}: config.json {config['architectures'][0]}, intermediate_size "
          f"{config['intermediate_size']}, {', '.join(weights)}")


def _check_resumed(rehearsal: Rehearsal, command: str, outputs: list) -> str:
  """The restart: resumed from the last checkpoint committed before the kill, every step
  logged once, the steps the killed run had logged after that checkpoint with the same losses
  (bit for bit: the same program on the same devices from an exact restore), and the in-loop
  benchmarks' results in the bucket."""
  from maxnucl import paths  # pylint: disable=import-outside-toplevel
  facts = rehearsal.facts
  workdir = paths.as_path(rehearsal.fill(_option(command, "--workdir")))
  resumed = max(facts["committed_at_kill"])
  if f"resumed from step {resumed} " not in outputs[0][1]:
    _fail(command, f"process 0 did not print 'resumed from step {resumed}':\n"
                   f"{outputs[0][1][-2000:]}")
  logged = _logged(workdir)
  steps = [row["step"] for row in logged]
  num_steps = rehearsal.num_steps
  if steps != list(range(1, num_steps + 1)):
    _fail(command, f"{workdir}/metrics.jsonl logs steps {steps}; expected 1..{num_steps} once")
  before = {row["step"]: row["loss"] for row in facts["logged_before_kill"]}
  after = {row["step"]: row["loss"] for row in logged}
  repeated = sorted(s for s in before if s > resumed)
  differ = {s: (before[s], after[s]) for s in before if before[s] != after[s]}
  if differ:
    _fail(command, f"losses differ from the killed run's at (step: (before, after)) {differ}")
  results = {}
  for bench in ("synthetic_arithmetic", "perplexity"):
    path = workdir / "eval" / bench / f"step_{num_steps}" / "results.json"
    if not path.exists():
      _fail(command, f"no {path} (train_loop.eval_tasks)")
    results[bench] = json.loads(path.read_text())["metrics"]
  last = logged[-1]
  if "perplexity/nll" not in last or not any(k.startswith("synthetic_arithmetic/") for k in last):
    _fail(command, f"metrics.jsonl's step {num_steps} has no in-loop benchmark metrics: "
                   f"{sorted(last)}")
  facts.update(resumed_from=resumed, losses=[after[s] for s in sorted(after)],
               repeated_steps=repeated, eval_metrics=results)
  return (f"resumed from step {resumed}; steps 1..{num_steps} logged once; steps {repeated} "
          f"equal the killed run's losses; in-loop eval at step {num_steps}: perplexity nll "
          f"{last['perplexity/nll']:.4f}")


CHECKS = {"convert": _check_converted, "inspect": _check_inspected, "start": _check_started,
          "kill": _check_killed, "train": _check_resumed, "prune": _check_pruned,
          "evaluate": _check_evaluated, "export": _check_exported}


def _num_steps(train_command: str) -> int:
  """train_loop.num_steps of the training command's gin files and bindings."""
  import gin  # pylint: disable=import-outside-toplevel
  from maxnucl import train  # pylint: disable=import-outside-toplevel
  words = shlex.split(train_command.rstrip(" &"), comments=True)
  files = [w.split("=", 1)[1] for w in words if w.startswith("--gin_file=")]
  bindings = [w.split("=", 1)[1] for w in words if w.startswith("--gin_param=")]
  gin.clear_config()
  try:
    train.parse_gin(files, bindings)
    return gin.query_parameter("train_loop.num_steps")
  finally:
    gin.clear_config()


def write_hf_source(folder: pathlib.Path):
  """HF_DIR: an untrained tiny Gemma-2 in Hugging Face's format (the stand-in for the
  downloaded Gemma-2 9B); its config."""
  import jax  # pylint: disable=import-outside-toplevel
  from maxnucl import checkpoints, models  # pylint: disable=import-outside-toplevel
  from maxnucl.conversion import convert  # pylint: disable=import-outside-toplevel
  cfg = models.get_config("gemma2_tiny")
  checkpoints.save(folder / "ckpt", cfg, models.init(cfg, jax.random.PRNGKey(0)))
  convert.maxnucl_to_hf(folder / "ckpt", folder / "hf")
  return folder / "hf", cfg


def rehearse(bucket: str, quick: bool, scratch: pathlib.Path) -> dict:
  """The page's commands against `bucket` (the clients already pointed at its server)."""
  commands = page_commands()
  hf_dir, cfg = write_hf_source(scratch)
  (scratch / "logs").mkdir()
  rehearsal = Rehearsal(bucket, hf_dir, dict(os.environ), scratch / "logs")
  rehearsal.source_cfg = cfg
  rehearsal.train_command = next(c for c in commands if "maxnucl.train" in c)
  rehearsal.num_steps = _num_steps(rehearsal.train_command)
  try:
    for command in commands:
      rehearsal.run(command)
  finally:  # a step that failed while a `&` run was going: no process left behind
    for process in rehearsal.background:
      _kill(process)
      process.wait()
  report = {"bucket": bucket, "steps": rehearsal.steps, "facts": rehearsal.facts}
  if not quick:
    report["uninterrupted"] = _uninterrupted(rehearsal)
  return report


def _uninterrupted(rehearsal: Rehearsal) -> dict:
  """The training command once more, never killed, in another workdir of the bucket: its
  losses must equal the resumed run's at every step."""
  from maxnucl import paths  # pylint: disable=import-outside-toplevel
  workdir = _option(rehearsal.train_command, "--workdir")
  command = rehearsal.train_command.rstrip(" &").replace(f"--workdir={workdir}",
                                                          f"--workdir={workdir}_uninterrupted")
  start = time.perf_counter()
  outputs = _wait(rehearsal.start(command), command)
  if any(code for code, _, _ in outputs):
    raise RuntimeError(f"the uninterrupted run failed:\n{outputs[0][2][-4000:]}")
  fresh_listings()
  losses = [row["loss"] for row in _logged(paths.as_path(
      rehearsal.fill(f"{workdir}_uninterrupted")))]
  if losses != rehearsal.facts["losses"]:
    raise ValueError(f"the resumed run's losses {rehearsal.facts['losses']} differ from an "
                     f"uninterrupted run's {losses}")
  seconds = time.perf_counter() - start
  print(f"{seconds:7.1f} s  the same training, never killed: the same {len(losses)} losses",
        flush=True)
  return {"seconds": seconds, "losses": losses}


@contextlib.contextmanager
def _emulated_bucket(bucket: str | None):
  """`bucket` as given (the caller's clients reach it), or a new one on an emulator started
  here (tests/gcs_emulator.py) with the clients pointed at it."""
  if bucket:
    yield bucket
    return
  import gcs_emulator  # pylint: disable=import-outside-toplevel
  server = gcs_emulator.start()
  try:
    with server.clients():
      yield server.new_bucket()
  finally:
    server.stop()


def _bucket_url(text: str) -> str:
  if not re.fullmatch(r"gs://[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]", text):
    raise argparse.ArgumentTypeError(f"{text!r}: expected gs://NAME, a bucket (no path)")
  return text


def step_label(command: str) -> str:
  """The program a command runs, e.g. `convert_checkpoint.py hf-to-maxnucl`, `maxnucl.train &`."""
  words = shlex.split(command, comments=True)
  if words[:1] == ["kill"]:
    return "kill -9 process 1; process 0 stops"
  words = words[words.index("python") + 1:]
  name = words[1] if words[0] == "-m" else pathlib.Path(words[0]).name
  rest = words[2:] if words[0] == "-m" else words[1:]
  if rest and not rest[0].startswith("-"):
    name += " " + rest[0]
  return name + (" &" if command.endswith("&") else "")


def print_table(report: dict) -> None:
  rows = [(step_label(s["command"]), s["processes"], s["seconds"]) for s in report["steps"]]
  if "uninterrupted" in report:
    rows.append(("maxnucl.train, never killed", NUM_PROCESSES,
                 report["uninterrupted"]["seconds"]))
  rows.append(("total (with the emulator and HF_DIR)", "", report["total_seconds"]))
  print(f"\n{'step':<40} {'processes':>9} {'seconds':>8}")
  for label, processes, seconds in rows:
    print(f"{label:<40} {processes:>9} {seconds:>8.1f}")


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true",
                      help="skip the uninterrupted training run that the resumed losses are "
                           "compared with at every step (the steps the killed run logged are "
                           "still compared)")
  parser.add_argument("--bucket", type=_bucket_url, default=None,
                      help="an existing, empty bucket to use (default: a new one on an emulator "
                           "started here)")
  parser.add_argument("--json", type=arguments.output_file, default=None,
                      help="also write the figures to this file")
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  start = time.perf_counter()
  with _emulated_bucket(args.bucket) as bucket, tempfile.TemporaryDirectory() as scratch:
    report = rehearse(bucket, args.quick, pathlib.Path(scratch))
  report.update(machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
                total_seconds=time.perf_counter() - start, quick=args.quick)
  print_table(report)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(report, indent=2))
  return report


if __name__ == "__main__":
  main()
