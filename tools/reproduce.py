"""`maxnucl-reproduce` from a checkout: python tools/reproduce.py --output DIR [--quick] (--help)."""
import sys

from maxnucl.reproduction.cli import main

if __name__ == "__main__":
  sys.exit(main())
