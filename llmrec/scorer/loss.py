"""The scorer's training loss (`batch_loss`) and its logQ correction (`candidate_log_q`).

Loss per batch of B (history, next item) samples: the candidates are the B targets (in-batch negatives) plus
`n_neg` items sampled from 0.5 * uniform + 0.5 * popularity^0.75 (shared by the batch); accidental hits (a
candidate equal to the row's own target at another column) are masked. Loss = softmax cross-entropy of the
retrieval logits scale * u.v - log q(candidate) over the candidates (logQ correction) + softmax cross-entropy
of the MLP head over the positive and `head_neg` (31) items drawn from the row's retrieval top-`n_candidates`
over the whole catalog (what the head re-ranks at inference; rows whose positive is not in that top list
add nothing; the head sees detached u, v so its loss never reaches retrieval; see ScorerModel.forward).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from llmrec.config import TrainConfig


def batch_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    neg_p: torch.Tensor,
    n_neg: int,
    gen: torch.Generator,
    head_neg: int = 31,
    log_q: torch.Tensor | None = None,
    head_pool: int = 200,
) -> torch.Tensor:
    """Sampled-softmax loss (retrieval u.v + MLP head) for one batch; see the module docstring.

    log_q: float32 (N,) candidate log-probabilities subtracted from the retrieval logits (logQ correction).
    batch may carry text feedback ("fb_vec" (B, T, D), "fb_pol" (B, T)) for the user encoder.
    """
    target = batch["target"].long()  # (B,)
    B = target.shape[0]
    rows = torch.arange(B, device=target.device)
    if n_neg < 0:  # full softmax over the whole catalog: no sampling, so no logQ and no accidental hits
        # positive = own index
        cand, pos, hit = torch.arange(neg_p.shape[0], device=target.device), target, None
    else:  # the B targets first (row b's positive is column b), then n_neg sampled negatives
        negs = torch.multinomial(neg_p, n_neg, replacement=True, generator=gen) if n_neg > 0 else target[:0]
        cand, pos = torch.cat([target, negs]), rows  # (C,)
        hit = cand[None, :] == target[:, None]  # (B, C)
        hit[rows, rows] = False
    retrieval, head = model(
        batch["hist_idx"].long(),
        batch["hist_event"].long(),
        batch["hist_rating"].float(),
        batch["hist_len"].long(),
        cand,
        head_neg,
        hit,
        pos,
        head_pool,
        batch.get("fb_vec"),
        batch.get("fb_pol"),
    )  # (B, C), (B, 1 + head_neg)
    if log_q is not None and n_neg >= 0:
        retrieval = retrieval - log_q[cand][None, :]  # (B, C)
    return F.cross_entropy(retrieval, pos) + F.cross_entropy(head, torch.zeros_like(rows))


def log_q_tensor(static: dict, cfg: TrainConfig, device: torch.device | str) -> torch.Tensor | None:
    """float32 (N,) `static["log_q"]` on `device`, or None when cfg turns the logQ correction off."""
    if not cfg.logq_correction:
        return None
    return torch.as_tensor(np.array(static["log_q"], np.float32), device=device)  # writable: no torch warning


def candidate_log_q(target_counts: np.ndarray, neg_p: np.ndarray, batch_size: int, n_neg: int) -> np.ndarray:
    """float32 (N,) log-probability that an item enters a batch's candidate pool (logQ correction).

    The pool is B in-batch targets (drawn like training targets, i.e. by popularity: `target_counts` (N,)
    training targets per item) plus n_neg draws from neg_p. Without subtracting log q from the sampled-softmax
    logits, popular items are over-represented as negatives and the model learns to rank them down, which
    costs full-ranking accuracy (Yi et al., 2019).
    """
    tgt = np.asarray(target_counts, dtype=np.float64).copy()
    tgt /= max(tgt.sum(), 1.0)
    n_neg = max(int(n_neg), 0)  # -1 = full softmax (no sampling; log q unused)
    q = (batch_size * tgt + n_neg * np.asarray(neg_p, dtype=np.float64)) / (batch_size + n_neg)
    return np.log(np.maximum(q, 1e-12)).astype(np.float32)
