"""The multi-process runtime: one JAX process per host of a TPU slice or GPU cluster.

    from maxnucl import distributed
    distributed.add_arguments(parser)          # --coordinator_address --num_processes --process_id
    args = parser.parse_args()
    distributed.initialize_from_args(args)     # jax.distributed.initialize, before any JAX work

Where the settings come from, first match wins:
  1. the flags `--coordinator_address HOST:PORT --num_processes N --process_id I`;
  2. the environment: MAXNUCL_COORDINATOR_ADDRESS / MAXNUCL_NUM_PROCESSES / MAXNUCL_PROCESS_ID,
     or JAX's own JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID;
  3. on a Cloud TPU VM, nothing at all: `jax.distributed.initialize()` discovers the slice's
     workers from the TPU metadata (as on every worker of `gcloud ... ssh --worker=all`), unless
     JAX_PLATFORMS leaves out TPUs (e.g. `JAX_PLATFORMS=cpu` for a tool on one worker);
  4. otherwise a single process, and nothing is initialised.

A process that dies stops sending heartbeats; after `heartbeat_timeout_s` the coordination
service terminates the others with "the JAX distributed service detected fatal errors ...
another task died", so a pod never hangs on a lost worker.  Log lines and the tools' one-line
errors carry "[process I/N]" once more than one process runs.
"""

from __future__ import annotations

import argparse
import builtins
import logging
import os
import re
from typing import Callable, Optional

import jax
import numpy as np

log = logging.getLogger(__name__)

ENVIRONMENT = {
    "coordinator_address": ("MAXNUCL_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("MAXNUCL_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("MAXNUCL_PROCESS_ID", "JAX_PROCESS_ID"),
}
DEFAULT_HEARTBEAT_TIMEOUT_S = 100
DEFAULT_INITIALIZATION_TIMEOUT_S = 300


class DistributedError(ValueError):
  """Incomplete or inconsistent multi-process settings."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The multi-process flags shared by the trainer, the evaluator and the pruner."""
  group = parser.add_argument_group(
      "multi-process (TPU pods, GPU clusters)",
      "one process per host; flags override the MAXNUCL_*/JAX_* environment variables; on a "
      "Cloud TPU VM no flag is needed (the slice is discovered)")
  group.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                     help="address of process 0's coordination service")
  group.add_argument("--num_processes", type=int, default=None, metavar="N",
                     help="number of processes (hosts) in the job")
  group.add_argument("--process_id", type=int, default=None, metavar="I",
                     help="this process's index in [0, N)")
  group.add_argument("--heartbeat_timeout_s", type=int, default=DEFAULT_HEARTBEAT_TIMEOUT_S,
                     metavar="S", help="a process silent this long is declared dead and the "
                     "others stop with an error (default %(default)s)")
  group.add_argument("--initialization_timeout_s", type=int,
                     default=DEFAULT_INITIALIZATION_TIMEOUT_S, metavar="S",
                     help="how long to wait for every process to join (default %(default)s)")


def initialize_from_args(args: argparse.Namespace) -> bool:
  """`initialize` with the flags of `add_arguments`."""
  return initialize(args.coordinator_address, args.num_processes, args.process_id,
                    heartbeat_timeout_s=args.heartbeat_timeout_s,
                    initialization_timeout_s=args.initialization_timeout_s)


def settings(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
             process_id: Optional[int] = None) -> Optional[dict]:
  """The explicit settings (arguments, else environment), validated; None when none is given."""
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  source = {k: "--" + k for k, v in given.items() if v is not None}
  for key, names in ENVIRONMENT.items():
    if given[key] is None:
      for name in names:
        if os.environ.get(name):
          given[key], source[key] = os.environ[name], name
          break
  if all(v is None for v in given.values()):
    return None
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise DistributedError(
        "multi-process settings are incomplete: " + ", ".join(f"{k} is given ({source[k]})"
                                                              for k in source)
        + "; also needed: " + ", ".join(f"--{k} (or {ENVIRONMENT[k][0]})" for k in missing))
  address = str(given["coordinator_address"])
  if not re.fullmatch(r"\[?[\w.:-]+\]?:\d+", address):
    raise DistributedError(f"{source['coordinator_address']} = {address!r}: expected HOST:PORT, "
                           f"e.g. localhost:1234 or 10.0.0.2:8476")
  out = {"coordinator_address": address}
  for key in ("num_processes", "process_id"):
    try:
      out[key] = int(given[key])
    except (TypeError, ValueError):
      raise DistributedError(f"{source[key]} = {given[key]!r}: expected an integer") from None
  if out["num_processes"] < 1:
    raise DistributedError(f"{source['num_processes']} = {out['num_processes']}: expected >= 1")
  if not 0 <= out["process_id"] < out["num_processes"]:
    raise DistributedError(f"{source['process_id']} = {out['process_id']}: expected an index in "
                           f"[0, {out['num_processes']}) for {out['num_processes']} processes")
  return out


def on_cloud_tpu_vm() -> bool:
  """Whether this host is a Cloud TPU VM (TPU chips and libtpu present), as JAX detects it."""
  try:
    from jax._src import cloud_tpu_init  # pylint: disable=import-outside-toplevel
    return bool(cloud_tpu_init.running_in_cloud_tpu_vm)
  except (ImportError, AttributeError):  # a JAX without the check: look for the chips
    return os.path.exists("/dev/accel0") or os.path.exists("/dev/vfio/0")


def _tpu_allowed() -> bool:
  """False when JAX_PLATFORMS leaves TPUs out (a CPU tool on one worker of a slice must not wait
  for the slice's other workers)."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  return not platforms or "tpu" in platforms.lower().split(",")


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *,
               heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S,
               initialization_timeout_s: int = DEFAULT_INITIALIZATION_TIMEOUT_S) -> bool:
  """Start the multi-process runtime (before any other JAX call); True if one was started.

  Explicit settings (arguments or environment, see the module docstring) start it with them; on
  a Cloud TPU VM without settings, JAX discovers the slice; elsewhere nothing happens (a single
  process).  Calling it again in the same process is a no-op.
  """
  if jax.distributed.is_initialized():
    return True
  explicit = settings(coordinator_address, num_processes, process_id)
  timeouts = {"heartbeat_timeout_seconds": heartbeat_timeout_s,
              "initialization_timeout": initialization_timeout_s}
  if explicit is not None:
    if explicit["num_processes"] == 1:
      return False
    jax.distributed.initialize(**explicit, **timeouts)
  elif on_cloud_tpu_vm() and _tpu_allowed():
    jax.distributed.initialize(**timeouts)
  else:
    return False
  _label_logs()
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def is_primary() -> bool:
  """Whether this is process 0, the one that prints, writes metrics and TensorBoard."""
  return jax.process_index() == 0


def sync(name: str) -> None:
  """Wait until every process gets here (a no-op in a single process); `name` identifies the
  barrier in errors."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices(name)


def from_primary(value: str) -> str:
  """The primary's `value` on every process (the others' `value` is ignored; every process must
  call this, as for `sync`): e.g. the name of a temporary directory that process 0 chose."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  data = np.frombuffer(value.encode("utf-8"), np.uint8) if is_primary() else np.zeros(0, np.uint8)
  # two broadcasts: every process must pass an array of the primary's size
  size = int(multihost_utils.broadcast_one_to_all(np.array(data.size, np.int64)))
  buffer = np.zeros(max(size, 1), np.uint8)
  buffer[:data.size] = data
  return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buffer))[:size]).decode("utf-8")


_ERROR = "\0error\0"  # from_primary's value when `on_primary`'s function raised


def on_primary(fn: Callable[[], Optional[str]]) -> str:
  """`fn()` run by the primary process alone (a check, a write), its result (a string; None is
  "") on every process.  An exception of `fn` is raised on every process: the primary's own, and
  on the others one of the same built-in type (FileExistsError, ValueError, ...; else
  RuntimeError naming the type) with the same message, so that all of them stop alike instead
  of waiting for the primary at the next barrier."""
  value = ""
  if is_primary():
    try:
      value = fn() or ""
    except Exception as e:  # noqa: BLE001 - told to the other processes, then raised here
      from_primary(f"{_ERROR}{type(e).__name__}\0{e}")
      raise
  value = from_primary(value)
  if not value.startswith(_ERROR):
    return value
  kind, message = value[len(_ERROR):].split("\0", 1)
  error = getattr(builtins, kind, None)
  if isinstance(error, type) and issubclass(error, Exception):
    raise error(message)
  raise RuntimeError(f"process 0 failed: {kind}: {message}")


def label() -> str:
  """"[process I/N] " when several processes run, else ""."""
  if not jax.distributed.is_initialized() or jax.process_count() == 1:
    return ""
  return f"[process {jax.process_index()}/{jax.process_count()}] "


class _ProcessFilter(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    if not getattr(record, "_maxnucl_labelled", False):
      record.msg = label() + str(record.msg)
      record._maxnucl_labelled = True  # pylint: disable=protected-access
    return True


def _label_logs() -> None:
  """Prefix every log line of this process with its index."""
  for handler in logging.getLogger().handlers:
    if not any(isinstance(f, _ProcessFilter) for f in handler.filters):
      handler.addFilter(_ProcessFilter())
