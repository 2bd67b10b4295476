"""What `maxnucl.gin_config` refuses in gin files and bindings, through every command that reads
gin (train, evaluate, the reproduction, the data command, the model summary, the pruner's
--eval_gin_param): an include cycle, an import of a module that does not exist, a macro that is
referenced but never defined, an include that resolves to no file and text that is not UTF-8 —
each in one line (exit 2) naming the file (or the binding) and the line, before anything is
loaded or created."""

import pathlib

import gin
import pytest

from maxnucl import evaluate, gin_config, summary, train
from maxnucl.data import cli as data_cli
from maxnucl.pruning import cli as pruning_cli
from maxnucl.reproduction import cli as reproduction_cli

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "gin" / "demo_cpu.gin")


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def _commands(tmp_path):
  """Each command line that parses gin files, as (name, argv for one --gin_file F)."""
  return {
      "train": lambda f: train.main(["--gin_file", f, "--workdir", str(tmp_path / "run")]),
      "evaluate": lambda f: evaluate.main(["--checkpoint", str(tmp_path / "ckpt"), "--output",
                                           str(tmp_path / "eval"), "--gin_file", f]),
      "reproduce": lambda f: reproduction_cli.main(["--output", str(tmp_path / "repro"),
                                                    "--gin_file", f]),
      "data cache": lambda f: data_cli.main(["cache", "--source", "synthetic_arithmetic",
                                             "--cache_dir", str(tmp_path / "cache"),
                                             "--gin_file", f]),
      "summary": lambda f: summary.main(["--gin_file", f]),
  }


def _one_line_error(capsys) -> str:
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1, err
  assert err[0].startswith("error: ") or ": error: " in err[0], err
  return err[0]


def _files(tmp_path):
  """name -> (gin file, what its one-line refusal must contain)."""
  (tmp_path / "self.gin").write_text("# includes itself\ninclude '%s'\n" % (tmp_path / "self.gin"))
  (tmp_path / "a.gin").write_text("include '%s'\n" % (tmp_path / "b.gin"))
  (tmp_path / "b.gin").write_text("NUCL_ALPHA = 1.0\n\ninclude '%s'\n" % (tmp_path / "a.gin"))
  (tmp_path / "import.gin").write_text(f"include '{DEMO}'\nimport maxnucl.nonexistent\n")
  (tmp_path / "macro.gin").write_text(f"include '{DEMO}'\n\ntrain_loop.num_steps = "
                                      f"%UNDEFINED_MACRO\n")
  (tmp_path / "missing.gin").write_text("include 'no/such/file.gin'\n")
  (tmp_path / "bytes.gin").write_bytes(b"# ok\nNUCL_ALPHA = 1.0 # \xff\xfe\n")
  return {
      "include cycle": ("self.gin", ["self.gin, line 2", "includes itself"]),
      "indirect cycle": ("a.gin", ["b.gin, line 3", "a.gin", "cycle"]),
      "missing module": ("import.gin", ["import.gin, line 2", "maxnucl.nonexistent"]),
      "undefined macro": ("macro.gin", ["macro.gin, line 3", "%UNDEFINED_MACRO",
                                        "not defined"]),
      "missing include": ("missing.gin", ["missing.gin, line 1", "no/such/file.gin"]),
      "not UTF-8": ("bytes.gin", ["bytes.gin, line 2", "UTF-8"]),
  }


@pytest.mark.parametrize("command", ["train", "evaluate", "reproduce", "data cache", "summary"])
@pytest.mark.parametrize("case", ["include cycle", "indirect cycle", "missing module",
                                  "undefined macro", "missing include", "not UTF-8"])
def test_bad_gin_file_is_refused_in_one_line_naming_file_and_line(command, case, tmp_path,
                                                                  capsys):
  name, fragments = _files(tmp_path)[case]
  assert _commands(tmp_path)[command](str(tmp_path / name)) == 2
  line = _one_line_error(capsys)
  for fragment in fragments:
    assert fragment in line, (fragment, line)
  assert len(line) < 400, line  # no dump of the whole configuration
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      ["self.gin", "a.gin", "b.gin", "import.gin", "macro.gin", "missing.gin", "bytes.gin"])


@pytest.mark.parametrize("binding, fragments", [
    ("include '{self}'", ["self.gin, line 2", "includes itself"]),
    ("import maxnucl.nonexistent", ["gin binding 'import maxnucl.nonexistent'",
                                    "maxnucl.nonexistent"]),
    ("train_loop.num_steps = %NOPE", ["gin binding 'train_loop.num_steps = %NOPE'", "%NOPE",
                                      "not defined"]),
])
def test_bad_bindings_are_refused_in_one_line_naming_the_binding(binding, fragments, tmp_path,
                                                                 capsys):
  (tmp_path / "self.gin").write_text("# includes itself\ninclude '%s'\n" % (tmp_path / "self.gin"))
  binding = binding.format(self=tmp_path / "self.gin")
  assert train.main(["--gin_file", DEMO, "--gin_param", binding, "--workdir",
                     str(tmp_path / "run")]) == 2
  line = _one_line_error(capsys)
  for fragment in fragments:
    assert fragment in line, (fragment, line)
  assert not (tmp_path / "run").exists()


def test_pruner_eval_gin_params_are_checked_like_every_other_binding(tmp_path, capsys):
  for binding, fragment in [("import maxnucl.nonexistent", "maxnucl.nonexistent"),
                            ("gsm8k.num_shots = %NOPE", "%NOPE")]:
    gin.clear_config()
    assert pruning_cli.prune_main(["--input", str(tmp_path), "--output", str(tmp_path / "out"),
                                   "--method", "magnitude", "--ratio", "0.5",
                                   "--eval_gin_param", binding]) == 2
    line = _one_line_error(capsys)
    assert fragment in line and binding in line, line


def test_macros_defined_anywhere_and_gin_constants_are_accepted(tmp_path):
  """A macro may be defined after its use, in another file or in a binding; %gin.REQUIRED is a
  constant, not a macro."""
  (tmp_path / "uses.gin").write_text(f"include '{DEMO}'\ntrain_loop.num_steps = %STEPS\n")
  gin_config.parse([str(tmp_path / "uses.gin")], ["STEPS = 7"])
  assert gin.query_parameter("%STEPS") == 7
  gin.clear_config()
  (tmp_path / "defines.gin").write_text("STEPS = 9\n")
  gin_config.parse([str(tmp_path / "uses.gin"), str(tmp_path / "defines.gin")], [])
  assert gin.query_parameter("%STEPS") == 9
  gin.clear_config()
  (tmp_path / "required.gin").write_text(f"include '{DEMO}'\ntrain_loop.num_steps = "
                                         f"%gin.REQUIRED\ntrain_loop.num_steps = 4\n")
  gin_config.parse([str(tmp_path / "required.gin")], [])


def test_a_file_included_twice_without_a_cycle_is_accepted(tmp_path):
  (tmp_path / "steps.gin").write_text("train_loop.num_steps = 3\n")
  (tmp_path / "top.gin").write_text(f"include '{DEMO}'\ninclude '{tmp_path / 'steps.gin'}'\n"
                                    f"include '{tmp_path / 'steps.gin'}'\n")
  gin_config.parse([str(tmp_path / "top.gin")], [])
  assert gin.query_parameter("train_loop.num_steps") == 3


def test_the_checks_after_parsing_name_the_file_and_line_of_the_binding(tmp_path):
  """A mistyped value or an unread macro is named with where it was read (gin itself keeps no
  locations): the file and line, or the --gin_param."""
  (tmp_path / "run.gin").write_text(f"include '{DEMO}'\n\ntrain_loop.num_steps = 'five'\n")
  with pytest.raises(gin_config.GinConfigError,
                     match=r"train_loop.num_steps = 'five': expected int \(gin file .*run.gin, "
                           r"line 3\)"):
    gin_config.parse([str(tmp_path / "run.gin")], [])
  gin.clear_config()
  with pytest.raises(gin_config.GinConfigError,
                     match=r"seq_len = 'long': expected int \(.*%DATA_SEQ_LEN at gin binding "
                           r"\"DATA_SEQ_LEN = 'long'\"\)"):
    gin_config.parse([DEMO], ["DATA_SEQ_LEN = 'long'"])
  gin.clear_config()
  (tmp_path / "macro.gin").write_text(f"include '{DEMO}'\nNUCL_ALPH = 3.0\n")
  with pytest.raises(gin_config.GinConfigError,
                     match=r"^gin file .*macro.gin, line 2: gin macro\(s\) defined but read by "
                           r"nothing: NUCL_ALPH \(did you mean NUCL_ALPHA\?\)"):
    gin_config.parse([str(tmp_path / "macro.gin")], [])
