"""Print a model's parameter counts by group and its per-layer structure.

    python -m maxnucl.summary gemma2_9b
    python -m maxnucl.summary --gin_file=gin/models/gemma2_tiny.gin --gin_param='model_config.num_layers=2'
    python -m maxnucl.summary --checkpoint /path/to/ckpt
"""

from __future__ import annotations

import argparse
import sys

from maxnucl import gin_config, models


def format_summary(cfg: models.ModelConfig) -> str:
  counts = models.param_count(cfg)
  total = counts["total"]
  lines = [f"model {cfg.name} ({cfg.family}): d={cfg.d_model}, layers={cfg.num_layers}, "
           f"heads={cfg.num_heads}/kv {cfg.num_kv_heads} x {cfg.head_dim}, "
           f"vocab={cfg.vocab_size}, dtype={cfg.dtype}, params={cfg.param_dtype}",
           f"{'group':<12}{'parameters':>18}{'share':>9}"]
  for group in ("embedding", "attention", "ffn", "ffn_in", "ffn_out", "norm", "total"):
    label = {"ffn_in": "  ffn in", "ffn_out": "  ffn out"}.get(group, group)
    lines.append(f"{label:<12}{counts[group]:>18,}{counts[group] / total:>9.1%}")
  widths = cfg.layer_ffn_widths
  if len(set(widths)) == 1:
    lines.append(f"FFN width m = {widths[0]} in all {cfg.num_layers} layers")
  else:
    lines.append("FFN widths per layer: " + ", ".join(map(str, widths)))
  kinds = cfg.layer_attention_kinds
  if "local" in kinds:
    lines.append(f"attention: sliding window {cfg.sliding_window} on layers "
                 f"{[i for i, k in enumerate(kinds) if k == 'local'][:6]}..., global elsewhere")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m maxnucl.summary", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("preset", nargs="?", help=f"one of {sorted(models.PRESETS)}")
  parser.add_argument("--gin_file", action="append", default=[], help="gin file(s) binding "
                      "model_config.*")
  parser.add_argument("--gin_param", action="append", default=[], help="extra gin bindings")
  parser.add_argument("--checkpoint", help="summarise the config stored in a maxnucl checkpoint")
  args = parser.parse_args(argv)
  try:
    if args.checkpoint:
      from maxnucl import checkpoints
      cfg = checkpoints.load_config(args.checkpoint)
    elif args.gin_file or args.gin_param:
      gin_config.parse(args.gin_file, args.gin_param)
      cfg = models.configured_model()
    elif args.preset:
      cfg = models.get_config(args.preset)
    else:
      parser.error("give a preset, --gin_file or --checkpoint")
  except (ValueError, KeyError, OSError) as error:
    print(f"error: {gin_config.error_message(error)}", file=sys.stderr)
    return 2
  print(format_summary(cfg))
  return 0


if __name__ == "__main__":
  sys.exit(main())
