"""The repository stands alone: no committed binaries, no pointers to files outside it."""

import pathlib
import subprocess

REPO = pathlib.Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", "build", "dist",
                "workdir", "runs"}
BINARY_SUFFIXES = (".whl", ".zip", ".tar.gz", ".egg", ".pyc", ".so", ".npy", ".pkl")


def _files():
  """What would be committed: in a git checkout the tracked files and the untracked ones that
  .gitignore does not exclude (so an ignored wheel folder for a device run does not count);
  elsewhere every file outside the usual build and environment folders."""
  listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                          cwd=REPO, capture_output=True, check=False)
  if listed.returncode == 0:
    for name in sorted(set(listed.stdout.decode().split("\0")) - {""}):
      if (REPO / name).is_file():
        yield REPO / name
    return
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
