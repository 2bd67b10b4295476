"""Hugging Face safetensors directories, read and written one tensor at a time.

A safetensors file is an 8-byte little-endian header length, a JSON header
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}` and the raw
little-endian tensor bytes.  Reading memory-maps one tensor (nothing else is touched); writing
emits the header from the planned shapes first and then each tensor's bytes as it is produced.
A directory holds `model.safetensors`, or several shards listed in
`model.safetensors.index.json` (`{"metadata": {"total_size"}, "weight_map": {name: file}}`).
A directory may also be a URL (`gs://...`, `file://...`; maxnucl.paths): files are then read and
written through etils.epath, a tensor by one ranged read of its bytes instead of a memory map.
Every header is validated as the `safetensors` library validates it before a tensor is read
(`_read_header`): a file that library refuses is refused here, naming the file and the tensor.

Why not the `safetensors` package's own API: its writers (`save_file`) take every tensor of a file
in memory at once (no streaming), and its numpy reader cannot return bfloat16 ("data type
'bfloat16' not understood", safetensors 0.8.0), which every released Gemma-2 checkpoint uses.  The
format is the 5-line layout above; tests/test_convert.py reads files written by the `safetensors`
package and checks the files written here with `safetensors.torch.load_file` and transformers.
"""

from __future__ import annotations

import collections
import json
import math
import os
import struct
from typing import Callable, Iterable, Optional

import ml_dtypes
import numpy as np
import tensorstore as ts

from maxnucl import paths

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16),
          "F16": np.dtype(np.float16), "F64": np.dtype(np.float64)}
DTYPE_CODES = {v.name: k for k, v in DTYPES.items()}


class SafetensorsError(ValueError):
  """A safetensors file or index is malformed, truncated or lacks a tensor."""


class SafetensorsReader:
  """Tensors of a Hugging Face model directory, by name, without loading any other tensor."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = paths.as_path(directory)
    index = self.directory / INDEX_FILE
    if index.exists():
      try:
        weight_map = json.loads(index.read_text())["weight_map"]
      except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise SafetensorsError(f"{index}: not a safetensors index ({e})") from None
      if not (isinstance(weight_map, dict) and all(
          isinstance(v, str) and "/" not in v and v not in ("", ".", "..")
          for v in weight_map.values())):
        raise SafetensorsError(f"{index}: weight_map is {_short(weight_map)}, expected an object "
                               f"of tensor name -> file name in this directory")
      files = sorted(set(weight_map.values()))
    elif (self.directory / SINGLE_FILE).exists():
      files, weight_map = [SINGLE_FILE], None
    else:
      files = sorted(p.name for p in self.directory.glob("*.safetensors"))
      weight_map = None
      if not files:
        raise SafetensorsError(f"{self.directory}: no *.safetensors files and no {INDEX_FILE}")
    self.entries: dict[str, tuple[paths.Path, str, tuple[int, ...], int, int]] = {}
    for name in files:
      path = self.directory / name
      if not path.exists():
        raise SafetensorsError(f"{index}: lists shard {name}, which does not exist")
      for tensor, entry in _read_header(path).items():
        if weight_map is not None and weight_map.get(tensor) != name:
          continue  # the index is authoritative for which shard holds a tensor
        self.entries[tensor] = (path, *entry)
    if weight_map is not None:
      absent = sorted(t for t, f in weight_map.items() if t not in self.entries)
      if absent:
        raise SafetensorsError(f"{index}: tensor {absent[0]} is listed in file "
                               f"{weight_map[absent[0]]} but that file does not hold it")

  def names(self) -> list[str]:
    return list(self.entries)

  def __contains__(self, name: str) -> bool:
    return name in self.entries

  def shape(self, name: str) -> tuple[int, ...]:
    return self._entry(name)[2]

  def dtype(self, name: str) -> np.dtype:
    return DTYPES[self._entry(name)[1]]

  def file(self, name: str) -> paths.Path:
    return self._entry(name)[0]

  def get(self, name: str) -> np.ndarray:
    """A read-only memory map of one tensor (pages are read when touched); from a URL, the
    tensor read into memory."""
    path, code, shape, begin, end = self._entry(name)
    if begin == end:
      return np.zeros(shape, DTYPES[code])
    if not paths.is_url(path):
      return np.memmap(path, dtype=DTYPES[code], mode="r", offset=begin, shape=shape)
    with path.open("rb") as f:
      f.seek(begin)
      data = f.read(end - begin)
    if len(data) != end - begin:
      raise SafetensorsError(f"{path}: tensor {name}: read {len(data)} of its {end - begin} "
                             f"bytes (file truncated?)")
    return np.frombuffer(data, DTYPES[code]).reshape(shape)

  def _entry(self, name):
    if name not in self.entries:
      raise SafetensorsError(f"{self.directory}: tensor {name} is missing (no safetensors "
                             f"file there holds it)")
    return self.entries[name]


# safetensors' own limit on the JSON header (its MAX_HEADER_SIZE): larger is refused unread
MAX_HEADER_BYTES = 100_000_000


def _read_header(path: paths.Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
  """name -> (dtype code, shape, absolute begin, absolute end), validated as the `safetensors`
  library validates a file: the 8-byte header length within the file (and at most
  MAX_HEADER_BYTES), the header a JSON object (no NaN/Infinity, no repeated key) of
  {"dtype", "shape", "data_offsets"} per tensor and an optional "__metadata__" of strings, every
  tensor's byte length its shape x its dtype's size, and the offsets, ordered, contiguous from 0
  and covering the data after the header exactly (no gap, no overlap, nothing after the last)."""
  size = paths.file_size(path)
  with path.open("rb") as f:
    head = f.read(8)
    if len(head) < 8:
      raise SafetensorsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER_BYTES or 8 + length > size:
      raise SafetensorsError(f"{path}: safetensors header length {length} exceeds the file "
                             f"({size} bytes; at most {MAX_HEADER_BYTES}): truncated or not a "
                             f"safetensors file")
    try:
      header = json.loads(f.read(length).decode("utf-8"), object_pairs_hook=_unique_keys,
                          parse_constant=_no_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
      raise SafetensorsError(f"{path}: unreadable safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise SafetensorsError(f"{path}: safetensors header is a JSON {type(header).__name__}, "
                           f"expected an object of tensors")
  metadata = header.get("__metadata__")
  if metadata is not None and not (isinstance(metadata, dict) and all(
      isinstance(v, str) for v in metadata.values())):
    raise SafetensorsError(f"{path}: safetensors __metadata__ is {_short(metadata)}, expected an "
                           f"object of strings")
  out = {}
  for name, info in header.items():
    if name != "__metadata__":
      code, shape, begin, end = _tensor_info(path, name, info)
      out[name] = (code, shape, begin, end)
  data_bytes, covered = size - 8 - length, 0
  for name, (_, _, begin, end) in sorted(out.items(), key=lambda kv: kv[1][2:]):
    if begin != covered:
      raise SafetensorsError(
          f"{path}: tensor {name}: data_offsets [{begin}, {end}] "
          f"{'overlap the previous tensor' if begin < covered else 'leave a gap'} (expected to "
          f"begin at {covered}: offsets are contiguous from 0)")
    if end > data_bytes:
      raise SafetensorsError(f"{path}: truncated safetensors file: tensor {name} ends at byte "
                             f"{8 + length + end} but the file has {size} bytes")
    covered = end
  if covered != data_bytes:
    raise SafetensorsError(f"{path}: the tensors cover {covered} bytes of the {data_bytes} after "
                           f"the {length}-byte header (incomplete metadata, file not fully "
                           f"covered: a wrong header length, or a truncated or extended file)")
  return {name: (code, shape, 8 + length + begin, 8 + length + end)
          for name, (code, shape, begin, end) in out.items()}


def _tensor_info(path, name: str, info) -> tuple[str, tuple[int, ...], int, int]:
  """(dtype code, shape, begin, end) of one header entry, checked (offsets relative to the data)."""
  where = f"{path}: tensor {name}"
  if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
    raise SafetensorsError(f"{where}: header entry is {_short(info)}, expected an object with "
                           f"dtype, shape and data_offsets")
  code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
  if not isinstance(code, str) or code not in DTYPES:
    raise SafetensorsError(f"{where} has dtype {_short(code)}; supported: {sorted(DTYPES)}")
  if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
    raise SafetensorsError(f"{where}: shape {_short(shape)}, expected a list of non-negative "
                           f"integers")
  if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
          and offsets[0] <= offsets[1]):
    raise SafetensorsError(f"{where}: data_offsets {_short(offsets)}, expected [begin, end] "
                           f"with 0 <= begin <= end")
  begin, end = offsets
  expected = math.prod(shape) * DTYPES[code].itemsize
  if end - begin != expected:
    raise SafetensorsError(f"{where} has {end - begin} bytes for shape {tuple(shape)} {code} "
                           f"(expected {expected})")
  return code, tuple(shape), begin, end


def _is_count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _short(value) -> str:
  text = json.dumps(value) if not isinstance(value, float) else repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _unique_keys(pairs):
  counts = collections.Counter(k for k, _ in pairs)
  repeated = sorted(k for k, n in counts.items() if n > 1)
  if repeated:
    raise ValueError(f"key {repeated[0]!r} appears more than once")
  return dict(pairs)


def _no_constant(name):
  raise ValueError(f"{name} is not JSON")


def plan_shards(specs: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                max_shard_bytes: int) -> list[list[tuple[str, tuple[int, ...], np.dtype]]]:
  """Split (name, shape, dtype) specs, in order, into shards of at most `max_shard_bytes`
  (a single larger tensor gets a shard of its own)."""
  shards: list[list] = [[]]
  size = 0
  for spec in specs:
    nbytes = int(np.prod(spec[1], dtype=np.int64)) * np.dtype(spec[2]).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += nbytes
  return shards


def write_sharded(directory: str | os.PathLike,
                  specs: list[tuple[str, tuple[int, ...], np.dtype]],
                  get_tensor: Callable[[str], np.ndarray], max_shard_bytes: int,
                  metadata: Optional[dict[str, str]] = None) -> list[paths.Path]:
  """Write `specs` (name, shape, dtype) into safetensors shard(s) under `directory`.

  `get_tensor(name)` is called once per tensor, in order, and must return exactly the planned
  shape and dtype.  One shard -> `model.safetensors`; several -> `model-0000i-of-0000n`
  files plus `model.safetensors.index.json`.
  """
  directory = paths.as_path(directory)
  shards = plan_shards(specs, max_shard_bytes)
  names = ([SINGLE_FILE] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map, total = {}, 0
  for file_name, shard in zip(names, shards):
    header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
    for name, shape, dtype in shard:
      nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
      header[name] = {"dtype": DTYPE_CODES[np.dtype(dtype).name], "shape": list(shape),
                      "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
      weight_map[name] = file_name
    total += offset
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keep tensor data 8-byte aligned
    with (directory / file_name).open("wb") as f:
      f.write(struct.pack("<Q", len(encoded)))
      f.write(encoded)
      for name, shape, dtype in shard:
        array = np.asarray(get_tensor(name))
        if tuple(array.shape) != tuple(shape) or array.dtype != np.dtype(dtype):
          raise SafetensorsError(f"{directory / file_name}: tensor {name} is {array.shape} "
                                 f"{array.dtype}, planned {tuple(shape)} {np.dtype(dtype)}")
        data = memoryview(contiguous(array).view(np.uint8).reshape(-1))
        # tf.io.gfile (epath's backend for URLs) takes bytes only: one more copy of the tensor
        f.write(bytes(data) if paths.is_url(directory) else data)
  if len(shards) > 1:
    (directory / INDEX_FILE).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  return [directory / n for n in names]


def contiguous(array: np.ndarray) -> np.ndarray:
  """`array` (e.g. a transposed view) in C order.  TensorStore does the strided copy: about twice
  as fast as numpy's for a transpose, and it handles ml_dtypes' bfloat16 natively."""
  if array.flags.c_contiguous:
    return array
  out = np.empty(array.shape, array.dtype)
  ts.array(out, copy=False, write=True).write(ts.array(array)).result()
  return out
