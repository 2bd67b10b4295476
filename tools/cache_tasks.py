#!/usr/bin/env python
"""`maxnucl-data cache` from a checkout: python tools/cache_tasks.py --source NAME ... (--help).

  python tools/cache_tasks.py --source super_glue_v102_proportional --split train \
      --cache_dir /data/maxnucl_cache --seq_len 1024 --vocab /ckpt/gemma/tokenizer.model \
      --data_dir /data/released

Caches a task or mixture's tokenized, packed rows as numpy shards (TF-free training input); see
docs/data.md.
"""
import sys

from maxnucl.data import cli

if __name__ == "__main__":
  sys.exit(cli.main(["cache"] + sys.argv[1:]))
