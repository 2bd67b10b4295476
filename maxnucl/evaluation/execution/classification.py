"""The verdict on one run: its status (STATUSES), reason and return code, from what the
supervisor observed (`supervisor.Run`): the launcher's reports, the program's exit status, the
completion token, and whether the supervisor stopped the run (timeout, output cap)."""

from __future__ import annotations

import signal

from .limits import Limits
from .supervisor import Capture, Run


STATUSES = ("passed", "failed", "early_exit", "timeout", "memory", "killed", "output_limit",
            "sandbox_error")


def classify(run: Run, timeout_s: float, limits: Limits) -> dict:
  """The result's passed/status/reason/returncode/containment from what was observed."""
  containment, unavailable, exit_status = {}, {}, None
  for report in run.reports:
    containment.update(report.get("containment", {}))
    unavailable.update(report.get("unavailable", {}))
    exit_status = report.get("exit", exit_status)
  containment["unavailable"] = unavailable
  returncode = None
  if exit_status is not None:
    returncode = -exit_status["signal"] if exit_status["signal"] else exit_status["code"]
  completed = run.completion.seen  # whatever else the program wrote to the completion pipe

  def result(status, reason):
    return {"passed": status == "passed", "status": status, "reason": reason,
            "returncode": returncode, "containment": containment}

  if not run.started:
    if run.stopped_for is not None:
      return result("sandbox_error", f"the sandbox did not start within "
                                     f"{limits.startup_timeout_s} s")
    return result("sandbox_error", f"the launcher exited with {run.launcher_returncode} before "
                                   f"the program started: {_last_line(run.stderr)}")
  if run.stopped_for == "output_limit":
    return result("output_limit", f"{run.overflowed}: runaway output, the run was stopped")
  if run.stopped_for == "timeout":
    return result("timeout", f"still running after the {timeout_s} s wall-clock timeout")
  if exit_status is None:
    return result("killed", f"the sandbox's init died (launcher exit {run.launcher_returncode})")
  if exit_status["signal"] == signal.SIGXCPU:
    return result("timeout", "CPU time limit (RLIMIT_CPU) reached")
  if exit_status["signal"]:
    return result("killed", f"killed by {_signal_name(exit_status['signal'])}")
  if completed and returncode == 0:
    return result("passed", "the program ran to its end")
  if completed:
    return result("failed", f"ran to its end but exited with {returncode} (atexit or a thread)")
  if returncode == 0:
    return result("early_exit", "exited with 0 before its code ran to the end")
  if _last_line(run.stderr).startswith("MemoryError"):
    return result("memory", f"MemoryError (RLIMIT_AS = {limits.memory_bytes} bytes)")
  return result("failed", f"exited with {returncode}")


def _signal_name(number: int) -> str:
  try:
    return signal.Signals(number).name
  except ValueError:
    return f"signal {number}"


def _last_line(capture: Capture) -> str:
  lines = capture.text().strip().splitlines()
  return lines[-1] if lines else ""
