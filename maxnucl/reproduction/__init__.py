"""The small-scale reproduction of the papers' findings (tools/reproduce.py, docs/reproduction.md):
`stages` runs train / fine-tune / prune / analyse / export on a local corpus and caches each
stage's result; `report` turns the results into tables, verdicts and plots."""
