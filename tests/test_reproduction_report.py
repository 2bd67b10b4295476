"""The reproduction report's statistics and verdict rules, on constructed results."""

import math

import numpy as np
import pytest

from maxnucl.reproduction import report
from tolerances import EPS64, rounding_atol


def _run(**final):
  return {"final": final, "curve": []}


def _std_atol(values):
  """float64 sample std of decimal `values`: each value's representation, the mean (n additions,
  a division) and the deviations round relative to the largest |value|; the squares, their sum,
  the division and the root add fewer."""
  n = len(values)
  return rounding_atol(max(abs(v) for v in values), 3 * n + 4, EPS64)


def _approx_difference(expected, larger):
  """A difference of float64 decimals: their representations and the subtraction (3 roundings)
  relative to the larger one."""
  return pytest.approx(expected, rel=0, abs=rounding_atol(larger, 3, EPS64))


def test_mean_and_sample_std_and_their_format():
  values = [1.0, 2.0, 3.0]
  assert report.mean_std(values) == (2.0, pytest.approx(1.0, rel=0, abs=_std_atol(values)))
  assert report.mean_std([4.0]) == (4.0, None)
  assert report.fmt([1.0, 2.0, 3.0], 2) == "2.00 ± 1.00 (n=3)"
  assert report.fmt([4.0], 1) == "4.0 (n=1)"
  assert report.fmt([]) == "–"


@pytest.mark.parametrize("a, b, expected", [
    ({"0": 1, "1": 2}, {"0": 2, "1": 3}, "less"),
    ({"0": 3, "1": 4}, {"0": 2, "1": 3}, "greater"),
    ({"0": 1, "1": 4}, {"0": 2, "1": 3}, None),    # mixed
    ({"0": 1}, {"0": 2}, None),                    # one seed decides nothing
    ({"0": 1, "1": 2, "2": 0}, {"0": 2, "1": 3}, "less"),  # only common seeds are compared
])
def test_paired_direction(a, b, expected):
  assert report.paired_direction(a, b) == expected


def _finetune(nucl_entropy, nucl_nll, std_nll=(3.0, 3.01, 3.02), nucl_arithmetic=2.0):
  standard = {str(s): _run(entropy=100.0, nll=n, arithmetic_nll=2.0)
              for s, n in enumerate(std_nll)}
  nucl = {str(s): _run(entropy=e, nll=n, arithmetic_nll=nucl_arithmetic)
          for s, (e, n) in enumerate(zip(nucl_entropy, nucl_nll))}
  return {"finetune": {"runs": {"standard": standard, "ent@1": nucl}, "main": {"ent": "ent@1"}}}


def test_nucl_finetune_verdicts():
  holds = report.finetune_table(_finetune((90, 91, 92), (3.0, 3.02, 3.03)))
  assert holds["verdicts"]["ent"]["verdict"] == report.HOLDS
  # the tolerance is max(0.02, 2 x the standard seeds' std = 0.02)
  assert holds["verdicts"]["ent"]["tolerance"] == pytest.approx(
      0.02, rel=0, abs=2 * _std_atol((3.0, 3.01, 3.02)))
  higher_entropy = report.finetune_table(_finetune((101, 102, 103), (3.0, 3.01, 3.02)))
  assert higher_entropy["verdicts"]["ent"]["verdict"] == report.FAILS
  much_worse = report.finetune_table(_finetune((90, 91, 92), (3.2, 3.2, 3.2)))
  assert much_worse["verdicts"]["ent"]["verdict"] == report.FAILS
  somewhat_worse = report.finetune_table(_finetune((90, 91, 92), (3.04, 3.05, 3.06)))
  assert somewhat_worse["verdicts"]["ent"]["verdict"] == report.UNSURE
  mixed = report.finetune_table(_finetune((90, 101, 92), (3.0, 3.01, 3.02)))
  assert mixed["verdicts"]["ent"]["verdict"] == report.UNSURE
  # the fine-tuning task's quality counts too
  task_lost = report.finetune_table(_finetune((90, 91, 92), (3.0, 3.01, 3.02),
                                              nucl_arithmetic=2.1))
  assert task_lost["verdicts"]["ent"]["verdict"] == report.FAILS
  # a mean over 3 seeds of 2.1 - 2.0: the decimals' representations (2.1, 0.1), each difference,
  # and the mean's 3 additions and division
  assert task_lost["verdicts"]["ent"]["mean_arithmetic_nll_change"] == pytest.approx(
      0.1, rel=0, abs=rounding_atol(2.1, 2 + 3 + 3 + 1, EPS64))
  task_slightly_worse = report.finetune_table(_finetune((90, 91, 92), (3.0, 3.01, 3.02),
                                                        nucl_arithmetic=2.03))
  assert task_slightly_worse["verdicts"]["ent"]["verdict"] == report.UNSURE


def _prune_rows(nll_by_method, ratio=0.25):
  return [{"method": m, "ratio": ratio, "layers": "all", "budget": "per_layer", "seed": s,
           "nll": v, "ffn_widths": [3]} for m, values in nll_by_method.items()
          for s, v in enumerate(values)]


def _pruned_results(nll_by_method):
  results = _finetune((90, 91), (3.0, 3.0), std_nll=(3.0, 3.0))
  results["prune"] = {"rows": _prune_rows(nll_by_method)}
  return results


def test_pruning_order_the_papers_and_the_reverse():
  paper = {"entropy": (3.1, 3.2), "random": (3.5, 3.6), "magnitude": (4.0, 4.1),
           "srinivas_babu": (4.2, 4.0), "stahlberg_byrne": (3.9, 3.7)}
  table = report.prune_table(_pruned_results(paper), 0.25)
  assert table["verdict"] == report.HOLDS
  assert [r["method"] for r in table["rows"]] == ["entropy", "random", "stahlberg_byrne",
                                                   "magnitude", "srinivas_babu"]
  reverse = {m: tuple(10 - v for v in values) for m, values in paper.items()}
  assert report.prune_table(_pruned_results(reverse), 0.25)["verdict"] == report.FAILS
  mixed = dict(paper, entropy=(3.1, 3.9))
  table = report.prune_table(_pruned_results(mixed), 0.25)
  assert table["pairs"]["entropy < random"] == report.UNSURE
  assert table["verdict"] == report.UNSURE
  assert report.best_method(_prune_rows(paper), 0.25) == "entropy"
  with pytest.raises(ValueError, match="no pruning results at ratio 0.5"):
    report.best_method(_prune_rows(paper), 0.5)


def test_nucl_then_prune_compares_the_increase_from_pruning():
  results = _finetune((90, 91), (3.5, 3.6), std_nll=(3.0, 3.0))
  results["prune"] = {"rows": _prune_rows({"entropy": (3.4, 3.5)})}   # standard: +0.4, +0.5
  results["nucl_prune"] = {"rows": [dict(r, variant="ent") for r in
                                    _prune_rows({"entropy": (3.6, 3.7)})]}  # NUCL: +0.1, +0.1
  table = report.nucl_prune_table(results, 0.25)
  assert table["verdicts"] == {"ent": report.HOLDS}
  assert table["rows"][1]["increase"] == [_approx_difference(0.1, 3.7)] * 2


def test_supernode_verdict_needs_concentration_and_costlier_removal():
  def results(share, without, random):
    return {"supernodes": {"fraction": 0.01, "rows": [
        {"seed": s, "lp_share": {"layers_0": share, "layers_1": share}, "nll": 3.0,
         "nll_without_supernodes": without, "nll_without_random": [random, random]}
        for s in range(2)]}}
  assert report.supernodes_table(results(0.5, 4.0, 3.1))["verdict"] == report.HOLDS
  assert report.supernodes_table(results(0.02, 3.05, 3.1))["verdict"] == report.FAILS
  assert report.supernodes_table(results(0.5, 3.05, 3.1))["verdict"] == report.UNSURE
  table = report.supernodes_table(results(0.5, 4.0, 3.1))
  assert table["median_share"] == 0.5 and not math.isnan(table["min_share"])


def test_layer_subsets_similar_or_not():
  def rows(means):
    return {"layer_subsets": {"rows": [
        {"layers": subset, "seed": s, "nll": m + d, "ffn_widths": [1]}
        for subset, m in means.items() for s, d in enumerate((-0.05, 0.0, 0.05))]}}
  similar = report.subsets_table(rows({"all": 3.0, "bottom_half": 3.0, "top_half": 3.01}), 0.25)
  assert similar["verdict"] == report.HOLDS
  apart = report.subsets_table(rows({"bottom_half": 3.0, "top_half": 4.0}), 0.25)
  assert apart["verdict"] == report.FAILS


def test_scratch_comparisons_are_paired_by_seed():
  runs = {"uniform": {"0": _run(nll=3.0, entropy=9), "1": _run(nll=3.2, entropy=9)},
          "middle": {"0": _run(nll=2.9, entropy=9), "1": _run(nll=3.1, entropy=9)}}
  assert report.scratch_table(runs, "middle", "uniform", "nll")["verdict"] == report.HOLDS
  # lower on average but not in every seed
  runs["middle"]["1"] = _run(nll=3.3, entropy=9)
  runs["middle"]["0"] = _run(nll=2.0, entropy=9)
  assert np.mean([r["final"]["nll"] for r in runs["middle"].values()]) < 3.1
  assert report.scratch_table(runs, "middle", "uniform", "nll")["verdict"] == report.UNSURE


def test_fine_tuning_curves_start_at_step_zero_from_their_own_seeds_pretraining():
  """The pre-trained model is step 0 of every fine-tuning curve, not its own last pre-training
  step (1200 in the full study), and seed s starts from pre-training s."""
  results = _finetune((90, 91, 92), (3.0, 3.0, 3.0))
  for runs in results["finetune"]["runs"].values():
    for run in runs.values():
      run["curve"] = [{"step": 100, "nll": 2.9}, {"step": 200, "nll": 2.8}]
  results["pretrain"] = {"runs": {str(s): _run(step=1200, nll=4.0 + s) for s in range(3)}}
  curves = report.finetune_curves(results)
  for key, by_seed in curves.items():
    for seed, points in by_seed.items():
      assert [p["step"] for p in points] == [0, 100, 200], key
      assert points[0]["nll"] == 4.0 + int(seed)


def _evaluation(values, tokens=None):
  values = np.asarray(values, np.float64)
  tokens = np.ones_like(values) if tokens is None else np.asarray(tokens, np.float64)
  return {"nll": float((values * tokens).sum() / tokens.sum()),
          "nll_rows": {"sums": (values * tokens).tolist(), "tokens": tokens.tolist()}}


def test_bootstrap_interval_has_the_width_of_the_standard_error():
  """Rows with per-token NLLs of standard deviation sd: the 95 % interval of their mean is
  +-1.96 sd / sqrt(n) (the bootstrap's percentile error with 2000 draws is a few per cent of
  that; 15 % allows for it and for the sample sd's own error at n = 400)."""
  rng = np.random.default_rng(1)
  values = rng.normal(3.0, 0.5, size=400)
  low, high = report.bootstrap_interval([_evaluation(values)])
  expected_half_width = 1.96 * values.std(ddof=1) / np.sqrt(values.size)
  assert low < values.mean() < high
  assert abs((high - low) / 2 / expected_half_width - 1) < 0.15
  # identical rows leave nothing to resample: the interval is the value itself
  assert report.bootstrap_interval([_evaluation([2.5] * 50)]) == (2.5, 2.5)
  # paired: a model against itself differs by exactly 0 in every draw
  assert report.bootstrap_interval([_evaluation(values)], baselines=[_evaluation(values)]) \
      == (0.0, 0.0)
  # a token-weighted mean: rows of more tokens count more
  weighted = report.bootstrap_interval([_evaluation([1.0, 3.0], tokens=[3, 1])], draws=4000)
  assert 1.0 <= weighted[0] < 1.5 < weighted[1] <= 3.0
  assert report.bootstrap_interval([{"nll": 3.0}]) is None  # no per-row sums stored


def test_rank_correlation_is_spearmans():
  """Against the textbook formula 1 - 6 sum d^2 / (n (n^2 - 1)) for distinct values."""
  from maxnucl.reproduction import stages  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=200), rng.normal(size=200)
  b = a + rng.normal(size=200)
  d = np.argsort(np.argsort(a)) - np.argsort(np.argsort(b))
  n = a.size
  # float64: Pearson's sums of n products (the covariance, each variance) round relative to
  # n x the ranks' stds (Cauchy-Schwarz), i.e. n each relative to 1, then a root and a division;
  # the formula rounds 3 times
  atol = rounding_atol(1.0, 3 * n + 5, EPS64)
  assert stages.rank_correlation(a, b) == pytest.approx(1 - 6 * (d ** 2).sum() / (n * (n * n - 1)),
                                                        rel=0, abs=atol)
  assert stages.rank_correlation(a, a ** 3) == pytest.approx(1.0, rel=0, abs=atol)  # monotone: 1
  assert stages.rank_correlation(a, -a) == pytest.approx(-1.0, rel=0, abs=atol)


def _premise(rho):
  return {str(s): {"per_layer": {"layers_0": rho}, "mean": rho} for s in range(2)}


def test_entropy_pruning_verdicts_need_their_premise():
  """Where outgoing entropy does not rank LP importance (|rho| < 0.1), an entropy-pruning claim
  is not testable on that model, whatever the pruning did; with the premise, the verdict
  stands."""
  paper = {"entropy": (3.1, 3.2), "random": (3.5, 3.6), "magnitude": (4.0, 4.1)}
  results = _pruned_results(paper)
  results["prune"]["premise"] = _premise(-0.03)
  table = report.prune_table(results, 0.25)
  assert table["pairs"]["entropy < random"] == report.NOT_TESTABLE
  assert table["pairs"]["random < magnitude"] == report.HOLDS  # not an entropy claim
  assert table["verdict"] == report.UNSURE
  results["prune"]["premise"] = _premise(-0.4)
  assert report.prune_table(results, 0.25)["pairs"]["entropy < random"] == report.HOLDS
  # NUCL, then prune: gated on the NUCL models' own premise
  results = _finetune((90, 91), (3.5, 3.6), std_nll=(3.0, 3.0))
  results["prune"] = {"rows": _prune_rows({"entropy": (3.4, 3.5)}), "premise": _premise(-0.4)}
  results["nucl_prune"] = {"rows": [dict(r, variant="ent") for r in
                                    _prune_rows({"entropy": (3.6, 3.7)})],
                           "premise": {"ent": _premise(0.05)}}
  assert report.nucl_prune_table(results, 0.25)["verdicts"] == {"ent": report.NOT_TESTABLE}
  results["nucl_prune"]["premise"] = {"ent": _premise(-0.3)}
  assert report.nucl_prune_table(results, 0.25)["verdicts"] == {"ent": report.HOLDS}


def test_the_premise_reading_follows_the_sign_of_rho():
  """Entropy pruning removes the highest-entropy neurons: rho < 0 is its premise, rho > 0 a
  reversal (it removes the important neurons), |rho| < 0.1 no ranking at all."""
  assert "the premise holds" in report._premise_text(-0.4)  # pylint: disable=protected-access
  assert "reversed" in report._premise_text(0.4)  # pylint: disable=protected-access
  assert report.NOT_TESTABLE in report._premise_text(0.05)  # pylint: disable=protected-access
  assert report._premise_text(None) == ""  # pylint: disable=protected-access


def test_the_verdict_table_states_nucls_cost_and_each_findings_source():
  results = _finetune((90, 91, 92), (3.0, 3.01, 3.02), nucl_arithmetic=2.1)
  summary = report.summarize(results, 0.25)
  text = report.measured("nucl_finetune", summary["nucl_finetune"])
  assert "arithmetic NLL +0.100" in text and "(a cost)" in text and "entropy -9.0%" in text  # (90, 91, 92) vs 100
  assert report.SOURCES["nucl_then_prune"].startswith("new in this study")
  assert report.SOURCES["reallocation"].startswith("new in this study")
  assert set(report.SOURCES) == set(report.VERDICT_RULES)
