"""What one run may use (`Limits`), and the names both sides of the sandbox share.

Imported by the launcher for every program, before any containment: the standard library's
`collections` only (a dataclass or typing would add 4-7 ms to each program's start-up)."""

from __future__ import annotations

import collections


DEFAULT_TIMEOUT_S = 3.0
PROGRAM_NAME = "program.py"
# The completion token: hex digits, written by the program's process once the program's code
# returned normally (launcher.run_to_completion), looked for by the supervisor.
TOKEN_BYTES = 32
LIMIT_DEFAULTS = {
    "memory_bytes": 1 << 30,  # RLIMIT_AS (address space)
    "file_bytes": 16 << 20,  # RLIMIT_FSIZE: the largest file the program may write
    "disk_bytes": 64 << 20,  # size of the tmpfs work directory: all files together
    "shm_bytes": 64 << 20,  # size of the sandbox's private /dev/shm (multiprocessing's semaphores)
    "processes": 16,  # RLIMIT_NPROC: the program's tasks (processes and threads) together
    "open_files": 64,  # RLIMIT_NOFILE
    "output_bytes": 1 << 20,  # stdout or stderr past this is runaway output: the run is killed
    "capture_bytes": 64 << 10,  # kept of each stream in the result (its head and its tail)
    "startup_timeout_s": 10.0,  # for the sandbox's own set-up, before the program's clock
}


class Limits(collections.namedtuple("Limits", LIMIT_DEFAULTS, defaults=LIMIT_DEFAULTS.values())):
  """Resource limits of one run (names and defaults: LIMIT_DEFAULTS); rlimits apply to each
  process the program starts, so a run may use at most processes x memory_bytes (16 GiB by
  default; no cgroup bounds the sum).  A namedtuple, not a dataclass: the launcher imports this
  module for every program, and dataclasses (or typing) would add 4-7 ms to each."""
  __slots__ = ()

  def validated(self) -> "Limits":
    for name, value in self._asdict().items():
      if not value > 0:
        raise ValueError(f"Limits.{name} = {value}; expected > 0")
    return self
