"""Structured FFN neuron pruning (NUCL paper Sec. 4.2 and baselines).

  scores.py       the registry of removal criteria (one registered function per method)
  surgery.py      slicing U/V columns and W rows; compensating merges
  calibration.py  calibration sources and activation / loss-proxy statistics
  prune.py        prune_ffn_neurons(...): checkpoint in, smaller checkpoint + report out
  analysis.py     entropy histograms, LP concentration, overlap between methods
  io.py           layer-by-layer checkpoint reading / writing (the only storage-aware module)
  cli.py          the command lines maxnucl-prune and maxnucl-analyze (tools/*.py call them)
"""

from maxnucl.pruning.prune import PruningError, prune_ffn_neurons, select_layers
from maxnucl.pruning.scores import METHODS, register

__all__ = ["METHODS", "PruningError", "prune_ffn_neurons", "register", "select_layers"]
