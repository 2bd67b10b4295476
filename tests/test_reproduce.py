"""tools/reproduce.py --quick: every stage runs through the real command line and leaves finite
results, a report and plots; a rerun skips finished stages."""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from maxnucl import checkpoints, paths
from maxnucl.reproduction import cli, stages
from tolerances import EPS64, decoder_terms, rounding_atol

REPO = pathlib.Path(__file__).resolve().parents[1]


def _reproduce(*args, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, str(REPO / "tools" / "reproduce.py"), *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
  output = tmp_path_factory.mktemp("reproduce") / "quick"
  done = _reproduce("--quick", "--output", str(output))
  assert done.returncode == 0, done.stderr[-3000:]
  return output, done


def _numbers(value, path=""):
  if isinstance(value, bool):
    return
  if isinstance(value, (int, float)):
    yield path, value
  elif isinstance(value, dict):
    for k, v in value.items():
      yield from _numbers(v, f"{path}/{k}")
  elif isinstance(value, list):
    for i, v in enumerate(value):
      yield from _numbers(v, f"{path}[{i}]")


def test_every_stage_leaves_finite_results(quick_run):
  output, done = quick_run
  results = json.loads((output / "results.json").read_text())
  assert set(results["stages"]) == set(stages.STAGES)
  for stage in stages.STAGES:
    assert (output / "stages" / f"{stage}.json").is_file()
  bad = [p for p, v in _numbers(results) if not math.isfinite(v)]
  assert not bad, bad[:10]
  s = results["stages"]
  # what each stage must have produced
  assert s["data"]["splits"]["train"]["files"] > 0 and s["data"]["files_sha256"]
  assert all(f["sha256"] and f["split"] in ("train", "finetune", "validation", "test")
             for f in s["data"]["files"])
  # one pre-training per seed, and each seed's fine-tunes start from its own
  assert set(s["pretrain"]["runs"]) == {"0", "1"}
  assert all(run["final"]["nll"] > 0 for run in s["pretrain"]["runs"].values())
  assert (s["pretrain"]["runs"]["0"]["final"]["entropy_per_layer"]
          != s["pretrain"]["runs"]["1"]["final"]["entropy_per_layer"])
  for seed in ("0", "1"):
    gin_text = (output / "runs" / f"ft_standard_s{seed}" / "run.gin").read_text()
    assert f"/runs/pretrain_s{seed}/checkpoints/" in gin_text
  assert set(s["finetune"]["runs"]) == {"standard", "ent@0.0003", "ent@0.001", "mstd@0.05"}
  standard = s["finetune"]["runs"]["standard"]
  assert set(standard) == {"0", "1"}
  assert len(standard["0"]["curve"]) == 2 and "accuracy_strict" in standard["0"]["final"]
  methods = {r["method"] for r in s["prune"]["rows"]}
  assert methods == {"entropy", "random", "magnitude", "srinivas_babu", "stahlberg_byrne",
                     "wanda_channel", "flap", "lp", "scar_prot", "activation"}
  for row in s["prune"]["rows"]:  # the pruned checkpoints really are smaller
    assert sum(row["ffn_widths"]) == round(4 * 128 * (1 - row["ratio"]))
  # every evaluation keeps its per-row NLL sums (the report's bootstrap resamples them)
  row = s["prune"]["rows"][0]
  # float64: this sequential and numpy's pairwise sum of the same non-negative row sums (a
  # rounding per row, relative to the total) and a division
  sums = row["nll_rows"]["sums"]
  assert sum(sums) / sum(row["nll_rows"]["tokens"]) == pytest.approx(
      row["nll"], rel=EPS64 * (len(sums) + 1), abs=0)
  # the premise of entropy pruning: a rank correlation per layer of every standard model
  for premise in s["prune"]["premise"].values():
    assert len(premise["per_layer"]) == 4
    assert all(-1 <= rho <= 1 for rho in premise["per_layer"].values())
  assert set(s["nucl_prune"]["premise"]) == {"ent", "mstd"} and s["diversity"]["premise"]
  assert {r["layers"] for r in s["layer_subsets"]["rows"]} == {"all", "bottom_half", "even"}
  assert {r["variant"] for r in s["nucl_prune"]["rows"]} == {"ent", "mstd"}
  widths = s["reallocation"]["widths"]
  assert sum(widths["middle"]) == sum(widths["uniform"]) and 0 in widths["middle"]
  assert set(s["nucl_pretrain"]["runs"]) == {"standard", "nucl_ent"}
  assert len(s["diversity"]["prune_rows"]) == 2
  assert all(0 < share <= 1 for row in s["supernodes"]["rows"]
             for share in row["lp_share"].values())
  export = s["export"]
  assert len(set(export["ffn_widths"])) > 1  # a global budget: per-layer widths
  exported, = (output / "pruned" / "standard_s0").glob("*_global_s0/checkpoint")
  cfg, _ = checkpoints.load(exported)
  for mode in ("pad", "custom_code"):  # transformers and maxnucl: a logit's roundings apart
    result = export["exports"][mode]
    np.testing.assert_allclose(result["max_abs_logit_diff"], 0.0, atol=rounding_atol(
        result["max_abs_logit"], decoder_terms(cfg, result["tokens_compared"])))
  assert (export["exports"]["custom_code"]["hf_parameters"]
          < export["exports"]["pad"]["hf_parameters"])
  # every finding has a verdict
  assert {v.get("verdict") for v in results["summary"].values()} <= {
      "holds", "does not hold", "inconclusive", "not testable at this scale", None}
  assert f"report:  {output / 'report.md'}" in done.stdout


def test_report_and_plots(quick_run):
  output, _ = quick_run
  text = (output / "report.md").read_text()
  for heading in ("## Verdicts", "## NUCL vs standard fine-tuning", "## Pruning 25%",
                  "## Entropy pruning of half the layers", "## NUCL, then entropy pruning",
                  "## FFN reallocation", "## NUCL during pre-training",
                  "## Inter-neuron diversity term", "## Supernodes",
                  "## Re-export to Hugging Face"):
    assert heading in text
  assert "± " in text and "(n=2)" in text
  # the verdict table names each finding's source and the figures it rests on
  verdicts = text.split("## Verdicts", 1)[1].split("\n## ", 1)[0]
  assert "| finding | source | verdict | measured | rule |" in verdicts
  for finding in ("nucl_then_prune", "reallocation"):
    assert any(line.startswith(f"| {finding} | new in this study")
               for line in verdicts.splitlines()), finding
  assert "arithmetic NLL" in verdicts and "rho(entropy, LP)" in verdicts
  assert "95 % bootstrap" in verdicts
  pngs = sorted((output / "figures").glob("*.png"))
  assert len(pngs) >= 5
  for png in pngs:
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"(figures/{png.name})" in text


def test_rerun_skips_finished_stages_and_redoes_a_missing_one(quick_run):
  output, _ = quick_run
  stage_files = {p: p.stat().st_mtime_ns for p in (output / "stages").glob("*.json")}
  logs = {p: p.stat().st_size for p in (output / "runs").glob("*/train.log")}
  (output / "stages" / "supernodes.json").unlink()
  done = _reproduce("--quick", "--output", str(output), "--stages", "supernodes", "export")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "stage supernodes: running" in done.stderr
  assert "stage export: running" not in done.stderr
  for path, mtime in stage_files.items():
    if path.name != "supernodes.json":
      assert path.stat().st_mtime_ns == mtime, path
  assert (output / "stages" / "supernodes.json").exists()
  assert {p: p.stat().st_size for p in (output / "runs").glob("*/train.log")} == logs


def _files(root: str | os.PathLike) -> dict[str, bytes]:
  """Every file below the directory or URL `root`: {relative name: content}."""
  root = paths.as_path(root)
  return {"/".join(parts): root.joinpath(*parts).read_bytes() for parts in paths.files_below(root)}


def _without_timing(value):
  """A stage's or the report's JSON without its wall times (which differ from run to run)."""
  if isinstance(value, dict):
    return {k: _without_timing(v) for k, v in value.items() if k != "wall_time_s"}
  if isinstance(value, list):
    return [_without_timing(v) for v in value]
  return value


def test_a_url_output_holds_what_a_local_one_does_and_a_rerun_resumes_from_it(gcs_bucket,
                                                                              tmp_path):
  """--output gs://...: the same files, with the same content (but the wall times and the
  working directory's path) as a local --output; a rerun with a new staging directory downloads
  the finished stage instead of running it again; a stage whose record never reached the bucket
  (an interrupted upload) runs again."""
  # names of equal length: sp.model records its training paths in length-prefixed fields
  local, staging = tmp_path / "local", tmp_path / "stage"
  url = f"{gcs_bucket}/repro"
  for output, extra in ((str(local), ()), (url, ("--staging_dir", str(staging)))):
    done = _reproduce("--quick", "--output", output, *extra, "--stages", "data")
    assert done.returncode == 0, done.stderr[-3000:]
  assert f"report:  {url}/report.md" in done.stdout
  remote, expected = _files(url), _files(local)
  expected = {name: data for name, data in expected.items() if not name.startswith(".jax_cache/")}
  assert set(remote) == set(expected) | {"uploads/data.json"}
  for name, data in expected.items():
    got = remote[name].replace(str(staging).encode(), str(local).encode())
    if name.endswith(".json"):
      assert _without_timing(json.loads(got)) == _without_timing(json.loads(data)), name
    else:
      assert got == data, name
  uploaded = json.loads(remote["uploads/data.json"])["files"]
  assert uploaded[-1] == "stages/data.json"  # the stage's record, uploaded last
  assert set(uploaded) == set(expected) - {"report.md", "results.json"}

  rerun = tmp_path / "rerun"
  done = _reproduce("--quick", "--output", url, "--staging_dir", str(rerun), "--stages", "data")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "stage data: running" not in done.stderr
  assert _files(f"{url}/stages")["data.json"] == remote["stages/data.json"]
  assert (rerun / "data" / "vocab" / "sp.model").read_bytes() == remote["data/vocab/sp.model"]

  (paths.as_path(url) / "stages" / "data.json").unlink()  # an upload cut before the record
  done = _reproduce("--quick", "--output", url, "--staging_dir", str(tmp_path / "third"),
                    "--stages", "data", "--no_report")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "stage data: running" in done.stderr
  assert "downloaded" not in done.stderr
  assert (paths.as_path(url) / "stages" / "data.json").exists()



def _layout(names) -> set[str]:
  """The file names, less those of the checkpoints' array data files (`.../d/<random hex>`, whose
  names and number vary from run to run), TensorBoard's names without their time and host."""
  return {re.sub(r"/events\.out\.tfevents\..*$", "/events.out.tfevents.*", name)
          for name in names if not re.search(r"/d/[0-9a-f]+$", name)}


def test_a_url_output_of_the_pretrain_stage_holds_the_local_runs_and_a_rerun_downloads_them(
    gcs_bucket, tmp_path):
  """--output gs://... --stages pretrain (the cheapest stage that trains, with its data stage):
  the bucket holds every file of a local output (but the compilation cache); each run's
  checkpoints hold the local run's params bit for bit, its metrics.jsonl the same losses, the
  stage's record the same results; the record is uploaded last; a rerun with a new staging
  directory downloads the stage and trains nothing."""
  local, staging = tmp_path / "local", tmp_path / "stage"  # names of equal length, as above
  url = f"{gcs_bucket}/repro"
  for output, extra in ((str(local), ()), (url, ("--staging_dir", str(staging)))):
    done = _reproduce("--quick", "--output", output, *extra, "--stages", "pretrain",
                      "--no_report")
    assert done.returncode == 0, done.stderr[-3000:]
  remote = _files(url)
  expected = {name for name in _files(local) if not name.startswith(".jax_cache/")}
  assert _layout(remote) == _layout(expected | {"uploads/data.json", "uploads/pretrain.json"})
  assert json.loads(remote["uploads/pretrain.json"])["files"][-1] == "stages/pretrain.json"
  record = remote["stages/pretrain.json"].replace(str(staging).encode(), str(local).encode())
  assert _without_timing(json.loads(record)) == _without_timing(
      json.loads((local / "stages" / "pretrain.json").read_text()))
  runs = sorted({name.split("/")[1] for name in expected if name.startswith("runs/")})
  assert runs == ["pretrain_s0", "pretrain_s1"]
  for run in runs:
    remote_ckpt = checkpoints.resolve(f"{url}/runs/{run}")
    local_ckpt = checkpoints.resolve(local / "runs" / run)
    assert str(remote_ckpt).rsplit("/", 1)[1] == local_ckpt.name  # the same final step
    for a, b in zip(*(jax.tree.leaves(checkpoints.load(c)[1]) for c in (remote_ckpt,
                                                                         local_ckpt))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    losses = [[json.loads(line)["loss"] for line in text.splitlines()] for text in (
        remote[f"runs/{run}/metrics.jsonl"].decode(),
        (local / "runs" / run / "metrics.jsonl").read_text())]
    assert losses[0] == losses[1] and losses[0]

  rerun = tmp_path / "rerun"
  done = _reproduce("--quick", "--output", url, "--staging_dir", str(rerun), "--stages",
                    "pretrain", "--no_report")
  assert done.returncode == 0, done.stderr[-3000:]
  assert "stage pretrain: running" not in done.stderr
  assert "run pretrain_s0" not in done.stderr and "run pretrain_s1" not in done.stderr
  assert _files(url) == remote

@pytest.mark.parametrize("argv, message", [
    (["--output", "OUT", "--staging_dir", "S"],
     "--staging_dir is for a URL --output (a local --output is worked in directly)"),
    (["--output", "gs://b/x", "--staging_dir", "gs://b/s"],
     "--staging_dir gs://b/s: expected a local directory, not a URL"),
    (["--output", "gs://b/x", "--publish_docs", "gs://b/docs"],
     "--publish_docs gs://b/docs: expected a local directory, not a URL"),
])
def test_what_cannot_be_a_url_is_refused_in_one_line(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_:
    cli.main(argv)
  assert exit_.value.code == 2
  assert capsys.readouterr().err.splitlines()[-1].endswith(message)


def test_changed_settings_are_refused(quick_run, tmp_path):
  output, _ = quick_run
  done = _reproduce("--quick", "--output", str(output), "--gin_param",
                    "reproduce.finetune_steps = 9", "--no_report")
  assert done.returncode == 2
  assert "other settings (differing: ['finetune_steps'])" in done.stderr


def test_an_output_of_the_earlier_layout_is_refused(tmp_path):
  """A directory written when every seed shared one pre-trained model (no "layout" in its
  settings.json) is not mixed with per-seed pre-training."""
  config = stages.Settings()
  settings = json.loads(json.dumps(__import__("dataclasses").asdict(config)))
  settings["corpus_root"] = None
  (tmp_path / "out").mkdir()
  (tmp_path / "out" / "settings.json").write_text(json.dumps(settings))
  with pytest.raises(stages.ReproductionError, match="differing: \\['layout'\\]"):
    stages.Reproduction(tmp_path / "out", config, progress=False)



def test_unknown_stages_and_a_missing_corpus_are_refused_before_anything_is_written(tmp_path):
  done = _reproduce("--quick", "--output", str(tmp_path / "x"), "--stages", "pruning")
  assert done.returncode == 2
  assert "unknown stages ['pruning']" in done.stderr
  done = _reproduce("--quick", "--output", str(tmp_path / "x"), "--corpus",
                    str(tmp_path / "missing"))
  assert done.returncode == 2
  assert f"--corpus {tmp_path / 'missing'}: not a directory" in done.stderr
  assert not (tmp_path / "x").exists()


def test_a_given_corpus_directory_is_split_tokenized_and_cached(tmp_path, monkeypatch):
  """--corpus: every UTF-8 file below the directory, whatever its suffix."""
  rng = __import__("random").Random(0)
  words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
           for _ in range(400)]
  root = tmp_path / "texts"
  for i in range(120):
    path = root / f"part{i % 4}" / f"doc_{i}{['.txt', '.md', ''][i % 3]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12))
                              for _ in range(20)) + "\n")
  (root / "blob.bin").write_bytes(bytes(range(256)) * 4)  # not UTF-8: left out
  monkeypatch.delenv("MAXNUCL_TEXT_CORPUS", raising=False)
  config = stages.Settings(corpus_max_split_bytes={}, vocab_size=384, seq_len=32)
  runner = stages.Reproduction(tmp_path / "out", config, corpus_root=root, progress=False)
  data = runner.run(["data"])["data"]
  assert data["corpus_root"] == str(root)
  assert len(data["files"]) == 120 and data["skipped"] == 1
  assert {f["path"].rsplit(".", 1)[-1] for f in data["files"]} >= {"txt", "md"}
  assert all(data["rows"][name] > 0 for name in data["rows"])
  assert (tmp_path / "out" / "data" / "vocab" / "sp.model").is_file()
  # the recorded settings name the corpus; another corpus in the same output is refused
  with pytest.raises(stages.ReproductionError, match="differing: \\['corpus_root'\\]"):
    stages.Reproduction(tmp_path / "out", config, corpus_root=tmp_path, progress=False)


def test_an_interrupted_run_stops_its_training_child_and_continues(tmp_path):
  """SIGTERM while the pre-training runs: the tool exits 143 and its training subprocess with it;
  the rerun resumes that training from its last checkpoint instead of starting over."""
  import signal  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  output = tmp_path / "out"
  args = [sys.executable, str(REPO / "tools" / "reproduce.py"), "--quick", "--output",
          str(output), "--stages", "pretrain", "--no_report"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  tool = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  first = output / "runs" / "pretrain_s0" / "checkpoints" / "15"
  deadline = time.time() + 300
  while not first.exists() and time.time() < deadline and tool.poll() is None:
    time.sleep(0.2)
  assert first.exists(), tool.communicate()[1][-3000:]
  tool.send_signal(signal.SIGTERM)
  _, err = tool.communicate(timeout=120)
  assert tool.returncode == 143, err[-3000:]
  log = (output / "runs" / "pretrain_s0" / "train.log").read_text()
  assert "finished at step" not in log
  assert not (output / "stages" / "pretrain.json").exists()
  time.sleep(1)  # the killed trainer wrote nothing more after the tool exited
  checkpoints = sorted(p.name for p in (output / "runs" / "pretrain_s0" / "checkpoints").iterdir())
  time.sleep(2)
  assert sorted(p.name for p in (output / "runs" / "pretrain_s0" / "checkpoints").iterdir()) \
      == checkpoints
  done = _reproduce("--quick", "--output", str(output), "--stages", "pretrain", "--no_report")
  assert done.returncode == 0, done.stderr[-3000:]
  log = (output / "runs" / "pretrain_s0" / "train.log").read_text()
  assert "resumed from step 15" in log and "finished at step 30" in log
  assert (output / "runs" / "pretrain_s1" / "checkpoints" / "30").is_dir()
  assert (output / "stages" / "pretrain.json").exists()
