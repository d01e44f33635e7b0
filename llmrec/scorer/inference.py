"""Inference API over a trained scorer artifact (`llmrec train` output): the one ranking path.

`Scorer.rank` is the production two-stage ranking that evaluation (`full_scores`), batch recommendations
(`recommend`) and serving (`llmrec.serve.recommend_core.RecommendCore`) all call: retrieval top-`n_candidates`
by u.v over the catalog (excluded items are never candidates; `cold_quota` of them reserved for cold items),
then the candidates are ranked by the MLP head (or u.v when training turned the head off) plus `cooc_weight`
times their item co-occurrence score with the user's positive history items (`llmrec.cooc`; the matrix is
the artifact's `cooc.npz`, the weight was chosen on validation), with `cold_every` slots of the list kept for
cold items and each cold item no lower than `cold_keep` x its place without the term (`cold_slot_scores`).
A user's text feedback (`History.fb_vec`,
`fb_pol`) is read by the user encoder, so it moves retrieval and ranking at once. `rank` also splits each
candidate's score into the signals that made it (`Ranked.parts`), which serving turns into a reason.
Retrieval over an external ANN index uses the same space: `item_vectors()` rows and `user_vectors()` rows,
score = inner product.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from llmrec.artifacts import ArtifactError, load_torch_file, read_meta
from llmrec.cooc import history_scores
from llmrec.device import resolve_device
from llmrec.protocol import History, Ranked
from llmrec.schema import INDEX_IDS_FILE
from llmrec.schema import SCORER_COOC_FILE as COOC_FILE
from llmrec.schema import SCORER_MODEL_FILE as MODEL_FILE
from llmrec.scorer.data import pad_feedback, pad_histories, positive_items
from llmrec.scorer.model import ScorerConfig, ScorerModel, cold_slot_scores, two_stage_rank

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
                f"the model ranks with cooc_weight {model.cfg.cooc_weight} "
                "but no co-occurrence matrix was given"
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
        state = load_torch_file(d / MODEL_FILE, map_location="cpu")  # weights_only: never runs code
        retrain = f"re-run `llmrec train --out {d}`"
        try:
            cfg = ScorerConfig(**state["model_config"])
        except TypeError as e:  # a config field this version does not know: a newer network
            raise ArtifactError(f"{d / MODEL_FILE} was written by another version of the scorer ({e}); "
                                f"{retrain}") from e
        sd = state["model"]
        model = ScorerModel(cfg, sd["text_vectors"], sd["id_slots"], sd.get("item_counts"))
        try:
            model.load_state_dict(sd)
        except RuntimeError as e:  # missing / unexpected parameters: another version of the network
            raise ArtifactError(
                f"{d / MODEL_FILE} was written by a different version of the scorer network "
                f"(code_version {meta.get('code_version')!r}): {str(e).splitlines()[0]}; {retrain}"
            ) from e
        item_ids = np.load(d / INDEX_IDS_FILE, allow_pickle=False)
        cooc = None
        if (d / COOC_FILE).is_file():
            cooc = sp.load_npz(d / COOC_FILE)
        elif cfg.cooc_weight > 0:
            raise ArtifactError(f"{d / COOC_FILE} is missing; {retrain}")
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
        """Width of the retrieval space (user and item vectors)."""
        return self.model.cfg.retrieval_dim

    @property
    def n_items(self) -> int:
        return self.model.cfg.n_items

    def item_index(self, item_id: str) -> int | None:
        """Catalog index of `item_id`, None when the scorer's catalog does not have it."""
        return self._pos.get(str(item_id))

    @torch.no_grad()
    def item_vectors(self) -> np.ndarray:
        """float32 (N, r): retrieval-space vectors of the catalog (text projection + gated ID [+ text])."""
        return self._reps().cpu().numpy()

    @torch.no_grad()
    def text_item_vectors(self, text_vectors: np.ndarray) -> np.ndarray:
        """float32 (M, r) retrieval vectors for items outside the catalog from their text vectors (M, D)."""
        t = np.asarray(text_vectors, dtype=np.float32)
        if t.ndim != 2 or t.shape[1] != self.text_dim:
            raise ValueError(
                f"text vectors must be (M, {self.text_dim}), got {t.shape}; embed with the same encoder"
            )
        return self.model.text_reps(torch.from_numpy(t).to(self.device)).cpu().numpy()

    # ---- users ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def user_vectors(self, histories: Sequence[History]) -> np.ndarray:
        """float32 (B, r) user vectors from time-ordered histories (last max_len events, their text
        feedback)."""
        return self._users(histories).cpu().numpy()

    @torch.no_grad()
    def score(
        self,
        user_vecs: np.ndarray,
        cand_idx: np.ndarray,
        history_items: Sequence[np.ndarray] | None = None,
    ) -> np.ndarray:
        """Ranking scores float32 (B, K) of candidates cand_idx int64 (B, K) for user_vecs (B, r).

        The MLP head's scores (u.v when the trained model has `rerank` off) with `cold_bonus` at cold items,
        plus `cooc_weight` times the co-occurrence score when `history_items` (per user, the catalog indices
        of its positive history items) are given.
        """
        u = torch.as_tensor(np.asarray(user_vecs, dtype=np.float32), device=self.device)
        c = torch.as_tensor(np.asarray(cand_idx, dtype=np.int64), device=self.device)
        if u.ndim != 2 or u.shape[1] != self.dim or c.ndim != 2 or c.shape[0] != u.shape[0]:
            raise ValueError(
                f"expected user_vecs (B, {self.dim}) and cand_idx (B, K), "
                f"got {tuple(u.shape)}, {tuple(c.shape)}"
            )
        self._check_idx(c, "cand_idx")
        if history_items is not None and len(history_items) != u.shape[0]:
            raise ValueError(f"history_items has {len(history_items)} entries for {u.shape[0]} users")
        out = self.model.rank_pairs(u[:, None, :], self._reps()[c]) + self.model.cold_bonus(c, True)
        return self._with_cooc(out, c, history_items).cpu().numpy()

    @torch.no_grad()
    def rank(
        self,
        histories: Sequence[History],
        n_candidates: int = 200,
        exclude: Sequence[np.ndarray] | None = None,
        exclude_history: bool = True,
        extra: Sequence[np.ndarray] | None = None,
        use_cooc: bool = True,
    ) -> Ranked:
        """The two-stage ranking (module docstring) of B users' candidates; see `Ranked`.

        Args:
            histories: B users (their text feedback included).
            n_candidates: retrieval candidates per user.
            exclude: per user, item indices never to rank (besides the history when exclude_history).
            extra: per user, further candidate indices to rank beside retrieval's (e.g. a query's text
                neighbours); duplicates and excluded ones get score -inf.
            use_cooc: False ranks without the co-occurrence term (the neural towers alone).
        """
        B = len(histories)
        if exclude is not None and len(exclude) != B:
            raise ValueError(f"exclude has {len(exclude)} entries for {B} histories")
        if extra is not None and len(extra) != B:
            raise ValueError(f"extra has {len(extra)} entries for {B} histories")
        m = self.model
        hist = self._tensors(histories)
        u_d, text_hist, text_fb = m.user_parts(*hist)
        u = torch.cat([u_d, text_hist + text_fb], dim=-1) if m.cfg.text_arm else u_d
        reps = self._reps()
        excl = self._exclude_mask(histories, exclude, exclude_history)
        retrieval, cand, score = two_stage_rank(m, u, reps, excl, n_candidates)
        if extra is not None and any(len(e) for e in extra):
            width = max(len(e) for e in extra)
            more = torch.zeros(B, width, dtype=torch.long, device=self.device)
            ok = torch.zeros(B, width, dtype=torch.bool, device=self.device)
            for b, e in enumerate(extra):
                e = np.asarray(e, dtype=np.int64)
                self._check_idx(torch.as_tensor(e), f"extra[{b}]")
                more[b, : len(e)] = torch.as_tensor(e, device=self.device)
                ok[b, : len(e)] = True
            in_list = (more[:, :, None] == cand[:, None, :]).any(-1)  # (B, w) already a candidate
            first = torch.ones_like(ok)  # first occurrence inside `extra`
            for j in range(1, width):
                first[:, j] = ~(more[:, :j] == more[:, j : j + 1]).any(1)
            ok &= ~in_list & first & ~torch.gather(excl, 1, more)
            s_more = m.rank_pairs(u[:, None, :], reps[more])
            if m.cfg.cold_bonus > 0:
                s_more = s_more + m.cold_bonus(more, True)
            s_more = s_more.masked_fill(~ok, float("-inf"))
            cand, score = torch.cat([cand, more], 1), torch.cat([score, s_more], 1)
        valid = score.isfinite()
        # the additive split of the score (for reasons): u.v = u_d.v_d + text_hist.t + text_fb.t, in the
        # head's units (scale * u.v) when the head ranks; the head's MLP correction counts as behaviour
        unit = m.scale if m.cfg.rerank else torch.tensor(1.0, device=self.device)
        v = reps[cand]  # (B, n, r)
        d = m.cfg.dim
        parts = {"behaviour": unit * (u_d[:, None, :] * v[..., :d]).sum(-1)}
        if m.cfg.text_arm:
            t = v[..., d:]
            # a cold item's bonus is for its text: it counts as content
            parts["content"] = unit * (text_hist[:, None, :] * t).sum(-1) + m.cold_bonus(cand, True)
            parts["feedback"] = unit * (text_fb[:, None, :] * t).sum(-1)
        parts["behaviour"] = parts["behaviour"] + (score - sum(parts.values()))  # + the MLP correction
        co = torch.zeros_like(score)
        if use_cooc:
            co = self._with_cooc(torch.zeros_like(score), cand, [positive_items(h) for h in histories])
        parts["cooc"] = co
        plain = score  # without the co-occurrence term: the neural places' order
        score = (score + co).masked_fill(~valid, float("-inf"))
        if m.cfg.cold_every or m.cfg.cold_keep:
            # cold-item slots and neural places: a moved cold item's lift is for its text, like its bonus
            cold = (m.id_slots[cand] == 0).cpu().numpy()
            neural = plain.masked_fill(~valid, float("-inf")).cpu().numpy()
            slotted = torch.from_numpy(cold_slot_scores(score.cpu().numpy(), cold, m.cfg.cold_every,
                                                        m.cfg.cold_keep, neural))
            slotted = slotted.to(score.device)
            parts["content" if m.cfg.text_arm else "behaviour"] += torch.where(valid, slotted - score, 0.0)
            score = slotted
        np_parts = {k: x.masked_fill(~valid, 0.0).cpu().numpy().astype(np.float32) for k, x in parts.items()}
        return Ranked(cand.cpu().numpy(), score.cpu().numpy().astype(np.float32), np_parts, u.cpu().numpy())

    @torch.no_grad()
    def recommend(
        self,
        histories: Sequence[History],
        k: int,
        exclude: Sequence[np.ndarray] | None = None,
        n_candidates: int = 200,
        exclude_history: bool = True,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of `rank`.

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
        r = self.rank(histories, max(n_candidates, k), exclude, exclude_history)
        k_eff = min(k, r.cand.shape[1])
        order = np.argsort(-r.score, axis=1, kind="stable")[:, :k_eff]
        sc = np.take_along_axis(r.score, order, 1)
        idx = np.where(np.isinf(sc), -1, np.take_along_axis(r.cand, order, 1))
        idx_np = np.full((len(histories), k), -1, np.int64)
        sc_np = np.full((len(histories), k), -np.inf, np.float32)
        idx_np[:, :k_eff], sc_np[:, :k_eff] = idx, sc
        return idx_np, sc_np

    @torch.no_grad()
    def full_scores(
        self,
        histories: Sequence[History],
        n_candidates: int = 200,
        exclude_history: bool = True,
        use_cooc: bool = True,
    ) -> np.ndarray:
        """float32 (B, N) catalog scores consistent with `rank` (use_cooc=False: without the co-occurrence
        term, i.e. the neural towers alone).

        The ranked candidates get their ranking score, shifted so that the whole block lies above every other
        item; the other items keep the order of their retrieval score below it. Excluded history items are in
        the lower block (not -inf).
        """
        r = self.rank(histories, n_candidates, None, exclude_history, use_cooc=use_cooc)
        raw = r.user_vecs @ self.item_vectors().T  # (B, N), history included
        raw = raw + self.model.cold_bonus(torch.arange(self.n_items, device=self.device), False).cpu().numpy()
        out = np.empty_like(raw, dtype=np.float32)
        big = np.finfo(np.float32).max / 4
        for b in range(raw.shape[0]):
            ok = np.isfinite(r.score[b])
            c, h = r.cand[b][ok], r.score[b][ok]
            in_block = np.zeros(raw.shape[1], dtype=bool)
            in_block[c] = True
            rest = raw[b][~in_block]
            floor = (h.min() if len(h) else 0.0) - 1.0
            if len(rest):
                out[b][~in_block] = np.maximum(rest - rest.max(), -big) + floor
            out[b][c] = h
        return out

    def choose(self, **fields: Any) -> None:
        """Replace post-training choices of the model's `ScorerConfig` (e.g. `finalize.COLD_CHOICES`, chosen
        on another validation) and drop what this scorer cached from the old values; an unknown field
        raises."""
        self.model.cfg = dataclasses.replace(self.model.cfg, **fields)
        self.__dict__.pop("_cooc_nb", None)
        self._item_vecs = None

    # ---- helpers ----------------------------------------------------------------------------------------
    def _with_cooc(
        self, scores: torch.Tensor, cand: torch.Tensor, history_items: Sequence[np.ndarray] | None
    ) -> torch.Tensor:
        """scores (B, K) + cooc_weight * co-occurrence scores of cand (B, K); unchanged without the term."""
        w = float(self.model.cfg.cooc_weight)
        if w <= 0 or self.cooc is None or history_items is None or cand.numel() == 0:
            return scores
        co = history_scores(self.cooc, history_items, cand.cpu().numpy(), impute=self._cooc_impute())
        return scores + w * torch.from_numpy(co).to(scores.device)

    def _cooc_impute(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Text neighbours with co-occurrence data for the items without (`ScorerModel.cooc_impute`; computed
        once)."""
        if not hasattr(self, "_cooc_nb"):
            self._cooc_nb = self.model.cooc_impute(self.cooc)
        return self._cooc_nb

    def _reps(self) -> torch.Tensor:
        if self._item_vecs is None:
            self._item_vecs = self.model.all_item_reps()
        return self._item_vecs

    def _tensors(self, histories: Sequence[History]) -> tuple[torch.Tensor | None, ...]:
        idx, ev, rt, ln = pad_histories(list(histories), self.model.cfg.max_len, n_items=self.n_items)
        fv, fp = pad_feedback(list(histories), self.text_dim)
        t = lambda a, dt: None if a is None else torch.as_tensor(a, device=self.device).to(dt)  # noqa: E731
        return (t(idx, torch.long), t(ev, torch.long), t(rt, torch.float32), t(ln, torch.long),
                t(fv, torch.float32), t(fp, torch.float32))

    def _users(self, histories: Sequence[History]) -> torch.Tensor:
        return self.model.user_vectors(*self._tensors(histories))

    def _check_idx(self, c: torch.Tensor, name: str) -> None:
        if c.numel() and (int(c.min()) < 0 or int(c.max()) >= self.n_items):
            raise ValueError(f"{name} must lie in [0, {self.n_items}), got [{int(c.min())}, {int(c.max())}]")

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
