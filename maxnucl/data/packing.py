"""Decoder-only features: concatenate inputs and targets, mask the loss, truncate, pack.

One example becomes one *segment*:

    sequence  = [BOS] inputs targets [EOS]   (no BOS when `bos_id` is None: a vocabulary whose
                                              text starts without one, e.g. SmolLM2's)
    tokens    = sequence[:-1]            what the model reads
    targets   = sequence[1:]             next token; the last position of a segment targets EOS
    loss_mask = 1 where the target is a targets token or the EOS (also inputs tokens when
                `loss_on_inputs`), else 0

Truncation to `seq_len` (tokens per segment): optional per-feature limits first
(`feature_lengths={"inputs": n, "targets": m}` keeps the *last* n inputs tokens and the
*first* m targets tokens), then, if the segment is still longer than `seq_len`, targets+EOS keep
their first min(len, seq_len) tokens and inputs keep their last tokens in the room left, so the
prompt end next to the answer survives (the EOS is lost only if the targets alone overflow).

Packing places segments one after another in rows of `seq_len` (a segment that does not fit
starts a new row); each row carries `segment_ids` 1, 2, ... and `positions` restarting at 0 per
segment; padding has token/target/segment id/position 0 and loss_mask 0.  Without packing each
row holds one segment.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence

import numpy as np

FEATURES = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
FEATURE_DTYPES = {"tokens": np.int32, "targets": np.int32, "loss_mask": np.float32,
                  "segment_ids": np.int32, "positions": np.int32}

_BOS, _INPUTS, _TARGETS, _EOS = 0, 1, 2, 3  # role of each element of `sequence`


def example_segment(inputs_ids: Sequence[int], targets_ids: Sequence[int], *, seq_len: int,
                    bos_id: Optional[int], eos_id: int, loss_on_inputs: bool = False,
                    feature_lengths: Optional[Mapping[str, int]] = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens int32[n], targets int32[n], loss_mask float32[n]) of one example, n <= seq_len."""
  inputs_ids = list(inputs_ids)
  targets_ids = list(targets_ids)
  if feature_lengths:
    if "inputs" in feature_lengths:
      limit = feature_lengths["inputs"]
      inputs_ids = inputs_ids[max(0, len(inputs_ids) - limit):] if limit > 0 else []
    if "targets" in feature_lengths:
      targets_ids = targets_ids[:feature_lengths["targets"]]
  bos = [] if bos_id is None else [bos_id]
  room = seq_len + 1 - len(bos)  # sequence elements after BOS (tokens are one fewer)
  answer = targets_ids + [eos_id]
  answer_kept = min(len(answer), room)
  inputs_room = room - answer_kept
  inputs_kept = inputs_ids[max(0, len(inputs_ids) - inputs_room):] if inputs_room > 0 else []
  sequence = np.asarray(bos + inputs_kept + answer[:answer_kept], dtype=np.int32)
  roles = np.asarray([_BOS] * len(bos) + [_INPUTS] * len(inputs_kept) + [_TARGETS] * answer_kept,
                     dtype=np.int32)
  counted = (roles[1:] == _TARGETS) | (loss_on_inputs & (roles[1:] == _INPUTS))
  return sequence[:-1], sequence[1:], counted.astype(np.float32)


def pack_segments(segments: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                  seq_len: int, pack: bool = True) -> dict[str, np.ndarray]:
  """Rows of segments: a dict of the `FEATURES`, each shaped [num_rows, seq_len]."""
  rows: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = []
  used = seq_len  # forces a new row for the first segment
  for segment in segments:
    length = len(segment[0])
    if length > seq_len:
      raise ValueError(f"segment of length {length} exceeds seq_len {seq_len}")
    if not pack or used + length > seq_len:
      rows.append([])
      used = 0
    rows[-1].append(segment)
    used += length
  packed = {name: np.zeros((len(rows), seq_len), dtype=FEATURE_DTYPES[name]) for name in FEATURES}
  for r, row in enumerate(rows):
    start = 0
    for segment_id, (tokens, targets, loss_mask) in enumerate(row, start=1):
      end = start + len(tokens)
      packed["tokens"][r, start:end] = tokens
      packed["targets"][r, start:end] = targets
      packed["loss_mask"][r, start:end] = loss_mask
      packed["segment_ids"][r, start:end] = segment_id
      packed["positions"][r, start:end] = np.arange(len(tokens))
      start = end
  return packed


def empty_rows(num_rows: int, seq_len: int) -> dict[str, np.ndarray]:
  """All-padding rows (used to fill the last batch of a finite evaluation pass)."""
  return {name: np.zeros((num_rows, seq_len), dtype=FEATURE_DTYPES[name]) for name in FEATURES}
