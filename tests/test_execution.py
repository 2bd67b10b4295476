"""Specification of maxnucl.evaluation.execution: the sandbox that runs model-written programs.

Every hostile program must (1) end with the right status, (2) within a bounded time, (3) leave
everything outside its temporary directory as it was, (4) leave no process behind, and (5) leave
the evaluation able to run the next program.  `assert_contained` checks (2)-(5).
"""

import json
import os
import pathlib
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid

import pytest

from maxnucl.evaluation import execution
from maxnucl.evaluation.execution import supervisor

PASSING = "def add(a, b):\n  return a + b\nassert add(1, 2) == 3\n"
SHORT_TIMEOUT_S = 1.0
SLEEP = shutil.which("sleep")
BOUND_S = 5.0  # any run here: the timeout plus the grace to stop and drain, with room to spare


def run(program: str, **kwargs) -> dict:
  return execution.check_program(textwrap.dedent(program), **kwargs)


def processes_mentioning(marker: str) -> list[str]:
  """Live processes whose command line contains `marker` (zombies have an empty one)."""
  found = []
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      cmdline = pathlib.Path(f"/proc/{entry}/cmdline").read_bytes()
    except OSError:
      continue
    if marker.encode() in cmdline:
      found.append(f"{entry}: {cmdline[:200]!r}")
  return found


class Outside:
  """A directory outside the sandbox with a file, a folder and an empty folder; remembers
  their names, contents, modes and modification times."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.root.mkdir()
    self.sentinel = root / "sentinel.txt"
    self.sentinel.write_text("keep me\n")
    (root / "keep").mkdir()
    (root / "keep" / "inner.txt").write_text("inner\n")
    (root / "empty").mkdir()
    self.before = self.snapshot()

  def snapshot(self) -> dict:
    state = {}
    for path in sorted(self.root.rglob("*")):
      info = path.lstat()
      state[str(path)] = (info.st_mode, info.st_mtime_ns,
                          path.read_bytes() if path.is_file() else None)
    return state

  def unchanged(self) -> bool:
    return self.snapshot() == self.before


@pytest.fixture
def outside(tmp_path):
  return Outside(tmp_path / "outside")


@pytest.fixture(scope="module")
def available():
  return execution.containment_available()


def require(available: dict, *facilities: str):
  """Fails (never skips) a test whose program is only safe to run under `facilities`."""
  missing = [name for name in facilities if not available[name]]
  if missing:
    pytest.fail(f"this machine offers no {missing} (reasons: {available['unavailable']}); the "
                f"hostile program of this test must not run without them")


def assert_contained(result: dict, outside: Outside, *markers: str, within_s: float = BOUND_S):
  assert result["elapsed_s"] < within_s, result
  assert outside.unchanged(), (outside.snapshot(), result)
  assert not os.path.exists(result["workdir"]), "the temporary directory was not removed"
  for marker in (result["workdir"], *markers):
    assert processes_mentioning(marker) == [], f"processes survived the run: {marker}"
  assert execution.check_program(PASSING)["passed"], "the next program could not run"


# ---- ordinary programs ---------------------------------------------------------------------


def test_correct_program_passes():
  result = run("""
      def square(x):
        return x * x
      print("hello")
      assert square(3) == 9
      assert [square(i) for i in range(3)] == [0, 1, 4]
  """)
  assert result["passed"] and result["status"] == "passed", result
  assert result["returncode"] == 0
  assert result["stdout"] == "hello\n" and result["stderr"] == ""


def test_failing_assert_fails_with_its_traceback_in_stderr():
  result = run("""
      def square(x):
        return x + x
      assert square(3) == 9, "square(3)"
  """)
  assert not result["passed"] and result["status"] == "failed", result
  assert result["returncode"] == 1
  assert "Traceback" in result["stderr"] and "AssertionError: square(3)" in result["stderr"]
  assert "program.py\", line 4" in result["stderr"]
  assert "launcher.py" not in result["stderr"], "the launcher's frames are not the program's"


def test_syntax_error_fails():
  result = run("def f(:\n  pass\n")
  assert result["status"] == "failed" and "SyntaxError" in result["stderr"], result


def test_program_has_a_private_writable_work_directory_as_cwd_home_and_tmpdir():
  result = run("""
      import os, tempfile
      cwd = os.getcwd()
      assert os.environ["HOME"] == cwd and tempfile.gettempdir() == cwd
      with open("data.txt", "w") as f:
        f.write("x" * 1000)
      os.mkdir("sub")
      os.rename("data.txt", "sub/data.txt")
      assert os.path.getsize("sub/data.txt") == 1000
      assert sorted(os.environ) == ["HOME", "LANG", "PATH", "TMPDIR"], sorted(os.environ)
      assert not os.isatty(0) and os.read(0, 10) == b""  # stdin is /dev/null
  """)
  assert result["passed"], result


def test_programs_may_write_dev_null_and_import_the_standard_library():
  result = run("""
      import collections, heapq, itertools, json, math, os, re, subprocess
      with open(os.devnull, "w") as f:
        f.write("discarded")
      assert subprocess.run(["echo", "child"], capture_output=True, text=True).stdout == "child\\n"
  """)
  assert result["passed"], result


# ---- the completion check --------------------------------------------------------------------


@pytest.mark.parametrize("exit_call", ["import sys; sys.exit(0)", "import os; os._exit(0)",
                                       "raise SystemExit", "exit()", "quit(0)"])
def test_exit_before_the_asserts_is_an_early_exit(exit_call, outside):
  result = run(f"def solution():\n  return 1\n{exit_call}\nassert solution() == 2\n")
  assert not result["passed"] and result["status"] == "early_exit", result
  assert result["returncode"] == 0
  assert_contained(result, outside)


def test_exit_status_zero_after_a_failed_assert_does_not_pass(outside):
  result = run("""
      import atexit, os, sys
      sys.excepthook = lambda *args: None
      atexit.register(lambda: os._exit(0))
      assert 1 == 2
  """)
  assert not result["passed"] and result["status"] == "early_exit", result
  assert_contained(result, outside)


def write_to_every_descriptor(data: bytes) -> str:
  """Program lines writing `data` to every descriptor from 3 to 63 that takes it."""
  return textwrap.dedent(f"""
      import os
      for fd in range(3, 64):
        try:
          os.write(fd, {data!r})
        except OSError:
          pass
  """)


def test_writing_to_every_descriptor_does_not_fake_completion(outside):
  result = run(write_to_every_descriptor(b"0123456789abcdef0123456789abcdef") +
               "os._exit(0)\nassert False\n")
  assert not result["passed"] and result["status"] == "early_exit", result
  assert_contained(result, outside)


# ---- resources -----------------------------------------------------------------------------


def test_infinite_loop_times_out(outside):
  result = run("while True:\n  pass\n", timeout_s=SHORT_TIMEOUT_S)
  assert not result["passed"] and result["status"] == "timeout", result
  assert result["elapsed_s"] >= SHORT_TIMEOUT_S
  assert_contained(result, outside)


def test_sleeping_past_the_timeout_times_out(outside):
  result = run("import time\ntime.sleep(100)\n", timeout_s=SHORT_TIMEOUT_S)
  assert result["status"] == "timeout", result
  assert_contained(result, outside)


def test_fork_bomb_is_bounded_and_killed(outside, available):
  require(available, "user_namespace", "pid_namespace")
  result = run("""
      import os
      while True:
        try:
          os.fork()
        except OSError:
          pass
  """, timeout_s=SHORT_TIMEOUT_S)
  assert not result["passed"] and result["status"] == "timeout", result
  assert result["containment"]["rlimits"]["RLIMIT_NPROC"] == execution.Limits().processes
  assert_contained(result, outside)


def test_fork_bomb_meets_the_process_limit(outside, available):
  require(available, "user_namespace", "pid_namespace")
  result = run("""
      import os, time
      children = 0
      try:
        while True:
          if os.fork() == 0:
            time.sleep(100)
          children += 1
      except OSError as error:
        print("stopped after", children, "children:", error)
  """, limits=execution.Limits(processes=8), timeout_s=SHORT_TIMEOUT_S)
  assert result["status"] == "passed" and "stopped after" in result["stdout"], result
  assert int(result["stdout"].split()[2]) < 8, result["stdout"]
  assert_contained(result, outside)


def test_memory_exhaustion_fails_with_memory_status(outside):
  result = run("""
      blocks = []
      while True:
        blocks.append(bytearray(b"x" * (64 << 20)))
  """, limits=execution.Limits(memory_bytes=256 << 20))
  assert not result["passed"] and result["status"] == "memory", result
  assert "MemoryError" in result["stderr"]
  assert_contained(result, outside)


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_gigabytes_of_output_are_cut_and_the_run_killed(stream, outside):
  result = run(f"""
      import sys
      line = "x" * 65535 + "\\n"
      for _ in range(1 << 15):  # 2 GiB
        sys.{stream}.write(line)
  """)
  assert not result["passed"] and result["status"] == "output_limit", result
  limits = execution.Limits()
  assert len(result[stream]) < limits.capture_bytes + 100
  assert "bytes omitted" in result[stream]
  assert_contained(result, outside)


def test_filling_the_disk_is_bounded(outside, available):
  require(available, "mount_namespace")
  result = run("""
      i = 0
      while True:
        with open(f"block{i}", "wb") as f:
          f.write(b"x" * (8 << 20))
        i += 1
  """)
  assert not result["passed"] and result["status"] == "failed", result
  assert "No space left on device" in result["stderr"], result["stderr"][-500:]
  assert_contained(result, outside)


def test_a_file_larger_than_the_size_limit_cannot_be_written(outside):
  result = run("""
      with open("big", "wb") as f:
        f.write(b"x" * (32 << 20))
  """)
  assert result["status"] == "failed" and "File too large" in result["stderr"], result
  assert_contained(result, outside)


# ---- the file system outside -----------------------------------------------------------------


DELETIONS = {
    "remove a file": "os.remove({sentinel!r})",
    "remove a tree": "shutil.rmtree({keep!r})",
    "remove an empty folder": "os.rmdir({empty!r})",
    "rename a file": "os.rename({sentinel!r}, {sentinel!r} + '.bak')",
    "truncate a file": "os.truncate({sentinel!r}, 0)",
}
WRITES = {
    "append to a file": "open({sentinel!r}, 'a').write('x')",
    "overwrite a file": "open({sentinel!r}, 'w').write('x')",
    "create a file": "open({root!r} + '/new.txt', 'w').write('x')",
    "create a file in /tmp": "open('/tmp/maxnucl-escape-{marker}', 'w').write('x')",
    "create a folder": "os.mkdir({root!r} + '/new')",
    "create a symlink": "os.symlink('/etc/passwd', {root!r} + '/link')",
    "move a file out": "open('f', 'w').write('x'); os.rename('f', {root!r} + '/moved')",
    "hard-link a file in": "os.link({sentinel!r}, 'hard'); open('hard', 'a').write('x')",
    "chmod a file": "os.chmod({sentinel!r}, 0o777)",
    "touch a file": "os.utime({sentinel!r}, (0, 0))",
}


def hostile_file_program(template: str, outside: Outside, marker: str) -> str:
  action = template.format(sentinel=str(outside.sentinel), keep=str(outside.root / "keep"),
                           empty=str(outside.root / "empty"), root=str(outside.root),
                           marker=marker)
  return f"import os, shutil\n{action}\n"


@pytest.mark.parametrize("action", sorted(DELETIONS))
def test_deleting_outside_the_work_directory_fails(action, outside):
  result = run(hostile_file_program(DELETIONS[action], outside, "unused"))
  assert not result["passed"] and result["status"] == "failed", result
  assert "Error" in result["stderr"]
  assert_contained(result, outside)


@pytest.mark.parametrize("action", sorted(WRITES))
def test_writing_outside_the_work_directory_fails(action, outside):
  marker = uuid.uuid4().hex
  result = run(hostile_file_program(WRITES[action], outside, marker))
  assert not result["passed"] and result["status"] == "failed", result
  assert not os.path.exists(f"/tmp/maxnucl-escape-{marker}")
  assert_contained(result, outside)


@pytest.mark.parametrize("layer", ["landlock", "read-only mounts"])
@pytest.mark.parametrize("action", ["remove a file", "overwrite a file", "create a file in /tmp",
                                    "create a folder", "move a file out"])
def test_each_file_system_layer_alone_keeps_the_outside_intact(layer, action, outside):
  marker = uuid.uuid4().hex
  disable = ["mount_namespace"] if layer == "landlock" else ["landlock"]
  result = run(hostile_file_program(WRITES.get(action) or DELETIONS[action], outside, marker),
               disable=disable)
  assert result["status"] == "failed", result
  assert not os.path.exists(f"/tmp/maxnucl-escape-{marker}")
  assert_contained(result, outside)


def test_files_written_in_the_work_directory_vanish_with_it(outside):
  result = run("open('left-behind.txt', 'w').write('x')\n")
  assert result["passed"], result
  assert_contained(result, outside)


# ---- the network -------------------------------------------------------------------------------


def test_connecting_to_a_tcp_port_on_this_machine_fails(outside):
  with socket.create_server(("127.0.0.1", 0)) as server:
    port = server.getsockname()[1]
    result = run(f"""
        import socket
        socket.create_connection(("127.0.0.1", {port}), timeout=30).sendall(b"escaped")
    """)
    server.settimeout(0.2)
    with pytest.raises(TimeoutError):
      server.accept()
  assert not result["passed"] and result["status"] == "failed", result
  assert "Error" in result["stderr"]
  assert_contained(result, outside, within_s=3.0)


def test_sending_udp_to_this_machine_fails(outside):
  with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as listener:
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    result = run(f"""
        import socket
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"escaped", ("127.0.0.1", {port}))
    """)
    listener.settimeout(0.2)
    with pytest.raises(TimeoutError):
      listener.recv(100)
  assert result["status"] == "failed", result
  assert_contained(result, outside, within_s=3.0)


@pytest.mark.parametrize("disable", [["landlock", "seccomp"], ["network_namespace", "seccomp"]],
                         ids=["network namespace alone", "landlock alone"])
def test_each_network_layer_alone_refuses_tcp(disable, outside):
  with socket.create_server(("127.0.0.1", 0)) as server:
    port = server.getsockname()[1]
    result = run(f"""
        import socket
        socket.create_connection(("127.0.0.1", {port}), timeout=30)
    """, disable=disable)
    server.settimeout(0.2)
    with pytest.raises(TimeoutError):
      server.accept()
  assert result["status"] == "failed", result
  assert_contained(result, outside, within_s=3.0)


def test_connecting_to_a_unix_socket_outside_fails(tmp_path, outside):
  path = str(tmp_path / "daemon.sock")
  with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
    server.bind(path)
    server.listen()
    result = run(f"""
        import socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect({path!r})
        s.sendall(b"escaped")
    """)
    server.settimeout(0.2)
    with pytest.raises(TimeoutError):
      server.accept()
  assert result["status"] == "failed" and "PermissionError" in result["stderr"], result
  assert_contained(result, outside, within_s=3.0)


def test_connecting_to_an_external_address_fails_without_hanging(outside, available):
  # Never sent unless the sandbox has no network of its own; 192.0.2.1 is TEST-NET-1 (RFC 5737).
  require(available, "network_namespace")
  result = run("""
      import socket
      socket.create_connection(("192.0.2.1", 80), timeout=30)
  """)
  assert not result["passed"] and result["status"] == "failed", result
  assert "Error" in result["stderr"]
  assert_contained(result, outside, within_s=3.0)


# ---- other processes ---------------------------------------------------------------------------


def detached_child_program(marker: str, then: str) -> str:
  """Starts a setsid'ed sleeper and a double-forked daemon, both carrying `marker` in their
  command lines, checks they run, then does `then`."""
  return textwrap.dedent(f"""
      import os, subprocess, sys, time
      sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)",
                                  "{marker}"], start_new_session=True)
      if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
          os.execv("{SLEEP}", ["sleep-{marker}", "1000"])
        os._exit(0)
      time.sleep(0.3)
      os.kill(sleeper.pid, 0)
      print("started", flush=True)
      {then}
  """)


def test_detached_children_are_killed_when_the_program_ends(outside):
  marker = uuid.uuid4().hex
  result = run(detached_child_program(marker, "assert True"))
  assert result["passed"] and result["stdout"] == "started\n", result
  assert_contained(result, outside, marker)


@pytest.mark.parametrize("disable", [[], ["pid_namespace"]], ids=["", "without PID namespace"])
def test_detached_children_are_killed_at_the_timeout(disable, outside):
  marker = uuid.uuid4().hex
  result = run(detached_child_program(marker, "time.sleep(100)"), timeout_s=SHORT_TIMEOUT_S,
               disable=disable)
  assert result["status"] == "timeout" and result["stdout"] == "started\n", result
  assert_contained(result, outside, marker)


def test_detached_children_are_killed_without_a_pid_namespace(outside):
  marker = uuid.uuid4().hex
  result = run(detached_child_program(marker, "assert True"), disable=["pid_namespace"])
  assert result["containment"]["pid_namespace"] is False
  assert result["passed"] and result["stdout"] == "started\n", result
  assert_contained(result, outside, marker)


def test_a_dying_evaluator_takes_its_runs_with_it(tmp_path):
  marker = uuid.uuid4().hex
  program = detached_child_program(marker, "time.sleep(100)")
  evaluator = subprocess.Popen(
      [sys.executable, "-c", "from maxnucl.evaluation import execution\n"
       f"execution.check_program({program!r}, timeout_s=60)\n"],
      env={**os.environ, "TMPDIR": str(tmp_path)})
  def started_children():
    return [p for p in processes_mentioning(marker) if not p.startswith(f"{evaluator.pid}:")]
  try:
    deadline = time.monotonic() + 10
    while len(started_children()) < 2 and time.monotonic() < deadline:
      time.sleep(0.05)
    assert len(started_children()) == 2, "the program's children never started"
  finally:
    evaluator.kill()
    evaluator.wait()
  deadline = time.monotonic() + 3
  while (processes_mentioning(marker) or processes_mentioning(str(tmp_path))) and (
      time.monotonic() < deadline):
    time.sleep(0.05)
  assert processes_mentioning(marker) == []
  assert processes_mentioning(str(tmp_path)) == [], "the launcher outlived its evaluator"


def test_signals_cannot_reach_processes_outside(outside):
  marker = uuid.uuid4().hex
  with subprocess.Popen([f"sleep-{marker}", "1000"], executable=SLEEP) as bystander:
    try:
      result = run(f"""
          import os, signal
          os.kill({bystander.pid}, signal.SIGKILL)
          os.kill({os.getpid()}, signal.SIGKILL)
      """)
      time.sleep(0.1)
      assert bystander.poll() is None, "the sandbox killed a process outside it"
    finally:
      bystander.send_signal(signal.SIGKILL)
  assert result["status"] == "failed", result
  assert "ProcessLookupError" in result["stderr"] or "PermissionError" in result["stderr"]
  assert_contained(result, outside)


# ---- containment, parallelism, degradation -----------------------------------------------------


def test_every_facility_this_machine_offers_is_active(available):
  """Core facilities must be offered (a sandbox without them would not contain these tests'
  programs) and each offered one must be in force for every run."""
  require(available, "user_namespace", "pid_namespace", "mount_namespace", "network_namespace",
          "landlock", "seccomp")
  containment = execution.check_program(PASSING)["containment"]
  for name in ("user_namespace", "pid_namespace", "mount_namespace", "network_namespace",
               "ipc_namespace", "landlock", "seccomp"):
    assert containment[name] is available[name], (name, containment)
  assert containment["landlock_abi"] == available["landlock_abi"]
  assert containment["landlock_network"] is (available["landlock_abi"] >= 4)
  assert containment["landlock_scopes"] is (available["landlock_abi"] >= 6)
  for name in ("fresh_proc", "readonly_root", "private_tmpfs", "private_shm", "capabilities_dropped",
               "no_new_privs", "process_group", "nproc_enforced"):
    assert containment[name] is True, (name, containment)
  assert set(containment["rlimits"]) == {"RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_FSIZE",
                                         "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CORE"}
  assert containment["unavailable"] == {}


def test_missing_facilities_degrade_and_are_reported(outside):
  result = execution.check_program(PASSING, disable=execution.FACILITIES)
  assert result["passed"], result
  for name in execution.FACILITIES:
    assert result["containment"][name] is False, name
    assert result["containment"]["unavailable"][name] == "disabled by the caller"
  failing = execution.check_program("assert False\n", disable=execution.FACILITIES)
  assert failing["status"] == "failed"
  assert_contained(result, outside)


def test_unknown_facility_or_bad_limits_are_refused_by_name():
  with pytest.raises(ValueError, match="landlok"):
    execution.check_program(PASSING, disable=["landlok"])
  with pytest.raises(ValueError, match="Limits.memory_bytes"):
    execution.check_program(PASSING, limits=execution.Limits(memory_bytes=0))
  with pytest.raises(ValueError, match="timeout_s"):
    execution.check_program(PASSING, timeout_s=0)


def test_check_programs_runs_in_parallel_and_keeps_the_order():
  programs = [f"import time\ntime.sleep(1)\nprint({i})\n" for i in range(4)]
  programs.insert(2, "assert False\n")
  t0 = time.monotonic()
  results = execution.check_programs(programs, workers=5)
  elapsed = time.monotonic() - t0
  assert elapsed < 3.0, f"4 one-second programs on 5 workers took {elapsed:.1f} s"
  assert [r["status"] for r in results] == ["passed", "passed", "failed", "passed", "passed"]
  assert [r["stdout"] for r in results] == ["0\n", "1\n", "", "2\n", "3\n"]


def test_status_values_are_the_documented_ones():
  assert set(execution.STATUSES) == {"passed", "failed", "early_exit", "timeout", "memory",
                                     "killed", "output_limit", "sandbox_error"}


def test_the_launchers_reports_are_parsed_one_thread_at_a_time():
  """CPython 3.11's AST constructor keeps interpreter-wide state, and parallel check_program calls
  once failed parsing a report ("SystemError: AST constructor recursion depth mismatch"): report
  lines are parsed under one lock, and a parse waits while another holds it."""
  import threading  # pylint: disable=import-outside-toplevel
  run = supervisor.Run(capture_bytes=1024)
  buffer = bytearray(b"{'containment': {'no_new_privs': True}, 'started': True}\n{'exit'")
  with supervisor._AST_LOCK:
    parser = threading.Thread(target=supervisor._parse_reports, args=(buffer, run))
    parser.start()
    parser.join(0.3)
    assert parser.is_alive() and run.reports == []  # waiting for the lock
  parser.join(10)
  assert run.reports == [{"containment": {"no_new_privs": True}, "started": True}]
  assert run.started and buffer == bytearray(b"{'exit'")  # the incomplete line stays


# ---- issue 27: what the sandbox hands back, the program text, shared memory, leftovers ---------


FLOOD_EVERY_DESCRIPTOR = """
    import os, time
    fds = [int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2]
    chunk = b"x" * (1 << 20)
    end = time.monotonic() + 2.5
    while time.monotonic() < end:
      for fd in fds:
        try:
          os.write(fd, chunk)
        except OSError:
          pass
"""


def test_flooding_the_completion_pipe_is_cut_and_the_evaluators_memory_stays_bounded(outside):
  """Everything read from the sandbox is capped: a program that writes hundreds of MiB into every
  descriptor it holds (the completion pipe included) is stopped as output_limit, and the
  evaluator's peak RSS grows by less than 32 MiB (it once grew by 650 MiB)."""
  evaluator = textwrap.dedent(f"""
      import json, resource, textwrap
      from maxnucl.evaluation import execution
      def peak_bytes():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
      assert execution.check_program({PASSING!r})["passed"]
      before = peak_bytes()
      result = execution.check_program(textwrap.dedent({FLOOD_EVERY_DESCRIPTOR!r}), timeout_s=5)
      print(json.dumps({{"status": result["status"], "reason": result["reason"],
                        "growth": peak_bytes() - before, "workdir": result["workdir"]}}))
  """)
  completed = subprocess.run([sys.executable, "-c", evaluator], capture_output=True, text=True,
                             timeout=60, check=False)
  assert completed.returncode == 0, completed.stderr
  report = json.loads(completed.stdout)
  assert report["status"] == "output_limit", report
  assert report["growth"] < 32 << 20, f"the evaluator's peak RSS grew by {report['growth']} bytes"
  assert not os.path.exists(report["workdir"])
  assert outside.unchanged()


def test_a_lone_surrogate_in_the_program_fails_it_without_raising():
  result = run("s = '\ud800'\nassert len(s) == 1\n")
  assert result["status"] == "failed" and "surrogates not allowed" in result["stderr"], result


def test_no_program_text_makes_check_programs_raise():
  """A seeded fuzz of program texts: random code points (lone surrogates, NULs and controls
  included), huge lines, truncated valid programs; every one gets a status, none raises."""
  rng = random.Random(27)
  alphabet = ["\0", "\ud800", "\udfff", "\x7f", "\u2028", "\r", "\n", "'", '"', "\\", "#", "(",
              "assert ", "def f():\n  ", "\t", "\U0001f600", "\ufeff", "é"]
  texts = [PASSING[:cut] for cut in range(0, len(PASSING), 7)]
  for _ in range(24):
    pieces = [rng.choice(alphabet) if rng.random() < 0.6 else chr(rng.randrange(0x110000))
              for _ in range(rng.randrange(1, 200))]
    texts.append("".join(pieces))
  texts += ["x = '" + "\ud800" * 100_000 + "'\n", "y = 1  # " + "z" * (1 << 20) + "\n",
            PASSING + "\0\n", "\ufeff" + PASSING, PASSING.replace("\n", "\r\n")]
  results = execution.check_programs(texts, workers=2)
  assert len(results) == len(texts)
  for text, result in zip(texts, results):
    assert result["status"] in execution.STATUSES and result["status"] != "sandbox_error", (
        text[:80], result)
  assert results[-1]["passed"], results[-1]  # CRLF line ends, as python reads a file


def test_a_stray_byte_on_the_completion_pipe_does_not_hide_a_run_to_the_end():
  result = run(write_to_every_descriptor(b"?") + "assert 1 + 1 == 2\n")
  assert result["passed"] and result["status"] == "passed", result


def test_programs_using_multiprocessing_pass_with_a_private_size_limited_dev_shm(outside):
  marker = uuid.uuid4().hex
  result = run(f"""
      import multiprocessing, os
      def square(x):
        return x * x
      if __name__ == "__main__":
        with multiprocessing.Pool(2) as pool:
          assert pool.map(square, range(5)) == [0, 1, 4, 9, 16]
        queue = multiprocessing.Queue()
        process = multiprocessing.Process(target=queue.put, args=(42,))
        process.start()
        assert queue.get(timeout=5) == 42
        process.join()
        open("/dev/shm/{marker}", "w").write("inside")
        try:
          for i in range(16):  # 128 MiB in files below the 16 MiB file size limit
            with open(f"/dev/shm/big{{i}}", "wb") as f:
              f.write(b"x" * (8 << 20))
        except OSError as error:
          print("shm full:", error.strerror)
  """, timeout_s=10)
  assert result["passed"], result
  assert "shm full: No space left on device" in result["stdout"], result
  assert result["containment"]["private_shm"] is True
  assert not os.path.exists(f"/dev/shm/{marker}"), "the sandbox wrote the host's /dev/shm"
  assert_contained(result, outside)


def test_workdirs_left_by_a_killed_evaluator_are_swept_and_live_ones_kept(tmp_path, monkeypatch):
  """A SIGKILLed evaluator cannot remove its runs' directories; the next evaluator using the same
  temporary directory removes them, but never one whose evaluator is alive nor another user's."""
  def evaluator():
    return subprocess.Popen(
        [sys.executable, "-c", "from maxnucl.evaluation import execution\n"
         "execution.check_program('import time\\ntime.sleep(100)\\n', timeout_s=60)\n"],
        env={**os.environ, "TMPDIR": str(tmp_path)})

  def workdirs():
    return set(tmp_path.glob("maxnucl-sandbox-*"))

  def start_evaluator_and_its_run():
    """The new evaluator and its run's directory, once its program started."""
    before = workdirs()
    process = evaluator()
    deadline = time.monotonic() + 10
    while not workdirs() - before and time.monotonic() < deadline:
      time.sleep(0.05)
    new, = workdirs() - before
    time.sleep(0.5)
    return process, new

  alive, live_dir = start_evaluator_and_its_run()
  try:
    killed, killed_dir = start_evaluator_and_its_run()
    foreign, foreign_dir = start_evaluator_and_its_run()
    for process in (killed, foreign):
      process.kill()
      process.wait()
    deadline = time.monotonic() + 5
    while (processes_mentioning(str(killed_dir)) or processes_mentioning(str(foreign_dir))) and (
        time.monotonic() < deadline):
      time.sleep(0.05)  # the killed evaluators' launchers exit
    assert workdirs() == {live_dir, killed_dir, foreign_dir}, "nothing removed them yet"
    os.chown(foreign_dir, 65534, 65534)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert execution.check_program(PASSING)["passed"]
    assert workdirs() == {live_dir, foreign_dir}
  finally:
    alive.kill()
    alive.wait()


def collect_candidates_and_fake_completion(collect: str) -> str:
  """A program that gathers every str/bytes its `collect` code reaches that looks like the
  completion token (32 hex digits), writes each to every open descriptor, then exits with 0
  before its failing assert (a program that found the token this way once passed)."""
  return textwrap.dedent("""
      import gc, os, sys
      found, seen = [], set()
      def visit(value, depth=0):
        if id(value) in seen or depth > 4:
          return
        seen.add(id(value))
        if isinstance(value, (str, bytes)) and len(value) == 32:
          text = value if isinstance(value, bytes) else value.encode(errors="replace")
          if all(c in b"0123456789abcdef" for c in text) and text not in found:
            found.append(text)
        elif isinstance(value, dict):
          for item in list(value.values()):
            visit(item, depth + 1)
        elif isinstance(value, (list, tuple, set, frozenset)):
          for item in list(value):
            visit(item, depth + 1)
  """) + textwrap.dedent(collect) + textwrap.dedent("""
      fds = [int(fd) for fd in os.listdir("/proc/self/fd") if int(fd) > 2]
      for candidate in found:
        for fd in fds:
          try:
            os.write(fd, candidate)
          except OSError:
            pass
      os._exit(0)
      assert False, "the tests never ran"
  """)


def test_the_completion_token_is_not_in_the_harness_frames(outside):
  result = run(collect_candidates_and_fake_completion("""
      frame = sys._getframe(0)
      while frame is not None:
        visit(dict(frame.f_locals))
        for cell in (frame.f_code.co_consts, frame.f_globals):
          visit(cell)
        frame = frame.f_back
  """))
  assert not result["passed"] and result["status"] in ("early_exit", "output_limit"), result
  assert_contained(result, outside)


def test_the_completion_token_is_not_reachable_through_gc(outside):
  result = run(collect_candidates_and_fake_completion("""
      for obj in gc.get_objects():
        visit(obj)
        for referent in gc.get_referents(obj):
          visit(referent, 4)
  """))
  assert not result["passed"] and result["status"] in ("early_exit", "output_limit"), result
  assert_contained(result, outside)
