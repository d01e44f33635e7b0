"""Inference API over a trained scorer artifact (`llmrec train` output), used by evaluation and serving.

`recommend` is the production two-stage pipeline: retrieval top-`n_candidates` by u.v over the catalog
(excluded items are never candidates), then the candidates are ranked by the MLP head (or u.v when training
turned the head off) plus `cooc_weight` times their item co-occurrence score with the user's positive history
items (`scorer.cooc`; the matrix is the artifact's `cooc.npz`, the weight was chosen on validation), and the
top k are returned. Retrieval over an external ANN index uses the same space: `item_vectors()` rows and
`user_vectors()` rows, score = inner product.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from llmrec.artifacts import ArtifactError, read_meta
from llmrec.device import resolve_device
from llmrec.eval.protocol import History
from llmrec.schema import INDEX_IDS_FILE
from llmrec.scorer.cooc import history_scores
from llmrec.scorer.data import pad_histories, positive_items
from llmrec.scorer.model import ScorerConfig, ScorerModel, two_stage_rank
from llmrec.scorer.train import COOC_FILE, MODEL_FILE

logger = logging.getLogger(__name__)


class Scorer:
    """A loaded scorer. Build with `Scorer.load(dir)` or `Scorer(model, item_ids)`.

    Example::

        s = Scorer.load("runs/ml/scorer")
        idx, scores = s.recommend([History("u1", np.array([3, 7]), np.array([1, 2]),
                                           np.array(["like", "view"]), np.array([np.nan, np.nan]))], k=10)
    """

    def __init__(
        self,
        model: ScorerModel,
        item_ids: np.ndarray,
        meta: dict | None = None,
        device: str = "cpu",
        cooc: sp.csr_matrix | None = None,
    ):
        if len(item_ids) != model.cfg.n_items:
            raise ValueError(f"{len(item_ids)} item ids for a model over {model.cfg.n_items} items")
        if cooc is not None and cooc.shape != (model.cfg.n_items, model.cfg.n_items):
            raise ValueError(f"co-occurrence matrix {cooc.shape} does not match {model.cfg.n_items} items")
        if cooc is None and model.cfg.cooc_weight > 0:
            raise ValueError(
                f"the model ranks with cooc_weight {model.cfg.cooc_weight} but no co-occurrence matrix was given"
            )
        self.cooc = cooc.tocsr() if cooc is not None else None
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.item_ids = np.asarray(item_ids).astype(str)
        self.meta = meta or {}
        self._pos = {iid: i for i, iid in enumerate(self.item_ids)}
        self._item_vecs: torch.Tensor | None = None

    @classmethod
    def load(cls, ckpt_dir: str | os.PathLike, device: str = "cpu") -> Scorer:
        """Load `ckpt_dir/model.pt` + `item_ids.npy` after checking meta.json is a "train" artifact."""
        t0 = time.perf_counter()
        d = Path(ckpt_dir)
        meta = read_meta(d, stage="train")
        for f in (MODEL_FILE, INDEX_IDS_FILE):
            if not (d / f).is_file():
                raise ArtifactError(f"{d / f} is missing; re-run `llmrec train --out {d}`")
        state = torch.load(d / MODEL_FILE, map_location="cpu", weights_only=False)
        cfg = ScorerConfig(**state["model_config"])
        sd = state["model"]
        model = ScorerModel(cfg, sd["text_vectors"], sd["id_slots"])
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:  # missing / unexpected parameters: another version of the network
            raise ArtifactError(
                f"{d / MODEL_FILE} was written by a different version of the scorer network "
                f"(code_version {meta.get('code_version')!r}): {str(e).splitlines()[0]}; "
                f"re-run `llmrec train --out {d}`"
            ) from e
        item_ids = np.load(d / INDEX_IDS_FILE, allow_pickle=False)
        cooc = None
        if (d / COOC_FILE).is_file():
            cooc = sp.load_npz(d / COOC_FILE)
        elif cfg.cooc_weight > 0:
            raise ArtifactError(f"{d / COOC_FILE} is missing; re-run `llmrec train --out {d}`")
        s = cls(model, item_ids, meta, device=device, cooc=cooc)
        logger.info(
            "loaded scorer from %s: %d items, d=%d, %.2fs", d, cfg.n_items, cfg.dim, time.perf_counter() - t0
        )
        return s

    # ---- catalog ----------------------------------------------------------------------------------------
    @property
    def text_dim(self) -> int:
        return self.model.cfg.text_dim

    @property
    def dim(self) -> int:
        return self.model.cfg.dim

    @property
    def n_items(self) -> int:
        return self.model.cfg.n_items

    def item_index(self, item_id: str) -> int | None:
        """Catalog index of `item_id`, None when the scorer's catalog does not have it."""
        return self._pos.get(str(item_id))

    @torch.no_grad()
    def item_vectors(self) -> np.ndarray:
        """float32 (N, d): retrieval-space vectors of the catalog (text projection + ID embedding)."""
        return self._reps().cpu().numpy()

    @torch.no_grad()
    def text_item_vectors(self, text_vectors: np.ndarray) -> np.ndarray:
        """float32 (M, d) retrieval vectors for items outside the catalog from their text vectors (M, D)."""
        t = np.asarray(text_vectors, dtype=np.float32)
        if t.ndim != 2 or t.shape[1] != self.text_dim:
            raise ValueError(
                f"text vectors must be (M, {self.text_dim}), got {t.shape}; embed with the same encoder"
            )
        return self.model.text_reps(torch.from_numpy(t).to(self.device)).cpu().numpy()

    # ---- users ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def user_vectors(self, histories: Sequence[History]) -> np.ndarray:
        """float32 (B, d) user vectors from time-ordered histories (last max_len events used)."""
        return self._users(histories).cpu().numpy()

    @torch.no_grad()
    def score(
        self,
        user_vecs: np.ndarray,
        cand_idx: np.ndarray,
        history_items: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Ranking scores float32 (B, K) of candidates cand_idx int64 (B, K) for user_vecs (B, d).

        The MLP head's scores (u.v when the trained model has `rerank` off), plus `cooc_weight` times the
        co-occurrence score when `history_items` (per user, the catalog indices of its positive history
        items) are given.
        """
        u = torch.as_tensor(np.asarray(user_vecs, dtype=np.float32), device=self.device)
        c = torch.as_tensor(np.asarray(cand_idx, dtype=np.int64), device=self.device)
        if u.ndim != 2 or u.shape[1] != self.dim or c.ndim != 2 or c.shape[0] != u.shape[0]:
            raise ValueError(
                f"expected user_vecs (B, {self.dim}) and cand_idx (B, K), "
                f"got {tuple(u.shape)}, {tuple(c.shape)}"
            )
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.n_items):
            raise ValueError(
                f"cand_idx must lie in [0, {self.n_items}), got [{int(c.min())}, {int(c.max())}]"
            )
        if history_items is not None and len(history_items) != u.shape[0]:
            raise ValueError(f"history_items has {len(history_items)} entries for {u.shape[0]} users")
        out = self.model.rank_pairs(u[:, None, :], self._reps()[c])
        return self._with_cooc(out, c, history_items).cpu().numpy()

    @torch.no_grad()
    def recommend(
        self,
        histories: Sequence[History],
        k: int,
        exclude: Sequence[np.ndarray] | None = None,
        n_candidates: int = 200,
        exclude_history: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Two-stage top-k: retrieval top-n_candidates by u.v, ranking scores (module docstring), top k.

        Args:
            histories: B users.
            k: items to return (fewer non-excluded items than k -> padded with index -1, score -inf).
            exclude: per user, item indices never to recommend (in addition to the history when
                exclude_history).
            n_candidates: retrieval candidates per user.

        Returns:
            (item indices int64 (B, k), ranking scores float32 (B, k)), best first.
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if exclude is not None and len(exclude) != len(histories):
            raise ValueError(f"exclude has {len(exclude)} entries for {len(histories)} histories")
        u = self._users(histories)
        excl = self._exclude_mask(histories, exclude, exclude_history)
        retrieval, cand, head = two_stage_rank(self.model, u, self._reps(), excl, max(n_candidates, k))
        head = self._with_cooc(head, cand, [positive_items(h) for h in histories])
        head = head.masked_fill(torch.gather(retrieval, 1, cand).isinf(), float("-inf"))
        k_eff = min(k, cand.shape[1])
        top = head.topk(k_eff, dim=1)
        idx = torch.gather(cand, 1, top.indices)
        idx = idx.masked_fill(top.values.isinf(), -1)
        idx_np = np.full((len(histories), k), -1, np.int64)
        sc_np = np.full((len(histories), k), -np.inf, np.float32)
        idx_np[:, :k_eff] = idx.cpu().numpy()
        sc_np[:, :k_eff] = top.values.cpu().numpy()
        return idx_np, sc_np

    @torch.no_grad()
    def full_scores(
        self,
        histories: Sequence[History],
        n_candidates: int = 200,
        exclude_history: bool = True,
        use_cooc: bool = True,
    ) -> np.ndarray:
        """float32 (B, N) catalog scores consistent with the two-stage ranking (use_cooc=False: without the
        co-occurrence term, i.e. the neural towers alone).

        The top n_candidates by retrieval (history items excluded when exclude_history) get their MLP score,
        shifted so that the whole re-ranked block lies above every other item; the other items keep the order
        of their retrieval score below it. Excluded history items are in the lower block (not -inf).
        """
        u = self._users(histories)
        reps = self._reps()
        excl = self._exclude_mask(histories, None, exclude_history)
        retrieval, cand, head = two_stage_rank(self.model, u, reps, excl, n_candidates)
        if use_cooc:
            head = self._with_cooc(head, cand, [positive_items(h) for h in histories])
        valid = ~torch.gather(retrieval, 1, cand).isinf()  # (B, n)
        raw = u @ reps.T  # (B, N), history included
        big = torch.finfo(torch.float32).max / 4
        out = torch.empty_like(raw)
        for b in range(raw.shape[0]):
            c, h = cand[b][valid[b]], head[b][valid[b]]
            in_block = torch.zeros(raw.shape[1], dtype=torch.bool, device=raw.device)
            in_block[c] = True
            rest = raw[b][~in_block]
            floor = (h.min() if len(h) else torch.tensor(0.0, device=raw.device)) - 1.0
            if len(rest):
                out[b][~in_block] = (rest - rest.max()).clamp(min=-big) + floor
            out[b][c] = h
        return out.cpu().numpy()

    # ---- helpers ----------------------------------------------------------------------------------------
    def _with_cooc(
        self, scores: torch.Tensor, cand: torch.Tensor, history_items: Sequence[np.ndarray] | None
    ) -> torch.Tensor:
        """scores (B, K) + cooc_weight * co-occurrence scores of cand (B, K); unchanged without the term."""
        w = float(self.model.cfg.cooc_weight)
        if w <= 0 or self.cooc is None or history_items is None or cand.numel() == 0:
            return scores
        co = history_scores(self.cooc, history_items, cand.cpu().numpy())  # (B, K)
        return scores + w * torch.from_numpy(co).to(scores.device)

    def _reps(self) -> torch.Tensor:
        if self._item_vecs is None:
            self._item_vecs = self.model.all_item_reps()
        return self._item_vecs

    def _users(self, histories: Sequence[History]) -> torch.Tensor:
        idx, ev, rt, ln = pad_histories(list(histories), self.model.cfg.max_len, n_items=self.n_items)
        t = lambda a, dt: torch.as_tensor(a, device=self.device).to(dt)  # noqa: E731
        return self.model.user_vectors(
            t(idx, torch.long), t(ev, torch.long), t(rt, torch.float32), t(ln, torch.long)
        )

    def _exclude_mask(self, histories, exclude, exclude_history: bool) -> torch.Tensor:
        mask = torch.zeros(len(histories), self.n_items, dtype=torch.bool, device=self.device)
        for b, h in enumerate(histories):
            if exclude_history and len(h.item_idx):
                hi = np.asarray(h.item_idx, dtype=np.int64)
                if hi.min() < 0 or hi.max() >= self.n_items:
                    raise ValueError(
                        f"history of user {h.user_id!r} has item_idx outside [0, {self.n_items}); "
                        "map item ids with Scorer.item_index first"
                    )
                mask[b, torch.as_tensor(hi, device=self.device)] = True
            if exclude is not None and len(exclude[b]):
                e = np.asarray(exclude[b], dtype=np.int64)
                if e.min() < 0 or e.max() >= self.n_items:
                    raise ValueError(f"exclude[{b}] has indices outside [0, {self.n_items})")
                mask[b, torch.as_tensor(e, device=self.device)] = True
        return mask
