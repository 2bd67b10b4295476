"""Checkpoint layouts of other codebases mapped to and from the maxnucl params tree."""
