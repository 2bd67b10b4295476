"""Metric functions shared by the benchmarks: small pure functions of references and predictions.

Every function returns a fraction (accuracy and F1 in [0, 1], Matthews correlation in [-1, 1]);
benchmarks report them x 100.  Definitions follow T5 (`t5.evaluation.metrics`, which wraps
scikit-learn and the official SQuAD script), and the tests compare against those implementations:

  classification   accuracy, mean_multiclass_f1 (CB), binary_f1 (MultiRC F1a),
                   matthews_correlation (AX-b)
  question answer  normalize_squad, squad_exact_match, squad_f1, max_over_references (ReCoRD)
  grouped          grouped_exact_match (MultiRC: a question counts when all its answers are right)

A prediction outside the label set (a generated string that names no class, by convention -1)
is simply wrong: it never equals a reference and counts against every class it is not.
"""

from __future__ import annotations

import collections
import re
import string
from typing import Callable, Hashable, Sequence


def _check_lengths(what: str, references: Sequence, predictions: Sequence) -> None:
  if len(references) != len(predictions):
    raise ValueError(f"{what}: {len(references)} references but {len(predictions)} predictions")
  if not references:
    raise ValueError(f"{what}: no examples (a metric of nothing is undefined)")


# ---- classification ------------------------------------------------------------------------------

def accuracy(references: Sequence[Hashable], predictions: Sequence[Hashable]) -> float:
  """(1/n) sum_i [prediction_i == reference_i]."""
  _check_lengths("accuracy", references, predictions)
  return sum(r == p for r, p in zip(references, predictions)) / len(references)


def _f1(true_positives: int, false_positives: int, false_negatives: int) -> float:
  """2 TP / (2 TP + FP + FN): the harmonic mean of precision and recall; 0 when all are 0
  (scikit-learn's value for an undefined F1)."""
  denominator = 2 * true_positives + false_positives + false_negatives
  return 2 * true_positives / denominator if denominator else 0.0


def mean_multiclass_f1(references: Sequence[int], predictions: Sequence[int],
                       num_classes: int) -> float:
  """Macro F1: (1/K) sum_k F1_k over the classes k = 0..K-1, each class's F1 counting it as the
  positive class.  A class never predicted (or never present) still counts, with its F1 (often
  0), as in T5's `mean_multiclass_f1` (scikit-learn fbeta_score, labels=range(K), macro)."""
  _check_lengths("mean_multiclass_f1", references, predictions)
  total = 0.0
  for k in range(num_classes):
    tp = sum(r == k and p == k for r, p in zip(references, predictions))
    fp = sum(r != k and p == k for r, p in zip(references, predictions))
    fn = sum(r == k and p != k for r, p in zip(references, predictions))
    total += _f1(tp, fp, fn)
  return total / num_classes


def binary_f1(references: Sequence[int], predictions: Sequence[int]) -> float:
  """F1 of the positive class 1 over references in {0, 1}.  A prediction that is neither 0 nor 1
  is wrong whatever the reference: a false negative when the reference is 1, a false positive
  when it is 0 (T5's `f1_score_with_invalid`, MultiRC's F1a)."""
  _check_lengths("binary_f1", references, predictions)
  tp = sum(r == 1 and p == 1 for r, p in zip(references, predictions))
  fp = sum(r == 0 and p != 0 for r, p in zip(references, predictions))
  fn = sum(r == 1 and p != 1 for r, p in zip(references, predictions))
  return _f1(tp, fp, fn)


def matthews_correlation(references: Sequence[Hashable], predictions: Sequence[Hashable]) -> float:
  """Matthews correlation coefficient (Gorodkin's multiclass R_K, = phi for two classes):

      (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))

  with s examples, c correct, t_k references and p_k predictions of class k (classes: every
  value seen, so an invalid prediction is a class of its own).  0 when the denominator is 0
  (scikit-learn's `matthews_corrcoef` convention, e.g. a constant prediction)."""
  _check_lengths("matthews_correlation", references, predictions)
  s = len(references)
  c = sum(r == p for r, p in zip(references, predictions))
  t = collections.Counter(references)
  p = collections.Counter(predictions)
  covariance = c * s - sum(p[k] * t[k] for k in set(t) | set(p))
  variance_predictions = s * s - sum(v * v for v in p.values())
  variance_references = s * s - sum(v * v for v in t.values())
  denominator = (variance_predictions * variance_references) ** 0.5
  return covariance / denominator if denominator else 0.0


# ---- question answering (SQuAD v1.1 evaluation script) ------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)


def normalize_squad(text: str) -> str:
  """Lower-case, drop ASCII punctuation, drop the articles a/an/the, collapse whitespace."""
  text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
  text = re.sub(r"\b(a|an|the)\b", " ", text)
  return " ".join(text.split())


def squad_exact_match(reference: str, prediction: str) -> float:
  """1 if the normalised strings are equal, else 0."""
  return float(normalize_squad(reference) == normalize_squad(prediction))


def squad_f1(reference: str, prediction: str) -> float:
  """Token F1 of the normalised strings: with n common tokens (a multiset intersection),
  precision n / |prediction tokens|, recall n / |reference tokens|; 0 when n = 0."""
  prediction_tokens = normalize_squad(prediction).split()
  reference_tokens = normalize_squad(reference).split()
  common = sum((collections.Counter(prediction_tokens)
                & collections.Counter(reference_tokens)).values())
  if common == 0:
    return 0.0
  precision = common / len(prediction_tokens)
  recall = common / len(reference_tokens)
  return 2 * precision * recall / (precision + recall)


def max_over_references(metric: Callable[[str, str], float], references: Sequence[str],
                        prediction: str) -> float:
  """max_j metric(reference_j, prediction): a question with several gold answers (ReCoRD) is
  answered as well as its best-matched answer."""
  if not references:
    raise ValueError("max_over_references: no reference answers for the prediction "
                     f"{prediction!r} (an unlabelled example cannot be scored)")
  return max(metric(reference, prediction) for reference in references)


# ---- grouped -------------------------------------------------------------------------------------

def grouped_exact_match(groups: Sequence[Hashable], references: Sequence[Hashable],
                        predictions: Sequence[Hashable]) -> float:
  """Mean over groups g of [prediction_i == reference_i for every example i of g]: MultiRC's
  per-question exact match (a question's answers are examples sharing its group)."""
  _check_lengths("grouped_exact_match", references, predictions)
  if len(groups) != len(references):
    raise ValueError(f"grouped_exact_match: {len(groups)} groups but {len(references)} "
                     "references")
  all_right: dict[Hashable, bool] = {}
  for group, reference, prediction in zip(groups, references, predictions):
    all_right[group] = all_right.get(group, True) and reference == prediction
  return sum(all_right.values()) / len(all_right)
