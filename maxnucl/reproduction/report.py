"""Tables, verdicts and plots of a reproduction: `write_report(runner)` writes OUTPUT/results.json,
OUTPUT/report.md and OUTPUT/figures/*.png.

Every comparison that decides a finding is paired by seed: seed s of one arm and seed s of the
other share the data order and, after fine-tuning, the pre-trained start (each seed has its own
pre-training).  A verdict is
  holds          the claimed direction in every seed (and, where the claim is "quality is kept",
                 a mean change within the tolerance),
  does not hold  the opposite direction in every seed,
  inconclusive   anything else (mixed seeds, or fewer than two seeds),
  not testable at this scale
                 an entropy-pruning claim on a model whose neurons' outgoing entropy does not rank
                 their loss-proxy importance (|Spearman rho| < PREMISE_MIN_CORRELATION): entropy
                 pruning is then random pruning by another name, and no outcome speaks to the
                 claim.
The rules per finding are in `VERDICT_RULES`, where each comes from in `SOURCES`; both are
printed in the report.  Next to the seed spread, every held-out NLL carries a 95 % bootstrap
interval over the evaluation rows (`bootstrap_interval`): how much the figure would move on
other held-out text of the same kind.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Optional, Sequence

import numpy as np

from maxnucl import outputs

HOLDS, FAILS, UNSURE = "holds", "does not hold", "inconclusive"
NOT_TESTABLE = "not testable at this scale"
# Tolerance for "quality is kept": the larger of this many nats and twice the seed spread.
NLL_TOLERANCE = 0.02
# Entropy pruning can only beat random pruning where a neuron's outgoing entropy ranks its
# importance.  With m = 768 neurons a layer, |rho| < 0.1 is within ~3 standard errors of no
# relation at all (1/sqrt(m - 1) = 0.036): the premise is absent.
PREMISE_MIN_CORRELATION = 0.1
BOOTSTRAP_DRAWS = 2000

# Where each finding comes from: a claim of the papers, or a question this study asks itself.
SOURCES = {
    "nucl_finetune": "NUCL paper (Fig. 2-3, Table 1)",
    "pruning_order": "NUCL paper (Table 4)",
    "layer_subsets": "NUCL paper (Table 5)",
    "nucl_then_prune": "new in this study (not claimed by the papers)",
    "reallocation": "new in this study: a from-scratch test at this scale of the layerwise "
                    "FFN-importance abstract's claim (made for 285M-1.2B models)",
    "nucl_pretrain": "new in this study (the NUCL paper names it a limitation)",
    "diversity": "new in this study (the NUCL paper names it a limitation)",
    "supernodes": "SCAR paper (supernodes)",
}

VERDICT_RULES = {
    "nucl_finetune": "NUCL lowers summed outgoing entropy vs standard fine-tuning in every seed, "
                     "and neither the held-out corpus NLL nor the held-out arithmetic NLL rises "
                     "by more than max(0.02 nats, 2 x the standard runs' std of it); does not "
                     "hold if entropy is higher in every seed or either NLL rises by more than "
                     "3 x its tolerance.",
    "pruning_order": "At the main ratio, held-out NLL after pruning: entropy < random and random "
                     "< magnitude, Srinivas-Babu, Stahlberg-Byrne, each pair in every seed; "
                     "entropy < random is not testable where |Spearman rho| of outgoing entropy "
                     "and LP importance is < 0.1 (mean over layers and seeds).",
    "layer_subsets": "Pruning bottom half / top half / even / odd layers gives similar NLL: the "
                     "range of the subset means is within 2 x the mean seed std, or no pair is "
                     "ordered the same way in every seed.",
    "nucl_then_prune": "The NLL increase from entropy pruning is smaller for the NUCL model "
                       "than for the standard model of the same seed, in every seed; not "
                       "testable where the NUCL models' |rho(entropy, LP)| is < 0.1.",
    "reallocation": "FFNs concentrated in the middle layers give lower held-out NLL than "
                    "uniform widths at equal FFN parameters, in every seed.",
    "nucl_pretrain": "NUCL during pre-training gives lower summed outgoing entropy than plain "
                     "pre-training in every seed (its NLL cost is reported).",
    "diversity": "The diversity-term model's NLL increase from entropy pruning is smaller than "
                 "the standard model's, in every seed; not testable where its |rho(entropy, "
                 "LP)| is < 0.1.",
    "supernodes": "The top 1% of channels by LP carry >= 10% of a layer's LP mass (median over "
                  "layers and seeds; 1% if uniform), and removing them raises NLL more than "
                  "removing as many random channels (every draw, every seed).",
}


# ---- statistics ----------------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> tuple[float, Optional[float]]:
  values = [float(v) for v in values]
  mean = float(np.mean(values))
  return mean, (float(np.std(values, ddof=1)) if len(values) > 1 else None)


def fmt(values: Sequence[float], digits: int = 3) -> str:
  """"mean ± std (n)" of `values` ("mean (n=1)" for one value)."""
  if not values:
    return "–"
  mean, std = mean_std(values)
  if std is None:
    return f"{mean:.{digits}f} (n=1)"
  return f"{mean:.{digits}f} ± {std:.{digits}f} (n={len(values)})"


def paired_direction(a: dict, b: dict) -> Optional[str]:
  """'less' if a[s] < b[s] for every common seed s, 'greater' if > for every one, else None
  (also with fewer than two common seeds)."""
  seeds = sorted(set(a) & set(b))
  if len(seeds) < 2:
    return None
  if all(a[s] < b[s] for s in seeds):
    return "less"
  if all(a[s] > b[s] for s in seeds):
    return "greater"
  return None


def verdict_from(direction: Optional[str], claimed: str) -> str:
  if direction is None:
    return UNSURE
  return HOLDS if direction == claimed else FAILS


def bootstrap_interval(evaluations: Sequence[dict], key: str = "nll",
                       baselines: Optional[Sequence[dict]] = None,
                       draws: int = BOOTSTRAP_DRAWS) -> Optional[tuple[float, float]]:
  """95 % percentile-bootstrap interval of the mean over `evaluations` (one per seed) of their
  held-out `key` NLL per token, resampling the evaluation rows (the same draw of rows for every
  model: they were all scored on the same rows).  With `baselines` (paired by position), of the
  mean difference evaluation - baseline.  None where the per-row sums are missing."""
  rows = [e.get(f"{key}_rows") for e in evaluations]
  if baselines is not None:
    rows += [b.get(f"{key}_rows") for b in baselines]
  if not rows or any(r is None for r in rows):
    return None
  count = len(rows[0]["sums"])
  rng = np.random.default_rng(0)
  picks = rng.integers(0, count, size=(draws, count))
  per_model = [np.asarray(r["sums"])[picks].sum(1) / np.asarray(r["tokens"])[picks].sum(1)
               for r in rows]
  value = np.mean(per_model[:len(evaluations)], axis=0)
  if baselines is not None:
    value = value - np.mean(per_model[len(evaluations):], axis=0)
  low, high = np.percentile(value, [2.5, 97.5])
  return float(low), float(high)


def fmt_ci(interval: Optional[tuple[float, float]], digits: int = 3) -> str:
  """" [low, high]" or "" without an interval."""
  if interval is None:
    return ""
  return f" [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]"


def premise_of(premise: Optional[dict]) -> Optional[float]:
  """The mean over seeds of the per-model mean Spearman rho(outgoing entropy, LP)."""
  if not premise:
    return None
  return float(np.mean([p["mean"] for p in premise.values()]))


def gated(verdict: str, rho: Optional[float]) -> str:
  """`verdict` of an entropy-pruning claim, or NOT_TESTABLE where its premise is absent."""
  if rho is not None and abs(rho) < PREMISE_MIN_CORRELATION:
    return NOT_TESTABLE
  return verdict


# ---- per-finding tables --------------------------------------------------------------------------

def _by_seed(runs: dict, key: str) -> dict:
  return {seed: run["final"][key] for seed, run in runs.items() if key in run["final"]}


def finetune_table(results: dict) -> dict:
  ft = results["finetune"]
  rows = []
  for key, runs in ft["runs"].items():
    finals = [r["final"] for r in runs.values()]
    rows.append({"run": key, "seeds": len(runs),
                 "entropy": [f["entropy"] for f in finals],
                 "nll": [f["nll"] for f in finals],
                 "nll_ci": bootstrap_interval(finals, "nll"),
                 "arithmetic_nll": [f["arithmetic_nll"] for f in finals],
                 "arithmetic_nll_ci": bootstrap_interval(finals, "arithmetic_nll"),
                 "accuracy_strict": [f.get("accuracy_strict", math.nan) for f in finals]})
  standard = ft["runs"]["standard"]
  quality = ("nll", "arithmetic_nll")  # held-out corpus and fine-tuning task
  baseline = {m: _by_seed(standard, m) for m in quality}
  tolerance = {m: max(NLL_TOLERANCE, 2 * (mean_std(list(baseline[m].values()))[1] or 0.0))
               for m in quality}
  verdicts = {}
  for variant, key in ft["main"].items():
    runs = ft["runs"][key]
    direction = paired_direction(_by_seed(runs, "entropy"), _by_seed(standard, "entropy"))
    common = [s for s in runs if s in standard]
    change = {m: float(np.mean([runs[s]["final"][m] - baseline[m][s]
                                for s in runs if s in baseline[m]])) for m in quality}
    change_ci = {m: bootstrap_interval([runs[s]["final"] for s in common], m,
                                       [standard[s]["final"] for s in common])
                 for m in quality}
    entropy_change = float(np.mean([runs[s]["final"]["entropy"] / standard[s]["final"]["entropy"]
                                    - 1 for s in common]))
    kept = all(change[m] <= tolerance[m] for m in quality)
    lost = any(change[m] > 3 * tolerance[m] for m in quality)
    if direction == "less" and kept:
      verdict = HOLDS
    elif direction == "greater" or (direction == "less" and lost):
      verdict = FAILS
    else:
      verdict = UNSURE
    verdicts[variant] = {"verdict": verdict, "alpha_run": key, "entropy_direction": direction,
                         "mean_entropy_change": entropy_change,
                         "mean_nll_change": change["nll"], "nll_change_ci": change_ci["nll"],
                         "mean_arithmetic_nll_change": change["arithmetic_nll"],
                         "arithmetic_nll_change_ci": change_ci["arithmetic_nll"],
                         "tolerance": tolerance["nll"],
                         "arithmetic_tolerance": tolerance["arithmetic_nll"]}
  return {"rows": rows, "verdicts": verdicts}


def _rows_at(rows: list[dict], ratio: float, **match) -> list[dict]:
  return [r for r in rows if math.isclose(r["ratio"], ratio)
          and all(r.get(k) == v for k, v in match.items())]


def _nll_by_seed(rows: list[dict]) -> dict:
  return {str(r["seed"]): r["nll"] for r in rows}


def best_method(rows: list[dict], ratio: float) -> str:
  """The pruning method with the lowest mean NLL at `ratio` (all layers, per-layer budget)."""
  means = {}
  for r in _rows_at(rows, ratio, layers="all", budget="per_layer"):
    means.setdefault(r["method"], []).append(r["nll"])
  if not means:
    raise ValueError(f"no pruning results at ratio {ratio}")
  return min(means, key=lambda m: np.mean(means[m]))


def prune_table(results: dict, ratio: float) -> dict:
  rows = results["prune"]["rows"]
  unpruned = _by_seed(results["finetune"]["runs"]["standard"], "nll")
  methods = sorted({r["method"] for r in rows})
  table = []
  for method in methods:
    at = _rows_at(rows, ratio, method=method, layers="all")
    table.append({"method": method, "nll": [r["nll"] for r in at],
                  "nll_ci": bootstrap_interval(at),
                  "accuracy_strict": [r["accuracy_strict"] for r in at
                                      if "accuracy_strict" in r]})
  table.sort(key=lambda r: np.mean(r["nll"]))
  sweep = {}
  for method in methods:
    for r in rows:
      if r["method"] == method and r["layers"] == "all":
        sweep.setdefault(method, {}).setdefault(r["ratio"], []).append(r["nll"])
  pairs = {}
  by = {m: _nll_by_seed(_rows_at(rows, ratio, method=m, layers="all")) for m in methods}
  rho = premise_of(results["prune"].get("premise"))
  for better, worse in (("entropy", "random"), ("random", "magnitude"),
                        ("random", "srinivas_babu"), ("random", "stahlberg_byrne")):
    if better in by and worse in by:
      verdict = verdict_from(paired_direction(by[better], by[worse]), "less")
      pairs[f"{better} < {worse}"] = gated(verdict, rho) if better == "entropy" else verdict
  return {"rows": table, "unpruned_nll": list(unpruned.values()), "sweep": sweep,
          "pairs": pairs, "verdict": _overall(pairs.values()), "premise_rho": rho}


def _overall(verdicts) -> str:
  """One verdict for several: their common value, else inconclusive."""
  verdicts = set(verdicts)
  return verdicts.pop() if len(verdicts) == 1 else UNSURE


def subsets_table(results: dict, ratio: float) -> dict:
  rows = results["layer_subsets"]["rows"]
  subsets = []
  for r in rows:
    if r["layers"] not in subsets:
      subsets.append(r["layers"])
  table = [{"layers": s, "nll": [r["nll"] for r in rows if r["layers"] == s],
            "nll_ci": bootstrap_interval([r for r in rows if r["layers"] == s]),
            "widths": next(r["ffn_widths"] for r in rows if r["layers"] == s)} for s in subsets]
  halves = [t for t in table if t["layers"] != "all"]
  verdict = UNSURE
  if halves and all(len(t["nll"]) > 1 for t in halves):
    means = [np.mean(t["nll"]) for t in halves]
    spread = np.mean([mean_std(t["nll"])[1] for t in halves])
    by = {t["layers"]: {str(r["seed"]): r["nll"] for r in rows if r["layers"] == t["layers"]}
          for t in halves}
    ordered = any(paired_direction(by[a], by[b]) is not None
                  for a in by for b in by if a < b)
    verdict = HOLDS if (max(means) - min(means) <= 2 * spread or not ordered) else FAILS
  return {"rows": table, "verdict": verdict, "ratio": ratio}


def _prune_increase(rows: list[dict], ratio: float, unpruned: dict, **match) -> dict:
  return {str(r["seed"]): r["nll"] - unpruned[str(r["seed"])]
          for r in _rows_at(rows, ratio, **match) if str(r["seed"]) in unpruned}


def _increase_ci(pruned_rows: list[dict], unpruned_runs: dict):
  """Bootstrap interval of the mean NLL increase from pruning, paired by seed."""
  pruned = [r for r in pruned_rows if str(r["seed"]) in unpruned_runs]
  return bootstrap_interval(pruned, "nll",
                            [unpruned_runs[str(r["seed"])]["final"] for r in pruned])


def nucl_prune_table(results: dict, ratio: float) -> dict:
  ft = results["finetune"]
  standard_rows = results["prune"]["rows"]
  std_unpruned = _by_seed(ft["runs"]["standard"], "nll")
  std_increase = _prune_increase(standard_rows, ratio, std_unpruned, method="entropy",
                                 layers="all")
  table = [{"model": "standard", "increase": list(std_increase.values()),
            "increase_ci": _increase_ci(_rows_at(standard_rows, ratio, method="entropy",
                                                 layers="all"), ft["runs"]["standard"]),
            "premise_rho": premise_of(results["prune"].get("premise"))}]
  verdicts = {}
  premises = results["nucl_prune"].get("premise", {})
  for variant, key in ft["main"].items():
    unpruned = _by_seed(ft["runs"][key], "nll")
    rows = [r for r in results["nucl_prune"]["rows"] if r["variant"] == variant]
    increase = _prune_increase(rows, ratio, unpruned)
    rho = premise_of(premises.get(variant))
    table.append({"model": f"NUCL-{variant} ({key})", "increase": list(increase.values()),
                  "increase_ci": _increase_ci(_rows_at(rows, ratio), ft["runs"][key]),
                  "nll_after": [r["nll"] for r in _rows_at(rows, ratio)], "premise_rho": rho})
    verdicts[variant] = gated(verdict_from(paired_direction(increase, std_increase), "less"),
                              rho)
  return {"rows": table, "verdicts": verdicts,
          "verdict": _overall(verdicts.values()) if verdicts else UNSURE}


def scratch_table(runs: dict, claimed_key: str, baseline_key: str, metric: str) -> dict:
  table = [{"arm": arm, "nll": [r["final"]["nll"] for r in seeds.values()],
            "nll_ci": bootstrap_interval([r["final"] for r in seeds.values()]),
            "entropy": [r["final"]["entropy"] for r in seeds.values()]}
           for arm, seeds in runs.items()]
  direction = paired_direction(_by_seed(runs[claimed_key], metric),
                               _by_seed(runs[baseline_key], metric))
  return {"rows": table, "verdict": verdict_from(direction, "less")}


def diversity_table(results: dict, ratio: float) -> dict:
  div = results["diversity"]
  unpruned = _by_seed(div["runs"], "nll")
  increase = {str(r["seed"]): r["nll"] - unpruned[str(r["seed"])] for r in div["prune_rows"]}
  std_increase = _prune_increase(results["prune"]["rows"], ratio,
                                 _by_seed(results["finetune"]["runs"]["standard"], "nll"),
                                 method="entropy", layers="all")
  rho = premise_of(div.get("premise"))
  return {"nll": list(unpruned.values()),
          "entropy": [r["final"]["entropy"] for r in div["runs"].values()],
          "increase": list(increase.values()), "standard_increase": list(std_increase.values()),
          "increase_ci": _increase_ci(div["prune_rows"], div["runs"]), "premise_rho": rho,
          "verdict": gated(verdict_from(paired_direction(increase, std_increase), "less"), rho)}


def supernodes_table(results: dict) -> dict:
  sn = results["supernodes"]
  shares = [s for row in sn["rows"] for s in row["lp_share"].values() if s is not None]
  median = float(np.median(shares)) if shares else math.nan
  costlier = [row["nll_without_supernodes"] > max(row["nll_without_random"])
              for row in sn["rows"]]
  concentrated = median >= 10 * sn["fraction"]
  if len(costlier) < 2:
    verdict = UNSURE
  elif concentrated and all(costlier):
    verdict = HOLDS
  elif not concentrated and not any(costlier):
    verdict = FAILS
  else:
    verdict = UNSURE
  removal_ci = bootstrap_interval(
      [{"nll_rows": r["nll_without_supernodes_rows"]} for r in sn["rows"]
       if "nll_without_supernodes_rows" in r],
      "nll", [{"nll_rows": r["nll_rows"]} for r in sn["rows"] if "nll_rows" in r])
  return {"median_share": median, "min_share": min(shares, default=math.nan),
          "max_share": max(shares, default=math.nan), "removal_increase_ci": removal_ci,
          "nll": [r["nll"] for r in sn["rows"]],
          "nll_without_supernodes": [r["nll_without_supernodes"] for r in sn["rows"]],
          "nll_without_random": [float(np.mean(r["nll_without_random"])) for r in sn["rows"]],
          "verdict": verdict}


# ---- the report ----------------------------------------------------------------------------------

def summarize(results: dict, ratio: float) -> dict:
  out = {}
  if "finetune" in results:
    out["nucl_finetune"] = finetune_table(results)
  if "prune" in results:
    out["pruning_order"] = prune_table(results, ratio)
  if "layer_subsets" in results:
    out["layer_subsets"] = subsets_table(results, ratio)
  if "nucl_prune" in results:
    out["nucl_then_prune"] = nucl_prune_table(results, ratio)
  if "reallocation" in results:
    out["reallocation"] = scratch_table(results["reallocation"]["runs"], "middle", "uniform",
                                        "nll")
  if "nucl_pretrain" in results:
    out["nucl_pretrain"] = scratch_table(results["nucl_pretrain"]["runs"], "nucl_ent",
                                         "standard", "entropy")
  if "diversity" in results:
    out["diversity"] = diversity_table(results, ratio)
  if "supernodes" in results:
    out["supernodes"] = supernodes_table(results)
  return out


def _verdict_of(table: dict) -> str:
  """The finding's verdict; per variant (or compared pair) where they disagree."""
  per_variant = {k: v if isinstance(v, str) else v["verdict"]
                 for k, v in (table.get("verdicts") or table.get("pairs") or {}).items()}
  if per_variant and len(set(per_variant.values())) > 1:
    return ", ".join(f"{k}: **{v}**" for k, v in per_variant.items())
  if "verdict" in table:
    return f"**{table['verdict']}**"
  return f"**{next(iter(per_variant.values()))}**"


def write_report(runner, *, wall_time_s: float) -> dict:
  """results.json, report.md and figures/ in the runner's output directory."""
  out: pathlib.Path = runner.out
  results = {stage: runner.result(stage) for stage in _finished(runner)}
  config = runner.config
  summary = summarize(results, config.prune_ratio)
  data = {"settings": json.loads((out / "settings.json").read_text()),
          "wall_time_s": {"this_invocation": wall_time_s,
                          "stages": {s: r.get("wall_time_s") for s, r in results.items()}},
          "summary": summary, "stages": results}
  figures = plot_figures(results, summary, out / "figures")
  outputs.write_file_atomically(out / "results.json", json.dumps(data, indent=1))
  outputs.write_file_atomically(out / "report.md", markdown(results, summary, config, figures,
                                                            relative_to=out))
  return {"report": out / "report.md", "results": out / "results.json", "figures": figures}


# Where docs/reproduction.md's real-model section (maxnucl.reproduction.real_report) begins: this
# study's publish rewrites what precedes it and keeps the rest.
REAL_SECTION_MARKER = "<!-- real-model section: tools/reproduce.py --model ... --publish_docs -->"


def _finished(runner) -> list[str]:
  return [s for s in runner.stage_names if runner.stage_path(s).exists()]


def markdown(results: dict, summary: dict, config, figures: dict, *,
             relative_to: pathlib.Path) -> str:
  """report.md: the setup, the verdict table, one section per finished stage, the figures."""
  lines = ["# Small-scale reproduction: report", ""]
  for section in (_setup_lines, _verdict_lines, _pretrain_lines, _finetune_lines, _prune_lines,
                  _subsets_lines, _nucl_prune_lines, _from_scratch_lines, _diversity_lines,
                  _supernode_lines, _export_lines):
    lines += section(results, summary, config)
  return "\n".join(lines + figure_lines(figures, relative_to))


def figure_lines(figures: dict, relative_to: pathlib.Path) -> list[str]:
  """The report's "Figures" section: {title: PNG path} as images relative to the report."""
  if not figures:
    return []
  return ["## Figures", "", *(f"![{name}]({path.relative_to(relative_to).as_posix()})"
                              for name, path in figures.items()), ""]


def _setup_lines(results: dict, summary: dict, config) -> list[str]:
  if "data" not in results:
    return []
  d = results["data"]
  return [f"Corpus: `{d['corpus_root']}`, {len(d['files'])} files "
          f"(sha256 of their hashes `{d['files_sha256'][:16]}…`); "
          + ", ".join(f"{s}: {v['files']} files / {v['bytes']:,} bytes"
                      for s, v in d["splits"].items())
          + f". SentencePiece vocabulary of {d['vocab_size']}, rows of "
          f"{d['tokens_per_row']} tokens. Model: {config.model}. Seeds: {list(config.seeds)}.",
          ""]


def _verdict_lines(results: dict, summary: dict, config) -> list[str]:
  lines = ["## Verdicts", "",
           "Intervals in brackets: 95 % bootstrap over the held-out evaluation rows.", "",
           "| finding | source | verdict | measured | rule |", "|---|---|---|---|---|"]
  for name, table in summary.items():
    lines.append(f"| {name} | {SOURCES[name]} | {_verdict_of(table)} | "
                 f"{measured(name, table)} | {VERDICT_RULES[name]} |")
  return lines + [""]


def _pretrain_lines(results: dict, summary: dict, config) -> list[str]:
  if "pretrain" not in results:
    return []
  finals = [run["final"] for run in results["pretrain"]["runs"].values()]
  return ["## Pre-training", "",
          f"{config.pretrain_steps} steps, one run per seed: held-out corpus NLL "
          f"{fmt([f['nll'] for f in finals])}{fmt_ci(bootstrap_interval(finals))}, summed "
          f"outgoing entropy {fmt([f['entropy'] for f in finals], 1)}.", ""]


def _finetune_lines(results: dict, summary: dict, config) -> list[str]:
  if "nucl_finetune" not in summary:
    return []
  t = summary["nucl_finetune"]
  lines = ["## NUCL vs standard fine-tuning (NUCL paper, Fig. 2–3)", "",
           "| run (variant@alpha) | summed outgoing entropy | held-out corpus NLL | "
           "arithmetic NLL | arithmetic accuracy (strict, %) |", "|---|---|---|---|---|"]
  for r in t["rows"]:
    lines.append(f"| {r['run']} | {fmt(r['entropy'], 1)} | {fmt(r['nll'])}"
                 f"{fmt_ci(r['nll_ci'])} | {fmt(r['arithmetic_nll'])}"
                 f"{fmt_ci(r['arithmetic_nll_ci'])} | {fmt(r['accuracy_strict'], 1)} |")
  return lines + ["", "Per variant (first alpha, paired by seed): " + "; ".join(
      f"{v}: {x['verdict']} (entropy {x['entropy_direction'] or 'mixed'} than standard; mean "
      f"change of corpus NLL {x['mean_nll_change']:+.3f} (tolerance {x['tolerance']:.3f}), "
      f"of arithmetic NLL {x['mean_arithmetic_nll_change']:+.3f} (tolerance "
      f"{x['arithmetic_tolerance']:.3f}))"
      for v, x in t["verdicts"].items()), ""]


def _prune_lines(results: dict, summary: dict, config) -> list[str]:
  if "pruning_order" not in summary:
    return []
  t = summary["pruning_order"]
  lines = [f"## Pruning {config.prune_ratio:.0%} of every FFN (NUCL paper, Table 4)", "",
           f"Unpruned (standard fine-tuned): NLL {fmt(t['unpruned_nll'])}.", "",
           "| method | held-out NLL | arithmetic accuracy (strict, %) |", "|---|---|---|"]
  for r in t["rows"]:
    lines.append(f"| {r['method']} | {fmt(r['nll'])}{fmt_ci(r['nll_ci'])} | "
                 f"{fmt(r['accuracy_strict'], 1)} |")
  ratios = sorted({x for s in t["sweep"].values() for x in s})
  lines += ["", "Ordering (paired by seed): " + "; ".join(
      f"{k}: {v}" for k, v in t["pairs"].items()) + _premise_text(t["premise_rho"]) + ".", "",
            "Sweep (mean NLL by ratio):", "",
            "| method | " + " | ".join(f"{x:.0%}" for x in ratios) + " |",
            "|---|" + "---|" * len(ratios)]
  for method, by_ratio in sorted(t["sweep"].items()):
    lines.append(f"| {method} | " + " | ".join(
        f"{np.mean(by_ratio[x]):.3f}" if x in by_ratio else "–" for x in ratios) + " |")
  return lines + [""]


def _subsets_lines(results: dict, summary: dict, config) -> list[str]:
  if "layer_subsets" not in summary:
    return []
  return ([f"## Entropy pruning of half the layers at {config.prune_ratio:.0%} (Table 5)", "",
           "| layers | FFN widths after | held-out NLL |", "|---|---|---|"]
          + [f"| {r['layers']} | {r['widths']} | {fmt(r['nll'])}{fmt_ci(r['nll_ci'])} |"
             for r in summary["layer_subsets"]["rows"]] + [""])


def _nucl_prune_lines(results: dict, summary: dict, config) -> list[str]:
  if "nucl_then_prune" not in summary:
    return []
  t = summary["nucl_then_prune"]
  return ([f"## NUCL, then entropy pruning at {config.prune_ratio:.0%}", "",
           "| model | NLL increase from pruning | rho(outgoing entropy, LP) |", "|---|---|---|"]
          + [f"| {r['model']} | {fmt(r['increase'])}{fmt_ci(r['increase_ci'])} | "
             f"{_rho(r['premise_rho'])} |" for r in t["rows"]]
          + ["", "Per variant: " + "; ".join(f"{k}: {v}" for k, v in t["verdicts"].items()),
             ""])


def _from_scratch_lines(results: dict, summary: dict, config) -> list[str]:
  lines = []
  if "reallocation" in summary:
    widths = results["reallocation"]["widths"]
    lines += _scratch_lines(
        "FFN reallocation (layerwise FFN importance), from scratch",
        f"Equal FFN parameters: uniform {widths['uniform']} vs middle {widths['middle']}; "
        f"{config.scratch_steps} steps.", "widths", summary["reallocation"]["rows"])
  if "nucl_pretrain" in summary:
    lines += _scratch_lines(
        f"NUCL during pre-training (nucl_ent, alpha {results['nucl_pretrain']['alpha']:g}), "
        f"from scratch", f"{config.scratch_steps} steps; standard = the uniform runs above.",
        "pre-training", summary["nucl_pretrain"]["rows"])
  return lines


def _diversity_lines(results: dict, summary: dict, config) -> list[str]:
  if "diversity" not in summary:
    return []
  t = summary["diversity"]
  return [f"## Inter-neuron diversity term (nucl_diversity, alpha "
          f"{results['diversity']['alpha']:g})", "",
          f"Fine-tuned: NLL {fmt(t['nll'])}, entropy {fmt(t['entropy'], 1)}; NLL increase "
          f"from entropy pruning at {config.prune_ratio:.0%}: {fmt(t['increase'])}"
          f"{fmt_ci(t['increase_ci'])} (standard: {fmt(t['standard_increase'])})"
          + _premise_text(t["premise_rho"]) + ".", ""]


def _supernode_lines(results: dict, summary: dict, config) -> list[str]:
  if "supernodes" not in summary:
    return []
  t = summary["supernodes"]
  return [f"## Supernodes (top {results['supernodes']['fraction']:.0%} of channels by LP)",
          "", f"Share of a layer's LP mass: median {t['median_share']:.1%} (range "
          f"{t['min_share']:.1%}–{t['max_share']:.1%}).", "",
          "| model | NLL | without supernodes | without as many random channels |",
          "|---|---|---|---|",
          f"| standard fine-tuned | {fmt(t['nll'])} | {fmt(t['nll_without_supernodes'])} | "
          f"{fmt(t['nll_without_random'])} |", "",
          f"NLL increase from removing the supernodes: 95 % interval"
          f"{fmt_ci(t['removal_increase_ci'])}.", ""]


def _export_lines(results: dict, summary: dict, config) -> list[str]:
  if "export" not in results:
    return []
  e = results["export"]
  return (["## Re-export to Hugging Face", "",
           f"Best method at {config.prune_ratio:.0%}: {e['method']}, global budget: per-layer "
           f"widths {e['ffn_widths']}.", "", "| export | parameters | max |logit difference| |",
           "|---|---|---|"]
          + [f"| {m} | {x['hf_parameters']:,} | {x['max_abs_logit_diff']:.2e} |"
             for m, x in e["exports"].items()] + [""])


def _scratch_lines(title: str, intro: str, first_column: str, rows: list[dict]) -> list[str]:
  return ([f"## {title}", "", intro, "",
           f"| {first_column} | held-out NLL | summed outgoing entropy |", "|---|---|---|"]
          + [f"| {r['arm']} | {fmt(r['nll'])}{fmt_ci(r['nll_ci'])} | {fmt(r['entropy'], 1)} |"
             for r in rows] + [""])


def _rho(rho: Optional[float]) -> str:
  return "–" if rho is None else f"{rho:+.2f}"


def _premise_text(rho: Optional[float]) -> str:
  """Entropy pruning removes the highest-entropy neurons: its premise is rho < 0 (high outgoing
  entropy, low importance).  rho > 0 is a measured reversal: it removes the important ones."""
  if rho is None:
    return ""
  if abs(rho) < PREMISE_MIN_CORRELATION:
    reading = (f"|rho| < {PREMISE_MIN_CORRELATION}: entropy does not rank importance here, so "
               f"entropy pruning is {NOT_TESTABLE}")
  elif rho < 0:
    reading = "the premise holds: the highest-entropy neurons are the least important"
  else:
    reading = ("the premise is reversed: the highest-entropy neurons are the most important, "
               "and entropy pruning removes them")
  return (f"; premise of entropy pruning: Spearman rho(outgoing entropy, LP importance) = "
          f"{rho:+.2f} (mean over layers and seeds; {reading})")


def _change(value: float, interval) -> str:
  return f"{value:+.3f}{fmt_ci(interval)}"


def measured(name: str, table: dict) -> str:
  """The figures a finding's verdict rests on, for the verdict table (costs included)."""
  if name == "nucl_finetune":
    return "; ".join(
        f"{v}: entropy {x['mean_entropy_change']:+.1%}, corpus NLL "
        f"{_change(x['mean_nll_change'], x['nll_change_ci'])}, arithmetic NLL "
        f"{_change(x['mean_arithmetic_nll_change'], x['arithmetic_nll_change_ci'])}"
        + (" (a cost)" if x["mean_arithmetic_nll_change"] > 0 else "")
        for v, x in table["verdicts"].items())
  if name == "pruning_order":
    nll = {r["method"]: np.mean(r["nll"]) for r in table["rows"]}
    shown = [m for m in ("entropy", "random", "magnitude") if m in nll]
    return (", ".join(f"{m} {nll[m]:.3f}" for m in shown) + " (NLL after pruning); rho(entropy, "
            f"LP) {_rho(table['premise_rho'])}")
  if name == "layer_subsets":
    means = [np.mean(r["nll"]) for r in table["rows"] if r["layers"] != "all"]
    return f"subset NLLs {min(means):.3f}–{max(means):.3f}" if means else "–"
  if name == "nucl_then_prune":
    return "; ".join(f"{r['model'].split(' ')[0]} +{np.mean(r['increase']):.3f}"
                     f"{fmt_ci(r['increase_ci'])} (rho {_rho(r['premise_rho'])})"
                     for r in table["rows"])
  if name in ("reallocation", "nucl_pretrain"):
    return "; ".join(f"{r['arm']}: NLL {np.mean(r['nll']):.3f}{fmt_ci(r['nll_ci'])}, entropy "
                     f"{np.mean(r['entropy']):.0f}" for r in table["rows"])
  if name == "diversity":
    return (f"increase +{np.mean(table['increase']):.3f}{fmt_ci(table['increase_ci'])} vs "
            f"standard +{np.mean(table['standard_increase']):.3f}; rho "
            f"{_rho(table['premise_rho'])}")
  if name == "supernodes":
    return (f"median LP share {table['median_share']:.0%}; NLL "
            f"{np.mean(table['nll']):.3f} -> {np.mean(table['nll_without_supernodes']):.3f} "
            f"without supernodes, {np.mean(table['nll_without_random']):.3f} without random")
  return "–"


def plot_figures(results: dict, summary: dict, directory: pathlib.Path) -> dict:
  """{title: PNG path} of the figures the finished stages allow, written into `directory`."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  directory.mkdir(parents=True, exist_ok=True)
  written = {}
  if "finetune" in results:
    written.update(_plot_finetuning(plt, results, summary, directory))
  if "pruning_order" in summary:
    written["pruning sweep"] = _plot_pruning_sweep(plt, summary["pruning_order"], directory)
  if "supernodes" in results:
    written["supernode LP share"] = _plot_supernodes(plt, results["supernodes"], directory)
  return written


def _plot_finetuning(plt, results: dict, summary: dict, directory: pathlib.Path) -> dict:
  """Entropy per layer and quality over fine-tuning (from step 0, the pre-trained model), and
  the alpha sweep's entropy against NLL."""
  ft = results["finetune"]
  arms = {"standard": "standard", **{f"NUCL-{v}": k for v, k in ft["main"].items()}}
  seed = sorted(ft["runs"]["standard"])[0]
  curves = finetune_curves(results)
  layers = len(ft["runs"]["standard"][seed]["curve"][0]["entropy_per_layer"])
  written = {}
  fig, axes = plt.subplots(1, layers, figsize=(2.6 * layers, 2.8), squeeze=False)
  for label, key in arms.items():
    curve = curves[key][seed]
    for i in range(layers):
      axes[0][i].plot([p["step"] for p in curve], [p["entropy_per_layer"][i] for p in curve],
                      marker="o", label=label)
  for i in range(layers):
    axes[0][i].set_title(f"layer {i}")
    axes[0][i].set_xlabel("step")
  axes[0][0].set_ylabel("summed outgoing entropy")
  axes[0][-1].legend(fontsize=7)
  written["entropy per layer over fine-tuning"] = _save(fig, directory / "entropy_layers.png")
  metrics = {"nll": "held-out corpus NLL", "arithmetic_nll": "held-out arithmetic NLL",
             "accuracy_strict": "arithmetic accuracy (strict, %)"}
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
  for label, key in arms.items():
    for ax, metric in zip(axes, metrics):
      for s in ft["runs"][key]:
        points = [p for p in curves[key][s] if metric in p]
        ax.plot([p["step"] for p in points], [p[metric] for p in points],
                color=f"C{list(arms).index(label)}", alpha=0.8,
                label=label if s == seed else None)
  for ax, title in zip(axes, metrics.values()):
    ax.set_ylabel(title)
    ax.set_xlabel("fine-tuning step")
  axes[-1].legend(fontsize=7)
  written["quality over fine-tuning"] = _save(fig, directory / "quality_curves.png")
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for r in summary["nucl_finetune"]["rows"]:
    ax.scatter(np.mean(r["entropy"]), np.mean(r["nll"]), s=12)
    ax.annotate(r["run"], (np.mean(r["entropy"]), np.mean(r["nll"])), fontsize=6)
  ax.set_xlabel("summed outgoing entropy")
  ax.set_ylabel("held-out corpus NLL")
  written["alpha sweep: entropy vs NLL"] = _save(fig, directory / "alpha_sweep.png")
  return written


def _plot_pruning_sweep(plt, table: dict, directory: pathlib.Path) -> pathlib.Path:
  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for method, by_ratio in sorted(table["sweep"].items()):
    ratios = sorted(by_ratio)
    ax.errorbar(ratios, [np.mean(by_ratio[x]) for x in ratios],
                yerr=[mean_std(by_ratio[x])[1] or 0 for x in ratios], marker="o", label=method,
                capsize=2)
  if table["unpruned_nll"]:
    ax.axhline(float(np.mean(table["unpruned_nll"])), color="black", linestyle=":",
               label="unpruned")
  ax.set_xlabel("fraction of FFN neurons removed")
  ax.set_ylabel("held-out corpus NLL")
  ax.legend(fontsize=7)
  return _save(fig, directory / "pruning_sweep.png")


def _plot_supernodes(plt, stage: dict, directory: pathlib.Path) -> pathlib.Path:
  fig, ax = plt.subplots(figsize=(5, 3))
  for row in stage["rows"]:
    names = list(row["lp_share"])
    ax.plot(range(len(names)), [row["lp_share"][n] for n in names], marker="o",
            label=f"seed {row['seed']}")
  ax.set_xlabel("layer")
  ax.set_ylabel("LP share of the top channels")
  ax.legend(fontsize=7)
  return _save(fig, directory / "supernodes.png")


def finetune_curves(results: dict) -> dict[str, dict[str, list[dict]]]:
  """{run key: {seed: evaluation points}} of the fine-tunes, each headed by its seed's
  pre-trained model as step 0 (the pre-training record's own step is its last pre-training
  step, not the fine-tune's start)."""
  pretrained = results.get("pretrain", {}).get("runs", {})
  return {key: {seed: ([{**pretrained[seed]["final"], "step": 0}] if seed in pretrained else [])
                + run["curve"] for seed, run in runs.items()}
          for key, runs in results["finetune"]["runs"].items()}


def _save(fig, path: pathlib.Path) -> pathlib.Path:
  fig.tight_layout()
  outputs.write_atomically(path, lambda f: fig.savefig(f, format=path.suffix[1:], dpi=110))
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  plt.close(fig)
  return path


def machine() -> str:
  """One line naming this machine: CPU model and count, memory, Python, jax and its backend."""
  import os  # pylint: disable=import-outside-toplevel
  import platform  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  cpu = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
  except (OSError, StopIteration):
    pass
  try:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    memory_text = f", {memory:.0f} GiB RAM"
  except (ValueError, OSError, AttributeError):
    memory_text = ""
  devices = jax.devices()
  return (f"{os.cpu_count()} x {cpu}{memory_text}; Python {platform.python_version()}, jax "
          f"{jax.__version__} on {devices[0].platform} ({len(devices)} device(s))")


def publish(out: pathlib.Path, docs_dir: pathlib.Path, *, command: str) -> pathlib.Path:
  """docs_dir/reproduction.md from OUT/report.md (figures copied to docs_dir/figures/ with a
  `reproduction_` prefix), headed by the command, the machine and the wall time."""
  import shutil  # pylint: disable=import-outside-toplevel
  results = json.loads((out / "results.json").read_text())
  stages_time = sum(t for t in results["wall_time_s"]["stages"].values() if t)
  text = (out / "report.md").read_text()
  figures = docs_dir / "figures"
  figures.mkdir(parents=True, exist_ok=True)
  for png in sorted((out / "figures").glob("*.png")):
    shutil.copyfile(png, figures / f"reproduction_{png.name}")
    text = text.replace(f"(figures/{png.name})", f"(figures/reproduction_{png.name})")
  body = text.split("\n", 1)[1]
  header = ["# Small-scale reproduction of the papers' findings", "",
            "Produced by:", "", "```", command, "```", "",
            f"Machine: {machine()}.", "",
            f"Wall time: {stages_time / 60:.0f} min, the sum of the stages' times (per stage: "
            f"results.json, `wall_time_s.stages`).", "",
            "What each stage does, the verdict rules and how to read the tables: "
            "[the reproduction guide](reproduction-guide.md).", ""]
  path = docs_dir / "reproduction.md"
  existing = path.read_text() if path.exists() else ""
  real = existing[existing.index(REAL_SECTION_MARKER):] \
      if REAL_SECTION_MARKER in existing else ""  # the real-model section is kept
  outputs.write_file_atomically(path, "\n".join(header) + body + ("\n\n" + real if real else ""))
  return path
