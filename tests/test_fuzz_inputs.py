"""A seeded mutation fuzz of the small untrusted inputs (issue 28 item 9), in-process: calibration
files (.npy rows and streams, .jsonl) through `maxnucl-prune`, gin files and bindings through the
commands that parse gin (train, the model summary), prompt files through `generate`, and the
launcher's flags through `tools/tpu_vm.py create --dry_run`.

Every mutant must be ACCEPTED validly or REFUSED in one line (exit 2) naming the file or the flag
(tests/fuzzing.py classifies each run: no traceback, no hang, no input modified, no partial
output).  What "validly" means is checked against a reference that does not share the reader's
code:
  * calibration: numpy's own .npy header parser and loader (and the data must cover the file
    exactly: numpy reads only what the header declares), Python's json and strict UTF-8 decoder;
    an accepted file holds only integer ids in [0, vocab) and the pruning report counts exactly
    its tokens;
  * gin: gin-config itself parses the same files and bindings without an error;
  * prompts: Python's strict UTF-8 decoder reads the same text, and the ids handed to the decoder
    are BOS + that text's bytes (`decoding.generate` is replaced by a recorder and the model is
    loaded once: the reader is under test, not the decoder);
  * launcher flags: the value is in gcloud's documented format (the predicates below, written
    from gcloud's documentation) and reaches the printed gcloud call unchanged.
The counts per reader are appended to $MAXNUCL_FUZZ_RECORD (docs' reliability table).
"""

from __future__ import annotations

import io
import json
import pathlib
import shlex
import shutil
import string

import gin
import jax
import numpy as np
import pytest

import fuzzing
from maxnucl import checkpoints, decoding, generate, gin_config, models, summary, train, tpu_vm
from maxnucl.data import vocabularies
from maxnucl.pruning import cli as pruning_cli

REPO = pathlib.Path(__file__).resolve().parents[1]
CFG = models.get_config("gemma2_tiny", num_layers=1)
V = CFG.vocab_size
ROWS, LENGTH = 8, 17  # calibration rows of 17 ids: 16 inputs, 16 targets
TIME_LIMIT_S = 60.0  # per run (a first compile included); a hang is far beyond


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("fuzz_inputs") / "ckpt"
  checkpoints.save(path, CFG, models.init(CFG, jax.random.PRNGKey(0)))
  return path


def _run_mutant(tally, name, path, data, run, names, valid, output=None):
  """Write `data` to `path`, run, classify, record; the output (if any) is removed after."""
  if isinstance(data, str):
    data = data.encode()
  path.write_bytes(data)
  before = fuzzing.tree_digest(path)
  result = run()
  outcome, detail = fuzzing.classify(result, names, before, fuzzing.tree_digest(path),
                                     output=output, valid=valid)
  tally.add(name, outcome, detail)
  if output is not None and pathlib.Path(output).exists():
    shutil.rmtree(output)


# ---- calibration files through maxnucl-prune ------------------------------------------------------

def _npy_reference(data: bytes):
  """The array numpy reads from `data`, or why an accepted file would be wrong: numpy refuses it,
  or its data does not cover the file exactly (numpy would read part of it)."""
  f = io.BytesIO(data)
  try:
    version = np.lib.format.read_magic(f)
    reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
              else np.lib.format.read_array_header_2_0)
    reader(f)
    offset = f.tell()
    array = np.load(io.BytesIO(data), allow_pickle=False)
  except Exception as e:  # noqa: BLE001 - numpy refuses it: any acceptance is wrong
    return f"numpy refuses it ({type(e).__name__})"
  if not isinstance(array, np.ndarray):
    return "numpy reads an archive, not an array"
  if len(data) != offset + array.nbytes:
    return f"numpy reads {array.nbytes} bytes of data of {len(data) - offset}"
  return array


def _npy_tokens(array, seq_len: int):
  """(rows, tokens) the first ROWS examples of a valid calibration array give, or why it is not
  valid calibration data."""
  if not isinstance(array, np.ndarray):
    return array
  if array.dtype.kind not in "iu":
    return f"dtype {array.dtype} holds no token ids"
  if array.ndim == 1:
    if array.size and (array.min() < 0 or array.max() >= V):
      return "ids outside [0, vocab)"
    rows, length = array.size // (seq_len + 1), seq_len + 1
  elif array.ndim == 2 and array.shape[1] >= 2:
    if array.size and (array.min() < 0 or array.max() >= V):
      return "ids outside [0, vocab)"
    rows, length = array.shape
  else:
    return f"shape {array.shape}"
  if rows == 0:
    return "no rows"
  return min(rows, ROWS), min(rows, ROWS) * (length - 1)


def _jsonl_tokens(data: bytes):
  """(rows, tokens) of the first ROWS sequences by Python's json and strict UTF-8, or why the
  file is not valid calibration data."""
  sequences = []
  for raw in data.split(b"\n"):
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError:
      return "not UTF-8"
    if not line.strip():
      continue
    try:
      item = json.loads(line)
    except ValueError:
      return "not JSON"
    ids = item.get("tokens") if isinstance(item, dict) else item
    if not isinstance(ids, list) or len(ids) < 2:
      return "not a list of >= 2 ids"
    if not all(type(t) is int and 0 <= t < V for t in ids):  # pylint: disable=unidiomatic-typecheck
      return "an id that is not an integer in [0, vocab)"
    sequences.append(len(ids))
  if not sequences:
    return "no sequences"
  return min(len(sequences), ROWS), sum(n - 1 for n in sequences[:ROWS])


def _calibration_run(checkpoint, path, out, report):
  argv = ["--input", str(checkpoint), "--output", str(out), "--method", "wanda_channel",
          "--ratio", "0.25", "--calibration", str(path), "--calibration_examples", str(ROWS),
          "--batch_size", str(ROWS), "--seq_len", str(LENGTH - 1), "--report", str(report)]
  return lambda: fuzzing.run_main(pruning_cli.prune_main, argv, TIME_LIMIT_S)


def _calibration_valid(expected, report):
  def valid():
    if isinstance(expected, str):
      return f"accepted, but the reference says: {expected}"
    got = json.loads(report.read_text())["calibration"]
    if (got["examples"], got["tokens"]) != expected:
      return f"read {got['examples']} rows / {got['tokens']} tokens, expected {expected}"
    return None
  return valid


def test_fuzz_calibration_files(tiny_checkpoint, tmp_path):
  rng = np.random.default_rng(2801)
  rows = rng.integers(3, V, (ROWS, LENGTH))
  out, report = tmp_path / "out", tmp_path / "report.json"
  tally = fuzzing.Tally("calibration files (maxnucl-prune --calibration)")

  bases = {"rows.npy": io.BytesIO(), "stream.npy": io.BytesIO()}
  np.save(bases["rows.npy"], rows.astype(np.int64))
  np.save(bases["stream.npy"], rows.ravel().astype(np.int32))
  for name, buffer in bases.items():
    for label, data in fuzzing.byte_mutants(buffer.getvalue(), rng, 50):
      path = tmp_path / name
      expected = _npy_tokens(_npy_reference(data), LENGTH - 1)
      _run_mutant(tally, f"{name}:{label}", path, data,
                  _calibration_run(tiny_checkpoint, path, out, report), [name],
                  _calibration_valid(expected, report), output=out)
      report.unlink(missing_ok=True)

  lines = [row.tolist() if r % 2 else {"tokens": row.tolist()} for r, row in enumerate(rows)]
  text = "".join(fuzzing.dumps(line) + "\n" for line in lines)
  jsonl_mutants = list(fuzzing.text_mutants(text, rng, 30))
  for i in range(50):  # a field of one line: deleted, of another type or range, perturbed
    at = int(rng.integers(ROWS))
    (label, value), = fuzzing.json_mutants(lines[at], rng, 1)
    mutated = list(lines)
    mutated[at] = value
    jsonl_mutants.append((f"json{i}:line{at + 1}:{label}",
                          "".join(fuzzing.dumps(line) + "\n" for line in mutated).encode()))
  for label, data in jsonl_mutants:
    path = tmp_path / "rows.jsonl"
    _run_mutant(tally, f"rows.jsonl:{label}", path, data,
                _calibration_run(tiny_checkpoint, path, out, report), ["rows.jsonl"],
                _calibration_valid(_jsonl_tokens(data), report), output=out)
    report.unlink(missing_ok=True)
  tally.assert_clean()
  assert tally.counts[fuzzing.ACCEPTED] and tally.counts[fuzzing.REFUSED], tally.report()


# ---- gin files and bindings -----------------------------------------------------------------------

def _gin_accepts(files, bindings):
  """Whether gin-config itself parses the files and bindings (the reference)."""
  gin.clear_config()
  try:
    with gin_config._without_gin_path_not_found():  # pylint: disable=protected-access
      gin.parse_config_files_and_bindings(files, bindings)
    return None
  except BaseException as e:  # noqa: BLE001 - any failure: gin refuses them
    return f"gin refuses them ({type(e).__name__})"
  finally:
    gin.clear_config()


def _train_without_training(monkeypatch):
  """train.main up to the trainer: the gin configuration is parsed and checked, the model
  configuration is built from it; the training loop itself does not run."""
  built = []
  monkeypatch.setattr(train, "train_loop", lambda workdir, **options: built.append(
      models.configured_model()) or {"workdir": pathlib.Path(workdir), "history": []})
  monkeypatch.setattr(train, "_print_outputs", lambda result: None)
  return built


def _gin_run(main, argv):
  def run():
    gin.clear_config()
    try:
      return fuzzing.run_main(main, argv, TIME_LIMIT_S)
    finally:
      gin.clear_config()
  return run


def test_fuzz_gin_files_and_bindings(tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)  # the shipped files include 'gin/...' relative to the checkout
  _train_without_training(monkeypatch)
  rng = np.random.default_rng(2802)
  tally = fuzzing.Tally("gin files and bindings (train, summary)")
  extra = tmp_path / "extra.gin"
  extra.write_text("train_loop.log_every = 5\nEXTRA_STEPS = 7\n")
  base = ((REPO / "gin" / "demo_cpu.gin").read_text()
          + f"include '{extra}'\nimport maxnucl.losses\ntrain_loop.checkpoint_every = "
            f"%EXTRA_STEPS\nmodel_config.num_layers = 2\n")
  bindings = ["train_loop.num_steps = 5", "NUCL_ALPHA = 0.5", "model_config.num_layers = 1",
              "learning_rate_schedule.warmup_steps = 2"]
  selectors = sorted({line.split("=")[0].strip() for line in base.splitlines() + bindings
                      if "=" in line and not line.startswith("#")})
  file_mutants = [("run.gin", label, data) for label, data in fuzzing.text_mutants(base, rng, 120)]
  file_mutants += [("extra.gin", label, data) for label, data in
                   fuzzing.text_mutants(extra.read_text(), rng, 20)]
  original_extra = extra.read_bytes()
  for i, (name, label, data) in enumerate(file_mutants):
    path = tmp_path / name
    if name == "extra.gin":
      (tmp_path / "run.gin").write_text(base)
    else:
      extra.write_bytes(original_extra)
    files = [str(tmp_path / "run.gin")]
    main, argv = ((train.main, ["--gin_file", files[0], "--workdir", str(tmp_path / "work")])
                  if i % 2 else (summary.main, ["--gin_file", files[0]]))
    path.write_bytes(data)
    problem = _gin_accepts(files, [])
    _run_mutant(tally, f"{name}:{label}", path, data, _gin_run(main, argv),
                ["run.gin", "extra.gin"],  # the mutated file, or the other one it breaks
                lambda p=problem: p and f"accepted, but {p}", output=tmp_path / "work")
  extra.write_bytes(original_extra)
  (tmp_path / "run.gin").write_text(base)
  for label, data in fuzzing.text_mutants("\n".join(bindings), rng, 80):
    try:
      mutated = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:  # argv is text: non-UTF-8 bytes arrive as surrogate escapes
      mutated = data.decode("utf-8", "surrogateescape").splitlines()
    problem = _gin_accepts([str(tmp_path / "run.gin")], mutated)
    argv = ["--gin_file", str(tmp_path / "run.gin")] + [f"--gin_param={b}" for b in mutated]
    stamp = tmp_path / "bindings.txt"  # the "input" of a bindings mutant: its text
    _run_mutant(tally, f"bindings:{label}", stamp, data, _gin_run(summary.main, argv),
                ["gin binding", *selectors], lambda p=problem: p and f"accepted, but {p}")
  tally.assert_clean()
  assert tally.counts[fuzzing.ACCEPTED] and tally.counts[fuzzing.REFUSED], tally.report()


# ---- prompt files through generate ----------------------------------------------------------------

def test_fuzz_prompt_files(tiny_checkpoint, tmp_path, monkeypatch):
  handed = []
  monkeypatch.setattr(decoding, "generate", lambda cfg, params, prompts, *a, **k: (
      handed.append(prompts) or [[] for _ in prompts]))
  model = generate.load_model(str(tiny_checkpoint))  # once: the prompt file is under test
  monkeypatch.setattr(generate, "load_model", lambda checkpoint, **kwargs: model)
  rng = np.random.default_rng(2803)
  tally = fuzzing.Tally("prompt files (generate --prompt_file)")
  text = "Q: Ada has 3 apples; Zoë buys 2 more (½ price, 漢字).\nHow many?\nA: "
  byte_tokenizer = vocabularies.ByteTokenizer()
  mutants = list(fuzzing.byte_mutants(text.encode(), rng, 100))
  mutants += list(fuzzing.text_mutants(text, rng, 50))
  path = tmp_path / "prompt.txt"
  for label, data in mutants:
    handed.clear()

    def valid(data=data):
      try:
        reference = data.decode("utf-8")
      except UnicodeDecodeError:
        return "accepted, but the file is not UTF-8"
      expected = [[byte_tokenizer.bos_id] + byte_tokenizer.encode(reference)]
      return None if handed == [expected] else f"handed {handed}, expected {expected}"
    argv = ["--checkpoint", str(tiny_checkpoint), "--prompt_file", str(path),
            "--max_new_tokens", "1"]
    _run_mutant(tally, label, path, data,
                lambda: fuzzing.run_main(generate.main, argv, TIME_LIMIT_S), ["prompt.txt"],
                valid)
  tally.assert_clean()
  assert tally.counts[fuzzing.ACCEPTED] and tally.counts[fuzzing.REFUSED], tally.report()


# ---- launcher flags through tools/tpu_vm.py --dry_run ---------------------------------------------

LOWER_DIGITS = set(string.ascii_lowercase + string.digits)


def _gcloud_name(value: str, low: int, high: int, extra: str = "-") -> bool:
  """low..high characters of lowercase letters, digits and `extra`, a letter first, a letter or
  digit last (gcloud's resource-name rule)."""
  return (low <= len(value) <= high and set(value) <= LOWER_DIGITS | set(extra)
          and value[0] in string.ascii_lowercase and value[-1] in LOWER_DIGITS)


def _gcloud_zone(value: str) -> bool:
  """REGION-LETTER with REGION = CONTINENT-DIRECTIONn (us-central2-b, europe-west4-a)."""
  parts = value.split("-")
  return (len(parts) >= 3 and len(parts[-1]) == 1 and parts[-1] in string.ascii_lowercase
          and all(p and set(p) <= LOWER_DIGITS for p in parts) and parts[0].isalpha()
          and parts[-2][-1].isdigit() and all(p.isalpha() for p in parts[1:-2])
          and parts[-2].rstrip(string.digits).isalpha() and value.isascii())


def _gcloud_project(value: str) -> bool:
  """6-30 of lowercase letters, digits and hyphens, a letter first, no hyphen last; an optional
  `domain:` prefix (legacy domain-scoped projects)."""
  domain, _, project = value.rpartition(":")
  return (_gcloud_name(project, 6, 30) and value.isascii()
          and (not domain or (set(domain) <= LOWER_DIGITS | set(".-")
                              and domain[0] in LOWER_DIGITS and domain[-1] in LOWER_DIGITS)))


def _runtime_version(value: str) -> bool:
  return (1 <= len(value) <= 128 and value.isascii() and set(value) <= LOWER_DIGITS | set("-._")
          and value[0] in LOWER_DIGITS and value[-1] in LOWER_DIGITS)


def _accelerator(value: str) -> bool:
  prefix, _, n = value.rpartition("-")
  for g in tpu_vm.GENERATIONS.values():
    if prefix == g.prefix and n.isascii() and n.isdigit() and str(int(n)) == n:
      count = int(n)
      return count in g.sizes if g.sizes else (0 < count <= g.max_n and count % g.multiple == 0)
  return False


FLAGS = {  # flag: (a valid value, gcloud's format, the gcloud argument it becomes)
    "--name": ("nucl-a1", lambda v: _gcloud_name(v, 1, 63) and v.isascii(), None),
    "--zone": ("us-central2-b", _gcloud_zone, "--zone="),
    "--project": ("my-proj-42", _gcloud_project, "--project="),
    "--accelerator_type": ("v5litepod-16", _accelerator, "--accelerator-type="),
    "--runtime_version": ("tpu-ubuntu2204-base", _runtime_version, "--version="),
}
HOSTILE = ["", " ", "us west", "--project=x", "--zone=x", "x;reboot", "$(id)", "a\nb",
           "US-CENTRAL2-B", "us-central2", "us-central2-b ", "p" * 31, "proj-", "1proj",
           "v5litepod-\u0661\u0666", "v5litepod-016", "tpu-ubuntu2204-base\x00", "é" * 8]


def _flag_mutants(rng, count):
  for i in range(count):
    flag = list(FLAGS)[int(rng.integers(len(FLAGS)))]
    valid_value = FLAGS[flag][0]
    if i % 3 == 0:
      value = HOSTILE[int(rng.integers(len(HOSTILE)))]
    else:
      (label, data), = fuzzing.byte_mutants(valid_value.encode(), rng, 1)
      value = data.decode("latin-1")
    yield flag, value


def test_fuzz_launcher_flags(tmp_path, monkeypatch, capsys):
  for variable in (tpu_vm.ZONE_ENV, tpu_vm.PROJECT_ENV):
    monkeypatch.delenv(variable, raising=False)
  rng = np.random.default_rng(2804)
  tally = fuzzing.Tally("launcher flags (tpu_vm create --dry_run)")
  stamp = tmp_path / "flags.txt"  # the mutant's text: the "input" that must stay unchanged
  for i, (flag, value) in enumerate(_flag_mutants(rng, 300)):
    flags = {name: spec[0] for name, spec in FLAGS.items()}
    flags[flag] = value
    argv = ["create", "--dry_run"] + [f"{name}={v}" for name, v in flags.items()]
    result = {}

    def run(argv=argv, result=result):
      result["run"] = fuzzing.run_main(tpu_vm.main, argv, TIME_LIMIT_S)
      return result["run"]

    def valid(flag=flag, value=value, result=result):
      if not FLAGS[flag][1](value):
        return f"{flag}={value!r} is not in gcloud's format"
      words = shlex.split(result["run"].stdout)
      argument = value if FLAGS[flag][2] is None else f"{FLAGS[flag][2]}{value}"
      return None if argument in words else f"{argument!r} not in the gcloud call {words}"
    _run_mutant(tally, f"{i}:{flag}={value!r}", stamp,
                f"{flag}={value}".encode("utf-8", "surrogateescape"), run, [flag], valid)
  capsys.readouterr()
  tally.assert_clean()
  assert tally.counts[fuzzing.ACCEPTED] and tally.counts[fuzzing.REFUSED], tally.report()
