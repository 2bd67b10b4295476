"""Tables, verdicts and plots of the real-model study (maxnucl.reproduction.real_model):
`write_report(runner)` writes OUTPUT/results.json, OUTPUT/report.md and OUTPUT/figures/*.png;
`publish(out, docs)` puts the report into docs/reproduction.md as its real-model section.

There is one pretrained model, so a comparison's uncertainty is that of the held-out text: every
figure carries a 95 % bootstrap interval over the held-out documents (one row each), and a
comparison of two models is paired (the same resampled documents for both;
`report.bootstrap_interval`).  Random pruning is the one method with seeds; it is compared by its
seed mean, and a method "beats random" only where it is also below every random seed.  A verdict
is
  holds          the claimed direction on every domain (code, prose), each interval excluding 0,
  does not hold  the opposite direction on every domain, each interval excluding 0,
  inconclusive   anything else,
  not testable   an entropy-pruning claim where outgoing entropy does not rank the neurons' LP
                 importance (|Spearman rho| < report.PREMISE_MIN_CORRELATION).
The rules per finding are in VERDICT_RULES, printed in the report.
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional, Sequence

import numpy as np

from maxnucl import outputs
from maxnucl.reproduction import report
from maxnucl.reproduction.report import FAILS, HOLDS, NOT_TESTABLE, UNSURE, fmt, fmt_ci

DOMAINS = ("code", "prose")
EXTRA = ("humaneval", "arithmetic")  # scored for some models only (real_model.EXTRA_DOMAINS)
SECTION_MARKER = report.REAL_SECTION_MARKER
PAPER = {"lp_share_median": 0.587, "lp_share_range": (0.330, 0.861),
         "scar_prot_ppl_50": 54.8, "wanda_channel_ppl_50": 989.2}

SOURCES = {
    "pruning_order": "NUCL paper (Table 4)",
    "layer_subsets": "NUCL paper (Table 5)",
    "edge_pairs": "NUCL paper (Fig. 4)",
    "lp_concentration": "SCAR paper (supernodes)",
    "outlier_overlap": "SCAR paper (supernodes vs activation outliers)",
    "supernode_removal": "SCAR paper (supernodes)",
    "scar_vs_wanda": "SCAR paper (50 % FFN sparsity)",
    "nucl_finetune": "NUCL paper (Fig. 2-3, Table 1)",
    "nucl_then_prune": "new in this study (not claimed by the papers)",
    "distill_vs_nll": "Minitron (arXiv 2407.14679: distillation beats NLL recovery)",
    "ranking_after_recovery": "new in this study (not claimed by the papers)",
    "nucl_then_recover": "new in this study (not claimed by the papers)",
}

VERDICT_RULES = {
    "pruning_order": "At 25 %: entropy < random (seed mean, and below every random seed), and "
                     "random < magnitude, Srinivas-Babu, Stahlberg-Byrne, each on code and prose "
                     "NLL with the paired interval excluding 0; entropy < random is not testable "
                     "where |rho(entropy, LP)| < 0.1.",
    "layer_subsets": "Entropy pruning of the bottom half, top half, even or odd layers gives "
                     "similar NLL: the paired interval of the highest minus the lowest group "
                     "includes 0 on every domain (holds), excludes it on every domain (does not "
                     "hold).",
    "edge_pairs": "Pruning the first or the last adjacent layer pair costs more than the middle "
                  "pairs: the mean NLL increase of the two outer pairs minus that of the inner "
                  "pairs, interval above 0 on every domain.",
    "lp_concentration": "The top 1 % of channels by LP carry >= 10 % of a layer's LP mass "
                        "(median over layers; 1 % if LP were uniform). The paper: median "
                        "58.7 %, range 33.0-86.1 % (Llama-3.1-8B).",
    "outlier_overlap": "LP supernodes overlap only weakly with activation outliers (the top 1 % "
                       "by RMS activation): median overlap over layers < 50 %.",
    "supernode_removal": "Switching off the supernodes raises NLL more than switching off as "
                         "many random channels (every draw), interval above 0 on every domain.",
    "scar_vs_wanda": "At 50 % FFN sparsity, SCAR-Prot's NLL < Wanda-channel's on every domain, "
                     "interval excluding 0.",
    "nucl_finetune": "NUCL lowers summed outgoing entropy vs standard fine-tuning in every seed, "
                     "and no held-out NLL (code, prose, arithmetic answers) rises by more than "
                     "max(0.02 nats, "
                     "2 x the standard runs' std); does not hold if entropy is higher in every "
                     "seed or an NLL rises by more than 3 x its tolerance.",
    "nucl_then_prune": "The NLL increase from 25 % entropy pruning is smaller for the NUCL model "
                       "than for the standard model of the same seed, in every seed and domain.",
    "distill_vs_nll": "Per pruned model (method @ ratio): after the same number of tokens, the "
                      "model recovered by distillation has lower held-out NLL than the one "
                      "recovered by NLL fine-tuning, on code and prose, paired interval "
                      "excluding 0.",
    "ranking_after_recovery": "Per ratio: the pruning criteria best and worst right after "
                              "pruning (mean NLL of the two domains) keep that order after "
                              "distillation, the interval of worst minus best above 0 on every "
                              "domain (holds: the ranking survives); below 0 on every domain "
                              "(does not hold: reversed); otherwise inconclusive (recovery "
                              "erased the difference, or the domains disagree).",
    "nucl_then_recover": "Entropy-pruned and recovered by distillation from its own unpruned "
                         "self, the NUCL fine-tuned model ends with lower held-out NLL than "
                         "the standard fine-tuned one, on code and prose, paired interval "
                         "excluding 0 (one seed).",
}


# ---- comparisons ---------------------------------------------------------------------------------

def difference(a: Sequence[dict], b: Sequence[dict], domain: str) -> dict:
  """mean NLL of evaluations `a` minus that of `b` on `domain`, with its paired interval."""
  key = f"{domain}_nll"
  value = float(np.mean([e[key] for e in a]) - np.mean([e[key] for e in b]))
  return {"difference": value, "ci": report.bootstrap_interval(list(a), key, list(b))}


def directed(diffs: dict, claimed: str) -> str:
  """HOLDS / FAILS / UNSURE from {domain: difference} for the claim "a < b" (claimed "less") or
  "a > b" ("greater"): every domain's interval on the claimed side of 0, or every one on the
  other side."""
  def side(d):
    low, high = d["ci"] if d["ci"] else (d["difference"], d["difference"])
    return "less" if high < 0 else "greater" if low > 0 else None
  sides = {side(d) for d in diffs.values()}
  if len(sides) == 1 and None not in sides:
    return HOLDS if sides == {claimed} else FAILS
  return UNSURE


def _rows(rows: list[dict], ratio: float, method: str, layers: str = "all") -> list[dict]:
  return [r for r in rows if r["method"] == method and abs(r["ratio"] - ratio) < 1e-9
          and r.get("layers", "all") == layers]


def prune_table(results: dict, ratio: float) -> dict:
  """Per method at `ratio`: NLL per domain (random: seed mean ± std) with intervals; the
  Table 4 comparisons."""
  rows = results["prune"]["rows"]
  base = results["baseline"]
  methods = list(dict.fromkeys(r["method"] for r in rows))
  table = []
  for method in methods:
    found = _rows(rows, ratio, method)
    if not found:
      continue
    entry = {"method": method, "seeds": len(found)}
    for domain in (*DOMAINS, *EXTRA):
      key = f"{domain}_nll"
      if all(key in r for r in found):
        entry[key] = [r[key] for r in found]
        entry[f"{key}_ci"] = report.bootstrap_interval(found, key)
        entry[f"{domain}_increase"] = difference(found, [base], domain)
    entry["entropy"] = [r["entropy"] for r in found]
    table.append(entry)
  comparisons = {}
  random = _rows(rows, ratio, "random")
  for method, claimed in (("entropy", "less"), ("magnitude", "greater"),
                          ("srinivas_babu", "greater"), ("stahlberg_byrne", "greater")):
    found = _rows(rows, ratio, method)
    if not found or not random:
      continue
    diffs = {d: difference(found, random, d) for d in DOMAINS}
    verdict = directed(diffs, claimed)
    if verdict == HOLDS and method == "entropy":  # below every random seed, too
      if not all(found[0][f"{d}_nll"] < min(r[f"{d}_nll"] for r in random) for d in DOMAINS):
        verdict = UNSURE
    comparisons[method] = {"vs_random": diffs, "claimed": claimed, "verdict": verdict}
  return {"ratio": ratio, "rows": table, "comparisons": comparisons}


def sweep(results: dict) -> dict:
  """{method: {domain: {ratio: mean NLL}}} with the unpruned model at ratio 0."""
  rows = results["prune"]["rows"]
  base = results["baseline"]
  out: dict = {}
  for r in rows:
    for domain in DOMAINS:
      out.setdefault(r["method"], {}).setdefault(domain, {}).setdefault(r["ratio"], []).append(
          r[f"{domain}_nll"])
  return {m: {d: {0.0: base[f"{d}_nll"], **{x: float(np.mean(v)) for x, v in by.items()}}
              for d, by in per.items()} for m, per in out.items()}


def subsets_table(results: dict, ratio: float) -> dict:
  stage = results["layer_subsets"]
  base = results["baseline"]
  by_layers = {r["layers"]: r for r in stage["rows"]}
  groups = [g for g in by_layers if g not in stage["pairs"]]
  pairs = [p for p in stage["pairs"] if p in by_layers]
  increase = {g: {d: difference([by_layers[g]], [base], d) for d in DOMAINS}
              for g in groups + pairs}
  verdicts = {}
  if len(groups) >= 2:
    diffs = {}
    for d in DOMAINS:
      order = sorted(groups, key=lambda g: by_layers[g][f"{d}_nll"])
      diffs[d] = {**difference([by_layers[order[-1]]], [by_layers[order[0]]], d),
                  "highest": order[-1], "lowest": order[0]}
    inside = [d["ci"] is not None and d["ci"][0] <= 0 <= d["ci"][1] for d in diffs.values()]
    verdicts["layer_subsets"] = {"diffs": diffs, "verdict": HOLDS if all(inside) else
                                 FAILS if not any(inside) else UNSURE}
  if len(pairs) >= 3:
    outer = [by_layers[pairs[0]], by_layers[pairs[-1]]]
    inner = [by_layers[p] for p in pairs[1:-1]]
    diffs = {d: difference(outer, inner, d) for d in DOMAINS}
    verdicts["edge_pairs"] = {"diffs": diffs, "verdict": directed(diffs, "greater")}
  return {"groups": groups, "pairs": pairs, "increase": increase, "verdicts": verdicts,
          "rows": by_layers}


def supernodes_table(results: dict) -> dict:
  stage = results["supernodes"]
  base = results["baseline"]
  shares = [v for v in stage["lp_share"].values() if v is not None]
  overlap = list(stage["outlier_overlap"].values())
  removal = {d: difference([stage["without_supernodes"]], stage["without_random"], d)
             for d in DOMAINS}
  every_draw = all(stage["without_supernodes"][f"{d}_nll"] > r[f"{d}_nll"]
                   for d in DOMAINS for r in stage["without_random"])
  removal_verdict = directed(removal, "greater")
  if removal_verdict == HOLDS and not every_draw:
    removal_verdict = UNSURE
  median_share = float(np.median(shares))
  out = {"median_share": median_share, "min_share": float(min(shares)),
         "max_share": float(max(shares)), "median_overlap": float(np.median(overlap)),
         "removal": removal,
         "nll": {d: base[f"{d}_nll"] for d in DOMAINS},
         "nll_without_supernodes": {d: stage["without_supernodes"][f"{d}_nll"] for d in DOMAINS},
         "nll_without_random": {d: [r[f"{d}_nll"] for r in stage["without_random"]]
                                for d in DOMAINS},
         "verdicts": {"lp_concentration": HOLDS if median_share >= 0.10 else FAILS,
                      "outlier_overlap": HOLDS if np.median(overlap) < 0.5 else FAILS,
                      "supernode_removal": removal_verdict}}
  if "prune" in results:
    rows = results["prune"]["rows"]
    scar, wanda = _rows(rows, 0.5, "scar_prot"), _rows(rows, 0.5, "wanda_channel")
    if scar and wanda:
      diffs = {d: difference(scar, wanda, d) for d in DOMAINS}
      out["scar_vs_wanda"] = {"diffs": diffs, "perplexity": {
          d: {"scar_prot": float(np.exp(scar[0][f"{d}_nll"])),
              "wanda_channel": float(np.exp(wanda[0][f"{d}_nll"]))} for d in DOMAINS}}
      out["verdicts"]["scar_vs_wanda"] = directed(diffs, "less")
  return out


def finetune_table(results: dict) -> dict:
  ft = results["finetune"]
  runs = ft["runs"]
  standard = runs["standard"]
  rows = []
  for key, by_seed in runs.items():
    finals = [r["final"] for r in by_seed.values()]
    rows.append({"run": key, "seeds": len(finals),
                 "alpha": ft["alphas"].get(key, {}).get("alpha"),
                 "entropy": [f["entropy"] for f in finals],
                 **{f"{d}_nll": [f[f"{d}_nll"] for f in finals] for d in (*DOMAINS, *EXTRA)},
                 **{f"{d}_nll_ci": report.bootstrap_interval(finals, f"{d}_nll")
                    for d in (*DOMAINS, *EXTRA)},
                 "accuracy_strict": [f.get("accuracy_strict") for f in finals],
                 "accuracy_flexible": [f.get("accuracy_flexible") for f in finals]})
  quality = (*DOMAINS, "arithmetic")
  tolerance = {d: max(report.NLL_TOLERANCE, 2 * (report.mean_std(
      [r["final"][f"{d}_nll"] for r in standard.values()])[1] or 0.0)) for d in quality}
  verdicts = {}
  for key, by_seed in runs.items():
    if key == "standard":
      continue
    common = [s for s in by_seed if s in standard]
    entropy = {s: by_seed[s]["final"]["entropy"] for s in common}
    direction = report.paired_direction(entropy, {s: standard[s]["final"]["entropy"]
                                                  for s in common})
    change = {d: difference([by_seed[s]["final"] for s in common],
                            [standard[s]["final"] for s in common], d) for d in quality}
    kept = all(change[d]["difference"] <= tolerance[d] for d in quality)
    broken = any(change[d]["difference"] > 3 * tolerance[d] for d in quality)
    if direction == "less" and kept:
      verdict = HOLDS
    elif direction == "greater" or broken:
      verdict = FAILS
    else:
      verdict = UNSURE
    entropy_change = float(np.mean([entropy[s] / standard[s]["final"]["entropy"] - 1
                                    for s in common]))
    verdicts[key] = {"seeds": len(common), "entropy_change": entropy_change,
                     "nll_change": change, "tolerance": tolerance, "verdict": verdict}
  return {"rows": rows, "verdicts": verdicts}


def nucl_prune_table(results: dict) -> dict:
  stage = results["nucl_prune"]
  runs = results["finetune"]["runs"]
  increase = {}
  for row in stage["rows"]:
    final = runs[row["variant"]][str(row["seed"])]["final"]
    increase.setdefault(row["variant"], {})[str(row["seed"])] = {
        d: row[f"{d}_nll"] - final[f"{d}_nll"] for d in DOMAINS}
  verdicts = {}
  for key, by_seed in increase.items():
    if key == "standard":
      continue
    common = [s for s in by_seed if s in increase.get("standard", {})]
    if not common:
      continue
    smaller = all(by_seed[s][d] < increase["standard"][s][d] for s in common for d in DOMAINS)
    larger = all(by_seed[s][d] > increase["standard"][s][d] for s in common for d in DOMAINS)
    verdicts[key] = HOLDS if smaller and len(common) >= 2 else FAILS if larger and \
        len(common) >= 2 else UNSURE
  return {"increase": increase, "verdicts": verdicts, "premise": stage["premise"]}


def _final(run: dict) -> dict:
  return run["curve"][-1]


def recovered_fraction(unpruned: dict, start: dict, point: dict, domain: str) -> Optional[float]:
  """The fraction of the NLL that pruning lost which recovery has won back at `point`: (pruned -
  now) / (pruned - unpruned); None where pruning lost nothing."""
  key = f"{domain}_nll"
  lost = start[key] - unpruned[key]
  return (start[key] - point[key]) / lost if lost > 0 else None


def _recovery_row(run: dict, unpruned: dict) -> dict:
  start, final = run["curve"][0], _final(run)
  row = {k: run[k] for k in ("name", "method", "ratio", "mode", "model")}
  row["tokens"] = final["tokens"]
  row["train_seconds"] = run.get("train_seconds")
  for d in DOMAINS:
    key = f"{d}_nll"
    fraction = recovered_fraction(unpruned, start, final, d)
    row[d] = {"unpruned": unpruned[key], "pruned": start[key], "recovered": final[key],
              "recovered_ci": report.bootstrap_interval([final], key),
              "fraction": fraction,
              # per 10k tokens, averaged over the run (the curves show the rate falls)
              "fraction_per_10k_tokens": None if fraction is None or not final["tokens"] else
              fraction / (final["tokens"] / 1e4),
              "curve": [{"tokens": p["tokens"], "nll": p[key],
                         "fraction": recovered_fraction(unpruned, start, p, d)}
                        for p in run["curve"]]}
  return row


def recover_table(results: dict) -> dict:
  """Per recovery run: held-out NLL unpruned -> pruned -> recovered and the fraction of the
  pruning loss recovered; distillation vs NLL per pruned model; the criteria's ranking before
  and after recovery, per ratio."""
  stage = results["recover"]
  unpruned = stage["unpruned"]
  runs = {(r["method"], r["ratio"], r["mode"]): r for r in stage["runs"]}
  rows = [_recovery_row(r, unpruned) for r in stage["runs"]]
  comparisons, verdicts = {}, {}
  for (method, ratio, mode), run in runs.items():
    other = runs.get((method, ratio, "nll"))
    if mode != "distill" or other is None:
      continue
    name = f"{method}@{ratio:g}"
    diffs = {d: difference([_final(run)], [_final(other)], d) for d in DOMAINS}
    comparisons[name] = {"diffs": diffs, "verdict": directed(diffs, "less")}
  ranking, ranking_verdicts = {}, {}
  for ratio in sorted({r["ratio"] for r in stage["runs"]}, reverse=True):
    distilled = {m: r for (m, x, mode), r in runs.items() if x == ratio and mode == "distill"}
    if len(distilled) < 2:
      continue
    def mean(point):
      return float(np.mean([point[f"{d}_nll"] for d in DOMAINS]))
    before = sorted(distilled, key=lambda m: mean(distilled[m]["curve"][0]))
    after = {mode: sorted((m for (m, x, md) in runs if x == ratio and md == mode),
                          key=lambda m, mode=mode: mean(_final(runs[(m, ratio, mode)])))
             for mode in ("distill", "nll")}
    best, worst = before[0], before[-1]
    spread_before = {d: difference([distilled[worst]["curve"][0]],
                                   [distilled[best]["curve"][0]], d) for d in DOMAINS}
    spread_after = {d: difference([_final(distilled[worst])], [_final(distilled[best])], d)
                    for d in DOMAINS}
    verdict = directed(spread_after, "greater")
    ranking[f"{ratio:g}"] = {"before": before, "after": after, "best": best, "worst": worst,
                             "spread_before": spread_before, "spread_after": spread_after,
                             "verdict": verdict}
    ranking_verdicts[f"{ratio:.0%}"] = verdict
  verdicts["distill_vs_nll"] = {k: v["verdict"] for k, v in comparisons.items()}
  if ranking_verdicts:
    verdicts["ranking_after_recovery"] = ranking_verdicts
  return {"unpruned": unpruned, "rows": rows, "comparisons": comparisons, "ranking": ranking,
          "verdicts": verdicts, "tokens_per_step": stage["tokens_per_step"],
          "steps": stage["steps"], "corpus": stage["corpus"]}


def nucl_recover_table(results: dict) -> dict:
  """The fine-tuned models, entropy-pruned and recovered by distillation: each against the
  standard one."""
  stage = results["nucl_recover"]
  rows = {r["variant"]: r for r in stage["rows"]}
  table = [dict(_recovery_row(r, r["unpruned"]), variant=key) for key, r in rows.items()]
  verdicts, diffs = {}, {}
  if "standard" in rows:
    for key, r in rows.items():
      if key == "standard":
        continue
      diffs[key] = {d: difference([_final(r)], [_final(rows["standard"])], d) for d in DOMAINS}
      verdicts[key] = directed(diffs[key], "less")
  return {"ratio": stage["ratio"], "rows": table, "diffs": diffs, "verdicts": verdicts}


def summarize(results: dict, ratio: float) -> dict:
  out: dict = {}
  premise = results.get("prune", {}).get("premise", {}).get("mean")
  if "prune" in results:
    out["prune"] = {str(x): prune_table(results, x) for x in
                    sorted({r["ratio"] for r in results["prune"]["rows"]})}
    out["sweep"] = sweep(results)
    main = out["prune"][str(ratio)]["comparisons"]
    parts = {m: c["verdict"] for m, c in main.items()}
    if "entropy" in parts:
      parts["entropy"] = report.gated(parts["entropy"], premise)
    out["verdicts"] = {"pruning_order": parts}
  out.setdefault("verdicts", {})
  if "layer_subsets" in results:
    out["layer_subsets"] = subsets_table(results, ratio)
    out["verdicts"].update({k: v["verdict"] for k, v in out["layer_subsets"]["verdicts"].items()})
  if "supernodes" in results:
    out["supernodes"] = supernodes_table(results)
    out["verdicts"].update(out["supernodes"]["verdicts"])
  if "finetune" in results:
    out["finetune"] = finetune_table(results)
    out["verdicts"]["nucl_finetune"] = {k: v["verdict"]
                                        for k, v in out["finetune"]["verdicts"].items()}
  if "nucl_prune" in results:
    out["nucl_prune"] = nucl_prune_table(results)
    out["verdicts"]["nucl_then_prune"] = out["nucl_prune"]["verdicts"]
  if "recover" in results:
    out["recover"] = recover_table(results)
    out["verdicts"].update(out["recover"]["verdicts"])
  if "nucl_recover" in results:
    out["nucl_recover"] = nucl_recover_table(results)
    out["verdicts"]["nucl_then_recover"] = out["nucl_recover"]["verdicts"]
  out["premise_rho"] = premise
  return out


# ---- the report ----------------------------------------------------------------------------------

def write_report(runner, *, wall_time_s: float) -> dict:
  out: pathlib.Path = runner.out
  results = {s: runner.result(s) for s in runner.stage_names if runner.stage_path(s).exists()}
  summary = summarize(results, runner.config.prune_ratio)
  data = {"settings": json.loads((out / "settings.json").read_text()),
          "wall_time_s": {"this_invocation": wall_time_s,
                          "stages": {s: r.get("wall_time_s") for s, r in results.items()}},
          "summary": summary, "stages": results}
  figures = plot_figures(results, summary, out / "figures")
  outputs.write_file_atomically(out / "results.json",
                                json.dumps(data, indent=1, default=_jsonable))
  outputs.write_file_atomically(out / "report.md", markdown(results, summary, runner.config,
                                                            figures, relative_to=out))
  return {"report": out / "report.md", "results": out / "results.json", "figures": figures}


def _jsonable(value):
  if isinstance(value, (np.floating, np.integer)):
    return value.item()
  raise TypeError(f"not JSON serialisable: {type(value)}")


def _interval(d: dict) -> str:
  return f"{d['difference']:+.3f}{fmt_ci(d['ci'])}"


def _verdict_text(value) -> str:
  if isinstance(value, dict):
    return ", ".join(f"{k}: **{v}**" for k, v in value.items())
  return f"**{value}**"


def markdown(results: dict, summary: dict, config, figures: dict, *,
             relative_to: pathlib.Path) -> str:
  lines = ["# Real model: SmolLM2-135M-Instruct", ""]
  lines += _setup_lines(results, config)
  lines += ["## Verdicts", "",
            "Brackets: 95 % bootstrap interval over the held-out documents (paired between "
            "models).", "", "| finding | source | verdict | rule |", "|---|---|---|---|"]
  for name, verdict in summary.get("verdicts", {}).items():
    lines.append(f"| {name} | {SOURCES[name]} | {_verdict_text(verdict)} | "
                 f"{VERDICT_RULES[name]} |")
  lines.append("")
  for section in (_agreement_lines, _baseline_lines, _prune_lines, _subsets_lines,
                  _supernode_lines, _finetune_lines, _nucl_prune_lines, _recover_lines,
                  _nucl_recover_lines, _difference_lines):
    lines += section(results, summary, config)
  return "\n".join(lines + report.figure_lines(figures, relative_to))


def _setup_lines(results: dict, config) -> list[str]:
  lines = []
  if "model" in results:
    m = results["model"]
    lines.append(f"Model: `{m['name']}` ({m['parameters']:,} parameters, {m['num_layers']} "
                 f"layers, FFN width {m['ffn_widths'][0]}) from `{pathlib.Path(m['source']).name}`"
                 + (f" (sha256 `{m['sha256'][:16]}…`)" if m.get("sha256") else "") + ".")
  if "data" in results:
    d = results["data"]
    p = d["prose_source"]
    lines.append(
        f"Held-out data, one row of [BOS] + {d['seq_len']} tokens per document: code — "
        f"{d['rows']['code']} standard-library files of the test split (split by a hash of the "
        f"path; {d['code_files']['test']} test / {d['code_files']['train']} train files); prose "
        f"— {d['rows']['prose']} topics of the Python documentation (`{p['module']}` of Python "
        f"{p['python']}, sha256 `{p['sha256'][:16]}…`, {p['license']}; "
        f"{d['prose_documents']['test']} test / {d['prose_documents']['train']} unused topics, "
        f"split by a hash of the name); HumanEval — the canonical solutions of "
        f"{d['rows']['humaneval']} evenly spaced problems, scored given their prompts "
        f"({d['loss_tokens']['humaneval']} solution tokens). Calibration (Wanda-channel, FLAP, "
        f"LP, SCAR-Prot, and the LP statistics): {d['calibration_rows']} code files of the train "
        f"split, never evaluated on.")
  lines.append(f"Settings: {config}.")
  return lines + [""]


AGREEMENT = {HOLDS: "agrees", FAILS: "disagrees", UNSURE: "neither agrees nor disagrees",
             NOT_TESTABLE: "cannot test"}


def _agreement_lines(results: dict, summary: dict, config) -> list[str]:
  """One plain line per finding: does this model agree with the paper's claim?"""
  lines = []
  for name, verdict in summary.get("verdicts", {}).items():
    parts = verdict if isinstance(verdict, dict) else {"": verdict}
    claims = {"entropy": "entropy beats random", "magnitude": "random beats magnitude",
              "srinivas_babu": "random beats Srinivas-Babu",
              "stahlberg_byrne": "random beats Stahlberg-Byrne"} if name == "pruning_order" \
        else {k: f"after {k}" for k in parts} if name == "distill_vs_nll" \
        else {k: f"at {k} removed" for k in parts} if name == "ranking_after_recovery" \
        else {k: f"NUCL-{k}" for k in parts if k}
    if SOURCES[name].startswith("new"):  # a question of this study: no paper to agree with
      words = {HOLDS: "yes", FAILS: "no", UNSURE: "unclear", NOT_TESTABLE: "not testable"}
      text = "; ".join((f"{claims[k]}: " if k else "") + words[v] for k, v in parts.items())
    else:
      text = "; ".join((f"{claims[k]}: " if k else "") + f"this model {AGREEMENT[v]}"
                       for k, v in parts.items())
    lines.append(f"- **{name}** ({SOURCES[name]}): {text}.")
  return ["## Where this model agrees with the papers", "", *lines, ""] if lines else []


def _difference_lines(results: dict, summary: dict, config) -> list[str]:
  """What separates this study from the papers' setting, and what each difference could
  explain."""
  return [
      "## What differs from the papers' setting", "",
      "- **Size**: 135M parameters (30 layers, FFN width 1536) against Gemma-2B (NUCL paper) and "
      "Llama-3.1-8B (SCAR paper). A smaller FFN has fewer redundant neurons per layer, so any "
      "removal costs more, and LP mass may concentrate less in 1 % of 1536 channels (15) than "
      "in 1 % of 14336 (143).",
      "- **Quantised weights**: the GGUF stores Q4_1 (4-bit values with a scale and minimum per "
      "block of 32), dequantised to float32 here. Small outgoing weights sit on that grid, which "
      "can reorder magnitude- and entropy-based scores among near-equal rows; the paper's "
      "models are bfloat16.",
      "- **Measures**: NLL per token on held-out code and prose (and HumanEval's canonical "
      "solutions) instead of the papers' downstream accuracies (MMLU, TriviaQA, ...) and "
      "WikiText perplexity. NLL moves where accuracy at 135M sits at the floor (HumanEval "
      "pass@1 0 of 164), but an NLL ordering need not be an accuracy ordering.",
      "- **An instruction-tuned model**: SmolLM2-135M-Instruct, the only SmolLM2 on the package "
      "index; the NUCL paper prunes and fine-tunes pre-trained Gemma-2.",
      "- **Fine-tuning budget**: a few dozen steps on a CPU against the paper's full fine-tuning "
      "runs: NUCL's effect on entropy is correspondingly small, and the NUCL-then-prune "
      "comparison asks what a short NUCL run changes.",
      "- **Calibration**: 16 standard-library files (code) for every data-aware method; the "
      "SCAR paper calibrates on general web text.", ""]


def _baseline_lines(results: dict, summary: dict, config) -> list[str]:
  if "baseline" not in results:
    return []
  b = results["baseline"]
  lines = ["## The unpruned model", "", "| measure | value |", "|---|---|"]
  for d in (*DOMAINS, *EXTRA):
    lines.append(f"| {d} NLL (nats/token) | {b[f'{d}_nll']:.3f}"
                 f"{fmt_ci(report.bootstrap_interval([b], f'{d}_nll'))} |")
  if "humaneval_pass_at_1" in b:
    lines.append(f"| HumanEval pass@1 (greedy, {b['humaneval_problems']} problems) | "
                 f"{b['humaneval_pass_at_1']:.1f} % |")
  lines.append(f"| synthetic arithmetic accuracy (strict / flexible) | "
               f"{b['accuracy_strict']:.1f} % / {b['accuracy_flexible']:.1f} % |")
  lines.append(f"| summed outgoing entropy | {b['entropy']:.0f} |")
  return lines + [""]


def _prune_lines(results: dict, summary: dict, config) -> list[str]:
  if "prune" not in summary:
    return []
  lines = ["## Table 4: removing FFN neurons", "",
           "NLL per token after removing a fraction of every layer's FFN neurons (random: mean ± "
           "std over seeds), interval over documents; the increase over the unpruned model in "
           "the last columns.", "",
           f"Premise of entropy pruning: Spearman rho(outgoing entropy, LP) = "
           f"{summary['premise_rho']:+.3f} (mean over layers).", ""]
  for ratio, table in summary["prune"].items():
    he = any("humaneval_nll" in r for r in table["rows"])
    lines += [f"### {float(ratio):.0%} removed", "",
              "| method | code NLL | prose NLL |"
              + (" HumanEval NLL | arithmetic NLL |" if he else "")
              + " code increase | prose increase |",
              "|---|---|---|" + ("---|---|" if he else "") + "---|---|"]
    for r in table["rows"]:
      cells = [r["method"] + (f" ({r['seeds']} seeds)" if r["seeds"] > 1 else "")]
      for d in (*DOMAINS, *EXTRA) if he else DOMAINS:
        cells.append(fmt(r[f"{d}_nll"]).replace(" (n=1)", "") + fmt_ci(r[f"{d}_nll_ci"])
                     if f"{d}_nll" in r else "–")
      cells += [_interval(r[f"{d}_increase"]) for d in DOMAINS]
      lines.append("| " + " | ".join(cells) + " |")
    if table["comparisons"]:
      lines += ["", "Against random (method − random seed mean): " + "; ".join(
          f"{m} code {_interval(c['vs_random']['code'])}, prose "
          f"{_interval(c['vs_random']['prose'])} → {c['verdict']}"
          for m, c in table["comparisons"].items()) + "."]
    lines.append("")
  return lines


def _subsets_lines(results: dict, summary: dict, config) -> list[str]:
  if "layer_subsets" not in summary:
    return []
  t = summary["layer_subsets"]
  lines = ["## Table 5 and Fig. 4: which layers", "",
           f"Entropy pruning of {config.prune_ratio:.0%} of the neurons of some layers only; "
           "NLL increase over the unpruned model.", "",
           "| layers | code increase | prose increase |", "|---|---|---|"]
  for g in t["groups"] + t["pairs"]:
    lines.append(f"| {g} | {_interval(t['increase'][g]['code'])} | "
                 f"{_interval(t['increase'][g]['prose'])} |")
  lines.append("")
  if "layer_subsets" in t["verdicts"]:
    v = t["verdicts"]["layer_subsets"]
    lines.append("Highest minus lowest group: " + "; ".join(
        f"{d} {x['highest']} − {x['lowest']} {_interval(x)}" for d, x in v["diffs"].items())
                 + f" → {v['verdict']}.")
  if "edge_pairs" in t["verdicts"]:
    v = t["verdicts"]["edge_pairs"]
    lines.append("Outer pairs minus inner pairs: " + "; ".join(
        f"{d} {_interval(x)}" for d, x in v["diffs"].items()) + f" → {v['verdict']}.")
  return lines + [""]


def _supernode_lines(results: dict, summary: dict, config) -> list[str]:
  if "supernodes" not in summary:
    return []
  t = summary["supernodes"]
  lines = ["## SCAR: supernodes", "",
           f"LP share of the top {results['supernodes']['fraction']:.0%} of channels: median "
           f"{t['median_share']:.1%}, range {t['min_share']:.1%}–{t['max_share']:.1%} over "
           f"layers (the paper, Llama-3.1-8B: median {PAPER['lp_share_median']:.1%}, range "
           f"{PAPER['lp_share_range'][0]:.1%}–{PAPER['lp_share_range'][1]:.1%}). Overlap of "
           f"the supernodes with the top channels by RMS activation: median "
           f"{t['median_overlap']:.0%} over layers.", "",
           "| | code NLL | prose NLL |", "|---|---|---|",
           f"| unpruned | {t['nll']['code']:.3f} | {t['nll']['prose']:.3f} |",
           f"| supernodes off | {t['nll_without_supernodes']['code']:.3f} | "
           f"{t['nll_without_supernodes']['prose']:.3f} |",
           f"| as many random channels off | {fmt(t['nll_without_random']['code'])} | "
           f"{fmt(t['nll_without_random']['prose'])} |", "",
           "Supernodes minus random: " + "; ".join(f"{d} {_interval(x)}"
                                                  for d, x in t["removal"].items()) + "."]
  if "scar_vs_wanda" in t:
    s = t["scar_vs_wanda"]
    lines.append("At 50 % FFN sparsity, perplexity SCAR-Prot vs Wanda-channel: " + "; ".join(
        f"{d} {s['perplexity'][d]['scar_prot']:.1f} vs {s['perplexity'][d]['wanda_channel']:.1f}"
        f" (NLL difference {_interval(s['diffs'][d])})" for d in DOMAINS)
                 + f" (the paper, Llama-3.1-8B: {PAPER['scar_prot_ppl_50']} vs "
                 f"{PAPER['wanda_channel_ppl_50']}).")
  return lines + [""]


def _finetune_lines(results: dict, summary: dict, config) -> list[str]:
  if "finetune" not in summary:
    return []
  t = summary["finetune"]
  lines = ["## NUCL fine-tuning", "",
           f"{config.finetune_steps} steps of {config.finetune_batch_size} x "
           f"{config.finetune_seq_len} tokens of synthetic arithmetic (GSM8K format), learning "
           f"rate {config.finetune_learning_rate:g}; alpha set so that NUCL's gradient norm at "
           "the start is the stated multiple of NLL's.", "",
           "| run | alpha | entropy | code NLL | prose NLL | HumanEval NLL | arithmetic NLL | "
           "arithmetic accuracy (strict) |", "|---|---|---|---|---|---|---|---|"]
  base = results["baseline"]
  lines.append(f"| unpruned start | – | {base['entropy']:.0f} | {base['code_nll']:.3f} | "
               f"{base['prose_nll']:.3f} | {base['humaneval_nll']:.3f} | "
               f"{base['arithmetic_nll']:.3f} | "
               f"{base['accuracy_strict']:.1f} % |")
  for r in t["rows"]:
    acc = [a for a in r["accuracy_strict"] if a is not None]
    lines.append(f"| {r['run']} ({r['seeds']} seeds) | "
                 + (f"{r['alpha']:.3g}" if r["alpha"] else "–") + f" | {fmt(r['entropy'], 0)} | "
                 + " | ".join(fmt(r[f"{d}_nll"]) for d in (*DOMAINS, *EXTRA))
                 + f" | {fmt(acc, 1)} % |")
  lines.append("")
  for key, v in t["verdicts"].items():
    lines.append(f"{key}: entropy {v['entropy_change']:+.2%} vs standard; NLL change "
                 + ", ".join(f"{d} {_interval(x)}" for d, x in v["nll_change"].items())
                 + f" → {v['verdict']}.")
  return lines + [""]


def _nucl_prune_lines(results: dict, summary: dict, config) -> list[str]:
  if "nucl_prune" not in summary:
    return []
  t = summary["nucl_prune"]
  lines = ["## NUCL, then prune", "",
           f"NLL increase from entropy pruning ({config.prune_ratio:.0%}) of each fine-tuned "
           "model, per seed; rho(entropy, LP) of the fine-tuned model in brackets.", "",
           "| run | seed | code increase | prose increase |", "|---|---|---|---|"]
  for key, by_seed in t["increase"].items():
    for seed, inc in by_seed.items():
      rho = t["premise"].get(f"{key}/{seed}")
      lines.append(f"| {key} | {seed} | {inc['code']:+.3f} | {inc['prose']:+.3f} |"
                   if rho is None else
                   f"| {key} (rho {rho:+.2f}) | {seed} | {inc['code']:+.3f} | "
                   f"{inc['prose']:+.3f} |")
  return lines + [""]


def _recovery_cells(row: dict) -> list[str]:
  cells = []
  for d in DOMAINS:
    x = row[d]
    cells.append(f"{x['pruned']:.3f} → {x['recovered']:.3f}{fmt_ci(x['recovered_ci'])}")
    cells.append("–" if x["fraction"] is None else
                 f"{x['fraction']:.0%} ({x['fraction_per_10k_tokens']:.1%})")
  return cells


RECOVERY_HEADER = ["| code NLL: pruned → recovered | code recovered (per 10k tokens) | "
                   "prose NLL: pruned → recovered | prose recovered (per 10k tokens) |",
                   "---|---|---|---|"]


def _recover_lines(results: dict, summary: dict, config) -> list[str]:
  if "recover" not in summary:
    return []
  t = summary["recover"]
  u = t["unpruned"]
  c = t["corpus"]
  lines = ["## Prune, then recover", "",
           f"Each criterion's pruned model, written as a smaller checkpoint, recovered for "
           f"{t['steps']} steps of {t['tokens_per_step']:,} tokens (Adam, learning rate "
           f"{config.recover_learning_rate:g}, cosine) on the train splits of both domains "
           f"({c['documents']['prose']} prose topics, {c['bytes']['prose']:,} bytes; "
           f"{c['documents']['code']} code files, {c['bytes']['code']:,} bytes): by "
           f"distillation (forward KL to the unpruned model's next-token distribution, "
           f"temperature {config.recover_temperature:g}) or by NLL on the same tokens. The "
           f"unpruned model: code NLL {u['code_nll']:.3f}, prose NLL {u['prose_nll']:.3f}. "
           "\"Recovered\": the fraction of the NLL that pruning lost which recovery won back, "
           "and that fraction per 10k training tokens, averaged over the run.", "",
           "| pruned | recovery " + RECOVERY_HEADER[0], "|---|---|" + RECOVERY_HEADER[1]]
  for r in t["rows"]:
    lines.append(f"| {r['method']} {r['ratio']:.0%} | {r['mode']} | "
                 + " | ".join(_recovery_cells(r)) + " |")
  lines.append("")
  if t["comparisons"]:
    lines.append("Distillation minus NLL recovery, after the same tokens: " + "; ".join(
        f"{name}: code {_interval(c['diffs']['code'])}, prose {_interval(c['diffs']['prose'])}"
        f" → {c['verdict']}" for name, c in t["comparisons"].items()) + ".")
    lines.append("")
  for ratio, r in t["ranking"].items():
    lines.append(
        f"At {float(ratio):.0%} removed, by mean NLL: right after pruning "
        f"{' < '.join(r['before'])}; after distillation {' < '.join(r['after']['distill'])}; "
        f"after NLL recovery {' < '.join(r['after']['nll'])}. Worst minus best "
        f"({r['worst']} − {r['best']}) before recovery: " + ", ".join(
            f"{d} {_interval(x)}" for d, x in r["spread_before"].items())
        + "; after distillation: " + ", ".join(f"{d} {_interval(x)}"
                                               for d, x in r["spread_after"].items())
        + f" → {r['verdict']}.")
  return lines + [""]


def _nucl_recover_lines(results: dict, summary: dict, config) -> list[str]:
  if "nucl_recover" not in summary:
    return []
  t = summary["nucl_recover"]
  lines = ["## NUCL, then prune, then recover", "",
           f"Each fine-tuned model (first seed) entropy-pruned at {t['ratio']:.0%} and recovered "
           "by distillation from its own unpruned self, on the recovery budget above.", "",
           "| fine-tuned | recovery " + RECOVERY_HEADER[0], "|---|---|" + RECOVERY_HEADER[1]]
  for r in t["rows"]:
    lines.append(f"| {r['variant']} | {r['mode']} | " + " | ".join(_recovery_cells(r)) + " |")
  lines.append("")
  for key, diffs in t["diffs"].items():
    lines.append(f"{key} minus standard, recovered: " + ", ".join(
        f"{d} {_interval(x)}" for d, x in diffs.items()) + f" → {t['verdicts'][key]}.")
  return lines + [""]


# ---- figures -------------------------------------------------------------------------------------

def plot_figures(results: dict, summary: dict, directory: pathlib.Path) -> dict:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  directory.mkdir(parents=True, exist_ok=True)
  written = {}
  if "sweep" in summary:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, domain in zip(axes, DOMAINS):
      for method, per in sorted(summary["sweep"].items()):
        ratios = sorted(per[domain])
        ax.plot(ratios, [per[domain][x] for x in ratios], marker="o", label=method)
      ax.set_xlabel("fraction of FFN neurons removed")
      ax.set_ylabel(f"held-out {domain} NLL")
      ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    written["pruning ratio curves per method"] = report._save(fig, directory / "pruning.png")
  if "supernodes" in results:
    shares = results["supernodes"]["lp_share"]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(range(len(shares)), [100 * (v or 0) for v in shares.values()])
    ax.axhline(100 * PAPER["lp_share_median"], color="black", linestyle=":",
               label="SCAR paper median (Llama-3.1-8B)")
    ax.axhline(100 * results["supernodes"]["fraction"], color="grey", linestyle="--",
               label="uniform LP")
    ax.set_xlabel("layer")
    ax.set_ylabel("% of LP mass in the top 1 %")
    ax.legend(fontsize=7)
    written["LP concentration per layer"] = report._save(fig, directory / "lp_concentration.png")
  if "layer_subsets" in summary and summary["layer_subsets"]["pairs"]:
    t = summary["layer_subsets"]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    depth = [int(p.split(",")[0]) for p in t["pairs"]]
    for domain in DOMAINS:
      values = [t["increase"][p][domain] for p in t["pairs"]]
      low = [v["difference"] - v["ci"][0] if v["ci"] else 0 for v in values]
      high = [v["ci"][1] - v["difference"] if v["ci"] else 0 for v in values]
      ax.errorbar(depth, [v["difference"] for v in values], yerr=[low, high], marker="o",
                  capsize=2, label=domain)
    ax.set_xlabel("first layer of the pruned pair")
    ax.set_ylabel("NLL increase")
    ax.legend(fontsize=7)
    written["Fig. 4: adjacent layer pairs"] = report._save(fig, directory / "layer_pairs.png")
  if "finetune" in results:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for key, by_seed in results["finetune"]["runs"].items():
      for seed, run in by_seed.items():
        points = [m for m in run["train_metrics"] if "outgoing_entropy" in m]
        if points:
          axes[0].plot([m["step"] for m in points], [m["outgoing_entropy"] for m in points],
                       label=f"{key} s{seed}")
        points = [m for m in run["train_metrics"] if "nll" in m]
        if points:
          axes[1].plot([m["step"] for m in points], [m["nll"] for m in points],
                       label=f"{key} s{seed}")
    axes[0].set_ylabel("summed outgoing entropy")
    axes[1].set_ylabel("training NLL")
    for ax in axes:
      ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    written["NUCL fine-tuning"] = report._save(fig, directory / "finetune.png")
  if "recover" in summary:
    written["prune, then recover"] = _plot_recovery(plt, summary["recover"],
                                                    directory / "recovery.png")
  return written


def _plot_recovery(plt, table: dict, path: pathlib.Path) -> pathlib.Path:
  """Held-out NLL along recovery: a row of panels per ratio, one per domain; a colour per
  criterion, solid for distillation, dashed for NLL; the unpruned model dotted."""
  ratios = sorted({r["ratio"] for r in table["rows"]}, reverse=True)
  methods = list(dict.fromkeys(r["method"] for r in table["rows"]))
  colours = {m: f"C{i}" for i, m in enumerate(methods)}
  fig, axes = plt.subplots(len(ratios), 2, figsize=(10, 3.4 * len(ratios)), squeeze=False)
  for row_axes, ratio in zip(axes, ratios):
    for ax, domain in zip(row_axes, DOMAINS):
      for r in table["rows"]:
        if r["ratio"] != ratio:
          continue
        curve = r[domain]["curve"]
        ax.plot([p["tokens"] / 1e3 for p in curve], [p["nll"] for p in curve], marker="o",
                markersize=3, color=colours[r["method"]],
                linestyle="-" if r["mode"] == "distill" else "--",
                label=f"{r['method']} ({r['mode']})")
      ax.axhline(table["unpruned"][f"{domain}_nll"], color="black", linestyle=":",
                 label="unpruned")
      ax.set_title(f"{ratio:.0%} of FFN neurons removed: {domain}", fontsize=9)
      ax.set_xlabel("recovery tokens (thousands)")
      ax.set_ylabel(f"held-out {domain} NLL")
  axes[0][0].legend(fontsize=7)
  return report._save(fig, path)


def publish(out: pathlib.Path, docs_dir: pathlib.Path, *, command: str) -> pathlib.Path:
  """The report as the real-model section of docs_dir/reproduction.md (after SECTION_MARKER;
  the small-scale part above it is kept), figures copied to docs_dir/figures/ with a
  `real_` prefix."""
  import shutil  # pylint: disable=import-outside-toplevel
  results = json.loads((out / "results.json").read_text())
  minutes = sum(t for t in results["wall_time_s"]["stages"].values() if t) / 60
  text = (out / "report.md").read_text()
  figures = docs_dir / "figures"
  figures.mkdir(parents=True, exist_ok=True)
  for png in sorted((out / "figures").glob("*.png")):
    shutil.copyfile(png, figures / f"real_{png.name}")
    text = text.replace(f"(figures/{png.name})", f"(figures/real_{png.name})")
  title, body = text.split("\n", 1)
  section = [SECTION_MARKER, "", title.replace("# ", "## ", 1), "", "Produced by:", "", "```",
             command, "```", "", f"Machine: {report.machine()}.", "",
             f"Wall time: {minutes:.0f} min, the sum of the stages' times.", "",
             body.replace("\n### ", "\n#### ").replace("\n## ", "\n### ")]
  path = docs_dir / "reproduction.md"
  existing = path.read_text() if path.exists() else ""
  kept = existing.split(SECTION_MARKER)[0].rstrip("\n")
  outputs.write_file_atomically(path, (kept + "\n\n" if kept else "") + "\n".join(section))
  return path
