"""A training run's guards: one trainer at a time (`Lock`), and a resumed run's configuration
compared with the one the run started with (`check_resumed_config`).

The lock, on a local disk: `DIR/trainer.lock`, held with `fcntl.flock` (the kernel releases it
when the holder dies, however it dies), its text naming the holder (host, pid, start time).  In a
bucket (`gs://`, or a `file://` URL on the same code path) there is no flock: the lock is the
object `DIR/trainer.lock` holding the holder and a lease (`expires` in Unix seconds) that a
background thread renews every `LEASE_S / 3`; a lock whose lease has run out (its holder died
without releasing it) is taken over.  Taking a bucket lock is check, write, then read back: it refuses a trainer whose
write was overwritten by another's before its read, but two trainers whose check-write-read
sequences do not overlap that way both read their own write and both run (the second overwrites
the first's lock).  Exclusivity needs a create-only write (Cloud Storage's `ifGenerationMatch=0`),
which this lock does not use yet; the local flock has no such gap.

The configuration: `DIR/config.gin` is the gin configuration the run started with.  A resumed
run whose bindings differ is refused with the changed bindings listed, unless the change is
allowed (`--allow_config_change`): it is then appended to `DIR/config_changes.jsonl` with the step
it takes effect at, and `config.gin` keeps the start.  Bindings that do not change what is trained
(progress, logging, evaluation, checkpoint cadence, and `train_loop.num_steps`: a run is extended by
resuming with more steps) may change freely.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import time
from typing import Any, Optional

from gin import config_parser

from maxnucl import outputs, paths

log = logging.getLogger("maxnucl.workdir")

LOCK_NAME = "trainer.lock"
CONFIG_NAME = "config.gin"
CHANGES_NAME = "config_changes.jsonl"
LEASE_S = 120.0

# Bindings a resumed run may change: they steer the run or where it runs (the device mesh and
# how the state is laid out on it, e.g. resuming a pod's run on one host), not what it computes.
RUN_CONTROL = frozenset(f"train_loop.{name}" for name in (
    "num_steps", "progress_bar", "log_every", "eval_every", "eval_split", "eval_batches",
    "eval_tasks", "eval_tasks_every", "eval_tasks_limit", "checkpoint_every", "keep_checkpoints",
    "async_checkpointing")) | {"train_main.workdir", "create_mesh.shape",
                               "logical_axis_rules.rules", "model_config.remat_policy"}


class WorkdirInUse(RuntimeError):
  """Another trainer holds the workdir's lock."""


class ConfigChanged(ValueError):
  """A resumed run's gin configuration differs from the one the run started with."""


# ---- the lock -----------------------------------------------------------------------------------

def _holder() -> dict:
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _describe(holder: dict) -> str:
  return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since "
          f"{holder.get('since', '?')}")


class Lock:
  """The exclusive lock of a training workdir; `acquire` refuses in one line naming the holder."""

  def __init__(self, workdir: paths.Path):
    self.path = workdir / LOCK_NAME
    self._file = None
    self._renewer: Optional[threading.Thread] = None
    self._stop = threading.Event()
    self.holder = _holder()
    self._owner = outputs._owner_record()  # pylint: disable=protected-access

  def acquire(self) -> "Lock":
    if paths.is_url(self.path):
      self._acquire_lease()
    else:
      self._acquire_flock()
    return self

  def _acquire_flock(self) -> None:
    import fcntl  # pylint: disable=import-outside-toplevel
    f = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      text = f.read()
      f.close()
      raise WorkdirInUse(f"{self.path.parent} is in use by another trainer ("
                         f"{_describe(_parse(text))}; lock file {self.path})") from None
    f.seek(0)
    f.truncate()
    f.write(json.dumps(self.holder) + "\n")
    f.flush()
    self._file = f

  def _acquire_lease(self) -> None:
    if self.path.exists():
      current = _parse(self.path.read_text())
      if (current.get("expires", 0) > time.time() and current.get("token") != self._token()
          and outputs._owner_alive(current.get("owner", {}))):  # pylint: disable=protected-access
        raise WorkdirInUse(f"{self.path.parent} is in use by another trainer "
                           f"({_describe(current)}; its lease on {self.path} runs until "
                           f"{_utc(current['expires'])}; it is taken over once that passes)")
      if current:
        log.warning("%s: taking over the lock of %s, whose lease %s", self.path,
                    _describe(current),
                    f"ran out at {_utc(current.get('expires', 0))}"
                    if current.get("expires", 0) <= time.time() else
                    "has not run out, but whose process on this machine is gone")
    self._write_lease()
    if _parse(self.path.read_text()).get("token") != self._token():
      raise WorkdirInUse(f"{self.path.parent} was locked by another trainer at the same "
                         f"moment ({_describe(_parse(self.path.read_text()))})")
    self._renewer = threading.Thread(target=self._renew, daemon=True, name="workdir-lease")
    self._renewer.start()

  def _token(self) -> str:
    return f"{self.holder['host']}:{self.holder['pid']}:{self.holder['since']}"

  def _write_lease(self) -> None:
    # owner: how a later trainer on this machine tells that this process is gone (a killed
    # trainer's lease is then taken over at once instead of when it runs out)
    self.path.write_text(json.dumps(dict(self.holder, token=self._token(),
                                         expires=time.time() + LEASE_S,
                                         owner=self._owner)) + "\n")

  def _renew(self) -> None:
    while not self._stop.wait(LEASE_S / 3):
      try:
        self._write_lease()
      except Exception as e:  # noqa: BLE001 - a failed renewal is retried; the run goes on
        log.warning("%s: could not renew the lease: %s", self.path, e)

  def release(self) -> None:
    self._stop.set()
    if self._file is not None:
      self._file.close()  # closing the descriptor releases the flock
      self._file = None
    elif self._renewer is not None:
      self._renewer.join(timeout=5)
      self._renewer = None
      try:
        if _parse(self.path.read_text()).get("token") == self._token():
          self.path.unlink()
      except OSError:
        pass  # already gone: the lease would have run out anyway

  def __enter__(self) -> "Lock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _parse(text: str) -> dict:
  try:
    value = json.loads(text)
  except json.JSONDecodeError:
    return {}
  return value if isinstance(value, dict) else {}


def _utc(seconds: float) -> str:
  return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(
      timespec="seconds")


# ---- the recorded configuration -----------------------------------------------------------------

class _Unresolved(config_parser.ParserDelegate):
  """Parses references as text: nothing needs to be imported or registered."""

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return f"@{scoped_configurable_name}{'()' if evaluate else ''}"

  def macro(self, macro_name):
    return f"%{macro_name}"


def bindings(gin_text: str) -> dict[str, Any]:
  """{"scope/selector.param" or "MACRO": value} of a gin config text (gin.config_str())."""
  out = {}
  for statement in config_parser.ConfigParser(gin_text, _Unresolved()):
    if not isinstance(statement, config_parser.BindingStatement):
      continue
    selector = statement.selector.rsplit(".", 1)[-1] if statement.arg_name else statement.selector
    key = f"{selector}.{statement.arg_name}" if statement.arg_name else selector
    out[f"{statement.scope}/{key}" if statement.scope else key] = statement.value
  return out


def config_changes(started: str, now: str) -> dict[str, tuple[Any, Any]]:
  """The bindings that differ between two gin config texts, run-control bindings excepted:
  {binding: (value at the start, value now)}; an absent binding is `<unset>`."""
  before, after = bindings(started), bindings(now)
  unset = "<unset>"
  return {key: (before.get(key, unset), after.get(key, unset))
          for key in sorted(set(before) | set(after))
          if key not in RUN_CONTROL and before.get(key, unset) != after.get(key, unset)}


def check_resumed_config(workdir: paths.Path, gin_text: str, step: int,
                         allow_change: bool, primary: bool) -> None:
  """Refuse a resumed run whose configuration differs from the run's `config.gin`, or, with
  `allow_change`, record the change in config_changes.jsonl (the primary process writes)."""
  recorded, changes_log = workdir / CONFIG_NAME, workdir / CHANGES_NAME
  if not recorded.exists():
    return  # a workdir from before config.gin was kept: nothing to compare with
  previous = changes_log.read_text() if changes_log.exists() else ""
  try:
    records = [json.loads(line)["config"] for line in previous.splitlines() if line.strip()]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ConfigChanged(f"{changes_log}: not a log of configuration changes ({e!r})") from None
  # The configuration in effect: the start's, or the last allowed change's.
  effective = records[-1] if records else recorded.read_text()
  source = changes_log if records else recorded
  changes = config_changes(effective, gin_text)
  if not changes:
    return
  listed = "; ".join(f"{k}: {before!r} -> {after!r}" for k, (before, after) in changes.items())
  if not allow_change:
    raise ConfigChanged(
        f"resuming {workdir} at step {step} with a configuration that differs from the run's "
        f"({source}): {listed}; use the same bindings, a new --workdir, or "
        f"--allow_config_change to continue with the new values (recorded in {CHANGES_NAME})")
  log.warning("resuming at step %d with changed bindings (--allow_config_change): %s", step,
              listed)
  if primary:
    record = {"step": step, "time": _holder()["since"],
              "changes": {k: [repr(b), repr(a)] for k, (b, a) in changes.items()},
              "config": gin_text}
    changes_log.write_text(previous + json.dumps(record) + "\n")  # whole: a bucket object
