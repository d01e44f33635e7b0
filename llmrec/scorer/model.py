"""The scorer network: item tower (text + optional ID), sequential user encoder, MLP re-ranker. Pure torch.

Shapes: B users, L history length (right-padded: the first `hist_len[b]` positions are real, oldest first),
N catalog items, D text-embedding dim, d model dim, K candidates per user.

- Item representation `v_i = W_text t_i + dropout_id(E_id[id_slot(i)])`: a linear projection of the frozen
  BERT text vector plus a learned ID embedding for items seen in training. Slot 0 is "no ID / cold"; it is a
  zero vector (padding_idx), so a cold item is represented by its text alone. During training the ID part
  is dropped per item with probability `id_dropout` (the item then uses slot 0), which keeps the text path
  strong enough to score cold items.
- User encoder: each history element is `v_item + E_event[kind] + E_pos[recency] + w_r * rating/5`
  (recency 0 = most recent, clipped at L-1; rating missing -> 0), run through a small causal transformer
  (chosen over a GRU, which steps through the L positions one at a time and was slower on CPU here);
  `u = W_out h_newest + mean(history element reps)`. The mean skip keeps a text-similarity path that works
  from the first epoch and for short histories.
- Retrieval score `u . v` (B, N); training logits are `scale * u . v` with a learned inverse temperature
  (init 20). Re-ranker `MLP([u; v; u*v] / sqrt(d)) + scale * u . v` -> (B, K), trained on detached u, v
  against negatives drawn from the retrieval top-K it re-ranks at inference (see `forward`).
- `warm_start()` (used by training) starts the model at the zero-shot text model: `text_proj` = the top-d
  singular directions of the catalog text matrix, encoder output layer zeroed, so u.v ~= cos(mean history
  text, item text) before the first step.

The catalog (text vectors, ID slots) lives in the module as buffers so that a checkpoint is self-contained.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from llmrec.schema import EVENT_KINDS

logger = logging.getLogger(__name__)

# event kind index: 0 = padding, 1.. = schema.EVENT_KINDS order
EVENT_INDEX = {kind: i + 1 for i, kind in enumerate(EVENT_KINDS)}
N_EVENT_SLOTS = len(EVENT_KINDS) + 1


@dataclass(frozen=True)
class ScorerConfig:
    text_dim: int  # D, the BERT text-embedding dim
    n_items: int  # N, catalog size
    n_id_slots: int  # 1 + number of items with a learned ID embedding (slot 0 = cold); 1 disables IDs
    dim: int = 64  # d, retrieval / model dim
    max_len: int = 50  # L, history elements the encoder reads (most recent kept)
    n_layers: int = 1  # causal transformer layers
    n_heads: int = 2
    mlp_hidden: int = 128
    id_dropout: float = 0.3  # probability of dropping an item's ID embedding during training
    dropout: float = 0.1
    # apply the MLP head at inference; training sets it False when, at the best epoch, re-ranking scored
    # below retrieval alone on validation (then ranking is u.v only and the head is kept but unused)
    rerank: bool = True
    # initial inverse softmax temperature on u.v (learned; training logits = scale * u.v). Text vectors are
    # unit-norm, so at the warm start u.v is a cosine in [-1, 1]; with scale 1 the softmax over thousands of
    # candidates is nearly flat and learning stalls (val NDCG@10 0.017 after 3 epochs on Scientific).
    logit_scale: float = 20.0
    # weight of the item co-occurrence score (scorer.cooc) added to the ranking score of the retrieval
    # candidates; chosen on validation after training (0 = neural ranking only). The co-occurrence matrix
    # itself is not part of the network: it lives next to the model in the artifact (cooc.npz).
    cooc_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in (
            "text_dim",
            "n_items",
            "n_id_slots",
            "dim",
            "max_len",
            "n_layers",
            "n_heads",
            "mlp_hidden",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ScorerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dim % self.n_heads:
            raise ValueError(f"ScorerConfig.dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 < float(self.logit_scale) <= 100.0:
            raise ValueError(f"ScorerConfig.logit_scale must be in (0, 100], got {self.logit_scale}")
        if float(self.cooc_weight) < 0:
            raise ValueError(f"ScorerConfig.cooc_weight must be >= 0, got {self.cooc_weight}")
        for name in ("id_dropout", "dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"ScorerConfig.{name} must be in [0, 1), got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


class ScorerModel(nn.Module):
    """Item tower + user encoder + MLP head over a fixed catalog.

    Args:
        cfg: sizes and regularisation.
        text_vectors: float32 (N, D) frozen text embeddings, row i = catalog item i.
        id_slots: int64 (N,) ID-embedding slot per item, 0 = no ID (cold), else in [1, n_id_slots).

    Example::

        cfg = ScorerConfig(text_dim=32, n_items=100, n_id_slots=101, dim=16)
        m = ScorerModel(cfg, torch.randn(100, 32), torch.arange(1, 101))
        u = m.user_vectors(torch.randint(0, 100, (4, 50)), torch.ones(4, 50, dtype=torch.long),
                           torch.zeros(4, 50), torch.full((4,), 50))   # (4, 16)
        scores = m.head_scores(u, torch.randint(0, 100, (4, 7)))            # (4, 7)
    """

    def __init__(self, cfg: ScorerConfig, text_vectors: torch.Tensor, id_slots: torch.Tensor):
        super().__init__()
        text_vectors = torch.as_tensor(text_vectors, dtype=torch.float32)
        id_slots = torch.as_tensor(id_slots, dtype=torch.long)
        if tuple(text_vectors.shape) != (cfg.n_items, cfg.text_dim):
            raise ValueError(
                f"text_vectors shape {tuple(text_vectors.shape)} != (n_items, text_dim) = "
                f"{(cfg.n_items, cfg.text_dim)}; build the config from the same ItemSpace"
            )
        if tuple(id_slots.shape) != (cfg.n_items,):
            raise ValueError(f"id_slots shape {tuple(id_slots.shape)} != (n_items,) = ({cfg.n_items},)")
        if len(id_slots) and (int(id_slots.min()) < 0 or int(id_slots.max()) >= cfg.n_id_slots):
            raise ValueError(
                f"id_slots must lie in [0, {cfg.n_id_slots}), got [{id_slots.min()}, {id_slots.max()}]"
            )
        self.cfg = cfg
        d = cfg.dim
        self.register_buffer("text_vectors", text_vectors)  # (N, D)
        self.register_buffer("id_slots", id_slots)  # (N,)
        self.text_proj = nn.Linear(cfg.text_dim, d)
        self.id_emb = nn.Embedding(cfg.n_id_slots, d, padding_idx=0)
        nn.init.normal_(self.id_emb.weight, std=0.02)
        with torch.no_grad():
            self.id_emb.weight[0].zero_()
        self.event_emb = nn.Embedding(N_EVENT_SLOTS, d, padding_idx=0)
        nn.init.normal_(self.event_emb.weight, std=0.02)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.rating_w = nn.Parameter(torch.zeros(d))
        self.encoder = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(
                d, cfg.n_heads, dim_feedforward=2 * d, dropout=cfg.dropout, batch_first=True, norm_first=True
            ),
            num_layers=cfg.n_layers,
            enable_nested_tensor=False,
        )
        self.register_buffer(
            "causal", torch.triu(torch.full((cfg.max_len, cfg.max_len), float("-inf")), 1), persistent=False
        )
        self.out = nn.Linear(d, d)
        self.log_scale = nn.Parameter(torch.tensor(math.log(cfg.logit_scale)))
        self.drop = nn.Dropout(cfg.dropout)
        self.mlp = nn.Sequential(
            nn.Linear(3 * d, cfg.mlp_hidden),
            nn.ReLU(),
            nn.Linear(cfg.mlp_hidden, cfg.mlp_hidden // 2),
            nn.ReLU(),
            nn.Linear(cfg.mlp_hidden // 2, 1),
        )

    @torch.no_grad()
    def warm_start(self) -> None:
        """Start training at the zero-shot text model: u.v ~= cos(mean history text, item text).

        `text_proj` becomes the projection on the top-d right singular vectors of the (uncentered) catalog
        text matrix, the rank-d map that best preserves text inner products; the sequence-encoder output
        layer is zeroed, so u = mean of the history item reps and the transformer adds learned corrections.
        """
        t = self.text_vectors
        d, D = self.cfg.dim, self.cfg.text_dim
        w = torch.zeros(d, D)
        _, _, vh = torch.linalg.svd(t.double(), full_matrices=False)  # vh (min(N, D), D)
        r = min(d, vh.shape[0])
        w[:r] = vh[:r].float()
        if r < d:  # more model dims than text directions: the rest start small and random
            nn.init.normal_(w[r:], std=0.02)
        self.text_proj.weight.copy_(w)
        self.text_proj.bias.zero_()
        self.out.weight.zero_()
        self.out.bias.zero_()
        # ID / event / recency embeddings start at 0 (they are learned from there): random ones add noise of
        # norm ~0.02 * sqrt(d) to every item and history element, comparable to the cosine gaps between items
        # (Magazine loo test NDCG@10 of the untrained d=64 model: 0.069 with them, 0.077 without)
        self.id_emb.weight.zero_()
        self.event_emb.weight.zero_()
        self.pos_emb.weight.zero_()

    @property
    def scale(self) -> torch.Tensor:
        """The learned inverse temperature exp(log_scale), clamped to <= 100 (CLIP's bound)."""
        return self.log_scale.clamp(max=math.log(100.0)).exp()

    # ---- item tower -------------------------------------------------------------------------------------
    def item_reps(self, item_idx: torch.Tensor) -> torch.Tensor:
        """Catalog indices (...) int64 -> item representations (..., d)."""
        v = self.text_proj(self.text_vectors[item_idx])  # (..., d)
        slots = self.id_slots[item_idx]  # (...)
        if self.training and self.cfg.id_dropout > 0:
            keep = torch.rand(slots.shape, device=slots.device) >= self.cfg.id_dropout
            slots = slots * keep
        return v + self.id_emb(slots)

    def text_reps(self, text_vectors: torch.Tensor) -> torch.Tensor:
        """Text vectors of items outside the catalog (M, D) -> cold item representations (M, d)."""
        return self.text_proj(text_vectors)

    def all_item_reps(self) -> torch.Tensor:
        """(N, d) representations of the whole catalog (IDs included, no dropout in eval mode)."""
        return self.item_reps(torch.arange(self.cfg.n_items, device=self.text_vectors.device))

    # ---- user encoder -----------------------------------------------------------------------------------
    def user_vectors(
        self,
        hist_idx: torch.Tensor,
        hist_event: torch.Tensor,
        hist_rating: torch.Tensor,
        hist_len: torch.Tensor,
    ) -> torch.Tensor:
        """Encode right-padded histories.

        Args:
            hist_idx: int64 (B, L) catalog indices, first hist_len[b] real (oldest first), rest any index.
            hist_event: int64 (B, L) event slot (EVENT_INDEX), 0 on padding.
            hist_rating: float32 (B, L) rating, NaN or 0 where none.
            hist_len: int64 (B,) number of real elements, >= 0 (0 = no history: u from biases only).

        Returns:
            float32 (B, d) user vectors in the retrieval space.
        """
        B, L = hist_idx.shape
        dev = hist_idx.device
        lens = hist_len.clamp(min=0, max=L)
        ar = torch.arange(L, device=dev)
        mask = ar[None, :] < lens[:, None]  # (B, L)
        recency = (lens[:, None] - 1 - ar[None, :]).clamp(min=0, max=self.cfg.max_len - 1)  # (B, L)
        rating = torch.nan_to_num(hist_rating.float(), nan=0.0) / 5.0
        x = (
            self.item_reps(hist_idx)
            + self.event_emb(hist_event * mask)
            + self.pos_emb(recency)
            + rating[..., None] * self.rating_w
        ) * mask[..., None]  # (B, L, d)
        x = self.drop(x)
        mean = x.sum(1) / lens.clamp(min=1)[:, None].float()  # (B, d)
        # causal attention: position t sees positions <= t, so right padding never reaches a real position
        y = self.encoder(x, mask=self.causal[:L, :L], is_causal=True)  # (B, L, d)
        last = (lens - 1).clamp(min=0)
        h = y[torch.arange(B, device=dev), last] * (lens > 0)[:, None]  # (B, d), output at the newest event
        return self.out(h) + mean

    # ---- heads ------------------------------------------------------------------------------------------
    def head_pairs(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """MLP re-ranker on broadcast pairs: u (..., d), v (..., d) -> scores (...).

        The MLP over [u; v; u*v] / sqrt(d) is a residual on the retrieval score scale * u.v: the re-ranker
        starts from retrieval's order and learns corrections (a plain MLP score ranked worse than u.v alone
        on MovieLens after 2 epochs: val recall@10 0.012 vs 0.028). Training feeds it detached u, v (see
        `forward`), so the head is a stacked model on top of retrieval.
        """
        u, v = torch.broadcast_tensors(u, v)
        x = torch.cat([u, v, u * v], dim=-1) / math.sqrt(self.cfg.dim)  # (..., 3d)
        return self.mlp(x).squeeze(-1) + self.scale.detach() * (u * v).sum(-1)

    def rank_pairs(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Final ranking scores at inference: the MLP head when `cfg.rerank`, else u.v; (...)."""
        if self.cfg.rerank:
            return self.head_pairs(u, v)
        u, v = torch.broadcast_tensors(u, v)
        return (u * v).sum(-1)

    def head_scores(self, u: torch.Tensor, cand_idx: torch.Tensor) -> torch.Tensor:
        """u (B, d), cand_idx int64 (B, K) -> MLP scores (B, K)."""
        v = self.item_reps(cand_idx)  # (B, K, d)
        return self.head_pairs(u[:, None, :], v)

    def forward(
        self,
        hist_idx: torch.Tensor,
        hist_event: torch.Tensor,
        hist_rating: torch.Tensor,
        hist_len: torch.Tensor,
        cand_idx: torch.Tensor,
        head_neg: int = 31,
        invalid: torch.Tensor | None = None,
        pos_col: torch.Tensor | None = None,
        head_pool: int = 200,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward over a shared candidate pool (one call, so DDP sees every parameter).

        Row b's positive is column `pos_col[b]` of the pool (default b: sampled pools put the B targets
        first; with the full catalog as the pool, pos_col = the targets' catalog indices).

        The MLP head trains on what it re-ranks at inference (`two_stage_rank`): the row's retrieval top-
        `head_pool` over the whole catalog, history items excluded. Its logits are the positive (column 0)
        plus `head_neg` items drawn uniformly from that top list; a row whose positive is not in its top list
        is a row the head never sees at inference, and its head logits are constant zeros (no gradient).
        Earlier the head trained against the `head_neg` highest-scored items of the sampled pool: positives
        then usually scored below all of its negatives, the head learned to invert retrieval's order, and
        two-stage validation NDCG@10 fell (Magazine 0.343 -> 0.165 over 5 epochs while retrieval stayed at
        0.346-0.356).

        Args:
            hist_*: as in `user_vectors`, batch B.
            cand_idx: int64 (C,) candidate pool holding every row's positive.
            head_neg: negatives per row for the head (clipped to head_pool - 1; 0 = no head loss).
            invalid: bool (B, C), True = not a negative for that row (accidental hits); never True at a
                row's positive column.
            pos_col: int64 (B,) the positive's column per row (None = arange(B)).
            head_pool: retrieval candidates per row the head re-ranks (n_candidates at inference).

        Returns:
            (retrieval logits scale * u.v (B, C), invalid = -1e9; head logits (B, 1 + head_neg), column 0 =
            positive).
        """
        u = self.user_vectors(hist_idx, hist_event, hist_rating, hist_len)  # (B, d)
        v = self.item_reps(cand_idx)  # (C, d)
        retrieval = self.scale * (u @ v.T)  # (B, C)
        if invalid is not None:
            retrieval = retrieval.masked_fill(invalid, -1e9)
        B = u.shape[0]
        rows = torch.arange(B, device=u.device)
        pos = rows if pos_col is None else pos_col
        pos_item = cand_idx[pos]  # (B,)
        # detached: the head's loss must not reach the retrieval towers (it is a stacked model on retrieval)
        with torch.no_grad():
            v_all = self.text_proj(self.text_vectors) + self.id_emb(self.id_slots)  # (N, d), inference reps
            n_items = v_all.shape[0]
            p = max(1, min(int(head_pool), n_items))
            h = max(0, min(int(head_neg), p - 1))
            s = u.detach() @ v_all.T  # (B, N)
            lens = hist_len.clamp(min=0, max=hist_idx.shape[1])
            real = torch.arange(hist_idx.shape[1], device=u.device)[None, :] < lens[:, None]  # (B, L)
            s[rows[:, None].expand_as(hist_idx)[real], hist_idx[real]] = float("-inf")  # history excluded
            top = s.topk(p, dim=1).indices  # (B, p)
            is_pos = top == pos_item[:, None]
            seen = is_pos.any(1)  # (B,) positive among the candidates the head would re-rank
            keys = torch.rand(top.shape, device=u.device).masked_fill(is_pos, -1.0)
            negs = top.gather(1, keys.topk(h, dim=1).indices)  # (B, h) uniform over the top list, no positive
            cols = torch.cat([pos_item[:, None], negs], dim=1)  # (B, 1 + h) catalog indices
        head = self.head_pairs(u.detach()[:, None, :], v_all[cols])  # (B, 1 + h)
        head = torch.where(seen[:, None], head, torch.zeros_like(head))
        return retrieval, head


def two_stage_rank(
    model: ScorerModel,
    u: torch.Tensor,
    item_reps: torch.Tensor,
    exclude: torch.Tensor | None,
    n_candidates: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Retrieval top-n by u.v (excluded items never candidates), then ranking scores (`rank_pairs`) on them.

    Args:
        model: the scorer (eval mode is the caller's job).
        u: (B, d) user vectors; item_reps: (N, d) catalog representations.
        exclude: bool (B, N), True = not a candidate (e.g. the user's history), or None.
        n_candidates: candidates per user (clipped to N).

    Returns:
        retrieval scores (B, N) with excluded = -inf, candidate indices int64 (B, n) in retrieval order,
        ranking scores (B, n) of those candidates (the MLP head, or u.v with rerank off).
    """
    retrieval = u @ item_reps.T  # (B, N)
    if exclude is not None:
        retrieval = retrieval.masked_fill(exclude, float("-inf"))
    n = min(int(n_candidates), item_reps.shape[0])
    cand = retrieval.topk(n, dim=1).indices  # (B, n)
    head = model.rank_pairs(u[:, None, :], item_reps[cand])  # (B, n)
    return retrieval, cand, head
