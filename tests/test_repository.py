"""The repository stands alone: no committed binaries, no pointers to files outside it."""

import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", "build", "dist",
                "workdir", "runs"}
BINARY_SUFFIXES = (".whl", ".zip", ".tar.gz", ".egg", ".pyc", ".so", ".npy", ".pkl")


def _files():
  for path in REPO.rglob("*"):
    parts = set(path.relative_to(REPO).parts)
    if path.is_file() and not parts & SKIPPED_DIRS and not any(
        p.endswith(".egg-info") for p in parts):
      yield path


def test_no_binary_artifacts_are_in_the_tree():
  binaries = [str(p.relative_to(REPO)) for p in _files() if p.name.endswith(BINARY_SUFFIXES)]
  assert binaries == []
  assert "*.whl" in (REPO / ".gitignore").read_text().split()


def test_docs_and_code_do_not_point_outside_the_repository():
  offenders = []
  for path in _files():
    if path.suffix in (".py", ".md", ".gin", ".txt", ".cfg", ".toml") and path != pathlib.Path(
        __file__):
      text = path.read_text(errors="ignore")
      if "../shared" in text or "shared/reference" in text or "shared/papers" in text:
        offenders.append(str(path.relative_to(REPO)))
  assert offenders == []
