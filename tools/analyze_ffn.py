"""`maxnucl-analyze` from a checkout: python tools/analyze_ffn.py --input CKPT ... (--help)."""
import sys

from maxnucl.pruning.cli import analyze_main

if __name__ == "__main__":
  sys.exit(analyze_main())
