"""`maxnucl-convert` from a checkout: python tools/convert_checkpoint.py COMMAND ... (--help)."""
import sys

from maxnucl.conversion.cli import main

if __name__ == "__main__":
  sys.exit(main())
