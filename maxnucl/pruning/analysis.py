"""FFN analyses behind tools/analyze_ffn.py: outgoing-entropy histograms, LP-mass concentration,
and overlap (Jaccard) between the removal sets of different pruning methods.

All functions read one layer's FFN at a time through maxnucl.pruning.io.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Optional, Sequence

import numpy as np

from maxnucl import ffn, outputs
from maxnucl.pruning import calibration as calib
from maxnucl.pruning import io
from maxnucl.pruning.prune import LayerPruner, select_layers
from maxnucl.pruning.scores import METHODS, supernodes


def entropy_histograms(reader: io.CheckpointReader, layers: Sequence[int], bins: int = 50
                       ) -> dict[str, dict]:
  """Per layer: histogram of the outgoing-connection entropies H_j (zero rows counted apart).

  Bins are shared across layers: [0, log d] (the maximum entropy of a d-dim distribution).
  """
  d = reader.cfg.d_model
  edges = np.linspace(0.0, math.log(d), bins + 1)
  out = {}
  for i in layers:
    name = ffn.layer_name(i)
    h = ffn.row_entropy(reader.read_ffn(name)[ffn.OUT])
    finite = h[np.isfinite(h)]
    counts, _ = np.histogram(finite, bins=edges)
    out[name] = {"edges": edges.tolist(), "counts": counts.tolist(),
                 "mean": float(finite.mean()) if finite.size else None,
                 "median": float(np.median(finite)) if finite.size else None,
                 "num_zero_rows": int(h.size - finite.size), "max_possible": math.log(d)}
  return out


def lp_concentration(stats: dict[str, calib.LayerStats], top_fraction: float = 0.01
                     ) -> dict[str, dict]:
  """Share of a layer's LP mass held by its top `top_fraction` channels (the supernodes)."""
  out = {}
  for name, st in stats.items():
    lp = st.loss_proxy
    core = supernodes(lp, top_fraction)
    total = float(lp.sum())
    out[name] = {"top_fraction": top_fraction, "num_supernodes": int(core.size),
                 "share": float(lp[core].sum() / total) if total > 0 else None}
  return out


def removal_sets(reader: io.CheckpointReader, methods: Sequence[str], ratio: float,
                 layers: Sequence[int], *, seed: int = 0,
                 stats: Optional[dict[str, calib.LayerStats]] = None) -> dict[str, dict]:
  """{method: {layer name: sorted removed indices}} with a per-layer budget floor(ratio * m)."""
  out: dict[str, dict] = {}
  for method in methods:
    pruner = LayerPruner(reader, method, seed=seed, stats=stats)
    out[method] = {}
    for i in layers:
      layer = pruner.inputs(i)
      removed, _, _ = pruner.cut(layer, math.floor(ratio * layer.width))
      out[method][layer.name] = sorted(int(r) for r in removed)
  return out


def jaccard(a, b) -> float:
  a, b = set(a), set(b)
  return len(a & b) / len(a | b) if a | b else 1.0


def overlap(sets: dict[str, dict]) -> dict[str, Any]:
  """Pairwise Jaccard of removal sets: per layer and the mean over layers."""
  methods = list(sets)
  out: dict[str, Any] = {"methods": methods, "per_layer": {}, "mean": {}}
  for a in methods:
    for b in methods:
      per_layer = {n: jaccard(sets[a][n], sets[b][n]) for n in sets[a]}
      out["per_layer"][f"{a}|{b}"] = per_layer
      out["mean"][f"{a}|{b}"] = float(np.mean(list(per_layer.values()))) if per_layer else None
  return out


def _save_png(fig, path: pathlib.Path) -> None:
  """The figure as a PNG at `path`, whole or not at all (a full disk leaves no torn file)."""
  outputs.write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120))


def _plots(result: dict, output_dir: pathlib.Path) -> list[str]:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  written = []
  hist = result["entropy"]
  fig, ax = plt.subplots(figsize=(7, 4))
  cmap = plt.get_cmap("viridis")
  for k, (name, h) in enumerate(hist.items()):
    edges = np.asarray(h["edges"])
    centers = (edges[1:] + edges[:-1]) / 2
    ax.plot(centers, h["counts"], color=cmap(k / max(len(hist) - 1, 1)), label=name)
  ax.set_xlabel("outgoing-connection entropy H_j (nats)")
  ax.set_ylabel("neurons")
  ax.set_title("Outgoing-entropy histogram per FFN layer")
  if len(hist) <= 12:
    ax.legend(fontsize=7)
  fig.tight_layout()
  _save_png(fig, output_dir / "entropy_histograms.png")
  plt.close(fig)
  written.append("entropy_histograms.png")

  if result.get("lp_concentration"):
    conc = result["lp_concentration"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(range(len(conc)), [c["share"] or 0.0 for c in conc.values()])
    ax.set_xticks(range(len(conc)), [ffn.layer_index(n) for n in conc])
    ax.set_xlabel("layer")
    ax.set_ylabel("share of LP mass in top 1%")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    _save_png(fig, output_dir / "lp_concentration.png")
    plt.close(fig)
    written.append("lp_concentration.png")

  if result.get("overlap"):
    methods = result["overlap"]["methods"]
    matrix = np.array([[result["overlap"]["mean"][f"{a}|{b}"] for b in methods]
                       for a in methods])
    fig, ax = plt.subplots(figsize=(1.2 * len(methods) + 2, 1.0 * len(methods) + 1.5))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="magma")
    ax.set_xticks(range(len(methods)), methods, rotation=45, ha="right")
    ax.set_yticks(range(len(methods)), methods)
    for r in range(len(methods)):
      for c in range(len(methods)):
        ax.text(c, r, f"{matrix[r, c]:.2f}", ha="center", va="center", color="gray", fontsize=8)
    fig.colorbar(im, ax=ax, label="mean Jaccard of removal sets")
    fig.tight_layout()
    _save_png(fig, output_dir / "overlap.png")
    plt.close(fig)
    written.append("overlap.png")
  return written


def analyze_ffn(input_path: str | os.PathLike, output_dir: str | os.PathLike, *,
                methods: Sequence[str] = ("entropy", "magnitude", "random"),
                ratio: float = 0.25, layers: str = "all", seed: int = 0,
                calibration: Any = None, calibration_examples: int = 128,
                batch_size: int = 8, seq_len: int = 128, bins: int = 50,
                data_cache_dir: Optional[str | os.PathLike] = None,
                data_vocab: str = "byte") -> dict:
  """Write analysis.json and PNG plots to `output_dir`; returns the JSON content.

  `calibration` is a SOURCE as in maxnucl.pruning.calibration; for a registered task name,
  `data_vocab` is its tokenizer and `data_cache_dir` where its cached shards are."""
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f"unknown pruning method(s) {unknown}; known methods: {sorted(METHODS)}")
  output_dir = outputs.check_output_path(output_dir, {"input checkpoint": input_path},
                                         flag="--output_dir", overwrite=None, replaces=False)
  reader = io.CheckpointReader(input_path)
  indices = select_layers(reader.cfg, layers)
  data_aware = [m for m in methods if METHODS[m].needs_calibration]
  if data_aware and calibration is None:
    raise ValueError(f"method(s) {data_aware} are data-aware and need --calibration SOURCE")
  stats = None
  if calibration is not None:
    stats = calib.collect_stats(reader.cfg, reader.read_all(), calib.iterate_batches(
        calibration, num_examples=calibration_examples, batch_size=batch_size, seq_len=seq_len,
        pad_id=reader.cfg.pad_id, cache_dir=data_cache_dir, vocab=data_vocab,
        vocab_size=reader.cfg.vocab_size))
  result: dict[str, Any] = {"input": str(reader.path), "layers": indices, "ratio": ratio,
                            "methods": list(methods), "seed": seed,
                            "entropy": entropy_histograms(reader, indices, bins)}
  if stats is not None:
    result["lp_concentration"] = lp_concentration(
        {ffn.layer_name(i): stats[ffn.layer_name(i)] for i in indices})
  if methods:
    sets = removal_sets(reader, methods, ratio, indices, seed=seed, stats=stats)
    result["removal_sets"] = sets
    result["overlap"] = overlap(sets)
  output_dir.mkdir(parents=True, exist_ok=True)
  result["plots"] = _plots(result, output_dir)
  # analysis.json last: its presence says the plots beside it are this run's, and whole
  outputs.write_file_atomically(output_dir / "analysis.json", json.dumps(result, indent=1))
  return result
