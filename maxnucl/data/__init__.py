"""Data: tasks, mixtures, tokenizers and the input pipeline.

Module map (one concept per module):
  vocabularies.py  TF-free tokenizers (byte, SentencePiece) with Gemma's pad 0 / eos 1 / bos 2,
                   SentencePiece training, and the matching seqio vocabularies.
  sources.py       locating and reading each dataset's released files (or its TFDS builder);
                   errors name the dataset, the places searched, the file and the line.
  formats.py       text-to-text formats: a raw record -> {"inputs": str, "targets": str}.
  synthetic.py     procedurally generated arithmetic word problems (pure Python, seeded).
  catalog.py       the TF-free registry of tasks and mixtures (name -> splits, examples, rates).
  packing.py       decoder-only features: concatenation, loss mask, truncation, packing.
  caching.py       writing / reading packed numpy shards with an index (the TF-free cache).
  pipeline.py      `create_data_iterator` and the checkpointable `DataIterator` (TF-free).
  tasks.py         the same tasks and mixtures registered with seqio (imports TensorFlow).

Importing this package imports nothing heavy; `maxnucl.data.pipeline` never imports TensorFlow.
"""
