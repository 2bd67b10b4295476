"""Parsing the gin configuration of a run, and refusing one that cannot be what the user meant.

    parse(["gin/demo_cpu.gin"], ["NUCL_ALPHA = 10.0"])   # files, then bindings; then checked

Gin paths such as `gin/demo_cpu.gin` and the files' own `include 'gin/base.gin'` are relative to
the working directory or, wherever the user stands, to `GIN_SEARCH_PATH`: the repository root in
a checkout (and an editable install), the package itself when installed from a wheel, which
ships the repository's `gin/` as `maxnucl/gin/` (setup.py).

Before gin reads anything, `check_sources` walks the files, their includes and the bindings as
gin will, and refuses in one line naming the file (or binding) and the line what gin would report
with a traceback or a dump of the whole configuration: an include cycle (gin recurses until
Python's stack is exhausted), an include that resolves to no file, text that is not UTF-8, an
`import` of a module that cannot be imported, and a `%MACRO` that is referenced but defined
nowhere (in the files, the bindings or the configuration parsed before).

Gin itself refuses a binding of an unknown configurable or parameter.  It accepts silently:
  * a macro that nothing reads (`NUCL_ALPH = 1000.0` for `NUCL_ALPHA`): the run would use the
    default and exit 0.  `check_macros` refuses it, naming the closest known macros;
  * a value of the wrong type (`train_loop.num_steps = 'five'`), which fails deep inside the run
    or, worse, works by accident.  `check_types` compares every binding of a maxnucl
    configurable (macros resolved) with the parameter's annotation and names the binding.
Values of the right type that make no sense (`checkpoint_every = 0`) are refused where they are
used, before any work (e.g. `train.train_loop`).

`recorded_binding(text, "create_data_iterator", "vocab")` reads one value back from a run's
recorded config (WORKDIR/operative_config.gin), macros resolved, without importing anything.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import difflib
import functools
import importlib
import inspect
import io
import logging
import os
import pathlib
import tokenize
import types
import typing
from typing import Any, Optional, Sequence

import gin
from gin import config as gin_internals
from gin import config_parser

_PACKAGE = pathlib.Path(__file__).resolve().parent
GIN_SEARCH_PATH = _PACKAGE if (_PACKAGE / "gin").is_dir() else _PACKAGE.parent
_MACRO = "gin.macro"


class GinConfigError(ValueError):
  """A gin file or binding that is refused (the message names it)."""


def parse(gin_files: Sequence[str], gin_params: Sequence[str]) -> None:
  """Parse gin files (relative to the working directory or `GIN_SEARCH_PATH`), then the
  bindings, then refuse unread macros and mistyped values."""
  parse_files_and_bindings(gin_files, gin_params)
  check_macros()
  check_types()


def parse_files_and_bindings(gin_files: Sequence[str], gin_params: Sequence[str],
                             finalize_config: bool = True) -> None:
  """`gin.parse_config_files_and_bindings` with `GIN_SEARCH_PATH` searched after the working
  directory, for the files and their includes; no checks (for partial configurations)."""
  _add_search_path()
  for path in gin_files:
    if not (pathlib.Path(path).exists() or (GIN_SEARCH_PATH / path).exists()):
      raise FileNotFoundError(f"gin file {path} does not exist (looked in the working directory "
                              f"and in {GIN_SEARCH_PATH})")
  with _without_gin_path_not_found():
    check_sources(gin_files, gin_params)
    # Files, then bindings, in two calls (gin's one call does the same), so that a syntax error
    # is reported with the file or the binding it is in.
    try:
      gin.parse_config_files_and_bindings(list(gin_files), None, finalize_config=False)
    except (SyntaxError, tokenize.TokenError) as error:
      raise GinConfigError(_syntax_error_message(error, "gin file", gin_files)) from None
    try:
      gin.parse_config_files_and_bindings(None, list(gin_params),
                                          finalize_config=finalize_config)
    except (SyntaxError, tokenize.TokenError) as error:
      raise GinConfigError(_syntax_error_message(error, "gin binding", gin_params)) from None


# ---- the sources, walked before gin reads them ------------------------------------------------------

MAX_INCLUDE_DEPTH = 32  # far deeper than any real configuration, far below Python's stack limit


@dataclasses.dataclass(frozen=True)
class _MacroReference:
  name: str


class _Recorder(config_parser.ParserDelegate):
  """Parses values without looking anything up, marking macro references."""

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return None

  def macro(self, macro_name):
    return _MacroReference(macro_name)


@dataclasses.dataclass
class _Sources:
  """What the walk collected: the macros defined and every reference with where it is."""
  defined: set
  references: list  # (macro name, where)


# Where each binding and macro of the configuration was read (the last one read wins, as in gin):
# (scope, selector as written, parameter) -> "gin file F, line N" / "gin binding '...'", so that
# the checks after parsing name the file and line (gin keeps no locations).
_BINDING_LOCATIONS: dict[tuple[str, str, str], str] = {}
_MACRO_LOCATIONS: dict[str, str] = {}


def _location(scope: str, selector: str, parameter: str) -> str:
  """Where a parsed binding (its complete selector) was read, or ""."""
  for (where_scope, written, where_parameter), where in reversed(_BINDING_LOCATIONS.items()):
    if (where_scope == scope and where_parameter == parameter
        and (selector == written or selector.endswith("." + written))):
      return where
  return ""


def check_sources(gin_files: Sequence[str], gin_params: Sequence[str]) -> None:
  """Walk the files (their includes, recursively) and the bindings as gin will read them, and
  refuse (GinConfigError, one line naming the file and line or the binding) an include cycle,
  an include of no file, text that is not UTF-8, an import that fails and a macro referenced
  but defined nowhere."""
  if not gin_internals._CONFIG:  # pylint: disable=protected-access
    _BINDING_LOCATIONS.clear()  # a fresh configuration: forget an earlier one's locations
    _MACRO_LOCATIONS.clear()
  sources = _Sources(defined={scope for (scope, selector) in gin_internals._CONFIG  # pylint: disable=protected-access
                              if selector == _MACRO}, references=[])
  for path in gin_files:
    _walk_file(path, _resolve(path), (), sources)
  bindings = "\n".join(gin_params)
  lines = bindings.splitlines()

  def binding_at(line: int) -> str:
    return (f"gin binding {lines[line - 1]!r}" if 1 <= line <= len(lines)
            else f"gin binding(s) {', '.join(map(repr, gin_params))}")
  _walk_text(bindings, None, binding_at, (), sources)
  for name, where in sources.references:
    if name not in sources.defined and not gin_internals._CONSTANTS.matching_selectors(name):  # pylint: disable=protected-access
      known = ", ".join(sorted(sources.defined)) or "none"
      raise GinConfigError(f"{where}: macro %{name} is not defined (no `{name} = ...` in the "
                           f"gin files or bindings; defined: {known})")


def _resolve(path: str) -> Optional[tuple[str, Any]]:
  """(file, reader) as gin's `parse_config_file` finds it: an absolute path as it is, a relative
  one under each search path in turn (the working directory first), with each registered
  reader; None when no reader finds it."""
  prefixes = gin_internals._LOCATION_PREFIXES if not os.path.isabs(path) else [""]  # pylint: disable=protected-access
  for prefix in prefixes:
    candidate = os.path.join(prefix, path)
    for reader, exists in gin_internals._FILE_READERS:  # pylint: disable=protected-access
      try:
        found = exists(candidate)
      except (OSError, ValueError):
        found = False
      if found:
        return candidate, reader
  return None


def _read_text(path: str, reader) -> str:
  """The file's text; GinConfigError naming the file and line where it is not UTF-8."""
  if reader is open:
    with open(path, "rb") as f:
      data = f.read()
  else:
    with reader(path) as f:
      data = f.read()
  if isinstance(data, str):
    return data
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    raise GinConfigError(f"gin file {path}, line {line}: not UTF-8 text ({e.reason} at byte "
                         f"{e.start})") from None


def _walk_file(given: str, found: Optional[tuple[str, Any]], stack: tuple, sources: _Sources,
               included_at: str = "") -> None:
  if found is None:
    raise GinConfigError(f"{included_at or 'gin file ' + repr(given)}: no such gin file "
                         f"{given!r} (looked in {', '.join(_search_paths())})")
  path, reader = found
  key = os.path.realpath(path) if reader is open else path
  if key in stack:
    cycle = " -> ".join(os.path.basename(p) for p in stack[stack.index(key):] + (key,))
    what = "includes itself" if len(stack) - stack.index(key) == 1 else f"is a cycle ({cycle})"
    raise GinConfigError(f"{included_at}: include {given!r} {what}: a gin file cannot include "
                         f"itself, directly or through other files")
  if len(stack) >= MAX_INCLUDE_DEPTH:
    raise GinConfigError(f"{included_at}: includes nested deeper than {MAX_INCLUDE_DEPTH} files")
  try:
    text = _read_text(path, reader)
  except OSError as e:
    raise GinConfigError(f"gin file {path}: cannot be read ({e.strerror or e})") from None
  _walk_text(text, path, lambda line: f"gin file {path}, line {line}", stack + (key,), sources)


def _search_paths() -> list[str]:
  return [p or "the working directory" for p in gin_internals._LOCATION_PREFIXES]  # pylint: disable=protected-access


def _walk_text(text: str, filename: Optional[str], where, stack: tuple,
               sources: _Sources) -> None:
  """The statements of one file (`filename`) or of the bindings (None); `where(line)` names a
  line in messages."""
  source = io.StringIO(text)
  if filename is not None:
    source.name = filename
  statements = config_parser.ConfigParser(source, _Recorder())
  while True:
    try:
      statement = next(statements)
    except StopIteration:
      return
    except (SyntaxError, tokenize.TokenError) as error:
      if filename is None:
        raise GinConfigError(_syntax_error_message(error, "gin binding", text.splitlines())
                             ) from None
      raise GinConfigError(_syntax_error_message(error, "gin file", [filename])) from None
    except (ValueError, RecursionError, MemoryError, OverflowError) as error:
      raise GinConfigError(f"{where(_parser_line(statements))}: cannot be "
                           f"parsed ({_first_line(error)})") from None
    line = statement.location.line_num
    if isinstance(statement, config_parser.IncludeStatement):
      _walk_file(statement.filename, _resolve(statement.filename), stack, sources,
                 included_at=where(line))
    elif isinstance(statement, config_parser.ImportStatement):
      _check_import(statement, where(line))
    elif isinstance(statement, config_parser.BindingStatement):
      if not statement.arg_name:  # NAME = value: a macro
        name = (f"{statement.scope}/{statement.selector}" if statement.scope
                else statement.selector)
        sources.defined.add(name)
        _MACRO_LOCATIONS[name] = where(line)
      else:
        key = (statement.scope or "", statement.selector, statement.arg_name)
        _BINDING_LOCATIONS.pop(key, None)  # re-inserted last: the binding gin keeps
        _BINDING_LOCATIONS[key] = where(line)
      for name in _macro_names(statement.value):
        sources.references.append((name, where(line)))


def _parser_line(parser) -> Any:
  token = getattr(parser, "_current_token", None)  # gin's parser keeps no public position
  return token.start[0] if token is not None else "?"


def _check_import(statement, where: str) -> None:
  """Import the module as gin will (its `from a import b` imports module a.b)."""
  if statement.module.startswith("__gin__."):
    return
  try:
    importlib.import_module(statement.module)
  except Exception as error:  # noqa: BLE001 - any failure of the import is the file's problem
    raise GinConfigError(f"{where}: {statement.format()}: {type(error).__name__}: "
                         f"{_first_line(error)}") from None


def _macro_names(value: Any) -> list[str]:
  if isinstance(value, _MacroReference):
    return [value.name]
  if isinstance(value, dict):
    return [n for v in value.values() for n in _macro_names(v)]
  if isinstance(value, (list, tuple, set)):
    return [n for v in value for n in _macro_names(v)]
  return []


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else type(error).__name__


def _syntax_error_message(error: Exception, what: str, texts: Sequence[str]) -> str:
  """One line naming where gin's parser stopped: `what` is "gin file" (texts: the files) or
  "gin binding" (texts: the bindings, which gin parses as one string, a line each)."""
  reason, location = (error.args + (None, None))[:2]
  if isinstance(error, tokenize.TokenError):  # no position: an unclosed bracket or string
    return f"{what}(s) {', '.join(map(repr, texts))}: {reason} (an unclosed bracket or quote?)"
  line = getattr(location, "line_num", None)
  if what == "gin file" and getattr(location, "filename", None):
    content = (location.line_content or "").strip()
    return f"gin file {location.filename}, line {line}: {reason} ({content!r})"
  lines = "\n".join(texts).splitlines()
  if line and 1 <= line <= len(lines):
    return f"gin binding {lines[line - 1]!r}: {reason}"
  return f"{what}(s) {', '.join(map(repr, texts))}: {reason}"


@functools.cache
def _add_search_path() -> None:
  gin.add_config_file_search_path(str(GIN_SEARCH_PATH))  # once: gin appends every call


class _GinPathNotFound(logging.Filter):
  """Matches gin's `ERROR:root:Path not found: gin/...`: its package-resource reader logs it for
  every search path that lacks a file, even when a later one has it (and reads `gin/x` as a
  module of gin-config's own `gin` package).  A file in no search path is still an OSError."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.msg == "Path not found: %s"
                and pathlib.Path(record.pathname).match("gin/resource_reader.py"))


@contextlib.contextmanager
def _without_gin_path_not_found():
  root, quiet = logging.getLogger(), _GinPathNotFound()
  root.addFilter(quiet)
  try:
    yield
  finally:
    root.removeFilter(quiet)


# ---- macros ---------------------------------------------------------------------------------------

def _references(value: Any, out: set) -> None:
  """Every macro name referenced (`%NAME`) inside a binding value."""
  if isinstance(value, gin_internals.ConfigurableReference):
    if value.configurable.selector == _MACRO:
      out.add(value.scoped_selector.rsplit("/", 1)[0])
  elif isinstance(value, dict):
    for item in value.values():
      _references(item, out)
  elif isinstance(value, (list, tuple, set)):
    for item in value:
      _references(item, out)


def check_macros() -> None:
  """Refuse a macro that no binding (and no other read macro) refers to."""
  defined, referenced = set(), set()
  for (scope, selector), bindings in gin_internals._CONFIG.items():  # pylint: disable=protected-access
    if selector == _MACRO:
      defined.add(scope)
    for value in bindings.values():
      _references(value, referenced)
  unread = sorted(defined - referenced)
  if unread:
    hints = []
    for name in unread:
      close = difflib.get_close_matches(name, sorted(referenced), n=3, cutoff=0.6)
      hints.append(f"{name}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
    where = _MACRO_LOCATIONS.get(unread[0])
    raise GinConfigError(f"{where + ': ' if where else ''}gin macro(s) defined but read by "
                         f"nothing: {', '.join(hints)}; macros in use: "
                         f"{', '.join(sorted(referenced))}")


# ---- types ----------------------------------------------------------------------------------------

def _resolve_macros(value: Any) -> Any:
  if isinstance(value, gin_internals.ConfigurableReference):
    if value.configurable.selector == _MACRO:
      scope = value.scoped_selector.rsplit("/", 1)[0]
      return _resolve_macros(gin_internals._CONFIG.get((scope, _MACRO), {}).get(  # pylint: disable=protected-access
          "value", _UNKNOWN))
    return _UNKNOWN  # a configurable's result: not checked here
  if isinstance(value, (list, tuple)):
    return type(value)(_resolve_macros(v) for v in value)
  if isinstance(value, dict):
    return {k: _resolve_macros(v) for k, v in value.items()}
  return value


_UNKNOWN = object()


def _matches(value: Any, hint: Any) -> bool:
  """Whether a parsed gin value can be what the annotation `hint` asks for (lenient where the
  annotation is broad: Any, callables, arrays, unions of those)."""
  if value is _UNKNOWN or hint is Any or hint is inspect.Parameter.empty:
    return True
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType):
    return any(_matches(value, h) for h in typing.get_args(hint))
  if hint is type(None):
    return value is None
  if hint is bool:
    return isinstance(value, bool)
  if hint is int:
    return isinstance(value, int) and not isinstance(value, bool)
  if hint is float:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
  if hint is str:
    return isinstance(value, str)
  if origin in (list, tuple, collections.abc.Sequence) or hint in (list, tuple):
    return isinstance(value, (list, tuple))
  if origin in (dict, collections.abc.Mapping) or hint is dict:
    return isinstance(value, dict)
  return True  # anything else (objects, callables, arrays) is not checked


def _hints(fn) -> dict:
  target = fn.__init__ if inspect.isclass(fn) else fn
  try:
    return typing.get_type_hints(target)
  except Exception:  # noqa: BLE001 - an annotation that cannot be evaluated is not checked
    return {}


def check_types() -> None:
  """Refuse a binding of a maxnucl configurable whose value contradicts the annotation."""
  for (scope, selector), bindings in gin_internals._CONFIG.items():  # pylint: disable=protected-access
    if selector == _MACRO or not selector.startswith("maxnucl."):
      continue
    configurable = gin_internals._REGISTRY.get_match(selector)  # pylint: disable=protected-access
    if configurable is None:
      continue
    hints = _hints(configurable.wrapped)
    for parameter, value in bindings.items():
      hint = hints.get(parameter)
      if hint is None:
        continue
      resolved = _resolve_macros(value)
      if not _matches(resolved, hint):
        expected = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
        macros: set = set()
        _references(value, macros)
        where = [_location(scope, selector, parameter)] + [
            f"%{m} at {_MACRO_LOCATIONS[m]}" for m in sorted(macros) if m in _MACRO_LOCATIONS]
        where = "; ".join(w for w in where if w)
        raise GinConfigError(f"gin binding {configurable.name}.{parameter} = {resolved!r}: "
                             f"expected {expected}" + (f" ({where})" if where else ""))


def error_message(error: BaseException) -> str:
  """The error's own message as the one line a command line prints before exiting 2: without
  the "In call to configurable ..." lines gin appends to exceptions raised inside configurables
  (the message already names the binding), its other lines joined.  Those are the location gin
  gives a parse error ("In bindings string line 1" / "In file ..., line 3", then the line) and
  the details a message lists below its first line (a missing dataset's roots and expected
  files)."""
  lines = [line.strip() for line in
           str(error).split("\n  In call to configurable")[0].splitlines() if line.strip()]
  message = lines[0] if lines else type(error).__name__
  for previous, line in zip(lines, lines[1:]):
    if previous.startswith("In "):
      separator = ": "
    elif previous.endswith((".", ":", ";")):
      separator = " "
    else:
      separator = "; "
    message += separator + line
  return message


# ---- a run's recorded configuration ---------------------------------------------------------------

class _Unresolved(config_parser.ParserDelegate):
  """Parses references without looking anything up: nothing needs to be imported or registered."""

  def configurable_reference(self, scoped_configurable_name, evaluate):
    return ("@", scoped_configurable_name, evaluate)

  def macro(self, macro_name):
    return ("%", macro_name)


def recorded_binding(gin_text: str, selector: str, param: str) -> Any:
  """The value that a recorded gin config (a training workdir's operative_config.gin or
  config.gin) binds to `selector.param` outside any scope, a macro resolved; None when it binds
  none.  Only parsed: the configurables it names need not be importable."""
  macros, value = {}, None
  for statement in config_parser.ConfigParser(gin_text, _Unresolved()):
    if not isinstance(statement, config_parser.BindingStatement) or statement.scope:
      continue
    if not statement.arg_name:  # NAME = value: a macro
      macros[statement.selector] = statement.value
    elif statement.arg_name == param and statement.selector.rsplit(".", 1)[-1] == selector:
      value = statement.value
  seen = set()
  while isinstance(value, tuple) and value[:1] == ("%",) and value[1] not in seen:
    seen.add(value[1])
    value = macros.get(value[1])
  return value
