"""Per-epoch validation of the scorer (`evaluate`) and the early-stopping rule built on it.

For each validation user, full ranking over the catalog with the user's train items excluded: retrieval
top-`n_candidates` by u.v, re-ranked by the MLP head, then the rest by u.v (the production two-stage pipeline)
-> `val_recall@10`, `val_ndcg@10`; also `val_retrieval_*` for u.v alone. Workers evaluate disjoint user slices
and all-reduce the sums, so every rank takes the same early-stopping decision (`update_early_stop`); the
checkpoint kept is the one with the best `SCORE_METRIC` (`best_checkpoint`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from llmrec.metrics import recall_ndcg
from llmrec.scorer import data as sdata
from llmrec.scorer.feedback import FeedbackBank
from llmrec.scorer.model import ScorerModel, two_stage_rank

SCORE_METRIC = "val_best_ndcg@10"  # max of two-stage and retrieval-only ndcg@10 (see ScorerConfig.rerank)


@torch.no_grad()
def evaluate(
    model: ScorerModel,
    val: sdata.ValidationSet | None,
    n_candidates: int = 200,
    k: int = 10,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
    chunk: int = 256,
    bank: FeedbackBank | None = None,
) -> dict[str, float]:
    """Full-ranking recall@k / ndcg@k of this rank's user slice, all-reduced over ranks when world > 1.

    `val_*` rank without text feedback (what early stopping reads); when the validation set carries
    synthesised feedback, `val_fb_*` rank the same users with it, and for the users whose text is negative
    `val_fb_neg_share_before/after` are the shares of their top k that carry the facet the text rejects
    (item facets from `bank`), the responsiveness the serving benchmark measures. Returns {} without a
    validation set.
    """
    if val is None or val.n_users == 0:
        return {}
    was_training = model.training
    # recall, ndcg, retrieval recall, retrieval ndcg, users | fb recall, fb ndcg, fb users | neg users, share
    # of the rejected facet before, after
    sums = torch.zeros(11, dtype=torch.float64)
    users = np.arange(rank, val.n_users, world)
    with_fb = val.fb_vec is not None and bool((val.fb_pol != 0).any())
    tops: dict[int, np.ndarray] = {}
    for ub, retrieval, cand, head in two_stage_chunks(
        model, val, users, max(n_candidates, k), device, chunk
    ):
        top_two = torch.gather(cand, 1, head.topk(k, dim=1).indices).cpu().numpy()  # (b, k)
        top_ret = retrieval.topk(k, dim=1).indices.cpu().numpy()
        for j, b in enumerate(ub):
            r2, n2 = recall_ndcg(top_two[j], val.targets[b], k)
            r1, n1 = recall_ndcg(top_ret[j], val.targets[b], k)
            sums[:5] += torch.tensor([r2, n2, r1, n1, 1.0], dtype=torch.float64)
            tops[int(b)] = top_two[j]
    if with_fb:
        for ub, _, cand, head in two_stage_chunks(
            model, val, users, max(n_candidates, k), device, chunk, feedback=True
        ):
            top_fb = torch.gather(cand, 1, head.topk(k, dim=1).indices).cpu().numpy()
            for j, b in enumerate(ub):
                if val.fb_pol[b, 0] == 0:
                    continue
                r, n = recall_ndcg(top_fb[j], val.targets[b], k)
                sums[5:8] += torch.tensor([r, n, 1.0], dtype=torch.float64)
                if val.fb_pol[b, 0] < 0 and bank is not None:
                    f = int(val.fb_facet[b])
                    share = [
                        np.mean([f in bank.facets_of(int(i)) for i in t]) for t in (tops[int(b)], top_fb[j])
                    ]
                    sums[8:] += torch.tensor([1.0, *share], dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(sums)
    model.train(was_training)
    n = max(float(sums[4]), 1.0)
    out = {
        f"val_recall@{k}": float(sums[0]) / n,
        f"val_ndcg@{k}": float(sums[1]) / n,
        f"val_retrieval_recall@{k}": float(sums[2]) / n,
        f"val_retrieval_ndcg@{k}": float(sums[3]) / n,
        f"val_best_ndcg@{k}": max(float(sums[1]), float(sums[3])) / n,
        "val_users": int(sums[4]),
    }
    if with_fb:
        n_fb = max(float(sums[7]), 1.0)
        out.update({f"val_fb_recall@{k}": float(sums[5]) / n_fb, f"val_fb_ndcg@{k}": float(sums[6]) / n_fb})
        if float(sums[8]) > 0:
            out.update(val_fb_neg_share_before=float(sums[9]) / float(sums[8]),
                       val_fb_neg_share_after=float(sums[10]) / float(sums[8]))
    return out


def two_stage_chunks(
    model: ScorerModel,
    val: sdata.ValidationSet,
    users: np.ndarray,
    n_candidates: int,
    device: torch.device | str = "cpu",
    chunk: int = 256,
    feedback: bool = False,
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Validation users in chunks through `two_stage_rank` (eval mode; each user's train items excluded;
    with `feedback`, the user encoder also reads the validation set's synthesised text).

    Yields (user rows ub, retrieval (b, N), candidates (b, n), ranking scores (b, n) with -inf where the
    candidate is excluded).
    """
    model.eval()
    reps = model.all_item_reps()  # (N, r)
    for s in range(0, len(users), chunk):
        ub = users[s : s + chunk]
        t = lambda a, dt, ub=ub: torch.as_tensor(a[ub], device=device).to(dt)  # noqa: E731
        fb = (t(val.fb_vec, torch.float32), t(val.fb_pol, torch.float32)) if feedback else (None, None)
        u = model.user_vectors(
            t(val.hist_idx, torch.long),
            t(val.hist_event, torch.long),
            t(val.hist_rating, torch.float32),
            t(val.hist_len, torch.long),
            *fb,
        )
        excl = torch.zeros(len(ub), reps.shape[0], dtype=torch.bool, device=device)
        for j, b in enumerate(ub):
            excl[j, torch.as_tensor(val.exclude[b], device=device)] = True
        retrieval, cand, head = two_stage_rank(model, u, reps, excl, n_candidates)
        yield ub, retrieval, cand, head


def update_early_stop(state: dict, metrics: dict, epoch: int, patience: int) -> bool:
    """Update {best, best_epoch, bad_epochs} in place; True when training should stop."""
    score = metrics.get(SCORE_METRIC)
    if score is None:  # no validation: the latest epoch is the best
        state.update(best=float(epoch), best_epoch=epoch, bad_epochs=0)
        return False
    if score > state["best"]:
        state.update(best=float(score), best_epoch=epoch, bad_epochs=0)
        return False
    state["bad_epochs"] += 1
    return state["bad_epochs"] >= patience


def best_checkpoint(result: Any, has_val: bool) -> Any:
    """The checkpoint of a Ray Train `result` with the highest SCORE_METRIC (the latest epoch among ties), or
    by epoch without validation; the last checkpoint when none reported the key."""
    key = SCORE_METRIC if has_val else "epoch"
    cands = [(c, m) for c, m in (result.best_checkpoints or []) if key in m]
    if not cands:
        return result.checkpoint
    return max(cands, key=lambda cm: (cm[1][key], cm[1]["epoch"]))[0]
