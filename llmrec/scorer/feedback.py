"""Synthesised natural-language feedback, so the scorer learns to act on what a user says.

Real text feedback ("no more animated movies", "more space adventures") is rare in logs, so training makes
some from the catalog's facets (`schema.FACETS`: genres, categories, ...): for a training pair (history, next
item) it attaches, with probability `p`, one text to the user:

- positive: a template filled with a facet of the target ("more Animation"): the text points at the target;
- negative: a template filled with a facet that the target does NOT carry, preferably one of the user's
  history items' facets ("no more Drama" when the next item is not a drama): the text points away from the
  target, which is exactly the case where a user's past behaviour and what they now say disagree.

Training and evaluation use disjoint phrasings (`TRAIN_TEMPLATES`, `HELDOUT_TEMPLATES`), so validation and
the feedback benchmark measure how the model reads unseen wording, not memorised phrases. The phrase vectors
come from the same text encoder as the items (their space), computed once per (facet, template).

Pure numpy; `FeedbackBank` is small (F facets x templates x D floats) and ships to Ray Train workers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

# {polarity: templates}; "{f}" is the facet name as the catalog writes it
TRAIN_TEMPLATES: dict[int, tuple[str, ...]] = {
    1: ("more {f}", "I want more {f}", "show me {f}", "I love {f}"),
    -1: ("no more {f}", "I'm tired of {f}", "not {f} please", "I don't like {f}"),
}
HELDOUT_TEMPLATES: dict[int, tuple[str, ...]] = {
    1: ("I'd enjoy something {f}", "please recommend {f}"),
    -1: ("please stop recommending {f}", "enough {f} for now"),
}


@dataclass(frozen=True)
class FeedbackBank:
    """Facets of the catalog and the phrase vectors of the texts about them.

    names: F facet names. indptr int64 (N + 1,), indices int32 (nnz,): item i carries facets
    indices[indptr[i]:indptr[i+1]]. pos float32 (F, Tp, D), neg float32 (F, Tn, D): the vectors of the
    positive / negative templates filled with each facet. facet_p float64 (F,): share of items carrying each
    facet.
    """

    names: list[str]
    indptr: np.ndarray
    indices: np.ndarray
    pos: np.ndarray
    neg: np.ndarray
    facet_p: np.ndarray
    templates: dict[int, tuple[str, ...]]

    @property
    def n_facets(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return int(self.pos.shape[-1])

    def facets_of(self, item: int) -> np.ndarray:
        return self.indices[self.indptr[item] : self.indptr[item + 1]]

    def phrase(self, facet: int, polarity: int, template: int = 0) -> str:
        return self.templates[polarity][template].format(f=self.names[facet])


def facet_index(
    item_facets: Sequence[Sequence[str]], min_items: int = 2, max_facets: int = 2000
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names, indptr (N+1,), indices) of the facets carried by >= min_items items (at most max_facets, the
    most frequent; ties by name). Facets below the bar cannot express a preference over a group of items."""
    from llmrec.data.facets import facet_matrix

    names, m = facet_matrix(item_facets, min_items=min_items)
    if len(names) > max_facets:
        counts = np.asarray(m.sum(axis=0)).ravel()
        keep = np.sort(np.lexsort((np.arange(len(names)), -counts))[:max_facets])  # most frequent, by name
        names, m = [names[j] for j in keep], m[:, keep]
    m = m.tocsr()
    m.sort_indices()
    return names, m.indptr.astype(np.int64), m.indices.astype(np.int32)


def build_bank(
    item_facets: Sequence[Sequence[str]],
    encode: Callable[[list[str]], np.ndarray],
    templates: dict[int, tuple[str, ...]] = TRAIN_TEMPLATES,
    min_items: int = 2,
    max_facets: int = 2000,
) -> FeedbackBank | None:
    """Index the facets and encode every (facet, template) phrase; None when no facet has min_items items.

    Args:
        item_facets: per catalog item (N), its facet names.
        encode: texts -> float32 (M, D) unit vectors, the encoder that embedded the items.
    """
    t0 = time.perf_counter()
    names, indptr, indices = facet_index(item_facets, min_items, max_facets)
    if not names:
        return None
    vecs = {}
    for pol in (1, -1):
        texts = [t.format(f=f) for f in names for t in templates[pol]]
        v = np.asarray(encode(texts), dtype=np.float32)
        vecs[pol] = v.reshape(len(names), len(templates[pol]), -1)
    counts = np.bincount(indices, minlength=len(names)).astype(np.float64)
    bank = FeedbackBank(names, indptr, indices, vecs[1], vecs[-1], counts / max(len(item_facets), 1),
                        dict(templates))
    logger.info("feedback bank: %d facets (on %d of %d items), %d phrases encoded in %.1fs", len(names),
                int((np.diff(indptr) > 0).sum()), len(item_facets), sum(len(v) for v in templates.values())
                * len(names), time.perf_counter() - t0)
    return bank


def sample_feedback(
    bank: FeedbackBank,
    target: np.ndarray,
    hist_idx: np.ndarray,
    hist_len: np.ndarray,
    rng: np.random.Generator,
    p: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One synthesised text per row with probability p (see the module docstring).

    Args:
        target: int (B,) catalog index of each row's next item.
        hist_idx: int (B, L) right-padded history; hist_len: int (B,).
        p: probability that a row gets a text (half positive, half negative).

    Returns:
        fb_vec float32 (B, 1, D), fb_pol float32 (B, 1) in {+1, -1, 0 = none}, facet int64 (B,) (-1 = none).
    """
    B = len(target)
    vec = np.zeros((B, 1, bank.dim), np.float32)
    pol = np.zeros((B, 1), np.float32)
    facet = np.full(B, -1, np.int64)
    for b in np.flatnonzero(rng.random(B) < p):
        own = bank.facets_of(int(target[b]))
        if rng.random() < 0.5:  # positive: a facet of the next item
            if len(own) == 0:
                continue
            f, sign, table = int(rng.choice(own)), 1, bank.pos
        else:  # negative: a facet the next item lacks, preferably one from the history
            hist = [bank.facets_of(int(i)) for i in hist_idx[b, : int(hist_len[b])]]
            cands = np.concatenate(hist) if hist else np.zeros(0, np.int32)
            cands = cands[~np.isin(cands, own)]
            if len(cands):
                f = int(rng.choice(cands))
            else:
                f = int(rng.choice(bank.n_facets, p=bank.facet_p / bank.facet_p.sum()))
                if f in own:
                    continue
            sign, table = -1, bank.neg
        vec[b, 0] = table[f, rng.integers(table.shape[1])]
        pol[b, 0] = sign
        facet[b] = f
    return vec, pol, facet


@dataclass(frozen=True)
class FeedbackBanks:
    """The training phrasings (`train`) and the held-out ones for validation (`heldout`), same facet index."""

    train: FeedbackBank
    heldout: FeedbackBank


def banks_for(
    items: object,
    encode: Callable[[list[str]], np.ndarray] | None = None,
    min_items: int = 2,
) -> FeedbackBanks | None:
    """Phrase banks for an `ItemSpace` from its `facets`, encoded with `encode` (default: a `TextEncoder` of
    `items.text_model`, the encoder of the item vectors). None, with the reason logged, when the catalog has
    no facets or no known encoder: the scorer then trains without synthesised feedback."""
    facets = getattr(items, "facets", None)
    if facets is None or not any(len(f) for f in facets):
        logger.info("no item facets: training without synthesised text feedback (its gains keep their start "
                    "values); prepare a catalog with facets to train them")
        return None
    if encode is None:
        model = getattr(items, "text_model", None)
        if not model:
            logger.info("the item vectors' encoder is unknown: training without synthesised text feedback")
            return None
        from llmrec.embed.encoder import TextEncoder

        enc = TextEncoder(model, device="cpu")
        dim = np.asarray(items.text_vectors).shape[1]
        if enc.dim != dim:
            logger.warning("the text encoder %s is %d-d but the item vectors are %d-d: training without "
                           "synthesised text feedback", model, enc.dim, dim)
            return None

        def encode(texts: list[str]) -> np.ndarray:
            return enc.encode(texts, batch_size=256)

    train = build_bank(facets, encode, TRAIN_TEMPLATES, min_items=min_items)
    if train is None:
        logger.info(
            "no facet is carried by >= %d items: training without synthesised text feedback", min_items
        )
        return None
    held = build_bank(facets, encode, HELDOUT_TEMPLATES, min_items=min_items)
    assert held is not None and held.names == train.names  # same facets, same index
    return FeedbackBanks(train, held)
