#!/usr/bin/env python
"""Cache a task or mixture's tokenized, packed rows as numpy shards (TF-free training input).

  python tools/cache_tasks.py --source super_glue_v102_proportional --split train \
      --cache_dir /data/maxnucl_cache --seq_len 1024 --vocab /ckpt/gemma/tokenizer.model \
      --data_dir /data/released

Thin wrapper over `maxnucl.data.pipeline.cache_task`; see docs/data.md.
"""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from maxnucl.data import cli  # pylint: disable=wrong-import-position

if __name__ == "__main__":
  sys.exit(cli.main(["cache"] + sys.argv[1:]))
