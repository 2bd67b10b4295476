"""Several real JAX processes on this machine, for the multi-process tests: each gets
`devices_each` simulated CPU devices and the flags of `maxnucl.distributed` (a localhost
coordinator on a free port)."""

import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA's backend optimisation level 0 for the tests' programs (conftest.py says why).
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"


def free_address() -> str:
  """localhost:PORT with a port that was free a moment ago."""
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return f"localhost:{s.getsockname()[1]}"


def cpu_env(devices: int, **extra: str) -> dict:
  """The test process's environment with `devices` simulated CPU devices; the fast-compile flag
  only where the test process has it (a suite run without it runs its children without it)."""
  fast = FAST_COMPILE_FLAG if FAST_COMPILE_FLAG in os.environ.get("XLA_FLAGS", "") else ""
  return {**os.environ, "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {fast}".strip(),
          **extra}


def start(command: list[str], num_processes: int = 2, devices_each: int = 2
          ) -> list[subprocess.Popen]:
  """`command` (argv after the interpreter, e.g. ["-m", "maxnucl.evaluate", ...]) once per
  process, with the coordinator flags appended."""
  flags = ["--coordinator_address", free_address(), "--num_processes", str(num_processes),
           "--initialization_timeout_s", "120"]
  return [subprocess.Popen([sys.executable, *command, *flags, "--process_id", str(i)], cwd=REPO,
                           env=cpu_env(devices_each), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
          for i in range(num_processes)]


def run(command: list[str], num_processes: int = 2, devices_each: int = 2,
        timeout: float = 300) -> list[tuple[int, str, str]]:
  """`start` and wait for all; (exit status, stdout, stderr) of each process."""
  procs = start(command, num_processes, devices_each)
  try:
    outputs = [p.communicate(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      p.kill()
  return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


def printed_lines(stdout: str) -> list[str]:
  """A process's stdout without the connection lines that Gloo (the CPU collectives) prints from
  its own threads ("[Gloo] Rank 0 is connected to 3 peer ranks. ..."); two threads' lines can
  interleave mid-line, so any line mentioning "peer ranks" or starting "[Gloo]" is dropped."""
  return [line for line in stdout.splitlines()
          if "peer ranks" not in line and not line.startswith("[Gloo]") and line.strip()]
