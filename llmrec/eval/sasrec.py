"""SASRec baseline (Kang & McAuley, ICDM 2018) at reference settings, trained in-process with torch.

ID-only causal self-attention over each user's positive item sequence. Settings (the defaults): 2 blocks,
hidden 64, 1 head, a point-wise feed-forward 4x the hidden width, dropout 0.2, Adam lr 1e-3, batch 128,
sequences of the last 50 items; the loss is the full softmax (cross-entropy over every known item, as in
SASRec+ / "gSASRec" studies, which lifts SASRec well above its sampled-BCE original) or, with
`loss="sampled"`, a sampled softmax over `n_negatives` uniform negatives shared by a batch. With a
validation set (`fit(train, items, validation=InnerValidation)`), validation NDCG@10 is measured after every
epoch, training stops after `patience` (3) epochs without a better one or after `epochs` (50; CE-trained
SASRec converges within tens of epochs), and the best epoch's weights are kept (`tuning["best_epoch"]`);
without one, all `epochs` run.

Logits are computed on at most `max_logits` (tokens x items) entries at a time: batches are cut into
micro-batches whose gradients are accumulated, so one optimiser step still sees `batch_size` sequences.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from llmrec.data.order import sort_events
from llmrec.eval.baselines import _IDModel
from llmrec.protocol import History, ItemSpace
from llmrec.schema import ITEM_IDX, USER_ID

if TYPE_CHECKING:
    import torch

    from llmrec.eval.tuning import InnerValidation

logger = logging.getLogger(__name__)

__all__ = ["SASRecRecommender"]


class SASRecRecommender(_IDModel):
    """SASRec over positive train events; see the module docstring. Cold items score -inf."""

    name = "sasrec"
    early_stopping = True  # `Tuned` hands it the inner validation instead of refitting

    def __init__(
        self,
        dim: int = 64,
        n_blocks: int = 2,
        n_heads: int = 1,
        max_len: int = 50,
        ffn_mult: int = 4,
        epochs: int = 50,
        batch_size: int = 128,
        loss: str = "ce",
        n_negatives: int = 256,
        lr: float = 1e-3,
        dropout: float = 0.2,
        patience: int = 3,
        seed: int = 0,
        device: str = "cpu",
        max_train_s: float | None = None,
        num_threads: int | None = None,
        max_logits: int = 2**23,
    ) -> None:
        if loss not in ("ce", "sampled"):
            raise ValueError(f"sasrec: loss must be 'ce' (full softmax) or 'sampled', got {loss!r}")
        self.dim, self.n_blocks, self.n_heads, self.max_len = dim, n_blocks, n_heads, max_len
        self.ffn_mult, self.epochs, self.batch_size, self.loss = ffn_mult, epochs, batch_size, loss
        self.n_negatives, self.lr, self.dropout, self.patience = n_negatives, lr, dropout, patience
        self.seed, self.device, self.max_train_s = seed, device, max_train_s
        self.num_threads = num_threads  # torch intra-op threads while fitting/scoring (None = leave as is)
        self.max_logits = max_logits
        self.tuning: dict[str, Any] = {}

    def fit(self, train: pd.DataFrame, items: ItemSpace, validation: InnerValidation | None = None) -> None:
        with _torch_threads(self.num_threads):
            self._fit(train, items, validation)

    def _fit(self, train: pd.DataFrame, items: ItemSpace, validation: InnerValidation | None) -> None:
        import torch

        t0 = time.perf_counter()
        pos = self._prepare(train, items)
        torch.manual_seed(self.seed)
        rng = np.random.default_rng(self.seed)
        windows = _sequence_windows(pos, self.max_len + 1)  # (W, max_len+1) int64, 0 = pad, item i -> i+1
        if len(windows) == 0:
            raise ValueError("sasrec: no user has 2 or more positive train events; nothing to learn from")
        self.net = _sasrec_net_cls()(
            items.n_items, self.dim, self.n_blocks, self.n_heads, self.max_len, self.dropout, self.ffn_mult
        ).to(self.device)
        opt = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        known_tok = np.flatnonzero(self.known) + 1
        unknown = torch.from_numpy(~self.known).to(self.device)  # (N,) masked out of the full softmax
        micro = max(1, min(self.batch_size, self.max_logits // max(1, self.max_len * items.n_items)))
        best_ndcg, best_state, best_epoch, bad, history = -1.0, None, 0, 0, []
        loss_val, epoch = float("nan"), 0
        for epoch in range(1, self.epochs + 1):
            self.net.train()
            order = rng.permutation(len(windows))
            total, n_tok = 0.0, 0
            for s in range(0, len(order), self.batch_size):
                batch = windows[order[s : s + self.batch_size]]
                n_batch_tok = max(1, int((batch[:, 1:] > 0).sum()))
                opt.zero_grad()
                for m in range(0, len(batch), micro):
                    w = torch.from_numpy(batch[m : m + micro]).to(self.device)
                    loss_sum, n = self._loss(w, unknown, known_tok, rng)
                    (loss_sum / n_batch_tok).backward()  # accumulated: the mean over the whole batch's tokens
                    total, n_tok = total + loss_sum.item(), n_tok + n
                opt.step()
            loss_val = total / max(n_tok, 1)
            line = f"sasrec epoch {epoch}/{self.epochs}: loss {loss_val:.4f}"
            if validation is not None:
                ndcg = validation.ndcg(validation.scores(self))
                history.append(round(ndcg, 6))
                line += f", val ndcg@10 {ndcg:.4f}"
                if ndcg > best_ndcg:
                    best_ndcg, best_epoch, bad = ndcg, epoch, 0
                    best_state = copy.deepcopy(self.net.state_dict())
                else:
                    bad += 1
            logger.info("%s (%.0fs)", line, time.perf_counter() - t0)
            if validation is not None and bad >= self.patience:
                logger.info("sasrec: early stop after epoch %d (best epoch %d)", epoch, best_epoch)
                break
            if self.max_train_s is not None and time.perf_counter() - t0 > self.max_train_s:
                logger.info(
                    "sasrec: stopping after epoch %d, time budget %.0fs reached", epoch, self.max_train_s
                )
                break
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.final_loss = loss_val
        self.tuning = {
            "best_epoch": best_epoch if validation is not None else epoch,
            "epochs_run": epoch,
            "val_ndcg_by_epoch": history,
        }
        logger.info(
            "sasrec: %d windows, %d epochs (kept %d), final loss %.3f (%.1fs)",
            len(windows),
            epoch,
            self.tuning["best_epoch"],
            loss_val,
            time.perf_counter() - t0,
        )

    def _loss(
        self, w: torch.Tensor, unknown: torch.Tensor, known_tok: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, int]:
        """(summed cross-entropy over the window's real next-item tokens, their count)."""
        import torch

        inp, tgt = w[:, :-1], w[:, 1:]  # (b, L)
        h = self.net(inp)  # (b, L, D)
        m = tgt > 0
        hs, ts = h[m], tgt[m]  # (T, D), (T,)
        emb = self.net.item_emb
        if self.loss == "ce":
            logits = hs @ emb.weight[1:].T  # (T, N)
            logits = logits.masked_fill(unknown[None, :], float("-inf"))
            return torch.nn.functional.cross_entropy(logits, ts - 1, reduction="sum"), len(ts)
        negs = torch.from_numpy(rng.choice(known_tok, size=self.n_negatives)).to(self.device)
        pos_logit = (hs * emb(ts)).sum(-1, keepdim=True)  # (T, 1)
        neg_logit = (hs @ emb(negs).T).masked_fill(negs[None, :] == ts[:, None], float("-inf"))  # (T, K)
        logits = torch.cat([pos_logit, neg_logit], dim=1)
        zeros = torch.zeros(len(ts), dtype=torch.long, device=self.device)
        return torch.nn.functional.cross_entropy(logits, zeros, reduction="sum"), len(ts)

    def score(self, histories: list[History]) -> np.ndarray:
        with _torch_threads(self.num_threads):
            return self._score(histories)

    def _score(self, histories: list[History]) -> np.ndarray:
        import torch

        seqs = np.zeros((len(histories), self.max_len), dtype=np.int64)  # left-padded, (B, L)
        for b, h in enumerate(histories):
            idx = self._history_items(h)[-self.max_len :] + 1
            if len(idx):
                seqs[b, -len(idx) :] = idx
        was_training = self.net.training
        self.net.eval()
        with torch.no_grad():
            x = torch.from_numpy(seqs).to(self.device)
            h = self.net(x)[:, -1]  # (B, D)
            scores = (h @ self.net.item_emb.weight[1:].T).float().cpu().numpy()  # (B, N)
        self.net.train(was_training)
        empty = seqs[:, -1] == 0
        scores[empty] = 0.0  # no known history: no opinion (ties)
        return self._mask_cold(np.ascontiguousarray(scores, dtype=np.float32))


# ----------------------------------------------------------------------------------------------- helpers


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sequence_windows(pos: pd.DataFrame, width: int) -> np.ndarray:
    """Cut each user's time-ordered item sequence into windows of `width` tokens (item i -> token i+1).

    The last window of a user ends at its last event; shorter windows are left-padded with 0.
    Users with a single event give no window. Returns int64 (W, width).
    """
    df = sort_events(pos)
    out = []
    for _, g in df.groupby(USER_ID, sort=False):
        toks = g[ITEM_IDX].to_numpy() + 1
        if len(toks) < 2:
            continue
        for end in range(len(toks), 1, -(width - 1)):  # windows overlap by one item so every pair is trained
            w = toks[max(0, end - width) : end]
            row = np.zeros(width, dtype=np.int64)
            row[-len(w) :] = w
            out.append(row)
    return np.stack(out) if out else np.zeros((0, width), dtype=np.int64)


def _sasrec_net_cls() -> type:  # torch imported lazily
    import torch
    from torch import nn

    class SASRecNet(nn.Module):
        def __init__(
            self,
            n_items: int,
            dim: int,
            n_blocks: int,
            n_heads: int,
            max_len: int,
            dropout: float,
            ffn_mult: int,
        ):
            super().__init__()
            self.item_emb = nn.Embedding(n_items + 1, dim, padding_idx=0)
            self.pos_emb = nn.Embedding(max_len, dim)
            # unit-norm item vectors: inputs (x sqrt(dim)) have unit per-dim scale and the output logits
            # h . e (h layer-normed) start near N(0, 1): the softmax starts at chance, not far above
            nn.init.normal_(self.item_emb.weight, std=dim**-0.5)
            nn.init.normal_(self.pos_emb.weight, std=1.0)
            with torch.no_grad():
                self.item_emb.weight[0].zero_()
            layer = nn.TransformerEncoderLayer(
                dim,
                n_heads,
                dim_feedforward=ffn_mult * dim,
                dropout=dropout,
                batch_first=True,
                norm_first=True,
            )
            self.blocks = nn.TransformerEncoder(layer, n_blocks, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(dim)
            self.drop = nn.Dropout(dropout)
            self.scale = math.sqrt(dim)
            self.n_heads = n_heads

        def forward(self, seq: torch.Tensor) -> torch.Tensor:  # (B, L) tokens -> (B, L, D)
            b, length = seq.shape
            pos = torch.arange(length, device=seq.device)[None, :].expand(b, length)
            x = self.drop(self.item_emb(seq) * self.scale + self.pos_emb(pos))
            x = self.blocks(x, mask=self._attn_mask(seq))
            return self.norm(x)

        def _attn_mask(self, seq: torch.Tensor) -> torch.Tensor:
            # True = may not attend. Query i sees keys j <= i that are not padding; every query also sees
            # itself, so no row is fully masked (a fully masked row gives NaN that leaks through 0-weights).
            length = seq.shape[1]
            ar = torch.arange(length, device=seq.device)
            allowed = (ar[None, :] <= ar[:, None])[None] & (seq != 0)[:, None, :]  # (B, L, L)
            allowed = allowed | torch.eye(length, dtype=torch.bool, device=seq.device)[None]
            return (~allowed).repeat_interleave(self.n_heads, dim=0)  # (B * heads, L, L)

    return SASRecNet
