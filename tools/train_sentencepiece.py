#!/usr/bin/env python
"""Train a SentencePiece model from local text files (pad 0, eos 1, bos 2, unk 3 as Gemma's).

  python tools/train_sentencepiece.py --output /tmp/sp384 --vocab_size 384 corpus/*.txt

Thin wrapper over `maxnucl.data.vocabularies.train_sentencepiece`.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from maxnucl.data import cli  # pylint: disable=wrong-import-position

if __name__ == "__main__":
  sys.exit(cli.main(["train_sentencepiece"] + sys.argv[1:]))
