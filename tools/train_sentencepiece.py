#!/usr/bin/env python
"""`maxnucl-data train_sentencepiece` from a checkout (pad 0, eos 1, bos 2, unk 3 as Gemma's).

  python tools/train_sentencepiece.py --output /tmp/sp384 --vocab_size 384 corpus/*.txt
"""
import sys

from maxnucl.data import cli

if __name__ == "__main__":
  sys.exit(cli.main(["train_sentencepiece"] + sys.argv[1:]))
