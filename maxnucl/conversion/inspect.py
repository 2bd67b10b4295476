"""What a checkpoint holds: arrays, parameter counts, FFN widths, outgoing-connection entropy.

Works on a maxnucl checkpoint or a Hugging Face directory of any architecture in
`hf_architectures`, and reads one tensor at a time.

Outgoing-connection entropy of FFN neuron j (the NUCL paper's statistic): with W = the layer's
outgoing matrix `layers_i/mlp/out` [m, d] (HF: `down_proj.weight` transposed),
    r_jk = |W_jk| / sum_k |W_jk|,    H_j = -sum_k r_jk log r_jk   (natural log, 0 log 0 = 0),
so H_j lies in [0, log d]: log d for a neuron that spreads its output evenly over the residual
stream, 0 for one that writes a single coordinate (`maxnucl.ffn.row_entropy`).  A zero row
(e.g. a zeroed neuron) follows the project's one zero-row rule: it counts as uniform, H = log d;
`zero_rows` says how many there are.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import numpy as np

from maxnucl import checkpoints, ffn, models, paths
from maxnucl.conversion import hf_io

_BLOCK_ELEMENTS = 1 << 24  # rows of W per entropy block: about this many elements


def entropy_stats(row_blocks: Iterator[np.ndarray]) -> dict[str, Any]:
  """mean/min/max of `ffn.row_entropy` over all rows of the blocks [b, d] of one W, and the
  number of zero rows among them."""
  count, total, low, high, zero = 0, 0.0, np.inf, -np.inf, 0
  for block in row_blocks:
    h = ffn.row_entropy(block)
    zero += int(np.sum(np.abs(np.asarray(block)).max(axis=1, initial=0.0)
                       <= ffn.ZERO_ROW_MAX_ABS))
    if h.size:
      count += h.size
      total += float(h.sum())
      low, high = min(low, float(h.min())), max(high, float(h.max()))
  return {"mean": total / count if count else None, "min": low if count else None,
          "max": high if count else None, "zero_rows": zero}


def _row_blocks(w: np.ndarray, transpose: bool = False) -> Iterator[np.ndarray]:
  """Blocks of rows of W (of W = w.T when `transpose`), reading only one block at a time."""
  rows, cols = (w.shape[1], w.shape[0]) if transpose else w.shape
  step = max(1, _BLOCK_ELEMENTS // max(cols, 1))
  for start in range(0, rows, step):
    yield w[:, start:start + step].T if transpose else w[start:start + step]


def inspect_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
  """A JSON-able summary of a maxnucl checkpoint (or a training workdir's latest one,
  `checkpoints.resolve`) or a Hugging Face directory."""
  path = paths.as_path(path)
  if (path / checkpoints.MODEL_CONFIG).is_dir():
    return _inspect_maxnucl(path)
  if (path / "config.json").exists():
    return _inspect_hf(path)
  try:
    step = checkpoints.resolve(path)
  except checkpoints.CheckpointError as e:  # neither a checkpoint nor a workdir
    raise FileNotFoundError(f"{e}, nor a Hugging Face directory (config.json)") from None
  return _inspect_maxnucl(step)


def _summary(fmt, path, cfg, arrays, entropy) -> dict[str, Any]:
  counts = models.param_count(cfg)
  counts["stored_total"] = int(sum(np.prod(a["shape"], dtype=np.int64) for a in arrays))
  return {"path": str(path), "format": fmt, "model": cfg.to_dict(), "arrays": arrays,
          "param_counts": counts, "ffn_widths": list(cfg.layer_ffn_widths),
          "outgoing_entropy": entropy}


def _inspect_maxnucl(path: paths.Path) -> dict[str, Any]:
  cfg = checkpoints.load_config(path)
  stored = checkpoints.stored_arrays(path)
  arrays = [{"name": "/".join(k), "shape": list(shape), "dtype": dtype}
            for k, (shape, dtype) in stored.items()]
  entropy = []
  for i, width in enumerate(cfg.layer_ffn_widths):
    if width:
      w = checkpoints.read_array(path, (ffn.layer_name(i), "mlp", ffn.OUT))
      entropy.append({"layer": ffn.layer_name(i), "width": width,
                      **entropy_stats(_row_blocks(w))})
      del w
  return _summary("maxnucl", path, cfg, arrays, entropy)


def _inspect_hf(path: paths.Path) -> dict[str, Any]:
  from maxnucl.conversion import convert  # late: convert imports this package's siblings
  cfg, hf = convert.read_hf_config(path)
  reader = hf_io.SafetensorsReader(path)
  arrays = [{"name": n, "shape": list(reader.shape(n)), "dtype": reader.dtype(n).name,
             "file": reader.file(n).name} for n in reader.names()]
  mapping = convert.check_declared_model(path, cfg, hf, reader).tensor_map(cfg)
  entropy = []
  for i, width in enumerate(cfg.layer_ffn_widths):
    if not width:  # a custom_code export's FFN-less layer: no down_proj
      continue
    down = reader.get(mapping[(ffn.layer_name(i), "mlp", ffn.OUT)][0])  # (d, m) = W.T, mmapped
    entropy.append({"layer": ffn.layer_name(i), "width": width,
                    **entropy_stats(_row_blocks(down, transpose=True))})
    del down
  return _summary("huggingface", path, cfg, arrays, entropy)


def format_summary(summary: dict[str, Any]) -> str:
  """The human-readable form of `inspect_checkpoint`'s result."""
  model = summary["model"]
  lines = [f"{summary['path']}: {summary['format']} checkpoint, model {model['name']!r} "
           f"({model['num_layers']} layers, d={model['d_model']}, vocab={model['vocab_size']})",
           "", "arrays:"]
  width = max(len(a["name"]) for a in summary["arrays"])
  for a in summary["arrays"]:
    lines.append(f"  {a['name']:<{width}}  {str(tuple(a['shape'])):<22} {a['dtype']}"
                 + (f"  [{a['file']}]" if "file" in a else ""))
  lines += ["", "parameters:"]
  lines += [f"  {k:<13} {v:>16,}" for k, v in summary["param_counts"].items()]
  lines += ["", "FFN widths: " + " ".join(str(w) for w in summary["ffn_widths"]), "",
            "outgoing-connection entropy of W = mlp/out rows (nats; max log d = "
            f"{np.log(model['d_model']):.4f}):",
            f"  {'layer':<10} {'width':>7} {'mean':>9} {'min':>9} {'max':>9} {'zero_rows':>9}"]
  for e in summary["outgoing_entropy"]:
    fmt = lambda x: f"{x:9.4f}" if x is not None else f"{'-':>9}"  # noqa: E731
    lines.append(f"  {e['layer']:<10} {e['width']:>7} {fmt(e['mean'])} {fmt(e['min'])} "
                 f"{fmt(e['max'])} {e['zero_rows']:>9}")
  return "\n".join(lines)
