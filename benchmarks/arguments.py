"""The benchmarks' argument checks: a bad value ends the script with argparse's error (the usage,
then one `error:` line naming the argument; exit 2) before any model is built or anything is
written.

    parser.add_argument("--layers", type=arguments.at_least(2), default=4)
    parser.add_argument("--json", type=arguments.output_file, default=None)
    args = parser.parse_args()
    cfg = arguments.model_config(parser, args.preset, num_layers=args.layers)
"""

from __future__ import annotations

import argparse
import pathlib
from typing import Any, Callable, NoReturn

from maxnucl import outputs


def at_least(minimum: int) -> Callable[[str], int]:
  """An argparse type: an integer >= `minimum`."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= {minimum}") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"{value}: expected an integer >= {minimum}")
    return value
  parse.__name__ = f"integer >= {minimum}"
  return parse


positive_int = at_least(1)
nonnegative_int = at_least(0)


def _number(text: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{text!r}: expected a number") from None


def positive_float(text: str) -> float:
  value = _number(text)
  if not value > 0:
    raise argparse.ArgumentTypeError(f"{text}: expected a number > 0")
  return value


def nonnegative_float(text: str) -> float:
  value = _number(text)
  if not value >= 0:
    raise argparse.ArgumentTypeError(f"{text}: expected a number >= 0")
  return value


def boolean(text: str) -> bool:
  if text.lower() in ("1", "true", "yes"):
    return True
  if text.lower() in ("0", "false", "no"):
    return False
  raise argparse.ArgumentTypeError(f"{text!r}: expected true or false")


def output_file(text: str) -> str:
  """A file the run writes at its end (--json): refused now if it could not be written then."""
  try:
    outputs.check_output_file(text, {}, flag="file")
  except outputs.OutputPathError as error:
    raise argparse.ArgumentTypeError(str(error)) from None
  return text


def work_directory(text: str) -> str:
  """A --workdir: a directory, or a path where one can be made."""
  path = pathlib.Path(text)
  if path.exists() and not path.is_dir():
    raise argparse.ArgumentTypeError(f"{text} exists and is not a directory")
  try:
    outputs.check_output_path(path, {}, flag="directory", overwrite=None, replaces=False)
  except outputs.OutputPathError as error:
    raise argparse.ArgumentTypeError(str(error)) from None
  return text


def model_config(parser: argparse.ArgumentParser, preset: str, **overrides: Any):
  """`models.get_config(preset, **overrides)`; an unknown preset or a bad field is the
  parser's error."""
  from maxnucl import models  # pylint: disable=import-outside-toplevel
  try:
    return models.get_config(preset, **overrides)
  except models.ConfigError as error:
    fail(parser, str(error))


def fail(parser: argparse.ArgumentParser, message: str) -> NoReturn:
  """parser.error: the usage, then `PROG: error: MESSAGE` as one line; exit 2."""
  parser.error(" ".join(message.split()))
