"""Loss library: token NLL, NUCL (Stahlberg & Kumar 2025), inter-neuron diversity, logit
distillation from a teacher and a registry of named loss terms.

    total, metrics = total_loss(params, logits, batch, cfg, terms={"nucl_mstd": 100.0})

See docs/losses.md for the formulas, normalisation, zero-row treatment and gin bindings.
"""

from maxnucl.losses.distill import (TEACHER_DTYPES, TEACHER_LOGITS, Distillation, distill,
                                    distill_kl, token_kl)
from maxnucl.losses.nll import NORMALIZATIONS, nll, reduce_tokens, token_log_z, z_loss
from maxnucl.losses.nucl import (MATRIX_VALUES, TARGETS, VARIANTS, ZERO_ROW_MAX_ABS, layer_names,
                                 mean_pairwise_similarity, nucl, nucl_rows, outgoing_entropy,
                                 outgoing_entropy_rows, target_matrices)
from maxnucl.losses.registry import LOSS_TERMS, register_term, total_loss

__all__ = [
    "Distillation", "TEACHER_DTYPES", "TEACHER_LOGITS", "distill", "distill_kl", "token_kl",
    "LOSS_TERMS", "MATRIX_VALUES", "NORMALIZATIONS", "TARGETS", "VARIANTS", "ZERO_ROW_MAX_ABS",
    "layer_names", "mean_pairwise_similarity", "nll", "nucl", "nucl_rows", "outgoing_entropy",
    "outgoing_entropy_rows", "reduce_tokens", "register_term", "target_matrices", "token_log_z",
    "total_loss", "z_loss",
]
