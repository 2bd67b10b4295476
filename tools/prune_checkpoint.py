"""`maxnucl-prune` from a checkout: python tools/prune_checkpoint.py --input CKPT ... (--help)."""
import sys

from maxnucl.pruning.cli import prune_main

if __name__ == "__main__":
  sys.exit(prune_main())
