"""Cutting neurons out of a gated FFN, and the compensating merges of the classical methods.

Neuron j of a layer is column j of U (gate) and V (up), both [d, m], and row j of W (out) [m, d].
Removing it slices all three; the compensating methods first fold the removed neuron's outgoing
row W_j into surviving rows (W_k += lambda_k W_j), which is exact when a_j = sum_k lambda_k a_k.
All arithmetic here is float64 numpy; results are cast back to the stored dtype by the caller.
"""

from __future__ import annotations

import numpy as np

from maxnucl.ffn import GATE, OUT, UP


def slice_ffn(ffn: dict[str, np.ndarray], kept: np.ndarray) -> dict[str, np.ndarray]:
  """Keep neurons `kept` (sorted indices): U[:, kept], V[:, kept], W[kept, :]."""
  kept = np.asarray(kept, np.int64)
  return {GATE: np.ascontiguousarray(ffn[GATE][:, kept]),
          UP: np.ascontiguousarray(ffn[UP][:, kept]),
          OUT: np.ascontiguousarray(ffn[OUT][kept, :])}


def top_removals(priority: np.ndarray, num_remove: int) -> np.ndarray:
  """The `num_remove` neurons with the highest priority (ties: lower index first).

  A priority of -inf marks a protected neuron, which is never returned.
  """
  order = np.lexsort((np.arange(priority.size), -priority))[:num_remove]
  if num_remove and np.isneginf(priority[order]).any():
    raise ValueError(f"cannot remove {num_remove} of {priority.size} neurons: only "
                     f"{int(np.sum(~np.isneginf(priority)))} are not protected")
  return order


# ---- Srinivas & Babu (2015), GLU adaptation --------------------------------------------------------

def merge_costs(gate: np.ndarray, up: np.ndarray, out: np.ndarray):
  """Pairwise "delete j, merge into i" quantities.

  Returns (dist [m, m], scale [m, m], wsq [m]) with
    dist[j, i]  = ||U_j - U_i||^2 + ||V_j - c_ji V_i||^2   (inf on the diagonal)
    scale[j, i] = c_ji = <V_j, V_i> / ||V_i||^2           (best up-projection scale)
    wsq[j]      = mean_k W_jk^2
  The gate passes through a non-homogeneous GELU/SiLU, so gate rows are compared directly; the up
  projection is linear, so V_j = c V_i makes a_j = c a_i exactly and the merge W_i += c W_j is then
  lossless.  Costs are O(m^2) memory and O(m^2 d) time.
  """
  u = np.asarray(gate, np.float64).T
  v = np.asarray(up, np.float64).T
  gram_u = u @ u.T
  norm_u = np.diag(gram_u).copy()
  dist = norm_u[:, None] + norm_u[None, :] - 2.0 * gram_u
  del gram_u
  gram_v = v @ v.T
  norm_v = np.diag(gram_v).copy()
  safe = np.where(norm_v > 0, norm_v, 1.0)
  scale = np.where(norm_v[None, :] > 0, gram_v / safe[None, :], 0.0)
  dist += norm_v[:, None] - np.where(norm_v[None, :] > 0, gram_v ** 2 / safe[None, :], 0.0)
  del gram_v
  np.maximum(dist, 0.0, out=dist)
  np.fill_diagonal(dist, np.inf)
  wsq = np.mean(np.asarray(out, np.float64) ** 2, axis=1)
  return dist, scale, wsq


def merge_greedy(ffn: dict[str, np.ndarray], num_remove: int):
  """Greedy Srinivas-Babu: repeatedly delete the neuron j with the smallest
  s_j = wsq_j * min_i dist[j, i] and fold it into its most similar survivor i: W_i += c_ji W_j.

  After every deletion the affected costs are recomputed (the survivor's wsq changed; neurons whose
  best partner was j look for a new one).  Returns (removed in order, new W [m, d] float64,
  initial cost per neuron [m]).
  """
  dist, scale, wsq = merge_costs(ffn[GATE], ffn[UP], ffn[OUT])
  m = wsq.size
  w = np.array(ffn[OUT], np.float64)
  best = np.argmin(dist, axis=1) if m > 1 else np.zeros(m, np.int64)
  best_dist = dist[np.arange(m), best] if m > 1 else np.full(m, np.inf)
  cost = wsq * best_dist
  initial = cost.copy()
  alive = np.ones(m, bool)
  removed = []
  for _ in range(min(num_remove, m)):
    if alive.sum() == 1:  # nothing left to merge into: remove without compensation
      j = int(np.flatnonzero(alive)[0])
      alive[j] = False
      removed.append(j)
      break
    j = int(np.argmin(np.where(alive, cost, np.inf)))
    i = int(best[j])
    w[i] += scale[j, i] * w[j]
    alive[j] = False
    removed.append(j)
    cost[j] = np.inf
    dist[:, j] = np.inf
    wsq[i] = np.mean(w[i] ** 2)
    stale = np.flatnonzero(alive & (best == j))
    if stale.size:
      best[stale] = np.argmin(dist[stale], axis=1)
      best_dist[stale] = dist[stale, best[stale]]
      cost[stale] = wsq[stale] * best_dist[stale]
    cost[i] = wsq[i] * best_dist[i]
  return np.asarray(removed, np.int64), w, initial


# ---- Stahlberg & Byrne (2017), data-free GLU adaptation --------------------------------------------

def _lstsq_costs(gram_u_dist, gram_v, wsq, alive, candidates, neighbours, ridge):
  """For each candidate j: lambda over its `neighbours` nearest alive gate rows (by ||U_k - U_j||).

  Returns (cost [n], neighbour indices [n, K], lambdas [n, K]) with
    cost_j = wsq_j * ( ||V_j - V_N lambda||^2 + sum_k lambda_k^2 ||U_k - U_j||^2 ).
  """
  n_alive = int(alive.sum())
  k = min(neighbours, n_alive - 1)
  cand = np.asarray(candidates, np.int64)
  if k <= 0:
    return wsq[cand] * np.diag(gram_v)[cand], np.zeros((cand.size, 0), np.int64), \
        np.zeros((cand.size, 0))
  dist = gram_u_dist[cand].copy()
  dist[:, ~alive] = np.inf
  dist[np.arange(cand.size), cand] = np.inf
  nbr = np.argpartition(dist, k - 1, axis=1)[:, :k]
  g = gram_v[nbr[:, :, None], nbr[:, None, :]]  # [n, K, K]
  b = gram_v[nbr, cand[:, None]]  # [n, K]
  eps = ridge * (np.trace(g, axis1=1, axis2=2) / k + 1e-30)
  lam = np.linalg.solve(g + eps[:, None, None] * np.eye(k), b[..., None])[..., 0]
  resid = gram_v[cand, cand] - 2 * np.sum(lam * b, 1) + np.einsum("nk,nkl,nl->n", lam, g, lam)
  gate_mismatch = np.sum(lam ** 2 * np.take_along_axis(dist, nbr, 1), axis=1)
  return wsq[cand] * (np.maximum(resid, 0.0) + gate_mismatch), nbr, lam


def least_squares_greedy(ffn: dict[str, np.ndarray], num_remove: int, *, neighbours: int = 16,
                         batch_size: int = 0, ridge: float = 1e-10):
  """Greedy Stahlberg-Byrne: remove neurons whose up vector is best expressed as a least-squares
  combination of surviving neurons with (nearly) the same gate vector; W_k += lambda_k W_j.

  Costs are recomputed every `batch_size` removals (0: max(1, m // 256)); each removed neuron's
  lambda is re-solved against the survivors at the moment it is removed, so compensation is exact
  whenever its activation is a linear combination of survivors'.  Returns (removed in order,
  new W [m, d] float64, initial cost per neuron [m]).
  """
  u = np.asarray(ffn[GATE], np.float64).T
  v = np.asarray(ffn[UP], np.float64).T
  w = np.array(ffn[OUT], np.float64)
  m = w.shape[0]
  gram_u = u @ u.T
  norm_u = np.diag(gram_u).copy()
  gate_dist = np.maximum(norm_u[:, None] + norm_u[None, :] - 2.0 * gram_u, 0.0)
  del gram_u
  gram_v = v @ v.T
  wsq = np.mean(w ** 2, axis=1)
  batch_size = batch_size or max(1, m // 256)
  alive = np.ones(m, bool)
  initial, _, _ = _lstsq_costs(gate_dist, gram_v, wsq, alive, np.arange(m), neighbours, ridge)
  removed: list[int] = []
  num_remove = min(num_remove, m)
  while len(removed) < num_remove:
    cand = np.flatnonzero(alive)
    cost, _, _ = _lstsq_costs(gate_dist, gram_v, wsq, alive, cand, neighbours, ridge)
    order = cand[np.lexsort((cand, cost))][:min(batch_size, num_remove - len(removed))]
    for j in order:
      _, nbr, lam = _lstsq_costs(gate_dist, gram_v, wsq, alive, [j], neighbours, ridge)
      if nbr.size:
        w[nbr[0]] += lam[0][:, None] * w[j][None, :]
        wsq[nbr[0]] = np.mean(w[nbr[0]] ** 2, axis=1)
      alive[j] = False
      removed.append(int(j))
  return np.asarray(removed, np.int64), w, initial
