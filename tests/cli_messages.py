"""What a refused command printed: its message lines without argparse's usage block."""


def message_lines(stderr: str) -> list[str]:
  """stderr without argparse's usage block (the `usage:` line and its indented continuation)."""
  lines = stderr.splitlines()
  if len(lines) > 1 and lines[0].startswith("usage:"):
    lines = lines[1:]
    while lines and lines[0].startswith(" "):
      lines = lines[1:]
  return lines
