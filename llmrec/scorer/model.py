"""The scorer network: item tower (text + optional ID), sequential user encoder, MLP re-ranker. Pure torch.

Shapes: B users, L history length (right-padded: the first `hist_len[b]` positions are real, oldest first),
T text-feedback slots per user (`fb_pol` 0 = empty), N catalog items, D text-embedding dim, d model dim,
K candidates per user. With the text arm (default) retrieval vectors are d + D wide:
`[behaviour (d); text (D)]`.

- Item representation `v_i = [W_text t_i + gate(n_i) * dropout_id(E_id[id_slot(i)]) ; t_i]`: a linear
  projection of the frozen BERT text vector plus a learned ID embedding for items seen in training, and (text
  arm) the unit text vector itself at full dimension. `gate(n) = n / (n + k0)` (k0 learned) weighs the ID part
  by how often the item was seen in training, so a rare item leans on its text and a cold one (slot 0, a zero
  vector) is its text alone. In training the ID part is dropped per item with probability
  `id_dropout + (1 - id_dropout) * c / (c + n_i)` (c = `rare_dropout_c`), higher for rare items, which keeps
  the text path strong enough to score cold and rare items.
- User encoder, behaviour part (d): each history element is `v_item + E_event[kind] + E_pos[recency] +
  w_r * rating/5` (recency 0 = most recent, clipped at L-1; rating missing -> 0), run through a small causal
  transformer (chosen over a GRU, which steps through the L positions one at a time and was slower on CPU);
  `u = W_out h_newest + mean(history element reps) + F_+ P e_+ - F_- P e_-`, where e_+ / e_- are the
  recency-weighted means of the user's positive / negative text-feedback vectors and F_+-, zero at the start,
  learn what a text says about behaviour.
- User encoder, text arm (D): `a = b(n) (beta(n) * m + g_+ e_+ - g_- e_-)`, m = unit recency-weighted mean
  of the history's text vectors (negative events subtract; the zero-shot text model's vector), beta(n) a
  learned gain per history-length bucket (`LEN_BUCKETS`: short histories can lean on text, long ones on
  behaviour), g_+- learned gains of positive / negative text feedback. Every gain lies in [0, text_gain_max],
  so text feedback acts at once with a bounded strength: a negative text lowers the retrieval score of every
  item by g_- times its cosine to the text, a positive one raises it. b(n), the `text_boost` of the
  history-length bucket, is 1 in training and chosen on validation afterwards (how much text outranks
  behaviour).
- Retrieval score `u . v` over the full width (B, N); training logits are `scale * u . v` with a learned
  inverse temperature (init 20). Re-ranker `MLP([u_d; v_d; u_d*v_d] / sqrt(d)) + scale * u . v` -> (B, K),
  trained on detached u, v against negatives drawn from the retrieval top-K it re-ranks at inference (see
  `forward`), so text arm and feedback reach the final ranking through its residual.
- `warm_start()` (used by training) starts the model at the zero-shot text model: `text_proj` = the top-d
  singular directions of the catalog text matrix, encoder output layer zeroed, so u.v ~= cos(mean history
  text, item text) before the first step.

The catalog (text vectors, ID slots, training counts) lives in the module as buffers so that a checkpoint is
self-contained.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from llmrec.config import USER_ENCODERS
from llmrec.cooc import has_cooc
from llmrec.schema import EVENT_INDEX, EVENT_KINDS, NEGATIVE_KINDS

logger = logging.getLogger(__name__)

N_EVENT_SLOTS = len(EVENT_KINDS) + 1
# history-length buckets of the text-arm gain beta(n): bucket j holds n in [LEN_BUCKETS[j], LEN_BUCKETS[j+1])
LEN_BUCKETS = (1, 2, 3, 5, 9, 17, 33)
FEEDBACK_HALF_LIFE = 4.0  # text feedback: the newest text of a polarity weighs 1, four texts older 0.5
COLD_TEMPERATURE = 0.05  # softmax temperature over cosines of a cold item's text neighbours (cold_impute_k)


@dataclass(frozen=True)
class ScorerConfig:
    text_dim: int  # D, the BERT text-embedding dim
    n_items: int  # N, catalog size
    n_id_slots: int  # 1 + number of items with a learned ID embedding (slot 0 = cold); 1 disables IDs
    dim: int = 64  # d, retrieval / model dim
    max_len: int = 50  # L, history elements the encoder reads (most recent kept)
    n_layers: int = 1  # layers of the user encoder
    # the sequence model over the history: "transformer" (causal self-attention, pre-norm, FFN 2d) or "gru"
    # (a recurrent encoder: order carried by the recurrence, the position embedding still marks recency)
    user_encoder: str = "transformer"
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
    # weight of the item co-occurrence score (llmrec.cooc) added to the ranking score of the retrieval
    # candidates; chosen on validation after training (0 = neural ranking only). The co-occurrence matrix
    # itself is not part of the network: it lives next to the model in the artifact (cooc.npz).
    cooc_weight: float = 0.0
    # full-dimension text arm: retrieval vectors [behaviour (d); text (D)], see the module docstring. With it
    # a cold item keeps the full BERT similarity (a d-dim projection loses part of it) and text feedback acts
    # in the text space directly.
    text_arm: bool = True
    text_gain_max: float = 4.0  # bound of the learned gains beta(n), g_+ and g_- (u.v units)
    text_half_life: float = 10.0  # recency half-life (events) of the history text mean m
    rare_dropout_c: float = 2.0  # extra ID dropout for rare items: c / (c + n_i) of the remaining keep mass
    # retrieval candidates reserved for items without an ID embedding (cold items): their text must reach the
    # re-ranker even when ID-carrying items fill the top of the list; 0 = no quota. Chosen on validation.
    cold_quota: int = 0
    # at inference a cold item (no ID embedding) borrows the gated ID vectors, and in the hybrid ranking the
    # co-occurrences, of its `cold_impute_k` nearest items by text that have them (weights softmax(cos /
    # COLD_TEMPERATURE)): it behaves like the items it reads like instead of like an item nobody wants
    # (a cold item with a warm near-duplicate becomes that item). 0 = off (cold items are text only).
    cold_impute_k: int = 10
    # ranking-time multiplier of the text arm (beta(n) m and the text-feedback term alike) per history-length
    # bucket (LEN_BUCKETS order; () = all 1): how much more text counts against behaviour than training made
    # it, chosen on validation after training (`choose_text_boost`: the largest boost not worse than the
    # bucket's best NDCG at 95%, so text carries short histories until behaviour measurably outweighs it)
    text_boost: tuple[float, ...] = ()
    # ranking-time bonus (u.v units; the head's units are scale * u.v) added to the retrieval and ranking
    # scores of items without an ID embedding. Behaviour favours the items that carry an ID (their ID vectors
    # hold their popularity), so a cold item that reads exactly like what the user wants still ranks below
    # warm ones; chosen on validation after training with a seeded tenth of the warm items made cold
    # (`tune_cold_bonus`: overall NDCG in that world, so warm users pay for every cold item pushed up)
    cold_bonus: float = 0.0
    # multiplier of the co-occurrence score an item without co-occurrence data borrows from its text
    # neighbours (`cooc_impute`; 0 = such items get no co-occurrence score). Chosen with the cold bonus in the
    # world with cold items (`tune_cold_bonus`): warm validation has (almost) no cold targets, so there it
    # could only lift the wrong items
    cooc_impute: float = 1.0
    # cold-item slots in the final list: at least one item without an ID embedding in every `cold_every`
    # positions (the j-th best cold candidate moves up to position j * cold_every when it ranks lower;
    # `cold_slot_scores`), as long as cold candidates remain; 0 = off. A bonus lifts every cold item by the
    # same amount, so a few warm items far above them still fill the top; a slot guarantees new items a place
    # the way a freshness slot does. Chosen with the cold bonus in the world with cold items
    # (`tune_cold_bonus`)
    cold_every: int = 0
    # cold items keep the place the neural towers give them: an item without an ID embedding ranks no lower
    # in the final list than `cold_keep` x its position in the ranking without the co-occurrence term
    # (`cold_slot_scores`); 0 = off, else >= 1. The co-occurrence term reorders the warm items it knows and
    # lifts them above every cold item; this keeps a new item where its text and the user's history put it,
    # per user, where a slot gives every user the same quota. Chosen with the slots in the world with cold
    # items (`tune_cold_bonus`)
    cold_keep: float = 0.0

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
        if self.user_encoder not in USER_ENCODERS:
            raise ValueError(
                f"ScorerConfig.user_encoder must be one of {USER_ENCODERS}, got {self.user_encoder!r}"
            )
        if not 0.0 < float(self.logit_scale) <= 100.0:
            raise ValueError(f"ScorerConfig.logit_scale must be in (0, 100], got {self.logit_scale}")
        if float(self.cooc_weight) < 0:
            raise ValueError(f"ScorerConfig.cooc_weight must be >= 0, got {self.cooc_weight}")
        for name in ("id_dropout", "dropout"):
            if not 0.0 <= float(getattr(self, name)) < 1.0:
                raise ValueError(f"ScorerConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("text_gain_max", "text_half_life"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"ScorerConfig.{name} must be > 0, got {getattr(self, name)}")
        object.__setattr__(self, "text_boost", tuple(float(x) for x in self.text_boost))
        if self.text_boost and (len(self.text_boost) != len(LEN_BUCKETS) or min(self.text_boost) < 0):
            raise ValueError(
                f"ScorerConfig.text_boost must be empty or {len(LEN_BUCKETS)} values >= 0 "
                "(one per history-length "
                f"bucket {LEN_BUCKETS}), got {self.text_boost}"
            )
        for name in ("cold_bonus", "cooc_impute"):
            if not 0.0 <= float(getattr(self, name)) < float("inf"):
                raise ValueError(
                    f"ScorerConfig.{name} must be a finite value >= 0, got {getattr(self, name)}"
                )
        if int(self.cold_every) < 0 or int(self.cold_every) == 1:
            raise ValueError(
                "ScorerConfig.cold_every must be 0 (no cold-item slots) or >= 2 (one item without an ID "
                f"embedding in every cold_every positions), got {self.cold_every}"
            )
        if not (float(self.cold_keep) == 0.0 or 1.0 <= float(self.cold_keep) < float("inf")):
            raise ValueError(
                "ScorerConfig.cold_keep must be 0 (off) or a finite value >= 1 (a cold item ranks no lower "
                f"than cold_keep x its place in the neural ranking), got {self.cold_keep}"
            )
        if float(self.rare_dropout_c) < 0 or int(self.cold_quota) < 0 or int(self.cold_impute_k) < 0:
            raise ValueError(
                f"ScorerConfig.rare_dropout_c, cold_quota and cold_impute_k must be >= 0, got "
                f"{self.rare_dropout_c}, {self.cold_quota}, {self.cold_impute_k}"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def retrieval_dim(self) -> int:
        """Width of user and item vectors in the retrieval space: d, plus D with the text arm."""
        return self.dim + (self.text_dim if self.text_arm else 0)


class ScorerModel(nn.Module):
    """Item tower + user encoder + MLP head over a fixed catalog.

    Args:
        cfg: sizes and regularisation.
        text_vectors: float32 (N, D) frozen text embeddings, row i = catalog item i.
        id_slots: int64 (N,) ID-embedding slot per item, 0 = no ID (cold), else in [1, n_id_slots).
        item_counts: float (N,) training events per item (the ID gate and rare-item dropout read it); None =
            every item with an ID slot counts as frequent (gate 1, plain `id_dropout`).

    Example::

        cfg = ScorerConfig(text_dim=32, n_items=100, n_id_slots=101, dim=16)
        m = ScorerModel(cfg, torch.randn(100, 32), torch.arange(1, 101))
        u = m.user_vectors(torch.randint(0, 100, (4, 50)), torch.ones(4, 50, dtype=torch.long),
                           torch.zeros(4, 50), torch.full((4,), 50))   # (4, 16 + 32)
        scores = m.head_scores(u, torch.randint(0, 100, (4, 7)))            # (4, 7)
    """

    def __init__(
        self,
        cfg: ScorerConfig,
        text_vectors: torch.Tensor,
        id_slots: torch.Tensor,
        item_counts: torch.Tensor | None = None,
    ):
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
        if item_counts is None:  # unknown counts: items with an ID slot count as frequent
            item_counts = torch.where(id_slots > 0, 1e6, 0.0)
        item_counts = torch.as_tensor(item_counts, dtype=torch.float32)
        if tuple(item_counts.shape) != (cfg.n_items,) or bool((item_counts < 0).any()):
            raise ValueError(f"item_counts must be (n_items,) = ({cfg.n_items},) and >= 0, got "
                             f"{tuple(item_counts.shape)}")
        self.cfg = cfg
        d = cfg.dim
        self.register_buffer("text_vectors", text_vectors)  # (N, D)
        self.register_buffer("id_slots", id_slots)  # (N,)
        self.register_buffer("item_counts", item_counts)  # (N,)
        sign = torch.ones(N_EVENT_SLOTS)
        sign[0] = 0.0
        for kind in NEGATIVE_KINDS:
            sign[EVENT_INDEX[kind]] = -1.0
        self.register_buffer("event_sign", sign, persistent=False)  # (slots,) history text-mean sign
        self.text_proj = nn.Linear(cfg.text_dim, d)
        self.id_emb = nn.Embedding(cfg.n_id_slots, d, padding_idx=0)
        nn.init.normal_(self.id_emb.weight, std=0.02)
        with torch.no_grad():
            self.id_emb.weight[0].zero_()
        # ID gate n / (n + k0), k0 = softplus(id_gate_k) (init 1: an item seen once keeps half of its ID
        # vector)
        self.id_gate_k = nn.Parameter(torch.tensor(math.log(math.e - 1.0)))
        self.event_emb = nn.Embedding(N_EVENT_SLOTS, d, padding_idx=0)
        nn.init.normal_(self.event_emb.weight, std=0.02)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        nn.init.normal_(self.pos_emb.weight, std=0.02)
        self.rating_w = nn.Parameter(torch.zeros(d))
        self.encoder: nn.Module
        if cfg.user_encoder == "gru":
            # between-layer dropout only (torch applies none after the last layer)
            self.encoder = nn.GRU(d, d, num_layers=cfg.n_layers, batch_first=True,
                                  dropout=cfg.dropout if cfg.n_layers > 1 else 0.0)
        else:
            self.encoder = nn.TransformerEncoder(
                nn.TransformerEncoderLayer(
                    d, cfg.n_heads, dim_feedforward=2 * d, dropout=cfg.dropout, batch_first=True,
                    norm_first=True,
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
        # text feedback into the behaviour part: zero at the start, learned from synthesised feedback
        self.fb_pos = nn.Linear(d, d, bias=False)
        self.fb_neg = nn.Linear(d, d, bias=False)
        nn.init.zeros_(self.fb_pos.weight)
        nn.init.zeros_(self.fb_neg.weight)
        # bounded gains (text_gain_max * sigmoid(logit)): beta per history-length bucket, g_+ and g_-
        self.beta_logit = nn.Parameter(torch.full((len(LEN_BUCKETS),), _gain_logit(0.5, cfg.text_gain_max)))
        self.fb_gain_logit = nn.Parameter(torch.full((2,), _gain_logit(1.0, cfg.text_gain_max)))
        self.register_buffer("len_edges", torch.tensor(LEN_BUCKETS, dtype=torch.long), persistent=False)
        boost = torch.tensor(cfg.text_boost or (1.0,) * len(LEN_BUCKETS), dtype=torch.float32)
        self.register_buffer("text_boost", boost, persistent=False)  # from cfg: the config is its one home

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

    def text_gains(self) -> dict[str, torch.Tensor]:
        """The bounded gains: beta (len(LEN_BUCKETS),) per history-length bucket, fb_pos, fb_neg (scalars)."""
        g = self.cfg.text_gain_max * torch.sigmoid(self.fb_gain_logit)
        return {
            "beta": self.cfg.text_gain_max * torch.sigmoid(self.beta_logit), "fb_pos": g[0], "fb_neg": g[1]
        }

    # ---- item tower -------------------------------------------------------------------------------------
    def id_gate(self, item_idx: torch.Tensor) -> torch.Tensor:
        """(...) catalog indices -> (...) weight n / (n + k0) of the ID embedding (0 for never-seen items)."""
        n = self.item_counts[item_idx]
        return n / (n + F.softplus(self.id_gate_k))

    def item_reps(self, item_idx: torch.Tensor) -> torch.Tensor:
        """Catalog indices (...) int64 -> item representations (..., retrieval_dim); ID dropout in training,
        cold items' borrowed ID vectors (`cold_impute_k`) at inference."""
        t = self.text_vectors[item_idx]  # (..., D)
        if not self.training and self.cfg.cold_impute_k > 0:
            ids = self.id_part(item_idx)  # (..., d)
        else:
            slots = self.id_slots[item_idx]  # (...)
            if self.training and self.cfg.id_dropout > 0:
                n = self.item_counts[item_idx]
                c = self.cfg.rare_dropout_c
                p = self.cfg.id_dropout + (1.0 - self.cfg.id_dropout) * (c / (c + n) if c > 0 else 0.0)
                keep = torch.rand(slots.shape, device=slots.device) >= p
                slots = slots * keep
            ids = self.id_gate(item_idx)[..., None] * self.id_emb(slots)
        v = self.text_proj(t) + ids
        return torch.cat([v, t], dim=-1) if self.cfg.text_arm else v

    def id_part(self, item_idx: torch.Tensor) -> torch.Tensor:
        """(..., d) gated ID vectors of the given items as at inference: a cold item (no ID slot) gets the
        text-neighbour-weighted mean of its `cold_impute_k` nearest ID-carrying items' gated ID vectors."""
        ids = self.id_gate(item_idx)[..., None] * self.id_emb(self.id_slots[item_idx])  # (..., d)
        cold = self.id_slots[item_idx] == 0
        if self.cfg.cold_impute_k <= 0 or not bool(cold.any()):
            return ids
        nb, w = self.cold_neighbours()
        if nb is None:
            return ids
        c_idx = item_idx[cold]  # (c,)
        nbi = nb[c_idx]  # (c, k)
        donors = self.id_gate(nbi)[..., None] * self.id_emb(self.id_slots[nbi])  # (c, k, d)
        out = ids.clone()
        out[cold] = (w[c_idx][..., None] * donors).sum(1)
        return out

    def cold_neighbours(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(idx (N, k), weights (N, k)): for each cold item (no ID slot) its `cold_impute_k` nearest
        ID-carrying items by text cosine and their softmax(cos / COLD_TEMPERATURE) weights (rows of other
        items are unused). Cached: the catalog buffers change only inside `items_made_cold`, which drops
        the cache."""
        cache = getattr(self, "_cold_nb", None)
        if cache is not None and (cache[0] is None or cache[0].device == self.text_vectors.device):
            return cache
        donor = self.id_slots > 0
        self._cold_nb = text_neighbours(self.text_vectors, ~donor, donor, self.cfg.cold_impute_k)
        return self._cold_nb

    def cooc_impute(self, sim: sp.csr_matrix | None) -> tuple[np.ndarray, np.ndarray] | None:
        """The `impute` argument of `llmrec.cooc.history_scores` for this model: `cooc_neighbours` of sim with
        `cfg.cold_impute_k`, weights times `cfg.cooc_impute`; None when there is nothing to impute."""
        return self.cooc_imputes(sim, [float(self.cfg.cooc_impute)])[0]

    def cooc_imputes(self, sim: sp.csr_matrix | None, factors: Sequence[float]
                     ) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """`cooc_impute` with each imputation factor of `factors` in place of `cfg.cooc_impute`: the
        neighbours are found once and weighted per factor."""
        if sim is None or all(float(f) <= 0 for f in factors):
            return [None] * len(factors)
        nb = cooc_neighbours(sim, self.text_vectors.cpu().numpy(), self.cfg.cold_impute_k)
        return [None if nb is None or float(f) <= 0 else (nb[0], nb[1] * np.float32(f)) for f in factors]

    @contextmanager
    def items_made_cold(self, item_idx: np.ndarray) -> Iterator[None]:
        """Inside the block the given items have no ID embedding (slot 0: they borrow their text neighbours'
        ID vectors and get `cold_bonus`, like a real cold item); on exit their slots and the neighbour cache
        are restored."""
        saved = self.id_slots.clone()
        self.id_slots[torch.as_tensor(np.asarray(item_idx, dtype=np.int64), device=saved.device)] = 0
        self._cold_nb = None
        try:
            yield
        finally:
            self.id_slots.copy_(saved)
            self._cold_nb = None

    def text_reps(self, text_vectors: torch.Tensor) -> torch.Tensor:
        """Text vectors of items outside the catalog (M, D) -> cold item representations (M,
        retrieval_dim)."""
        v = self.text_proj(text_vectors)
        return torch.cat([v, text_vectors], dim=-1) if self.cfg.text_arm else v

    def all_item_reps(self) -> torch.Tensor:
        """(N, retrieval_dim) representations of the whole catalog (IDs included; ID dropout only in
        training)."""
        return self.item_reps(torch.arange(self.cfg.n_items, device=self.text_vectors.device))

    def inference_reps(self) -> torch.Tensor:
        """(N, retrieval_dim) catalog representations as at inference (no ID dropout), whatever the mode."""
        was = self.training
        self.training = False  # only item_reps reads it here; no submodule changes mode
        try:
            return self.all_item_reps()
        finally:
            self.training = was

    # ---- user encoder -----------------------------------------------------------------------------------
    def user_vectors(
        self,
        hist_idx: torch.Tensor,
        hist_event: torch.Tensor,
        hist_rating: torch.Tensor,
        hist_len: torch.Tensor,
        fb_vec: torch.Tensor | None = None,
        fb_pol: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """float32 (B, retrieval_dim) user vectors; arguments as in `user_parts`."""
        u, text_hist, text_fb = self.user_parts(hist_idx, hist_event, hist_rating, hist_len, fb_vec, fb_pol)
        return torch.cat([u, text_hist + text_fb], dim=-1) if self.cfg.text_arm else u

    def user_parts(
        self,
        hist_idx: torch.Tensor,
        hist_event: torch.Tensor,
        hist_rating: torch.Tensor,
        hist_len: torch.Tensor,
        fb_vec: torch.Tensor | None = None,
        fb_pol: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode right-padded histories and (optionally) text feedback, by part.

        Args:
            hist_idx: int64 (B, L) catalog indices, first hist_len[b] real (oldest first), rest any index.
            hist_event: int64 (B, L) event slot (EVENT_INDEX), 0 on padding.
            hist_rating: float32 (B, L) rating, NaN or 0 where none.
            hist_len: int64 (B,) number of real elements, >= 0 (0 = no history: u from biases only).
            fb_vec: float32 (B, T, D) text-feedback vectors (unit BERT vectors of the texts), oldest first.
            fb_pol: float32 (B, T) polarity of each text: +1, -1, or 0 = empty slot.

        Returns:
            (u (B, d) behaviour part, beta(n) * m (B, D) history-text part, g_+ e_+ - g_- e_- (B, D) feedback
            part); the D parts are zeros without the text arm. The user vector is [u; text + feedback].
        """
        B, L = hist_idx.shape
        dev = hist_idx.device
        lens = hist_len.clamp(min=0, max=L)
        ar = torch.arange(L, device=dev)
        mask = ar[None, :] < lens[:, None]  # (B, L)
        recency = (lens[:, None] - 1 - ar[None, :]).clamp(min=0)  # (B, L), 0 = newest
        rating = torch.nan_to_num(hist_rating.float(), nan=0.0) / 5.0
        reps = self.item_reps(hist_idx)  # (B, L, retrieval_dim)
        x = (
            reps[..., : self.cfg.dim]
            + self.event_emb(hist_event * mask)
            + self.pos_emb(recency.clamp(max=self.cfg.max_len - 1))
            + rating[..., None] * self.rating_w
        ) * mask[..., None]  # (B, L, d)
        x = self.drop(x)
        mean = x.sum(1) / lens.clamp(min=1)[:, None].float()  # (B, d)
        # both encoders are causal: position t sees positions <= t, so right padding never reaches a real one
        if self.cfg.user_encoder == "gru":
            y = self.encoder(x)[0]  # (B, L, d)
        else:
            y = self.encoder(x, mask=self.causal[:L, :L], is_causal=True)  # (B, L, d)
        last = (lens - 1).clamp(min=0)
        h = y[torch.arange(B, device=dev), last] * (lens > 0)[:, None]  # (B, d), output at the newest event
        u = self.out(h) + mean
        e_pos, e_neg = self._feedback_means(fb_vec, fb_pol, B, dev)  # (B, D) each
        if e_pos is not None:
            w = self.text_proj.weight  # (d, D): the item text projection, no bias
            u = u + self.fb_pos(e_pos @ w.T) - self.fb_neg(e_neg @ w.T)
        zeros = torch.zeros(B, self.cfg.text_dim, device=dev)
        if not self.cfg.text_arm:
            return u, zeros, zeros
        t = self.text_vectors[hist_idx]  # (B, L, D)
        r = (0.5 ** (recency.float() / self.cfg.text_half_life)) * self.event_sign[hist_event] * mask
        m = F.normalize((r[..., None] * t).sum(1), dim=-1)  # (B, D), zero rows stay zero
        gains = self.text_gains()
        bucket = (torch.bucketize(lens, self.len_edges, right=True) - 1).clamp(min=0)  # (B,)
        # the ranking-time boost scales the whole text arm, feedback included: more text for short histories
        # must not make a text dislike weaker against the history's own text than training made it
        boost = self.text_boost[bucket][:, None]  # (B, 1)
        fb = zeros if e_pos is None else boost * (gains["fb_pos"] * e_pos - gains["fb_neg"] * e_neg)
        return u, boost * gains["beta"][bucket][:, None] * m, fb

    def _feedback_means(
        self, fb_vec: torch.Tensor | None, fb_pol: torch.Tensor | None, B: int, dev: torch.device
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Recency-weighted means (B, D) of the positive and of the negative texts (zeros where none)."""
        if fb_vec is None or fb_pol is None or fb_vec.numel() == 0:
            return None, None
        D = self.cfg.text_dim
        if (
            fb_vec.ndim != 3
            or tuple(fb_vec.shape[::2]) != (B, D)
            or tuple(fb_pol.shape) != tuple(fb_vec.shape[:2])
        ):
            raise ValueError(
                f"text feedback must be fb_vec (B={B}, T, D={D}) and fb_pol (B, T), got "
                f"{tuple(fb_vec.shape)} and {tuple(fb_pol.shape)}"
            )
        pol = fb_pol.to(dev).float()
        out = []
        for sel in (pol > 0, pol < 0):
            # age of a text among its polarity's texts: number of later ones (newest = 0)
            later = sel.flip(1).long().cumsum(1).flip(1) - sel.long()  # (B, T)
            r = (0.5 ** (later.float() / FEEDBACK_HALF_LIFE)) * sel
            mass = r.sum(1, keepdim=True).clamp(min=1e-12)
            out.append((r[..., None] * fb_vec.to(dev).float()).sum(1) / mass)  # (B, D)
        return out[0], out[1]

    # ---- heads ------------------------------------------------------------------------------------------
    def head_pairs(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """MLP re-ranker on broadcast pairs: u (..., retrieval_dim), v (..., retrieval_dim) -> scores (...).

        The MLP over the behaviour parts [u_d; v_d; u_d*v_d] / sqrt(d) is a residual on the retrieval score
        scale * u.v (full width, text arm included): the re-ranker starts from retrieval's order and learns
        corrections (a plain MLP score ranked worse than u.v alone on MovieLens after 2 epochs: val recall@10
        0.012 vs 0.028). Training feeds it detached u, v (see `forward`), so the head is a stacked model on
        top of retrieval.
        """
        u, v = torch.broadcast_tensors(u, v)
        d = self.cfg.dim
        ud, vd = u[..., :d], v[..., :d]
        x = torch.cat([ud, vd, ud * vd], dim=-1) / math.sqrt(d)  # (..., 3d)
        return self.mlp(x).squeeze(-1) + self.scale.detach() * (u * v).sum(-1)

    def rank_pairs(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Final ranking scores at inference: the MLP head when `cfg.rerank`, else u.v; (...)."""
        if self.cfg.rerank:
            return self.head_pairs(u, v)
        u, v = torch.broadcast_tensors(u, v)
        return (u * v).sum(-1)

    def cold_bonus(self, item_idx: torch.Tensor, head_units: bool) -> torch.Tensor:
        """`cfg.cold_bonus` at the items (...) without an ID slot, 0 elsewhere; in the units of `rank_pairs`
        (scale * u.v with the re-ranker on) when head_units, else of u.v (retrieval)."""
        b = (self.id_slots[item_idx] == 0).float() * float(self.cfg.cold_bonus)
        return b * self.scale.detach() if head_units and self.cfg.rerank else b

    def head_scores(self, u: torch.Tensor, cand_idx: torch.Tensor) -> torch.Tensor:
        """u (B, retrieval_dim), cand_idx int64 (B, K) -> MLP scores (B, K)."""
        v = self.item_reps(cand_idx)  # (B, K, retrieval_dim)
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
        fb_vec: torch.Tensor | None = None,
        fb_pol: torch.Tensor | None = None,
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
            hist_*: as in `user_vectors`, batch B; fb_vec, fb_pol: text feedback as in `user_vectors`.
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
        u = self.user_vectors(hist_idx, hist_event, hist_rating, hist_len, fb_vec, fb_pol)  # (B, r)
        v = self.item_reps(cand_idx)  # (C, r)
        retrieval = self.scale * (u @ v.T)  # (B, C)
        if invalid is not None:
            retrieval = retrieval.masked_fill(invalid, -1e9)
        B = u.shape[0]
        rows = torch.arange(B, device=u.device)
        pos = rows if pos_col is None else pos_col
        pos_item = cand_idx[pos]  # (B,)
        # detached: the head's loss must not reach the retrieval towers (it is a stacked model on retrieval)
        with torch.no_grad():
            v_all = self.inference_reps()  # (N, r)
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


@torch.no_grad()
def text_neighbours(
    text_vectors: torch.Tensor,
    query: torch.Tensor,
    donor: torch.Tensor,
    k: int,
    temperature: float = COLD_TEMPERATURE,
    chunk: int = 4096,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The k nearest donor items by text cosine of every query item (never itself).

    Args:
        text_vectors: (N, D) unit text vectors; query, donor: bool (N,).
        k: neighbours per item (clipped to the number of donors).

    Returns:
        (idx int64 (N, k), weights float32 (N, k) = softmax(cos / temperature) over the k) with zeros in the
        rows of non-query items, or (None, None) when there is no donor or no query item. Exact (chunked
        matmul): O(|query| x |donor| x D).
    """
    n_donor = int(donor.sum())
    k = min(int(k), n_donor)
    q_idx = torch.nonzero(query).squeeze(1)  # (Q,)
    if k <= 0 or len(q_idx) == 0:
        return None, None
    d_idx = torch.nonzero(donor).squeeze(1)  # (M,)
    dv = text_vectors[d_idx]  # (M, D)
    n = text_vectors.shape[0]
    idx = torch.zeros(n, k, dtype=torch.long, device=text_vectors.device)
    w = torch.zeros(n, k, dtype=torch.float32, device=text_vectors.device)
    for s in range(0, len(q_idx), chunk):
        rows = q_idx[s : s + chunk]
        sim = text_vectors[rows] @ dv.T  # (b, M)
        sim = sim.masked_fill(d_idx[None, :] == rows[:, None], float("-inf"))
        top = sim.topk(k, dim=1)
        idx[rows] = d_idx[top.indices]
        w[rows] = torch.softmax(top.values / temperature, dim=1)
    return idx, w


def cooc_neighbours(
    sim: sp.csr_matrix, text_vectors: np.ndarray, k: int = 10
) -> tuple[np.ndarray, np.ndarray] | None:
    """For every item without co-occurrence data, its k nearest items by text that have some, with softmax
    weights (`text_neighbours`); the `impute` argument of `llmrec.cooc.history_scores`. None when k <= 0 or
    nothing is missing."""
    has = has_cooc(sim)
    if k <= 0 or has.all() or not has.any():
        return None
    idx, w = text_neighbours(torch.from_numpy(np.asarray(text_vectors, np.float32)), torch.from_numpy(~has),
                             torch.from_numpy(has), k)
    return (idx.numpy(), w.numpy()) if idx is not None else None


def _gain_logit(value: float, bound: float) -> float:
    """The logit x with bound * sigmoid(x) == value (0 < value < bound)."""
    p = min(max(value / bound, 1e-4), 1 - 1e-4)
    return math.log(p / (1.0 - p))


def two_stage_rank(
    model: ScorerModel,
    u: torch.Tensor,
    item_reps: torch.Tensor,
    exclude: torch.Tensor | None,
    n_candidates: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Retrieval top-n by u.v (excluded items never candidates), then ranking scores (`rank_pairs`) on them;
    both plus `cfg.cold_bonus` at items without an ID embedding.

    With `cfg.cold_quota` q > 0 the list is the top n - q by u.v plus the top q items without an ID
    embedding (cold items) not already in it, so the best cold items always reach the ranking stage.

    Args:
        model: the scorer (eval mode is the caller's job).
        u: (B, r) user vectors; item_reps: (N, r) catalog representations.
        exclude: bool (B, N), True = not a candidate (e.g. the user's history), or None.
        n_candidates: candidates per user (clipped to N).

    Returns:
        retrieval scores (B, N) with excluded = -inf, candidate indices int64 (B, n) (retrieval order inside
        each part), ranking scores (B, n) of those candidates (the MLP head, or u.v with rerank off), -inf at
        every candidate that is not one (an excluded item, or a quota slot with no cold item left, whose index
        may repeat another candidate's).
    """
    retrieval = u @ item_reps.T  # (B, N)
    if model.cfg.cold_bonus > 0:
        retrieval = retrieval + model.cold_bonus(torch.arange(item_reps.shape[0], device=u.device), False)
    if exclude is not None:
        retrieval = retrieval.masked_fill(exclude, float("-inf"))
    n = min(int(n_candidates), item_reps.shape[0])
    q = min(int(model.cfg.cold_quota), n)
    cold = model.id_slots == 0  # (N,)
    if q > 0 and bool(cold.any()):
        main = retrieval.topk(n - q, dim=1)  # (B, n - q)
        rest = retrieval.masked_fill(~cold[None, :], float("-inf")).scatter(1, main.indices, float("-inf"))
        extra = rest.topk(q, dim=1)  # (B, q); -inf = no cold item left (the index is then meaningless)
        cand = torch.cat([main.indices, extra.indices], dim=1)  # (B, n)
        valid = torch.cat([main.values, extra.values], dim=1).isfinite()
    else:
        top = retrieval.topk(n, dim=1)
        cand, valid = top.indices, top.values.isfinite()  # (B, n)
    head = model.rank_pairs(u[:, None, :], item_reps[cand])  # (B, n)
    if model.cfg.cold_bonus > 0:
        head = head + model.cold_bonus(cand, True)
    return retrieval, cand, head.masked_fill(~valid, float("-inf"))


def cold_slot_scores(
    score: np.ndarray,
    cold: np.ndarray,
    every: int,
    keep: float = 0.0,
    neural: np.ndarray | None = None,
) -> np.ndarray:
    """Ranking scores float (B, n) with cold items placed (`ScorerConfig.cold_every`, `cold_keep`): their
    descending order is the plain order of `score` with some cold candidates moved up.

    Each cold candidate (one without an ID embedding) has a deadline, the lowest position it may take: with
    slots (every >= 2) the j-th best cold candidate (1-based, in the plain order) must be at or above position
    j * every; with keep >= 1 a cold candidate at position r of the `neural` order (the ranking without the
    co-occurrence term) must be at or above ceil(keep * r). Cold candidates keep their relative order, so an
    earlier one must also make room for a later one's deadline; every cold candidate goes to the lowest
    position that meets all of these and its own plain position, and the other candidates fill the free
    positions in their order. Only moved items' scores change: a run of moved items gets evenly spaced scores
    between those of the unmoved items around it, so scores stay on the ranking's scale and a sort by score
    gives the placed order (up to exact ties of those neighbours).

    Args:
        score: (B, n) ranking scores, -inf where the candidate is not one (never moved).
        cold: bool (B, n), True at candidates without an ID embedding.
        every: 0 = no slots (score returned as is without keep), else >= 2.
        keep: 0 = no neural places, else >= 1 (needs `neural`).
        neural: (B, n) the same candidates' scores without the co-occurrence term.
    """
    score = np.asarray(score)
    if every == 1:
        raise ValueError("every must be 0 or >= 2, got 1")
    if keep and keep < 1:
        raise ValueError(f"keep must be 0 or >= 1, got {keep}")
    if keep and neural is None:
        raise ValueError("keep > 0 needs the neural scores (the ranking without the co-occurrence term)")
    if (every <= 0 and not keep) or score.size == 0:
        return score
    B, n = score.shape
    rows = np.arange(B)[:, None]
    order = np.argsort(-score, axis=1, kind="stable")
    s_sorted = np.take_along_axis(score, order, 1)
    c_sorted = np.take_along_axis(np.asarray(cold, dtype=bool), order, 1) & np.isfinite(s_sorted)
    natural = np.broadcast_to(np.arange(1, n + 1)[None, :], (B, n))  # 1-based positions in the plain order
    c_count = np.cumsum(c_sorted, axis=1)  # j for the j-th cold candidate
    deadline = natural.copy()
    if every > 0:
        deadline = np.minimum(deadline, c_count * every)
    if keep:
        nat_of = np.empty((B, n), dtype=np.int64)  # position of each candidate in the neural order
        nat_of[rows, np.argsort(-np.asarray(neural), axis=1, kind="stable")] = np.arange(1, n + 1)[None, :]
        deadline = np.minimum(deadline, np.ceil(keep * np.take_along_axis(nat_of, order, 1)).astype(np.int64))
    # cold candidates in their order: p_j = c_j + max(0, min over later cold k of (deadline_k - c_k)), the
    # lowest positions that keep their order and meet every deadline (strictly increasing in j)
    slack = np.where(c_sorted, deadline - c_count, n)
    slack = np.minimum.accumulate(slack[:, ::-1], axis=1)[:, ::-1]
    pos = np.where(c_sorted, c_count + np.maximum(slack, 0), 0)
    moved = c_sorted & (pos < natural)
    if not moved.any():
        return score
    # the others fill the free positions in their order
    taken = np.zeros((B, n + 1), dtype=bool)
    taken[rows, pos] = True
    free = np.argsort(taken[:, 1:], axis=1, kind="stable")  # 0-based free positions first, in order
    rank_other = np.clip(np.cumsum(~c_sorted, axis=1) - 1, 0, n - 1)
    final = np.where(c_sorted, pos - 1, np.take_along_axis(free, rank_other, 1))  # (B, n) 0-based
    by_pos = np.empty_like(s_sorted)
    np.put_along_axis(by_pos, final, s_sorted, 1)
    moved_at = np.zeros((B, n), dtype=bool)
    np.put_along_axis(moved_at, final, moved, 1)
    # a run of moved items at positions a..b sits between the unmoved items at a - 1 and b + 1 (one is always
    # below: the last candidate's place is never a moved item's); a run at the top gets steps above it
    idx = np.where(~moved_at, np.arange(n)[None, :], -1)
    above = np.maximum.accumulate(idx, axis=1)  # the nearest unmoved position at or above
    idx_b = np.where(~moved_at, np.arange(n)[None, :], n)
    below = np.minimum.accumulate(idx_b[:, ::-1], axis=1)[:, ::-1]  # the nearest unmoved at or below
    b, p = np.nonzero(moved_at)
    lo, hi = below[b, p], above[b, p]
    s_lo = by_pos[b, lo]
    n_fin = np.isfinite(s_sorted).sum(1)  # a row with a moved item has at least two candidates
    span = s_sorted[b, 0] - s_sorted[b, np.maximum(n_fin[b] - 1, 0)]
    step = np.maximum(span / n, 1e-6)
    s_hi = np.where(hi < 0, s_lo + (lo - hi) * step, by_pos[b, np.maximum(hi, 0)])
    new = s_hi + (s_lo - s_hi) * (p - hi) / (lo - hi)
    at = np.empty((B, n), dtype=np.int64)  # final position -> index in the plain order
    np.put_along_axis(at, final, np.broadcast_to(np.arange(n)[None, :], (B, n)), 1)
    out = np.array(score, copy=True)
    out[b, order[b, at[b, p]]] = new.astype(out.dtype)
    return out
