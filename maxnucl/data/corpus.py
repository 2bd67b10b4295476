"""A local text corpus as registered tasks: the files of a directory, split into train / finetune /
validation / test by file, cut into examples on line boundaries.

    manifest = prepare_corpus(root, out_dir)        # writes out_dir/{split}.jsonl + manifest.json
    MAXNUCL_TEXT_CORPUS=out_dir python -m maxnucl.train ... MIXTURE_OR_TASK_NAME='text_corpus'

The default root is the running Python's standard library (`python_stdlib_dir()`), a code corpus
present on every machine with Python.  A file's split is a function of its path relative to the
root alone (a hash), so adding or removing other files never moves a file between splits.  The
manifest lists every file used with its SHA-256, size and split.

Registered (in `catalog`):
  text_corpus            train, validation, test   the corpus as language modelling
  text_corpus_finetune   train (the finetune files), test (the test files)
  text_corpus_finetune_arithmetic   mixture 1:1 of text_corpus_finetune and synthetic_arithmetic
The directory comes from `text_corpus_settings.directory` (gin) or `$MAXNUCL_TEXT_CORPUS`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import sysconfig
from typing import Optional, Sequence

import gin

from maxnucl import outputs

SPLITS = ("train", "finetune", "validation", "test")
# Shares of the files (by a hash of the path), in SPLITS order.
DEFAULT_SHARES = (0.8, 0.06, 0.07, 0.07)
ENV_DIRECTORY = "MAXNUCL_TEXT_CORPUS"


class CorpusError(ValueError):
  pass


def python_stdlib_dir() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _split_of(relative: str, shares: Sequence[float]) -> str:
  digest = hashlib.sha256(relative.encode()).digest()
  u = int.from_bytes(digest[:8], "big") / 2**64
  edge = 0.0
  for split, share in zip(SPLITS, shares):
    edge += share
    if u < edge:
      return split
  return SPLITS[-1]


def chunk_text(text: str, max_chars: int) -> list[str]:
  """`text` cut on line boundaries into pieces of at most `max_chars` characters (a longer line
  is cut inside); blank-only pieces are dropped."""
  pieces, current, size = [], [], 0
  for line in text.splitlines(keepends=True):
    while len(line) > max_chars:
      head, line = line[:max_chars], line[max_chars:]
      if current:
        pieces.append("".join(current))
        current, size = [], 0
      pieces.append(head)
    if size + len(line) > max_chars and current:
      pieces.append("".join(current))
      current, size = [], 0
    current.append(line)
    size += len(line)
  if current:
    pieces.append("".join(current))
  return [p for p in pieces if p.strip()]


def _candidate_files(root: pathlib.Path, suffixes: Optional[Sequence[str]]) -> list[pathlib.Path]:
  files = []
  for path in sorted(root.rglob("*")):
    relative = path.relative_to(root).parts
    if "site-packages" in relative or "dist-packages" in relative or "__pycache__" in relative:
      continue
    if path.is_file() and not path.is_symlink() and (suffixes is None or path.suffix in suffixes):
      files.append(path)
  return files


def prepare_corpus(root: str | os.PathLike, output_dir: str | os.PathLike, *,
                   suffixes: Optional[Sequence[str]] = (".py",),
                   max_file_bytes: int = 64_000, max_split_bytes: Optional[dict] = None,
                   chunk_chars: int = 400, shares: Sequence[float] = DEFAULT_SHARES) -> dict:
  """Writes `output_dir/{split}.jsonl` ({"text": piece} per line) and `manifest.json`.

  Files larger than `max_file_bytes` or not UTF-8 are left out (listed in the manifest as
  skipped).  `max_split_bytes` ({split: bytes}) caps a split: its files are taken in the order
  of their path hash until the cap.  Returns the manifest.
  """
  root = pathlib.Path(root)
  if not root.is_dir():
    raise CorpusError(f"corpus root {root} is not a directory")
  if len(shares) != len(SPLITS) or abs(sum(shares) - 1) > 1e-9 or min(shares) <= 0:
    raise CorpusError(f"shares {list(shares)}: expected {len(SPLITS)} positive numbers summing "
                      f"to 1, for splits {SPLITS}")
  caps = dict(max_split_bytes or {})
  unknown = set(caps) - set(SPLITS)
  if unknown:
    raise CorpusError(f"max_split_bytes has unknown splits {sorted(unknown)}; splits: {SPLITS}")
  by_split: dict[str, list] = {s: [] for s in SPLITS}
  skipped = []
  for path in _candidate_files(root, suffixes):
    relative = path.relative_to(root).as_posix()
    data = path.read_bytes()
    if len(data) > max_file_bytes:
      skipped.append({"path": relative, "reason": f"larger than {max_file_bytes} bytes"})
      continue
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError:
      skipped.append({"path": relative, "reason": "not UTF-8"})
      continue
    order = hashlib.sha256(b"order:" + relative.encode()).hexdigest()
    by_split[_split_of(relative, shares)].append(
        (order, relative, text, hashlib.sha256(data).hexdigest(), len(data)))
  files, pieces = [], {}
  for split in SPLITS:
    used, size = [], 0
    for order, relative, text, digest, nbytes in sorted(by_split[split]):
      if split in caps and size + nbytes > caps[split]:
        continue
      used.append((relative, text))
      size += nbytes
      files.append({"path": relative, "sha256": digest, "bytes": nbytes, "split": split})
    if not used:
      raise CorpusError(f"corpus root {root}: no files for split {split!r} (found "
                        f"{len(by_split[split])} candidates; suffixes {suffixes})")
    pieces[split] = [p for _, text in used for p in chunk_text(text, chunk_chars)]
  manifest = {"root": str(root), "suffixes": list(suffixes) if suffixes else None,
              "max_file_bytes": max_file_bytes, "max_split_bytes": caps,
              "chunk_chars": chunk_chars, "shares": list(shares),
              "splits": {s: {"files": sum(f["split"] == s for f in files),
                             "bytes": sum(f["bytes"] for f in files if f["split"] == s),
                             "examples": len(pieces[s])} for s in SPLITS},
              "files": files, "skipped": skipped}
  with outputs.TemporaryOutput(output_dir, overwrite=False) as staging:
    for split in SPLITS:
      with outputs.naming_errors(staging / f"{split}.jsonl"), \
          open(staging / f"{split}.jsonl", "w") as f:
        for piece in pieces[split]:
          f.write(json.dumps({"text": piece}) + "\n")
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=1))
  return manifest


@gin.configurable
def text_corpus_settings(directory: Optional[str] = None) -> pathlib.Path:
  """The prepared corpus directory: the gin binding, else $MAXNUCL_TEXT_CORPUS."""
  directory = directory or os.environ.get(ENV_DIRECTORY)
  if not directory:
    raise CorpusError(f"the text_corpus tasks need a prepared corpus directory: bind "
                      f"text_corpus_settings.directory or set ${ENV_DIRECTORY} "
                      f"(written by maxnucl.data.corpus.prepare_corpus / tools/reproduce.py)")
  return pathlib.Path(directory)


def read_split(split: str) -> list[str]:
  path = text_corpus_settings() / f"{split}.jsonl"
  if not path.is_file():
    raise CorpusError(f"text corpus split file {path} does not exist")
  texts = []
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      try:
        texts.append(json.loads(line)["text"])
      except (json.JSONDecodeError, KeyError, TypeError):
        raise CorpusError(f"{path}:{line_no}: expected a JSON object with a \"text\" "
                          f"string") from None
  return texts


def language_modelling_examples(split: str) -> list[dict[str, str]]:
  return [{"inputs": "", "targets": text} for text in read_split(split)]
