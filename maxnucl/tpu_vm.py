"""Run maxnucl on a Cloud TPU VM slice: create it, install this checkout, train, watch, delete.

    maxnucl-tpu-vm create --name nucl --zone us-west4-a --project P --accelerator_type v5litepod-16
    maxnucl-tpu-vm setup  --name nucl --zone us-west4-a --project P
    maxnucl-tpu-vm train  --name nucl --zone us-west4-a --project P --detach -- \\
        --gin_file=gin/gemma2_9b_gsm8k.gin --workdir=gs://BUCKET/runs/9b_gsm8k ...
    maxnucl-tpu-vm logs   --name nucl ...   [--worker 0] [--follow]
    maxnucl-tpu-vm status --name nucl ...
    maxnucl-tpu-vm delete --name nucl ...

(`python tools/tpu_vm.py` is the same command.)  Every step is one or more `gcloud compute tpus`
calls, run as argument lists (never through a local shell); `--dry_run` prints them instead, one
per line, so they can be read, copied or run by hand.  The workflow:

  create   a TPU VM (`tpu-vm create`), or with --queued a queued resource whose node has the same
           name (`queued-resources create`), on demand, --spot or --reserved.
  setup    packs this checkout (the files git knows, without .git, .venv and caches) into a
           tarball, copies it to every worker (`tpu-vm scp --worker=all`) and there unpacks it to
           ~/maxnucl and installs it into the virtual environment ~/maxnucl_venv together with
           the jax[tpu] of the version requirements.txt pins (`tpu-vm ssh --worker=all`).
  train    starts `python -m maxnucl.train ARGS` on every worker at once, ARGS being everything
           after `--` (a flag of train itself there, such as --dry_run, is refused: it goes
           before `--`); its output goes to ~/maxnucl_logs/train.log on each worker (and, without
           --detach, to this terminal).  On a Cloud TPU VM the trainer needs no multi-process
           flags: JAX discovers the slice's workers itself (maxnucl/distributed.py).
  run      the same for any other program of the checkout (`-- -m maxnucl.evaluate ...`,
           `-- tools/prune_checkpoint.py ...`), logged to ~/maxnucl_logs/<name>.log.
  logs     the tail of that log on every worker (--worker 0 for one), each line prefixed with
           the worker's host name.
  stop     ends the programs that `train`/`run` started (SIGTERM), on every worker.
  status   `describe` of the TPU VM or queued resource.
  delete   deletes it (without asking: the billing stops when the slice is gone).

The remote command given to `gcloud ... ssh --command=` is read by the worker's shell, so every
piece that comes from the user (the trainer's arguments, gin bindings with spaces or quotes,
paths) is quoted with `shlex.quote` into one literal word.

--zone and --project fall back to CLOUDSDK_COMPUTE_ZONE and CLOUDSDK_CORE_PROJECT (the variables
gcloud itself reads).  Errors in the command line exit with 2; a failing gcloud call with 1,
naming the call.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pathlib
import re
import shlex
import subprocess
import sys
import tarfile
import tempfile
from typing import Iterator, Optional, Sequence

GCLOUD = "gcloud"
ZONE_ENV = "CLOUDSDK_COMPUTE_ZONE"
PROJECT_ENV = "CLOUDSDK_CORE_PROJECT"
LIBTPU_RELEASES = "https://storage.googleapis.com/jax-releases/libtpu_releases.html"

# Paths on the workers, relative to the home directory.
REMOTE_DIR = "maxnucl"
REMOTE_VENV = "maxnucl_venv"
REMOTE_LOG_DIR = "maxnucl_logs"
REMOTE_TARBALL = "maxnucl-src.tar.gz"
DEFAULT_PYTHON = "python3.11"  # maxnucl needs Python >= 3.11; the TPU images ship 3.10

# Never copied to the workers, whatever git says.
EXCLUDED_PARTS = frozenset({".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".mypy_cache",
                            "build", "dist", "workdir", "runs"})


class UsageError(ValueError):
  """A command line that cannot be run (exit status 2); the message names the flag."""


class GcloudError(RuntimeError):
  """A gcloud call that failed or could not be started (exit status 1)."""


# ---- TPU generations and accelerator types -----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  """One TPU generation as `--accelerator-type` spells it: PREFIX-N, N counting `unit`."""
  name: str  # v5e
  prefix: str  # v5litepod
  unit: str  # "chips" or "TensorCores" (v4 and v5p count two per chip)
  cores_per_chip: int
  sizes: Optional[tuple[int, ...]]  # the allowed N, or None: any multiple of `multiple` <= `max_n`
  multiple: int
  max_n: int
  chips_per_host: int  # of a multi-host slice
  single_host_chips: int  # slices up to this many chips are one host
  runtime_version: str  # default --runtime_version (the TPU software image)
  hbm_gib: float  # per chip
  peak_bf16_flops: float  # dense, per chip (as maxnucl/flops.py; kept here: no jax import)

  def describe_sizes(self) -> str:
    if self.sizes:
      return f"{self.prefix}-N, N {self.unit} in {{{', '.join(map(str, self.sizes))}}}"
    return (f"{self.prefix}-N, N {self.unit}: a multiple of {self.multiple} up to "
            f"{self.max_n}")


GENERATIONS = {g.name: g for g in (
    TpuGeneration(name="v4", prefix="v4", unit="TensorCores", cores_per_chip=2, sizes=None,
                  multiple=8, max_n=4096, chips_per_host=4, single_host_chips=4,
                  runtime_version="tpu-ubuntu2204-base", hbm_gib=32.0, peak_bf16_flops=275e12),
    TpuGeneration(name="v5e", prefix="v5litepod", unit="chips", cores_per_chip=1,
                  sizes=(1, 4, 8, 16, 32, 64, 128, 256), multiple=1, max_n=256,
                  chips_per_host=4, single_host_chips=8, runtime_version="v2-alpha-tpuv5-lite",
                  hbm_gib=16.0, peak_bf16_flops=197e12),
    TpuGeneration(name="v5p", prefix="v5p", unit="TensorCores", cores_per_chip=2, sizes=None,
                  multiple=8, max_n=12288, chips_per_host=4, single_host_chips=4,
                  runtime_version="v2-alpha-tpuv5", hbm_gib=95.0, peak_bf16_flops=459e12),
    TpuGeneration(name="v6e", prefix="v6e", unit="chips", cores_per_chip=1,
                  sizes=(1, 4, 8, 16, 32, 64, 128, 256), multiple=1, max_n=256,
                  chips_per_host=4, single_host_chips=8, runtime_version="v2-alpha-tpuv6e",
                  hbm_gib=32.0, peak_bf16_flops=918e12),
)}


@dataclasses.dataclass(frozen=True)
class AcceleratorType:
  """A parsed `--accelerator_type`, e.g. v5litepod-16: 16 chips on 4 hosts."""
  text: str
  generation: TpuGeneration
  chips: int

  @property
  def hosts(self) -> int:
    g = self.generation
    return 1 if self.chips <= g.single_host_chips else self.chips // g.chips_per_host


def known_accelerator_types() -> str:
  return "; ".join(g.describe_sizes() for g in GENERATIONS.values())


def parse_accelerator_type(text: str) -> AcceleratorType:
  """`v5litepod-16` -> AcceleratorType(v5e, 16 chips); UsageError naming the known forms."""
  match = re.fullmatch(r"([a-z0-9]+)-([1-9][0-9]*)", text, flags=re.ASCII)  # as gcloud spells N
  by_prefix = {g.prefix: g for g in GENERATIONS.values()}
  if match and match.group(1) in by_prefix:
    generation, n = by_prefix[match.group(1)], int(match.group(2))
    valid = (n in generation.sizes if generation.sizes
             else n > 0 and n % generation.multiple == 0 and n <= generation.max_n)
    if valid:
      return AcceleratorType(text, generation, n // generation.cores_per_chip)
  hint = ""
  if match and match.group(1) in GENERATIONS and match.group(1) not in by_prefix:
    hint = (f" (gcloud spells {match.group(1)} as "
            f"{GENERATIONS[match.group(1)].prefix}-{match.group(2)})")
  raise UsageError(f"--accelerator_type {text!r} is not a known TPU slice{hint}; known forms: "
                   f"{known_accelerator_types()}")


# ---- where: name, zone, project ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  zone: str
  project: str

  @property
  def location(self) -> list[str]:
    return [f"--zone={self.zone}", f"--project={self.project}"]


# gcloud's formats (re.ASCII: \d is 0-9 only).  A zone is REGION-LETTER, the region a continent,
# a direction and a number (us-central2-b, northamerica-northeast1-a); a project ID 6 to 30
# lowercase letters, digits and hyphens, starting with a letter and not ending with a hyphen
# (a legacy domain-scoped one prefixed with `domain:`); a TPU name up to 63 of the same; a
# runtime version lowercase letters, digits, dots and hyphens (tpu-vm-tf-2.16.1-pjrt).
ZONE_FORMAT = re.compile(r"[a-z]+(-[a-z]+)+[0-9]+-[a-z]", re.ASCII)
REGION_FORMAT = re.compile(r"[a-z]+(-[a-z]+)+[0-9]+", re.ASCII)
PROJECT_FORMAT = re.compile(r"([a-z0-9][-a-z0-9.]*[a-z0-9]:)?[a-z][-a-z0-9]{4,28}[a-z0-9]",
                            re.ASCII)
NAME_FORMAT = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", re.ASCII)
RUNTIME_VERSION_FORMAT = re.compile(r"[a-z0-9]([-a-z0-9._]{0,126}[a-z0-9])?", re.ASCII)


def check_zone(zone: str, source: str = "--zone") -> str:
  if not ZONE_FORMAT.fullmatch(zone):
    hint = (f" ({zone} is a region: add the zone's letter, e.g. {zone}-a)"
            if REGION_FORMAT.fullmatch(zone) else "")
    raise UsageError(f"{source} {zone!r}: expected a Cloud zone such as us-central2-b or "
                     f"europe-west4-a (lowercase letters, digits and hyphens){hint}")
  return zone


def check_project(project: str, source: str = "--project") -> str:
  if not PROJECT_FORMAT.fullmatch(project):
    raise UsageError(f"{source} {project!r}: expected a Cloud project ID: 6 to 30 lowercase "
                     f"letters, digits and hyphens, starting with a letter, not ending with a "
                     f"hyphen (e.g. my-project-123)")
  return project


def check_runtime_version(version: str) -> str:
  if not RUNTIME_VERSION_FORMAT.fullmatch(version):
    raise UsageError(f"--runtime_version {version!r}: expected a TPU software version of "
                     f"lowercase letters, digits, dots and hyphens, e.g. tpu-ubuntu2204-base "
                     f"(leave the flag out for the generation's default)")
  return version


def resolve_target(name: str, zone: Optional[str], project: Optional[str],
                   environ: Optional[dict] = None) -> Target:
  """The flags, else CLOUDSDK_COMPUTE_ZONE / CLOUDSDK_CORE_PROJECT; UsageError if neither, or
  if a value is not in gcloud's format (the message names the flag or the variable)."""
  environ = os.environ if environ is None else environ
  if not NAME_FORMAT.fullmatch(name):
    raise UsageError(f"--name {name!r}: expected a TPU name of lowercase letters, digits and "
                     f"hyphens, starting with a letter (at most 63 characters)")
  if zone is not None:
    check_zone(zone)
  elif environ.get(ZONE_ENV):
    zone = check_zone(environ[ZONE_ENV], ZONE_ENV)
  else:
    raise UsageError(f"no zone: pass --zone (e.g. --zone=us-west4-a) or set {ZONE_ENV}")
  if project is not None:
    check_project(project)
  elif environ.get(PROJECT_ENV):
    project = check_project(environ[PROJECT_ENV], PROJECT_ENV)
  else:
    raise UsageError(f"no project: pass --project or set {PROJECT_ENV}")
  return Target(name, zone, project)


# ---- the gcloud calls --------------------------------------------------------------------------

TPU_VM = [GCLOUD, "compute", "tpus", "tpu-vm"]
QUEUED = [GCLOUD, "compute", "tpus", "queued-resources"]


def create_commands(target: Target, accelerator: AcceleratorType, runtime_version: str, *,
                    queued: bool = False, provisioning: Optional[str] = None) -> list[list[str]]:
  """provisioning: None (on demand), "spot" or "reserved"."""
  extra = [f"--{provisioning}"] if provisioning else []
  if queued:
    return [[*QUEUED, "create", target.name, f"--node-id={target.name}", *target.location,
             f"--accelerator-type={accelerator.text}", f"--runtime-version={runtime_version}",
             *extra]]
  return [[*TPU_VM, "create", target.name, *target.location,
           f"--accelerator-type={accelerator.text}", f"--version={runtime_version}", *extra]]


def status_commands(target: Target, *, queued: bool = False) -> list[list[str]]:
  return [[*(QUEUED if queued else TPU_VM), "describe", target.name, *target.location]]


def delete_commands(target: Target, *, queued: bool = False) -> list[list[str]]:
  """--quiet: no prompt.  A queued resource is deleted with --force, its TPU VM first."""
  if queued:
    return [[*QUEUED, "delete", target.name, *target.location, "--force", "--quiet"]]
  return [[*TPU_VM, "delete", target.name, *target.location, "--quiet"]]


def ssh_command(target: Target, command: str, worker: str = "all") -> list[str]:
  return [*TPU_VM, "ssh", target.name, *target.location, f"--worker={worker}",
          f"--command={command}"]


def scp_command(target: Target, local: str, remote: str, worker: str = "all") -> list[str]:
  return [*TPU_VM, "scp", local, f"{target.name}:{remote}", *target.location,
          f"--worker={worker}"]


# ---- the remote commands (read by each worker's shell: every user value is quoted) -------------

def _home(path: str) -> str:
  """A path relative to the worker's home directory, as a shell word."""
  return '"$HOME"/' + shlex.quote(path)


def _check_relative(flag: str, path: str) -> str:
  parts = pathlib.PurePosixPath(path).parts
  if not path or path.startswith(("/", "~")) or not parts or any(p in ("..", ".") for p in parts):
    raise UsageError(f"{flag} {path!r}: expected a directory relative to the workers' home "
                     f"directory, e.g. {REMOTE_DIR}")
  return path


def setup_remote_command(jax_version: str, *, python: str = DEFAULT_PYTHON,
                         remote_dir: str = REMOTE_DIR, venv: str = REMOTE_VENV,
                         extras: Sequence[str] = ()) -> str:
  """Unpack the copied tarball into `remote_dir` (replacing an older copy) and install it with
  jax[tpu]==jax_version into `venv`; installs `python` with apt when the image lacks it."""
  q = shlex.quote
  new = remote_dir.rstrip("/") + ".new"
  package = "./" + remote_dir + (f"[{','.join(extras)}]" if extras else "")
  pip = f"{_home(venv + '/bin/python')} -m pip install -q"
  steps = [
      "set -e",  # every step below must succeed
      'cd "$HOME"',
      f"command -v {q(python)} >/dev/null 2>&1 || {{ sudo apt-get update -qq && "
      f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {q(python)} "
      f"{q(python + '-venv')}; }}",
      f"rm -rf {q(new)}",
      f"mkdir -p {q(new)}",
      f"tar -xzf {q(REMOTE_TARBALL)} -C {q(new)}",
      f"rm -f {q(REMOTE_TARBALL)}",
      f"rm -rf {q(remote_dir)}",
      f"mv {q(new)} {q(remote_dir)}",
      f"test -x {q(venv + '/bin/python')} || {q(python)} -m venv {q(venv)}",
      f"{pip} --upgrade pip",
      f"{pip} -e {q(package)} {q(f'jax[tpu]=={jax_version}')} -f {q(LIBTPU_RELEASES)}",
      f"{_home(venv + '/bin/python')} -c "
      + q('import socket, jax, maxnucl; print(socket.gethostname(), "maxnucl", '
          'maxnucl.__version__, "jax", jax.__version__)'),
  ]
  return "; ".join(steps)


def _environment(env: Sequence[str]) -> list[str]:
  for item in env:
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", item, flags=re.DOTALL):
      raise UsageError(f"--env {item!r}: expected NAME=VALUE, e.g. MAXNUCL_DATA_DIR=data")
  return list(env)


def log_path(log: str) -> str:
  """The log of `train`/`run --log NAME` on each worker, relative to the home directory."""
  if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", log):
    raise UsageError(f"--log {log!r}: expected a name of letters, digits, '.', '_' and '-', "
                     f"e.g. train")
  return f"{REMOTE_LOG_DIR}/{log}.log"


def run_remote_command(python_args: Sequence[str], log: str, *, detach: bool = False,
                       env: Sequence[str] = (), remote_dir: str = REMOTE_DIR,
                       venv: str = REMOTE_VENV) -> str:
  """`cd ~/maxnucl && [env K=V ...] ~/maxnucl_venv/bin/python ARGS`, its output in the log.

  Attached, the output is also shown here (tee; with pipefail the exit status is the
  program's).  Detached: nohup, in the background, stdin/stdout/stderr redirected so that the
  ssh session returns at once.
  """
  q = shlex.quote
  env_words = f"env {shlex.join(_environment(env))} " if env else ""
  program = f"{env_words}{_home(venv + '/bin/python')} {shlex.join(python_args)}"
  log_file = _home(log_path(log))
  prefix = f'cd "$HOME" && mkdir -p {q(REMOTE_LOG_DIR)} && cd {q(remote_dir)}'
  if detach:
    return (f"{prefix} && {{ nohup {program} > {log_file} 2>&1 < /dev/null & }} && "
            f"echo \"$(hostname): started, log ~/{log_path(log)}\"")
  return f"set -o pipefail; {prefix} && {program} 2>&1 | tee {log_file}"


def logs_remote_command(log: str, *, lines: int = 50, follow: bool = False) -> str:
  """The last `lines` lines of the log (then new ones with `follow`), each prefixed with the
  worker's host name."""
  path = _home(log_path(log))
  tail = f"tail -n {int(lines)}" + (" -F" if follow else "")
  return (f"test -f {path} || {{ echo \"$(hostname): no log ~/{log_path(log)}\"; exit 1; }}; "
          f"{tail} {path} | sed -u \"s/^/$(hostname): /\"")


def stop_remote_command(venv: str = REMOTE_VENV) -> str:
  """SIGTERM to every program of the virtual environment.  The pattern's first character is a
  bracket expression, so that it does not match this command's own shell."""
  program = f"{venv}/bin/python"
  pattern = f"[{program[0]}]{re.escape(program[1:])}"
  return (f"if pkill -TERM -f {shlex.quote(pattern)}; then echo \"$(hostname): stopped\"; "
          f"else echo \"$(hostname): nothing running\"; fi")


# ---- setup: the checkout as a tarball ----------------------------------------------------------

def repository_root() -> pathlib.Path:
  """The checkout this module belongs to (the directory above the package)."""
  return pathlib.Path(__file__).resolve().parent.parent


def source_files(source: pathlib.Path) -> list[str]:
  """The files of the checkout to copy, relative to it: what git tracks or would track (not
  ignored), that exist, without .git, virtual environments, caches and build outputs."""
  if not (source / "setup.py").is_file():
    raise UsageError(f"--source {source}: not a maxnucl checkout (no setup.py); pass the "
                     f"directory of a clone of this repository")
  if (source / ".git").exists():
    try:
      listed = subprocess.run(["git", "-C", str(source), "ls-files", "-z", "--cached", "--others",
                               "--exclude-standard"], capture_output=True, check=True).stdout
      names = [n for n in listed.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError) as error:
      raise GcloudError(f"could not list the files of {source} with git: {error}") from None
  else:
    names = [str(p.relative_to(source)) for p in source.rglob("*") if p.is_file()]

  def wanted(name: str) -> bool:
    parts = pathlib.PurePosixPath(name).parts
    return (not set(parts) & EXCLUDED_PARTS and not any(p.endswith(".egg-info") for p in parts)
            and not name.endswith(".pyc") and (source / name).is_file())
  return sorted(n for n in names if wanted(n))


def pack(source: pathlib.Path, names: Sequence[str], tarball: pathlib.Path) -> int:
  """Write `names` (relative to `source`) into a gzipped tarball; its size in bytes."""
  with tarfile.open(tarball, "w:gz") as archive:
    for name in names:
      archive.add(source / name, arcname=name, recursive=False)
  return tarball.stat().st_size


def pinned_jax_version(source: pathlib.Path) -> str:
  """The `jax==X` of the checkout's requirements.txt: the workers get jax[tpu]==X."""
  requirements = source / "requirements.txt"
  try:
    text = requirements.read_text()
  except OSError as error:
    raise UsageError(f"--source {source}: cannot read requirements.txt ({error})") from None
  match = re.search(r"^jax==([^\s#;]+)", text, flags=re.MULTILINE)
  if not match:
    raise UsageError(f"{requirements}: no `jax==VERSION` line; the workers' jax[tpu] must "
                     f"match the pinned jax")
  return match.group(1)


# ---- running -----------------------------------------------------------------------------------

def execute(commands: Sequence[Sequence[str]], dry_run: bool = False) -> None:
  """Run each gcloud call in turn (no shell), stopping at the first failure; with `dry_run`
  print them, one per line, instead."""
  for argv in commands:
    line = shlex.join(argv)
    if dry_run:
      print(line, flush=True)
      continue
    print(f"+ {line}", file=sys.stderr, flush=True)
    try:
      status = subprocess.run(list(argv), check=False).returncode
    except FileNotFoundError:
      raise GcloudError(f"{argv[0]} not found on PATH: install the Google Cloud CLI "
                        f"(https://cloud.google.com/sdk/docs/install) and run `gcloud auth "
                        f"login`") from None
    if status != 0:
      raise GcloudError(f"gcloud failed with exit status {status}: {line}")


@contextlib.contextmanager
def _tarball_dir(dry_run: bool) -> Iterator[pathlib.Path]:
  if dry_run:
    yield pathlib.Path(".")
  else:
    with tempfile.TemporaryDirectory(prefix="maxnucl-setup-") as directory:
      yield pathlib.Path(directory)


def setup(target: Target, args: argparse.Namespace) -> None:
  remote_dir = _check_relative("--remote_dir", args.remote_dir)
  venv = _check_relative("--venv", args.venv)
  if not re.fullmatch(r"[A-Za-z0-9/][-A-Za-z0-9._+/]*", args.python, flags=re.ASCII):
    raise UsageError(f"--python {args.python!r}: expected an interpreter's name or path, e.g. "
                     f"{DEFAULT_PYTHON}")
  extras = args.extras.split(",") if args.extras else []
  for extra in extras:
    if not re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9._]*[A-Za-z0-9])?", extra, flags=re.ASCII):
      raise UsageError(f"--extras {args.extras!r}: expected a comma list of the package's extras, "
                       f"e.g. eval")
  source = pathlib.Path(args.source).resolve()
  names = source_files(source)
  jax_version = pinned_jax_version(source)
  with _tarball_dir(args.dry_run) as directory:
    tarball = directory / REMOTE_TARBALL
    if args.dry_run:
      print(f"dry run: would pack {len(names)} files of {source} into {tarball}",
            file=sys.stderr)
    else:
      size = pack(source, names, tarball)
      print(f"packed {len(names)} files of {source} ({size / 1e6:.1f} MB)", file=sys.stderr)
    execute([scp_command(target, str(tarball), REMOTE_TARBALL),
             ssh_command(target, setup_remote_command(jax_version, python=args.python,
                                                      remote_dir=remote_dir, venv=venv,
                                                      extras=extras))], args.dry_run)


def _default_log(python_args: Sequence[str]) -> str:
  """The log name of `run`: `-m maxnucl.evaluate ...` -> maxnucl.evaluate,
  `tools/prune_checkpoint.py ...` -> prune_checkpoint."""
  if python_args[:1] == ["-m"] and len(python_args) > 1:
    return python_args[1]
  return pathlib.PurePosixPath(python_args[0]).stem if python_args else "run"


def _warn_about_workdir(trainer_args: Sequence[str]) -> None:
  workdir = None
  for i, arg in enumerate(trainer_args):
    if arg.startswith("--workdir="):
      workdir = arg.split("=", 1)[1]
    elif arg == "--workdir" and i + 1 < len(trainer_args):
      workdir = trainer_args[i + 1]
  if workdir is None or not workdir.startswith("gs://"):
    print(f"note: the workdir is {workdir or 'the gin default'}, not a gs:// URL: on a "
          f"multi-host slice every worker must write to the same workdir (a bucket)",
          file=sys.stderr)


# ---- command line ------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
  summary, notes = __doc__.split("\n\n", 1)
  parser = argparse.ArgumentParser(description=summary, epilog=notes,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  common = argparse.ArgumentParser(add_help=False)
  where = common.add_argument_group("where")
  where.add_argument("--name", required=True, help="the TPU VM (and queued resource) name")
  where.add_argument("--zone", default=None,
                     help=f"e.g. us-west4-a (default: ${ZONE_ENV})")
  where.add_argument("--project", default=None, help=f"(default: ${PROJECT_ENV})")
  where.add_argument("--dry_run", action="store_true",
                     help="print the gcloud calls, one per line, instead of running them")
  commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

  def command(name, help_text, **kwargs):
    return commands.add_parser(name, parents=[common], help=help_text, description=help_text,
                               **kwargs)

  create = command("create", "create a TPU VM slice (or, with --queued, a queued resource)")
  create.add_argument("--accelerator_type", required=True,
                      help=f"the slice, e.g. v5litepod-16; known forms: "
                           f"{known_accelerator_types()}")
  create.add_argument("--runtime_version", default=None,
                      help="TPU software image (default per generation: " + ", ".join(
                          f"{g.name} {g.runtime_version}" for g in GENERATIONS.values()) + ")")
  create.add_argument("--queued", action="store_true",
                      help="request a queued resource (waits for capacity) instead of failing "
                           "when none is free")
  pricing = create.add_mutually_exclusive_group()
  pricing.add_argument("--spot", action="store_true",
                       help="Spot capacity: much cheaper, may be preempted at any time")
  pricing.add_argument("--reserved", action="store_true", help="use the project's reservation")

  setup_cmd = command("setup", "copy this checkout to every worker and install it with jax[tpu]")
  setup_cmd.add_argument("--source", default=str(repository_root()),
                         help="the checkout to copy (default: %(default)s)")
  setup_cmd.add_argument("--python", default=DEFAULT_PYTHON,
                         help="interpreter of the workers' virtual environment, installed with "
                              "apt when missing (default: %(default)s)")
  setup_cmd.add_argument("--extras", default="",
                         help="extras of the package to install, e.g. eval")
  setup_cmd.add_argument("--remote_dir", default=REMOTE_DIR,
                         help="where the checkout goes, relative to the workers' home "
                              "(default: %(default)s)")
  setup_cmd.add_argument("--venv", default=REMOTE_VENV,
                         help="the workers' virtual environment, relative to their home "
                              "(default: %(default)s)")

  train = command("train", "start `python -m maxnucl.train ARGS` on every worker "
                  "(ARGS: everything after --)",
                  usage="%(prog)s --name NAME [--zone Z] [--project P] [--detach] -- "
                        "--gin_file=... --workdir=gs://... [--gin_param=...]")
  run = command("run", "start `python ARGS` in the checkout on every worker (ARGS: everything "
                "after --, e.g. -m maxnucl.evaluate ... or tools/prune_checkpoint.py ...)",
                usage="%(prog)s --name NAME [...] [--log NAME] -- -m MODULE ARGS")
  for cmd in (train, run):
    cmd.add_argument("--detach", action="store_true",
                     help="start in the background (nohup) and return; watch with `logs`")
    cmd.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                     help="environment variable for the program (repeatable), e.g. "
                          "MAXNUCL_DATA_DIR=data")
    cmd.add_argument("--log", default=None,
                     help=f"log name: ~/{REMOTE_LOG_DIR}/<log>.log on each worker (default: "
                          f"train, or the module/script name for run)")
    cmd.add_argument("--remote_dir", default=REMOTE_DIR, help="the checkout on the workers")
    cmd.add_argument("--venv", default=REMOTE_VENV, help="the virtual environment on the workers")

  logs = command("logs", "show the end of the train/run log of every worker")
  logs.add_argument("--log", default="train", help="log name (default: %(default)s)")
  logs.add_argument("--lines", type=int, default=50, help="(default: %(default)s)")
  logs.add_argument("--follow", action="store_true", help="keep printing new lines (Ctrl-C ends)")

  stop = command("stop", "stop (SIGTERM) what train/run started, on every worker")
  stop.add_argument("--venv", default=REMOTE_VENV, help="the virtual environment on the workers")

  for cmd in (run, logs, stop):
    cmd.add_argument("--worker", default="all",
                     help="all, one index (0 is process 0) or a list such as 0,2 or 1-3 "
                          "(default: %(default)s; a JAX program on the TPUs of a multi-host "
                          "slice runs on all)")
  for cmd in (train, run):
    # What `_refuse_launcher_flags` looks for after --: every flag of the command but --help.
    # (argparse lists a parser's flags only in its private _actions.)
    cmd.set_defaults(launcher_flags=frozenset(
        flag for action in cmd._actions  # pylint: disable=protected-access
        for flag in action.option_strings if flag not in ("-h", "--help")))

  status = command("status", "describe the TPU VM (or, with --queued, the queued resource)")
  delete = command("delete", "delete the TPU VM (or, with --queued, the queued resource and "
                   "its TPU VM), without asking")
  for cmd in (status, delete):
    cmd.add_argument("--queued", action="store_true", help="it was created with --queued")
  return parser


def _worker(text: str) -> str:
  if not re.fullmatch(r"all|\d+(-\d+)?(,\d+(-\d+)?)*", text):
    raise UsageError(f"--worker {text!r}: expected all, an index such as 0, or a list such as "
                     f"0,2 or 1-3")
  return text


def _refuse_launcher_flags(args: argparse.Namespace, python_args: Sequence[str]) -> None:
  """A flag of train/run itself after -- would reach the program on the workers, and the
  launcher would go ahead without it (`-- ... --dry_run` really running gcloud)."""
  for arg in python_args:
    flag = arg.split("=", 1)[0]
    if flag in args.launcher_flags:
      raise UsageError(f"{flag} after --: it is a flag of `{args.command}` itself, and everything "
                       f"after -- goes to the program on the workers; put it before --")


def commands_for(args: argparse.Namespace, target: Target,
                 python_args: Sequence[str]) -> list[list[str]]:
  """The gcloud calls of every command but setup."""
  if args.command == "create":
    accelerator = parse_accelerator_type(args.accelerator_type)
    runtime = (accelerator.generation.runtime_version if args.runtime_version is None
               else check_runtime_version(args.runtime_version))
    provisioning = "spot" if args.spot else "reserved" if args.reserved else None
    return create_commands(target, accelerator, runtime, queued=args.queued,
                           provisioning=provisioning)
  if args.command in ("train", "run"):
    remote_dir = _check_relative("--remote_dir", args.remote_dir)
    venv = _check_relative("--venv", args.venv)
    if args.command == "train":
      if not python_args:
        raise UsageError("train: the trainer's flags go after --, e.g. -- "
                         "--gin_file=gin/gemma2_9b_gsm8k.gin --workdir=gs://BUCKET/runs/9b")
      _warn_about_workdir(python_args)
      python_args, log = ["-m", "maxnucl.train", *python_args], args.log or "train"
    else:
      if not python_args:
        raise UsageError("run: the program goes after --, e.g. -- -m maxnucl.evaluate "
                         "--gin_file=gin/eval/gsm8k.gin ...")
      log = args.log or _default_log(python_args)
    worker = _worker(args.worker) if args.command == "run" else "all"
    return [ssh_command(target, run_remote_command(python_args, log, detach=args.detach,
                                                   env=args.env, remote_dir=remote_dir,
                                                   venv=venv), worker)]
  if args.command == "logs":
    if args.lines < 1:
      raise UsageError(f"--lines {args.lines}: expected a positive number")
    return [ssh_command(target, logs_remote_command(args.log, lines=args.lines,
                                                    follow=args.follow), _worker(args.worker))]
  if args.command == "stop":
    return [ssh_command(target, stop_remote_command(_check_relative("--venv", args.venv)),
                        _worker(args.worker))]
  if args.command == "status":
    return status_commands(target, queued=args.queued)
  if args.command == "delete":
    return delete_commands(target, queued=args.queued)
  raise AssertionError(args.command)


def main(argv: Optional[Sequence[str]] = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  python_args: list[str] = []
  if "--" in argv:
    split = argv.index("--")
    argv, python_args = argv[:split], argv[split + 1:]
  parser = _parser()
  args = parser.parse_args(argv)
  try:
    if python_args and args.command not in ("train", "run"):
      raise UsageError(f"{args.command} takes no arguments after -- (only train and run do)")
    if python_args:
      _refuse_launcher_flags(args, python_args)
    target = resolve_target(args.name, args.zone, args.project)
    if args.command == "setup":
      setup(target, args)
    else:
      execute(commands_for(args, target, python_args), args.dry_run)
  except UsageError as error:
    print(f"error: {error}", file=sys.stderr)
    return 2
  except GcloudError as error:
    print(f"error: {error}", file=sys.stderr)
    return 1
  if args.command == "create" and args.queued and not args.dry_run:
    print("queued: `status --queued` shows its state; run `setup` once it is ACTIVE",
          file=sys.stderr)
  return 0
