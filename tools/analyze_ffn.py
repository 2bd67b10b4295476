"""FFN analysis: outgoing-entropy histograms, LP-mass concentration, removal-set overlap.

  python tools/analyze_ffn.py --input CKPT --output_dir DIR \
      [--methods entropy,magnitude,random,lp] [--ratio 0.25] [--layers all] [--seed 0] \
      [--calibration SOURCE --calibration_examples 128] [--vocab tokenizer.model]
      [--data_cache_dir DIR]

Writes DIR/analysis.json and DIR/{entropy_histograms,lp_concentration,overlap}.png.
LP concentration (share of LP mass in the top 1% channels per layer) needs --calibration.
"""

import argparse
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from maxnucl.pruning import analysis  # noqa: E402  pylint: disable=wrong-import-position


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--input", required=True)
  parser.add_argument("--output_dir", required=True)
  parser.add_argument("--methods", default="entropy,magnitude,random",
                      help="comma list of pruning methods to compare (empty: none)")
  parser.add_argument("--ratio", type=float, default=0.25)
  parser.add_argument("--layers", default="all")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--calibration", default=None)
  parser.add_argument("--calibration_examples", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--bins", type=int, default=50)
  parser.add_argument("--vocab", default="byte",
                      help="tokenizer for a registered task name: a SentencePiece model (e.g. "
                           "Gemma's tokenizer.model) or 'byte'")
  parser.add_argument("--data_cache_dir", default=None,
                      help="read a registered task's cached shards from here")
  args = parser.parse_args(argv)
  try:
    result = analysis.analyze_ffn(
        args.input, args.output_dir, methods=[m for m in args.methods.split(",") if m],
        ratio=args.ratio, layers=args.layers, seed=args.seed, calibration=args.calibration,
        calibration_examples=args.calibration_examples, batch_size=args.batch_size,
        seq_len=args.seq_len, bins=args.bins,
        data_cache_dir=args.data_cache_dir, data_vocab=args.vocab)
  except (ValueError, FileNotFoundError) as e:
    print(f"analyze_ffn: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({"output_dir": args.output_dir, "plots": result["plots"],
                    "lp_concentration": {k: v["share"] for k, v in
                                         result.get("lp_concentration", {}).items()},
                    "mean_jaccard": result.get("overlap", {}).get("mean")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
