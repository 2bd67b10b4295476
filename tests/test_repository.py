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


def _imports(path: pathlib.Path, module: str, modules: set) -> set:
  """The maxnucl modules `module` (at `path`) imports, at its top or inside functions; imports
  under `if TYPE_CHECKING:` (annotations only) do not run and do not count."""
  import ast  # pylint: disable=import-outside-toplevel
  tree = ast.parse(path.read_text())
  typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
  package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
  found = set()
  for node in ast.walk(tree):
    if id(node) in typing_only:
      continue
    if isinstance(node, ast.Import):
      found |= {a.name for a in node.names if a.name in modules}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([node.module] if node.module else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        found |= {full} if full in modules else ({base} if base in modules else set())
  return found - {module}


def test_no_two_modules_import_each_other():
  # A pair that imports each other (even one lazily, inside a function) is one concern split in
  # two files, or a layering mistake: the lower module must not know the higher one.
  paths = {}
  for path in (REPO / "maxnucl").rglob("*.py"):
    name = ".".join(path.relative_to(REPO).with_suffix("").parts)
    paths[name.removesuffix(".__init__")] = path
  graph = {m: _imports(p, m, set(paths)) for m, p in paths.items()}
  pairs = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets
                  if a in graph[b]})
  assert pairs == []
