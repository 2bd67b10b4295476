"""The real-model study (maxnucl.reproduction.real_model, real_report, tools/reproduce.py --model,
tools/reproduce_accelerator.sh): the pruning it evaluates is the pruner's, its statistics and
verdicts give known answers on constructed cases, and the whole study runs end to end (quick
settings) on a tiny Llama exported as Hugging Face files, through the accelerator script's CPU
smoke mode; the real SmolLM2-135M's data stage on the real model (`real_model` marker)."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import bpe_cases
from maxnucl import checkpoints, models
from maxnucl.conversion import convert
from maxnucl.pruning import io, prune
from maxnucl.pruning.scores import METHODS
from maxnucl.reproduction import real_model, real_report, report
from tolerances import decoder_terms, magnitude, rounding_atol

REPO = pathlib.Path(__file__).resolve().parents[1]
SEQ = 24


def _random_params(cfg, seed):
  """Initial params scaled up (a trained model's weights are not the initialisation's tiny ones:
  the pruning scores then differ between neurons)."""
  return jax.tree.map(lambda x: np.asarray(x) * 3.0, models.init(cfg, jax.random.PRNGKey(seed)))


def _logits(cfg, params):
  tokens = np.random.default_rng(5).integers(3, cfg.vocab_size, (2, SEQ)).astype(np.int32)
  return np.asarray(models.apply(cfg, params, tokens), np.float64)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
  """llama_tiny (4 layers, FFN 256) with the tiny byte-level BPE tokenizer, and a calibration
  file of token rows."""
  directory = tmp_path_factory.mktemp("real-tiny")
  vocab = bpe_cases.write_tokenizer_dir(directory / "vocab")
  cfg = models.get_config("llama_tiny", pad_id=0, eos_id=0, bos_id=1)
  params = _random_params(cfg, 3)
  path = directory / "ckpt"
  checkpoints.save(path, cfg, params)
  checkpoints.write_tokenizer_files(path, {f.name: f.read_bytes() for f in vocab.parent.iterdir()})
  calibration = directory / "calibration.npy"
  rows = np.random.default_rng(0).integers(3, len(bpe_cases.tokens()), (8, SEQ + 1))
  np.save(calibration, rows.astype(np.int32))
  return path, cfg, params, calibration, vocab


@pytest.mark.parametrize("method", sorted(METHODS))
def test_switch_off_computes_what_the_pruned_checkpoint_computes(tiny_llama, tmp_path, method):
  """The study evaluates every method at full width with the removed neurons switched off; for
  every method (the two compensating ones included) that is the function of the physically
  smaller checkpoint tools/prune_checkpoint.py writes, and the removed sets are the pruner's."""
  path, cfg, params, calibration, _ = tiny_llama
  stats = None
  if METHODS[method].needs_calibration:
    from maxnucl.pruning import calibration as calib  # pylint: disable=import-outside-toplevel
    stats = calib.collect_stats(cfg, params, calib.iterate_batches(
        str(calibration), num_examples=8, batch_size=4, seq_len=SEQ))
  switched, removed = real_model.switch_off(io.CheckpointReader(path), params, method=method,
                                            ratio=0.25, layers="bottom_half", seed=4,
                                            stats=stats)
  written = prune.prune_ffn_neurons(path, tmp_path / "pruned", method=method, ratio=0.25,
                                    layers="bottom_half", seed=4,
                                    calibration=str(calibration) if stats else None,
                                    calibration_examples=8, batch_size=4, seq_len=SEQ)
  by_layer = {layer["name"]: layer for layer in written["layers"]}
  assert sorted(removed) == ["layers_0", "layers_1"]  # bottom half of 4 layers
  for name, indices in removed.items():
    kept = set(range(cfg.layer_ffn_widths[int(name.split("_")[1])])) - set(indices)
    assert sorted(kept) == by_layer[name]["kept"]
  pruned_cfg, pruned = checkpoints.load(tmp_path / "pruned")
  ours, theirs = _logits(cfg, switched), _logits(pruned_cfg, pruned)
  # Both are float32 forward passes of the same function; their sums run over other widths and
  # orders (tests/tolerances.py); a compensating method's merged rows round once more per layer.
  merges = 1 if METHODS[method].compensating else 0
  atol = rounding_atol(magnitude(ours, theirs), decoder_terms(cfg, SEQ) + merges * cfg.num_layers)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=atol)


# ---- statistics and verdicts on constructed cases ----------------------------------------------

def _evaluation(sums_by_domain: dict, tokens: int = 10) -> dict:
  out = {}
  for domain, sums in sums_by_domain.items():
    sums = np.asarray(sums, np.float64)
    out[f"{domain}_nll"] = float(sums.sum() / (tokens * sums.size))
    out[f"{domain}_nll_rows"] = {"sums": sums.tolist(), "tokens": [tokens] * sums.size}
  return out


ROWS = np.linspace(20.0, 40.0, 12)  # per-row NLL sums of 10 tokens: 2.0 ... 4.0 nats a token


def test_difference_of_a_constant_shift_is_exact():
  """Every row of `a` costs 0.3 nats a token more than `b`'s: the difference is 0.3 and so is
  every bootstrap draw (same rows resampled for both)."""
  a = _evaluation({"code": ROWS + 3.0})
  b = _evaluation({"code": ROWS})
  d = real_report.difference([a], [b], "code")
  assert d["difference"] == pytest.approx(0.3, abs=1e-12)
  assert d["ci"] == pytest.approx((0.3, 0.3), abs=1e-12)
  assert real_report.directed({"code": d}, "greater") == report.HOLDS
  assert real_report.directed({"code": d}, "less") == report.FAILS


def test_directed_is_inconclusive_when_domains_disagree_or_an_interval_holds_zero():
  up = {"difference": 0.2, "ci": (0.1, 0.3)}
  down = {"difference": -0.2, "ci": (-0.3, -0.1)}
  straddle = {"difference": 0.05, "ci": (-0.1, 0.2)}
  assert real_report.directed({"code": up, "prose": down}, "greater") == report.UNSURE
  assert real_report.directed({"code": up, "prose": straddle}, "greater") == report.UNSURE
  assert real_report.directed({"code": up, "prose": up}, "greater") == report.HOLDS


def _prune_results(entropy_shift: float, random_shifts=(1.0, 1.2, 0.8)) -> dict:
  """Results whose methods' rows are the unpruned rows shifted by known nats per token."""
  def shifted(nats):
    return _evaluation({"code": ROWS + 10 * nats, "prose": ROWS[::-1] + 10 * nats})
  rows = [{"method": "entropy", "ratio": 0.25, "seed": 0, "entropy": 1.0,
           **shifted(entropy_shift)},
          {"method": "magnitude", "ratio": 0.25, "seed": 0, "entropy": 1.0, **shifted(5.0)}]
  rows += [{"method": "random", "ratio": 0.25, "seed": s, "entropy": 1.0, **shifted(x)}
           for s, x in enumerate(random_shifts)]
  return {"baseline": shifted(0.0), "prune": {"rows": rows, "premise": {"mean": 0.5}}}


def test_pruning_order_verdicts_follow_the_constructed_shifts():
  table = real_report.prune_table(_prune_results(0.5), 0.25)
  entropy, magnitude_ = table["comparisons"]["entropy"], table["comparisons"]["magnitude"]
  assert entropy["vs_random"]["code"]["difference"] == pytest.approx(0.5 - 1.0)
  assert entropy["verdict"] == report.HOLDS and magnitude_["verdict"] == report.HOLDS
  increase = {r["method"]: r["code_increase"]["difference"] for r in table["rows"]}
  assert increase == pytest.approx({"entropy": 0.5, "magnitude": 5.0, "random": 1.0})
  # entropy worse than random: the claim fails
  assert real_report.prune_table(_prune_results(1.5), 0.25)["comparisons"]["entropy"][
      "verdict"] == report.FAILS
  # below the random mean but above one random seed (0.8): not "beats random"
  assert real_report.prune_table(_prune_results(0.9), 0.25)["comparisons"]["entropy"][
      "verdict"] == report.UNSURE


def _recover_results(shifts: dict, tokens_per_step: int = 1000) -> dict:
  """A recover stage whose runs' curves are the unpruned rows shifted by known nats per token:
  shifts[(method, mode)] = (after pruning, after recovery) at 50 %."""
  def shifted(nats):
    return _evaluation({"code": ROWS + 10 * nats, "prose": ROWS[::-1] + 10 * nats})
  runs = [{"name": f"{m}_{mode}", "method": m, "ratio": 0.5, "mode": mode, "model": "base",
           "train_seconds": 1.0,
           "curve": [{"step": 0, "tokens": 0, **shifted(pruned)},
                     {"step": 4, "tokens": 4 * tokens_per_step, **shifted(recovered)}]}
          for (m, mode), (pruned, recovered) in shifts.items()]
  return {"recover": {"unpruned": shifted(0.0), "runs": runs, "tokens_per_step": tokens_per_step,
                      "steps": 4, "corpus": {}}}


def test_recovered_fraction_and_the_recovery_verdicts_follow_the_constructed_shifts():
  """Entropy loses 2.0 nats to pruning and wins back 1.5 by distillation, 1.0 by NLL:
  fractions 75 % and 50 % (per 10k tokens of a 4k-token run: x 2.5); distillation beats NLL.
  Activation loses 1.0 and, recovered by distillation, ends 0.2 below entropy's 0.5: the
  ranking after pruning (activation < entropy) survives.  Equal recoveries: inconclusive."""
  table = real_report.recover_table(_recover_results({
      ("entropy", "distill"): (2.0, 0.5), ("entropy", "nll"): (2.0, 1.0),
      ("activation", "distill"): (1.0, 0.3), ("activation", "nll"): (1.0, 0.3)}))
  rows = {(r["method"], r["mode"]): r for r in table["rows"]}
  for domain in ("code", "prose"):
    assert rows[("entropy", "distill")][domain]["fraction"] == pytest.approx(0.75)
    assert rows[("entropy", "nll")][domain]["fraction"] == pytest.approx(0.5)
    assert rows[("entropy", "distill")][domain]["fraction_per_10k_tokens"] == pytest.approx(
        0.75 * 2.5)
    assert [p["fraction"] for p in rows[("activation", "nll")][domain]["curve"]] == \
        pytest.approx([0.0, 0.7])
  distill = table["comparisons"]["entropy@0.5"]
  assert distill["diffs"]["code"]["difference"] == pytest.approx(0.5 - 1.0)
  assert distill["verdict"] == report.HOLDS
  assert table["comparisons"]["activation@0.5"]["verdict"] == report.UNSURE  # equal: ci (0, 0)
  ranking = table["ranking"]["0.5"]
  assert ranking["before"] == ["activation", "entropy"] and ranking["verdict"] == report.HOLDS
  assert ranking["spread_after"]["prose"]["difference"] == pytest.approx(0.5 - 0.3)
  # recovery reverses the order: entropy ends below activation
  reversed_ = real_report.recover_table(_recover_results({
      ("entropy", "distill"): (2.0, 0.1), ("activation", "distill"): (1.0, 0.3)}))
  assert reversed_["ranking"]["0.5"]["verdict"] == report.FAILS
  assert reversed_["verdicts"]["distill_vs_nll"] == {}  # no NLL runs to compare with


def test_premise_gates_the_entropy_verdict():
  results = _prune_results(0.5)
  results["prune"]["premise"]["mean"] = 0.05
  summary = real_report.summarize(results, 0.25)
  assert summary["verdicts"]["pruning_order"]["entropy"] == report.NOT_TESTABLE
  assert summary["verdicts"]["pruning_order"]["magnitude"] == report.HOLDS


def test_publish_keeps_the_other_study_and_replaces_its_own_section(tmp_path):
  """docs/reproduction.md holds both studies: publishing either leaves the other's part."""
  docs = tmp_path / "docs"
  docs.mkdir()
  (docs / "reproduction.md").write_text("# Small-scale reproduction\n\nsmall body\n")
  out = tmp_path / "run"
  (out / "figures").mkdir(parents=True)
  (out / "figures" / "pruning.png").write_bytes(b"png")
  (out / "results.json").write_text(json.dumps({"wall_time_s": {"stages": {"a": 120.0}}}))
  (out / "report.md").write_text("# Real model: X\n\n## Verdicts\n\n![p](figures/pruning.png)\n")
  for _ in range(2):  # publishing again replaces the section, it does not add a second one
    real_report.publish(out, docs, command="python tools/reproduce.py --model smollm2_135m")
  text = (docs / "reproduction.md").read_text()
  assert text.startswith("# Small-scale reproduction\n\nsmall body")
  assert text.count(real_report.SECTION_MARKER) == 1 and "### Verdicts" in text
  assert "(figures/real_pruning.png)" in text and (docs / "figures" / "real_pruning.png").exists()
  small = tmp_path / "small"
  (small / "figures").mkdir(parents=True)
  (small / "results.json").write_text(json.dumps({"wall_time_s": {"stages": {"a": 60.0}}}))
  (small / "report.md").write_text("# title\nnew small body\n")
  report.publish(small, docs, command="python tools/reproduce.py --output X")
  text = (docs / "reproduction.md").read_text()
  assert "new small body" in text and "small body\n" not in text.split("new small body")[0]
  assert text.count(real_report.SECTION_MARKER) == 1 and "### Verdicts" in text


# ---- the command line ------------------------------------------------------------------------


def _reproduce(*args, env=None):
  return subprocess.run([sys.executable, "tools/reproduce.py", *args], cwd=REPO,
                        capture_output=True, text=True, env=env, check=False)


@pytest.mark.parametrize("args, message", [
    (["--model_path", "x.gguf"], "--model_path needs --model"),
    (["--model", "smollm2_accelerator"], "needs --model_path"),
    (["--model", "smollm2_135m", "--stages", "pretrain"], "unknown stages ['pretrain']"),
    (["--model", "smollm2_135m", "--model_path", "/no/such.gguf"], "/no/such.gguf"),
])
def test_bad_requests_exit_2_naming_the_problem_and_write_nothing(tmp_path, args, message):
  result = _reproduce("--output", str(tmp_path / "out"), *args)
  assert result.returncode == 2, result.stderr
  assert message in result.stderr and "Traceback" not in result.stderr
  assert not (tmp_path / "out" / "stages").exists()


def test_accelerator_script_refuses_a_directory_without_config_json(tmp_path):
  result = subprocess.run(["bash", "tools/reproduce_accelerator.sh", str(tmp_path),
                           str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                          check=False)
  assert result.returncode == 2 and "no config.json" in result.stderr
  assert not (tmp_path / "out").exists()


# ---- end to end --------------------------------------------------------------------------------

# The quick settings, smaller still: rows of 192 byte-level tokens (HumanEval's shortest canonical
# solutions fit), one NUCL variant.
SMOKE_BINDINGS = ["reproduce_real.seq_len = 192", "reproduce_real.humaneval_nll_problems = 12",
                  "reproduce_real.nucl_gradient_ratios = {'mstd': 1.0}",
                  "reproduce_real.layer_groups = ('bottom_half', 'top_half')",
                  "reproduce_real.pair_stride = 1"]  # pairs (0, 1), (1, 2), (2, 3) of 4 layers


def test_the_study_runs_end_to_end_from_hugging_face_files_and_resumes(tiny_llama, tmp_path):
  """tools/reproduce_accelerator.sh in its CPU smoke mode on a tiny Llama exported as Hugging
  Face files: every stage runs, the report has every section and figure, and a second
  invocation finds every stage cached."""
  path, cfg, _, _, vocab = tiny_llama
  hf_dir = tmp_path / "hf"
  convert.maxnucl_to_hf(path, hf_dir, vocab=str(vocab))
  out = tmp_path / "study"
  env = dict(os.environ, MAXNUCL_ACCELERATOR_SMOKE="1")
  command = ["bash", "tools/reproduce_accelerator.sh", str(hf_dir), str(out)]
  command += [f"--gin_param={b}" for b in SMOKE_BINDINGS]
  first = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env,
                         check=False)
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert set(results["stages"]) == set(real_model.STAGES)
  assert results["stages"]["model"]["num_layers"] == cfg.num_layers
  verdicts = results["summary"]["verdicts"]
  assert set(verdicts) == set(real_report.SOURCES)
  text = (out / "report.md").read_text()
  for heading in ("## Verdicts", "## The unpruned model", "## Table 4", "### 25% removed",
                  "### 50% removed", "## Table 5 and Fig. 4", "## SCAR: supernodes",
                  "## NUCL fine-tuning", "## NUCL, then prune", "## Prune, then recover",
                  "## NUCL, then prune, then recover", "## Figures"):
    assert heading in text, heading
  figures = sorted(p.name for p in (out / "figures").glob("*.png"))
  assert figures == ["finetune.png", "layer_pairs.png", "lp_concentration.png", "pruning.png",
                     "recovery.png"]
  _check_recovery(results["stages"], cfg, out)
  nucl = results["stages"]["nucl_recover"]["rows"]
  assert [r["variant"] for r in nucl] == ["standard", "mstd"]
  model = results["stages"]["model"]["checkpoint"]
  assert all(r["mode"] == "distill" and r["teacher"] != model for r in nucl)  # its own teacher
  rows = results["stages"]["prune"]["rows"]
  assert {r["method"] for r in rows} == set(real_model.RealSettings().prune_methods)
  assert len([r for r in rows if r["method"] == "random" and r["ratio"] == 0.25]) == 2
  second = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env,
                          check=False)
  assert second.returncode == 0 and ": running" not in second.stdout + second.stderr


def _check_recovery(stages_: dict, cfg, out: pathlib.Path) -> None:
  """Every quick recovery run: a physically pruned student (floor(ratio x width) neurons fewer
  per layer) trained by its mode from step 0 (the pruned model) to the last step, evaluated at
  each checkpoint; only the recovered (last) checkpoint is kept, with the student's widths; the
  distillation runs logged a KL at every step, the NLL runs none."""
  recorded = json.loads((out / "settings.json").read_text())
  steps, points = recorded["recover_steps"], recorded["recover_curve_points"]
  runs = stages_["recover"]["runs"]
  assert {(r["method"], r["mode"]) for r in runs} == {
      (m, mode) for m in recorded["recover_methods"] for mode in real_model.RECOVERY_MODES}
  for run in runs:
    widths = [w - int(run["ratio"] * w) for w in cfg.layer_ffn_widths]
    assert [p["step"] for p in run["curve"]] == [0, *range(steps // points, steps + 1,
                                                           steps // points)]
    assert all(np.isfinite(p[f"{d}_nll"]) for p in run["curve"] for d in ("code", "prose"))
    kept = sorted(p.name for p in (out / "runs" / run["name"] / "checkpoints").iterdir()
                  if p.name.isdigit())
    assert kept == [str(steps)]
    assert list(checkpoints.load_config(run["checkpoint"]).layer_ffn_widths) == widths
    logged = [m for m in run["train_metrics"] if "loss" in m]
    assert [m["step"] for m in logged] == list(range(1, steps + 1))
    assert all(("distill_kl" in m) == (run["mode"] == "distill") for m in logged)


def test_the_recover_stage_runs_alone_through_its_accelerator_script(tiny_llama, tmp_path):
  """tools/recover_accelerator.sh in its CPU smoke mode on a tiny Llama checkpoint: only the
  model, data and recover stages run, and the report holds the recovery section and figure."""
  path, cfg, _, _, _ = tiny_llama
  out = tmp_path / "study"
  env = dict(os.environ, MAXNUCL_ACCELERATOR_SMOKE="1")
  command = ["bash", "tools/recover_accelerator.sh", str(path), str(out)]
  command += [f"--gin_param={b}" for b in SMOKE_BINDINGS]
  command += ["--gin_param=reproduce_real.recover_methods = ('entropy',)"]  # 2 runs, not 4
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, check=False)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert set(results["stages"]) == {"model", "data", "recover"}
  assert "## Prune, then recover" in (out / "report.md").read_text()
  assert (out / "figures" / "recovery.png").is_file()
  _check_recovery(results["stages"], cfg, out)


def test_the_recover_script_refuses_a_missing_model(tmp_path):
  done = subprocess.run(["bash", "tools/recover_accelerator.sh", str(tmp_path / "none.gguf"),
                         str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                        check=False)
  assert done.returncode == 2 and "none.gguf does not exist" in done.stderr
  assert not (tmp_path / "out").exists()


@pytest.mark.real_model
def test_real_model_data_are_held_out_documents_of_two_domains(smollm2_gguf, tmp_path):
  """The model and data stages on SmolLM2-135M: one row per document of [BOS-free] 257 tokens,
  code test files and prose test topics never among the calibration files, HumanEval rows
  scoring only canonical-solution tokens."""
  from maxnucl import gin_config  # pylint: disable=import-outside-toplevel
  gin_config.parse(["gin/reproduce/smollm2_135m_quick.gin"], [])
  runner = real_model.RealModelStudy(tmp_path / "study", real_model.real_settings(),
                                     model_path=smollm2_gguf, progress=False)
  runner.run(["data"])
  data = runner.result("data")
  seq = data["seq_len"]
  rows = runner.rows()
  for domain in ("code", "prose"):
    assert rows[domain]["tokens"].shape == (data["rows"][domain], seq)
    assert (rows[domain]["loss_mask"] == 1).all()  # every token of a full-length document
    np.testing.assert_array_equal(rows[domain]["tokens"][:, 1:], rows[domain]["targets"][:, :-1])
  code_eval = {d["id"] for d in data["sources"]["code"]["documents"]}
  calibration = {d["id"] for d in data["sources"]["calibration"]["documents"]}
  assert code_eval and calibration and not code_eval & calibration
  assert np.load(runner.calibration_file).shape == (data["calibration_rows"], seq + 1)
  assert 0 < rows["humaneval"]["loss_mask"].sum() < rows["humaneval"]["segment_ids"].sum()
  assert data["prose_source"]["module"] == "pydoc_data.topics"
