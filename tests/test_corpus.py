"""The local text corpus (maxnucl.data.corpus) and its registered tasks."""

import hashlib
import json

import pytest

from maxnucl.data import catalog, corpus


def _tree(root, files):
  for name, text in files.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())


def _files(n):
  return {f"pkg{i % 3}/mod_{i}.py": "".join(f"x_{i}_{j} = {j}\n" for j in range(i % 7 + 1))
          for i in range(n)}


def test_chunks_cut_on_lines_within_the_limit_and_keep_all_text():
  text = "a = 1\n\n" + "b" * 25 + "\nshort\n   \n" + "c = 3\n" * 4
  pieces = corpus.chunk_text(text, 10)
  assert all(len(p) <= 10 for p in pieces)
  assert all(p.strip() for p in pieces)
  # nothing but blank-only pieces is lost, in order
  assert "".join(pieces).replace("\n", "").replace(" ", "") == \
      text.replace("\n", "").replace(" ", "")
  # a piece ends on a line boundary unless a single line was longer than the limit
  assert [p for p in pieces if not p.endswith("\n")] == ["b" * 10, "b" * 10]


def test_split_of_a_file_depends_on_its_path_alone(tmp_path):
  files = _files(300)
  _tree(tmp_path / "a", files)
  first = corpus.prepare_corpus(tmp_path / "a", tmp_path / "out_a")
  _tree(tmp_path / "b", dict(list(files.items())[::2]))
  third = corpus.prepare_corpus(tmp_path / "b", tmp_path / "out_c")
  split_a = {f["path"]: f["split"] for f in first["files"]}
  split_c = {f["path"]: f["split"] for f in third["files"]}
  assert split_c == {p: split_a[p] for p in split_c}
  assert set(split_a) == set(files)
  assert set(first["splits"]) == set(corpus.SPLITS)


def test_manifest_records_hashes_and_the_split_files_hold_the_text(tmp_path):
  files = _files(30)
  files["big.py"] = "y = 2\n" * 100
  files["latin1.py"] = "s = '\xe9'\n".encode("latin-1")
  files["notes.txt"] = "not python\n"
  _tree(tmp_path / "root", files)
  manifest = corpus.prepare_corpus(tmp_path / "root", tmp_path / "out", max_file_bytes=500)
  used = {f["path"]: f for f in manifest["files"]}
  assert set(used) == set(_files(30))  # .txt not a suffix; big.py too large; latin-1 not UTF-8
  assert {s["path"] for s in manifest["skipped"]} == {"big.py", "latin1.py"}
  for path, entry in used.items():
    data = (tmp_path / "root" / path).read_bytes()
    assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert entry["bytes"] == len(data)
  assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest
  for split in corpus.SPLITS:
    texts = [json.loads(line)["text"]
             for line in (tmp_path / "out" / f"{split}.jsonl").read_text().splitlines()]
    expected = "".join(files[f["path"]] for f in manifest["files"] if f["split"] == split)
    assert sorted("".join(texts).splitlines()) == sorted(expected.splitlines())
    assert manifest["splits"][split]["examples"] == len(texts)


def test_split_caps_are_respected(tmp_path):
  _tree(tmp_path / "root", _files(60))
  manifest = corpus.prepare_corpus(tmp_path / "root", tmp_path / "out",
                                   max_split_bytes={"train": 300})
  assert 0 < manifest["splits"]["train"]["bytes"] <= 300
  with pytest.raises(corpus.CorpusError, match="unknown splits.*'dev'"):
    corpus.prepare_corpus(tmp_path / "root", tmp_path / "o2", max_split_bytes={"dev": 1})


def test_bad_roots_and_empty_splits_are_refused_and_nothing_is_written(tmp_path):
  with pytest.raises(corpus.CorpusError, match="not a directory"):
    corpus.prepare_corpus(tmp_path / "missing", tmp_path / "out")
  _tree(tmp_path / "root", _files(2))
  with pytest.raises(corpus.CorpusError, match="no files for split"):
    corpus.prepare_corpus(tmp_path / "root", tmp_path / "out")
  assert not (tmp_path / "out").exists()
  with pytest.raises(corpus.CorpusError, match="shares"):
    corpus.prepare_corpus(tmp_path / "root", tmp_path / "out", shares=(1, 0, 0, 0))
  _tree(tmp_path / "r2", _files(40))
  corpus.prepare_corpus(tmp_path / "r2", tmp_path / "out2")
  with pytest.raises(FileExistsError, match="already exists"):
    corpus.prepare_corpus(tmp_path / "r2", tmp_path / "out2")


def test_registered_tasks_read_the_prepared_directory(tmp_path, monkeypatch):
  _tree(tmp_path / "root", _files(40))
  corpus.prepare_corpus(tmp_path / "root", tmp_path / "out")
  monkeypatch.setenv(corpus.ENV_DIRECTORY, str(tmp_path / "out"))
  train = catalog.get_task("text_corpus").examples("train")
  assert train == [{"inputs": "", "targets": t} for t in corpus.read_split("train")]
  finetune = catalog.get_task("text_corpus_finetune").examples("train")
  assert [e["targets"] for e in finetune] == corpus.read_split("finetune")
  mixed = catalog.text_examples("text_corpus_finetune_arithmetic", "train", seed=0,
                                shuffle=True, mixture_size=200)
  assert any(e["inputs"].startswith("Q: ") for e in mixed)
  assert any(e["inputs"] == "" for e in mixed)


def test_missing_directory_and_malformed_lines_name_the_setting_and_line(tmp_path, monkeypatch):
  monkeypatch.delenv(corpus.ENV_DIRECTORY, raising=False)
  with pytest.raises(corpus.CorpusError, match="MAXNUCL_TEXT_CORPUS"):
    catalog.get_task("text_corpus").examples("train")
  (tmp_path / "train.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
  monkeypatch.setenv(corpus.ENV_DIRECTORY, str(tmp_path))
  with pytest.raises(corpus.CorpusError, match=r"train.jsonl:2: expected a JSON object"):
    corpus.read_split("train")
