"""Layer-by-layer checkpoint I/O for the pruner (the one place that touches the storage format).

Built on the streaming API of `maxnucl.checkpoints`:

  reading  `checkpoints.read_array`: one stored tensor at a time (TensorStore), e.g. one layer's
           {gate U, up V, out W} (`CheckpointReader.read_ffn`), each verified (checksum, missing
           chunks, finiteness; docs/checkpoints.md).  Tensors copied unchanged (the
           embedding, norms, attention, unselected layers) are opened lazily (`open_lazy`: a
           verified view on the zarr leaf or on the OCDBT store Orbax writes) so the writer
           reads them block by block as it writes, when their stored chunks are small
           (StreamingWriter's row blocks, e.g. converter outputs; `checkpoints.save` and trainer
           checkpoints, chunked by Orbax to <= 64 MiB).  A leaf stored as one large chunk (plain
           Orbax defaults) is read whole.  Only calibration and perplexity evaluation read the
           whole tree (`read_all`).
  writing  `checkpoints.StreamingWriter`: each array is written as soon as `CheckpointWriter.write`
           receives it and is not kept.  Everything goes to a temporary sibling directory that is
           renamed to the output only after every tensor of the (pruned) config was written; on an
           error nothing appears at the output path, and an existing output is refused unless
           overwrite=True.  Input and output may be URLs (gs://, file://; see maxnucl.outputs
           for how a URL output is published).

So the pruner's peak memory is one layer's FFN (as stored, its float copies and the pruned slice)
plus a few row blocks of the writer, not the whole checkpoint (for a checkpoint written with
Orbax's default single chunk per array, add its largest tensor).  The output keeps the input's
stored dtype.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np

from maxnucl import checkpoints, ffn
from maxnucl.models.config import ModelConfig

FFN_KEYS = ffn.FFN_KEYS  # U [d, m], V [d, m], W [m, d]

Key = tuple[str, ...]

# Lazy block-wise copying pays only when the stored chunks are small (StreamingWriter: ~64 MiB
# row blocks); larger chunks (Orbax's one chunk per array) are read whole instead.
MAX_LAZY_CHUNK_BYTES = 256 << 20


class CheckpointReader:
  """Reads a maxnucl checkpoint one tensor at a time (never the whole tree unless asked); `path`
  may be a training workdir, meaning its latest checkpoint (`checkpoints.resolve`)."""

  def __init__(self, path: str | os.PathLike):
    self.path = checkpoints.resolve(path)
    self.cfg: ModelConfig = checkpoints.load_config(self.path)
    self.stored: dict[Key, tuple[tuple[int, ...], str]] = checkpoints.stored_arrays(self.path)
    # every read is verified against these (checkpoints._read_leaf, VerifiedView)
    self.checksums: dict[Key, int] = checkpoints.stored_checksums(self.path)

  @property
  def dtype(self) -> str:
    """The stored dtype of the checkpoint's tensors (the pruned checkpoint is written in it)."""
    dtypes = sorted({dtype for _, dtype in self.stored.values()})
    if len(dtypes) != 1:
      raise checkpoints.CheckpointError(
          f"{self.path}: tensors are stored in several dtypes {dtypes}; the pruner writes one "
          f"dtype (convert the checkpoint to a single dtype first)")
    return dtypes[0]

  def read(self, key: Key) -> np.ndarray:
    """One leaf as a numpy array in its stored dtype."""
    if key not in self.stored:
      raise checkpoints.CheckpointError(
          f"{self.path}: tensor {'/'.join(key)} is not stored in this checkpoint")
    return checkpoints.read_listed_array(self.path, key, self.stored[key],
                                         checksums=self.checksums)

  def open_lazy(self, key: Key):
    """A read-only view of one leaf (`checkpoints.open_array`: nothing read yet, verified as
    StreamingWriter.write reads it block by block), or, for a leaf whose chunks are too large
    to copy block by block, the array itself (`read`)."""
    if key not in self.stored:
      return self.read(key)  # raises the "not stored" error
    view = checkpoints.open_array(self.path, key, stored=self.stored[key],
                                  checksums=self.checksums)
    chunk = view.chunk_layout.read_chunk.shape
    if chunk is None or np.prod(chunk) * view.dtype.numpy_dtype.itemsize > MAX_LAZY_CHUNK_BYTES:
      # Orbax's default stores a single-host array as one chunk: every row block would decode
      # all of it.
      return self.read(key)
    return view

  def read_ffn(self, layer: str) -> dict[str, np.ndarray]:
    """One layer's FFN: {"gate": U [d, m], "up": V [d, m], "out": W [m, d]} (stored dtype)."""
    return {name: self.read((layer, "mlp", name)) for name in FFN_KEYS}

  def non_ffn_keys(self) -> list[Key]:
    return [k for k in self.stored if not (len(k) == 3 and k[1] == "mlp")]

  def read_all(self) -> dict:
    """The whole params tree (numpy). Only calibration and perplexity evaluation need this."""
    return checkpoints.unflatten({k: self.read(k) for k in self.stored})


class CheckpointWriter:
  """Writes a checkpoint one array at a time (a context manager over StreamingWriter).

      with CheckpointWriter(path, cfg, dtype="bfloat16") as writer:
        writer.write(("layers_0", "mlp", "out"), w)   # written now, not kept

  Leaving the block normally checks that every tensor of `cfg` was written and renames the
  temporary directory into place; an exception removes it.  `tokenizer_files` (name -> bytes)
  go to CKPT/tokenizer/ (the input checkpoint's, so the pruned model keeps its tokenizer).
  """

  def __init__(self, path: str | os.PathLike, cfg: ModelConfig, *, dtype: str,
               overwrite: bool = False, tokenizer_files: Optional[dict[str, bytes]] = None):
    self._writer = checkpoints.StreamingWriter(path, cfg, dtype=dtype, overwrite=overwrite,
                                               tokenizer_files=tokenizer_files)
    self.path = self._writer.path
    self.expected: set[Key] = set(self._writer.expected)

  def __enter__(self) -> "CheckpointWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self._writer.__exit__(exc_type, exc, tb)

  def write(self, key: Key, array: np.ndarray) -> None:
    self._writer.write(key, array)
