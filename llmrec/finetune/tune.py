"""Fine-tune the text encoder on behaviour: items a user takes one after the other should embed close.

Pure pandas/torch/transformers, no Ray (the Ray Train adapter is `llmrec.finetune.ray_tune`). The tuned
encoder is saved as a model folder `llmrec embed --model` reads, so the catalog, queries and text feedback are
all encoded by it and share one space (serving finds it through the embeddings' meta.json `model_path`).

- Pairs (`build_pairs`): the leave-last-out split of `llmrec evaluate` / `llmrec train --holdout loo`
  (`llmrec.eval.split.leave_last_out`, same seed): only its *train* events make training pairs, so the tuned
  encoder never saw a validation or test target of that split. Per user, events in the one event order
  (`sort_events`), only the scorer's target kinds (`llmrec.scorer.data.target_mask`: no dislike / skip); each
  event after the first is paired with the one before it, unless both are the same item. Validation pairs:
  per user with a validation event of a target kind, (the user's last training target-kind item, the
  validation item), at most `val_pairs` users, a seeded sample.
- Loss (`contrastive_loss`): InfoNCE over cosines / temperature with in-batch negatives, both directions
  (context -> next among the batch's next items, and back); a batch item equal to a row's positive is not
  its negative.
- What is trained: the top `train_layers` transformer layers; the
  word embeddings and the layers below stay frozen, so the start is the zero-shot encoder and a few hundred
  steps cannot wander far from it.
- Model choice: recall@10 / NDCG@10 of the validation item among the catalog items (the context item
  excluded), ranked by cosine to the context item, at step 0 (the frozen encoder) and every `eval_every`
  steps; the best pass is kept, so a tune that does not help returns the frozen encoder (`improved` False).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from llmrec.config import EncoderTuneConfig
from llmrec.data.order import sort_events
from llmrec.embed.encoder import attention_mask_from_length
from llmrec.schema import ITEM_ID, USER_ID

if TYPE_CHECKING:
    import torch

    from llmrec.embed.encoder import TextEncoder

logger = logging.getLogger(__name__)

EVAL_K = 10
# files of a model folder that are weights: not copied from the base model (save_pretrained writes new ones)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "tf_model.h5", "flax_model.msgpack",
                "model.safetensors.index.json", "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class TunePairs:
    """Item index pairs (context, next) of the catalog rows.

    train: int64 (P, 2); val: int64 (V, 2); stats: counts for meta.json.
    """

    train: np.ndarray
    val: np.ndarray
    stats: dict[str, Any] = field(default_factory=dict)


def build_pairs(
    interactions: pd.DataFrame, item_ids: Sequence[str] | np.ndarray, seed: int = 0, val_pairs: int = 2000
) -> TunePairs:
    """Training and validation pairs of the leave-last-out split (module docstring).

    Args:
        interactions: canonical columns (user_id, item_id, ts, rating, event), as `llmrec prepare` writes.
        item_ids: the catalog's item ids; pair values are rows of it.
        seed: the split's tie order and the validation sample.
        val_pairs: validation pairs at most.

    Raises:
        ValueError: interactions name items outside the catalog (with examples), or no pair can be made.
    """
    from llmrec.eval.split import leave_last_out
    from llmrec.scorer.data import target_mask

    lookup = pd.Index(np.asarray(item_ids).astype(str))
    idx = lookup.get_indexer(interactions[ITEM_ID].astype(str))
    if (idx < 0).any():
        bad = interactions.loc[idx < 0, ITEM_ID].astype(str).unique()
        raise ValueError(
            f"{int((idx < 0).sum())} interactions name {len(bad)} items outside the catalog (e.g. "
            f"{bad[:5].tolist()}); tune on the interactions `llmrec prepare` wrote with the same items"
        )
    split = leave_last_out(interactions, seed)
    train = split.train[target_mask(split.train)]
    train = sort_events(train, seed)  # leave_last_out keeps the order; sort again to be independent of it
    user = train[USER_ID].astype(str).to_numpy()
    item = lookup.get_indexer(train[ITEM_ID].astype(str)).astype(np.int64)
    same_user = np.zeros(len(train), bool)
    same_user[1:] = user[1:] == user[:-1]
    keep = same_user.copy()
    keep[1:] &= item[1:] != item[:-1]
    rows = np.flatnonzero(keep)
    train_pairs = np.stack([item[rows - 1], item[rows]], axis=1) if len(rows) else np.zeros((0, 2), np.int64)

    valid = split.valid[target_mask(split.valid)]
    last_train = pd.Series(item, index=user).groupby(level=0).last()  # the user's last training item
    v_user = valid[USER_ID].astype(str).to_numpy()
    has_ctx = np.isin(v_user, last_train.index)
    v_user = v_user[has_ctx]
    v_item = lookup.get_indexer(valid[ITEM_ID].astype(str).to_numpy()[has_ctx]).astype(np.int64)
    v_ctx = last_train.loc[v_user].to_numpy(np.int64) if len(v_user) else np.zeros(0, np.int64)
    ok = v_ctx != v_item
    val = np.stack([v_ctx[ok], v_item[ok]], axis=1) if ok.any() else np.zeros((0, 2), np.int64)
    if len(val) > val_pairs:
        pick = np.sort(np.random.default_rng(seed).choice(len(val), val_pairs, replace=False))
        val = val[pick]
    if len(train_pairs) == 0:
        raise ValueError(
            f"no training pairs from {len(interactions)} interactions: a pair needs two consecutive events "
            "of one user on different items, in the leave-last-out training split (users with >= 3 events "
            "keep their last two out); give more interactions"
        )
    stats = {"n_train_pairs": int(len(train_pairs)), "n_val_pairs": int(len(val)),
             "n_train_events": int(len(train)), "n_users": int(split.stats.get("n_users", 0)),
             "split": "leave_last_out", "seed": int(seed)}
    return TunePairs(train=train_pairs, val=val, stats=stats)


def contrastive_loss(ctx: torch.Tensor, nxt: torch.Tensor, ctx_idx: torch.Tensor, nxt_idx: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over in-batch negatives.

    Args:
        ctx, nxt: float (B, D) unit rows, the context and the next item of each pair.
        ctx_idx, nxt_idx: int (B,) their catalog rows: a column holding the row's own positive item
            (duplicates in the batch) is masked out of the negatives, not counted as one.
        temperature: logits = cosine / temperature.

    Returns:
        scalar: mean of the context -> next and next -> context cross-entropies.
    """
    import torch

    logits = ctx @ nxt.T / temperature  # (B, B)
    b = logits.shape[0]
    eye = torch.eye(b, dtype=torch.bool, device=logits.device)
    dup_fwd = (nxt_idx[None, :] == nxt_idx[:, None]) & ~eye  # column j is row i's own next item
    dup_bwd = (ctx_idx[None, :] == ctx_idx[:, None]) & ~eye
    target = torch.arange(b, device=logits.device)
    fwd = torch.nn.functional.cross_entropy(logits.masked_fill(dup_fwd, float("-inf")), target)
    bwd = torch.nn.functional.cross_entropy(logits.T.masked_fill(dup_bwd, float("-inf")), target)
    return (fwd + bwd) / 2


def trainable_parameters(model: torch.nn.Module, train_layers: int) -> list[torch.nn.Parameter]:
    """Freeze `model` but its top `train_layers` encoder layers; return what is trained. (The BERT pooler
    stays frozen: sentence pooling reads the token states, never it.)

    Raises:
        ValueError: the model has no `encoder.layer` list (not a BERT-family model).
    """
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if layers is None:
        raise ValueError(
            f"{type(model).__name__} has no encoder.layer list; tune-encoder trains the top layers of a "
            "BERT-family model (BERT, MiniLM, RoBERTa, ...)"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    top = list(layers)[-min(train_layers, len(layers)):]
    params = [p for layer in top for p in layer.parameters()]
    for p in params:
        p.requires_grad_(True)
    return params


def evaluate_pairs(encode: Callable[[np.ndarray], np.ndarray], n_items: int, val: np.ndarray,
                   max_items: int, seed: int = 0) -> dict[str, float]:
    """Recall@10 / NDCG@10 of each validation pair's next item, ranked by cosine to its context item among
    the catalog (or, above `max_items` items, the validation items plus a seeded sample), context excluded.

    Args:
        encode: catalog rows (n,) -> float32 (n, D) unit rows (the encoder as it is now).
        n_items: catalog size.
        val: int64 (V, 2) (context, next) rows.
    """
    from llmrec.metrics import compute_metrics

    if len(val) == 0:
        return {}
    if n_items <= max_items:
        rows = np.arange(n_items)
    else:
        need = np.unique(val)
        rest = np.setdiff1d(np.arange(n_items), need)
        extra = np.random.default_rng(seed).choice(rest, max(0, max_items - len(need)), replace=False)
        rows = np.sort(np.concatenate([need, extra]))
    pos = np.full(n_items, -1, np.int64)
    pos[rows] = np.arange(len(rows))
    vecs = encode(rows)  # (M, D)
    ctx, nxt = pos[val[:, 0]], pos[val[:, 1]]
    scores = vecs[ctx] @ vecs.T  # (V, M)
    m = compute_metrics(scores, nxt, exclude=[np.array([c]) for c in ctx], ks=(EVAL_K,))
    return {f"recall@{EVAL_K}": float(m[f"recall@{EVAL_K}"]), f"ndcg@{EVAL_K}": float(m[f"ndcg@{EVAL_K}"])}


class FrozenBottom:
    """The frozen layers' output of every item, computed once, so a step runs only the trained top layers.

    `embed(rows, grad)` -> float32 (B, D) unit rows, equal to the encoder's own forward (checked on a few
    items at construction; `ok` False, and the caller runs the whole model, when this transformers version's
    layers cannot be called this way). Memory: the states of every item's real tokens, float32 (at most
    `nbytes`: items x max_length x hidden size x 4 bytes; `tune_loop` caches only below `cache_max_bytes`).
    """

    def __init__(self, encoder: TextEncoder, texts: Sequence[str], train_layers: int, batch_size: int = 64):
        import torch

        self.encoder = encoder
        model = encoder.transformer
        layers = list(model.encoder.layer)
        self.top = layers[-min(train_layers, len(layers)):]
        self.k = len(layers) - len(self.top)  # hidden_states[k] is the input of the first trained layer
        tok = encoder.tokenize(list(texts))
        ids, length = tok["input_ids"], tok["length"]
        self.states: list[torch.Tensor] = [None] * len(length)  # type: ignore[list-item]
        order = np.argsort(length, kind="stable")
        was_training = model.training
        model.eval()
        with torch.inference_mode():
            for b0 in range(0, len(order), batch_size):
                rows = order[b0 : b0 + batch_size]
                width = int(length[rows].max())
                x = torch.as_tensor(ids[rows, :width], dtype=torch.long, device=encoder.device)
                m = torch.as_tensor(attention_mask_from_length(length[rows], width), device=encoder.device)
                h = model(input_ids=x, attention_mask=m, output_hidden_states=True).hidden_states[self.k]
                for j, r in enumerate(rows):
                    self.states[r] = h[j, : length[r]].clone()
        model.train(was_training)
        probe = np.arange(min(8, len(texts)))
        with torch.inference_mode():
            got = self.embed(probe, grad=False).cpu().numpy()
        want = encoder.encode([texts[i] for i in probe])
        self.ok = bool(np.allclose(got, want, atol=1e-4))
        if not self.ok:
            logger.warning("tune-encoder: the cached frozen layers do not reproduce the model's forward "
                           "(max diff %.2g); running the whole model every step",
                           float(np.abs(got - want).max()))

    @staticmethod
    def nbytes(encoder: TextEncoder, n_items: int) -> int:
        """Bytes the cache takes at most: items x max_length tokens x hidden size x 4."""
        return n_items * encoder.max_length * int(encoder.transformer.config.hidden_size) * 4

    def embed(self, rows: np.ndarray, grad: bool = True) -> torch.Tensor:
        import torch
        from transformers.masking_utils import create_bidirectional_mask

        lens = [int(self.states[r].shape[0]) for r in rows]
        width = max(lens)
        h = torch.zeros(len(rows), width, self.states[rows[0]].shape[1], device=self.encoder.device)
        for j, r in enumerate(rows):
            h[j, : lens[j]] = self.states[r]
        mask = torch.as_tensor(attention_mask_from_length(np.asarray(lens), width), device=h.device)
        model = self.encoder.transformer
        with torch.set_grad_enabled(grad):
            m4 = create_bidirectional_mask(config=model.config, inputs_embeds=h, attention_mask=mask)
            for layer in self.top:
                h = layer(h, m4)
                h = h[0] if isinstance(h, tuple) else h
            return self.encoder.pool(h, mask)


@dataclass
class TuneResult:
    """What `tune_loop` did: the best state (trained parameters only, by name), its step and metrics."""

    best_step: int
    best_metrics: dict[str, float]
    frozen_metrics: dict[str, float]
    best_state: dict[str, Any]
    history: list[dict[str, Any]]
    steps: int
    train_s: float
    mean_loss_last: float | None

    @property
    def improved(self) -> bool:
        return self.best_step > 0


def tune_loop(
    encoder: TextEncoder,
    texts: Sequence[str],
    pairs: TunePairs,
    cfg: EncoderTuneConfig,
    *,
    rank: int = 0,
    world: int = 1,
    wrap: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    report: Callable[[dict[str, Any]], None] | None = None,
) -> TuneResult:
    """Train `encoder`'s top layers on `pairs.train` (module docstring); return the best pass.

    Args:
        encoder: the start (its weights are changed in place; the best state is in the result).
        texts: every catalog item's text, by row.
        rank, world: this worker among `world` data-parallel ones: each draws its own pairs, batch_size //
            world per step.
        wrap: wraps the transformer for training (DDP: `ray.train.torch.prepare_model`); None = as it is.
        report: called after every validation pass with {step, loss, metrics...}.
    """
    import torch

    model = encoder.transformer
    params = trainable_parameters(model, cfg.train_layers)
    trained_names = {n for n, p in model.named_parameters() if p.requires_grad}
    net = wrap(model) if wrap is not None else model
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    rng = np.random.default_rng(cfg.seed * 1000 + rank)
    per_worker = max(2, cfg.batch_size // world)
    score_key = f"ndcg@{EVAL_K}"

    def snapshot() -> dict[str, Any]:
        return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if n in trained_names}

    bottom = None
    if world == 1 and FrozenBottom.nbytes(encoder, len(texts)) <= cfg.cache_max_bytes:
        bottom = FrozenBottom(encoder, texts, cfg.train_layers)
        bottom = bottom if bottom.ok else None
    logger.info("tune-encoder: %s", "frozen layers cached once per item" if bottom is not None
                else "the whole model runs every step")

    def encode_rows(rows: np.ndarray) -> np.ndarray:
        if bottom is None:
            return encoder.encode([texts[i] for i in rows])
        with torch.inference_mode():
            return np.concatenate([bottom.embed(rows[b : b + 128], grad=False).cpu().numpy()
                                   for b in range(0, len(rows), 128)])

    def run_eval(step: int, loss: float | None) -> dict[str, Any]:
        model.eval()
        m = evaluate_pairs(encode_rows, len(texts), pairs.val, cfg.eval_max_items, cfg.seed)
        model.train()
        row = {"step": step, "loss": loss, **m}
        history.append(row)
        logger.info("tune-encoder step %d: loss %s, val %s", step,
                    "-" if loss is None else f"{loss:.4f}", {k: round(v, 4) for k, v in m.items()})
        if report is not None:
            report(row)
        return m

    history: list[dict[str, Any]] = []
    frozen = run_eval(0, None)
    best_step, best_m, best_state = 0, frozen, snapshot()
    t0 = time.perf_counter()
    losses: list[float] = []
    step = 0
    model.train()
    for step in range(1, cfg.max_steps + 1):
        batch = pairs.train[rng.integers(0, len(pairs.train), per_worker)]
        both = np.concatenate([batch[:, 0], batch[:, 1]])
        if bottom is not None:
            vec = bottom.embed(both)  # (2B, D)
        else:
            vec = encoder.embed_for_training([texts[i] for i in both], net)
        loss = contrastive_loss(vec[:per_worker], vec[per_worker:], torch.as_tensor(batch[:, 0]),
                                torch.as_tensor(batch[:, 1]), cfg.temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        out_of_time = cfg.max_seconds is not None and time.perf_counter() - t0 >= cfg.max_seconds
        if step % cfg.eval_every == 0 or step == cfg.max_steps or out_of_time:
            recent = float(np.mean(losses[-cfg.eval_every:]))
            m = run_eval(step, recent)
            if m and m.get(score_key, -math.inf) > best_m.get(score_key, -math.inf):
                best_step, best_m, best_state = step, m, snapshot()
        if out_of_time:
            logger.info("tune-encoder: max_seconds %.0f reached after %d steps", cfg.max_seconds, step)
            break
    model.eval()
    with torch.no_grad():  # the encoder leaves with the best state
        named = dict(model.named_parameters())
        for n, v in best_state.items():
            named[n].copy_(v)
    return TuneResult(best_step=best_step, best_metrics=best_m, frozen_metrics=frozen, best_state=best_state,
                      history=history, steps=step, train_s=time.perf_counter() - t0,
                      mean_loss_last=float(np.mean(losses[-cfg.eval_every:])) if losses else None)


def save_tuned(encoder: TextEncoder, out_dir: str | Path) -> Path:
    """Write the encoder as a model folder `llmrec embed --model` reads: the base model's files (tokenizer,
    sentence-transformers modules and pooling, prompts) with the tuned weights (`save_pretrained`)."""
    out = Path(out_dir)
    src = Path(encoder.model_path)
    if src.is_dir():
        shutil.copytree(src, out, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(*WEIGHT_FILES, "README.md", ".*"))
    out.mkdir(parents=True, exist_ok=True)
    encoder.tokenizer.save_pretrained(out)
    encoder.transformer.save_pretrained(out, safe_serialization=True)
    return out
