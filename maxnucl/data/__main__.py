"""`python -m maxnucl.data {cache,train_sentencepiece,list} ...` (see maxnucl/data/cli.py)."""

import sys

from maxnucl.data import cli

sys.exit(cli.main())
