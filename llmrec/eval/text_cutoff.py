"""Item text as of a split's cutoff: rebuild the texts that include user-written parts, re-embed what changed.

Where prepare kept user-written item text apart (`llmrec.data.item_text`: MovieLens tags, Amazon reviews),
`split_item_space` rebuilds every item's text from the text events visible before the split's cutoff
(`llmrec.eval.split.visible_text_events`), encodes the items whose text changed with the embeddings' own
encoder (same model, max_length, mean pooling, L2 norm), and returns the split's `ItemSpace` (a copy with
those rows replaced). Every model of the split (llmrec, the text baselines, the hybrids) reads that space, and
`llmrec train --holdout loo` trains on the loo split's space, so a model never reads text written after the
events it is tested on. Datasets without user-written text get the prepared space unchanged.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import pandas as pd

from llmrec.data.item_text import TextSpec, base_texts, build_item_texts
from llmrec.eval.split import Split, visible_text_events
from llmrec.protocol import ItemSpace
from llmrec.schema import ITEM_ID, TEXT

logger = logging.getLogger(__name__)

__all__ = ["split_item_space"]


def split_item_space(
    space: ItemSpace,
    items: pd.DataFrame,
    text: tuple[pd.DataFrame, TextSpec] | None,
    split: Split,
    embed_meta: dict[str, Any],
    encoders: dict[str, Any] | None = None,
) -> tuple[ItemSpace, dict[str, Any]]:
    """The split's item space and what changed.

    Args:
        space: the prepared item space (embeddings artifact order).
        items: items.parquet (with `text_base` when text events exist).
        text: `read_text_events(data_dir)` (events, spec), or None (nothing to rebuild).
        split: the evaluation split whose cutoff applies.
        embed_meta: the embeddings' meta.json (encoder and max_length).
        encoders: a cache {model: TextEncoder} shared across calls (one model load per evaluation).

    Returns:
        (space, info): info = {"n_text_events", "n_visible", "n_items_changed", "encode_s"} (empty dict when
        `text` is None).
    """
    if text is None:
        return space, {}
    t0 = time.perf_counter()
    events, spec = text
    vis = visible_text_events(split, events)
    rebuilt = build_item_texts(base_texts(items), events[vis], spec)  # indexed by item_id
    served = pd.Series(items[TEXT].astype(str).to_numpy(), index=items[ITEM_ID].astype(str))
    ids = pd.Index(np.asarray(space.item_ids).astype(str))
    new = rebuilt.reindex(ids)
    old = served.reindex(ids)
    changed = np.flatnonzero((new.notna() & (new != old)).to_numpy())
    info = {
        "n_text_events": int(len(events)),
        "n_visible": int(vis.sum()),
        "n_items_changed": int(len(changed)),
        "encode_s": 0.0,
    }
    if len(changed) == 0:
        return space, info
    enc = _encoder(space.text_model, embed_meta, encoders if encoders is not None else {})
    vecs = np.array(space.text_vectors, dtype=np.float32, copy=True)
    vecs[changed] = enc.encode(new.iloc[changed].tolist(), batch_size=64)
    info["encode_s"] = round(time.perf_counter() - t0, 2)
    logger.info(
        "%s: %d of %d user-written texts existed before the cutoff; %d items' text changed and were "
        "re-embedded (%.1fs)",
        split.protocol,
        info["n_visible"],
        len(events),
        len(changed),
        info["encode_s"],
    )
    return replace(space, text_vectors=vecs), info


def _encoder(model: str | None, embed_meta: dict[str, Any], cache: dict[str, Any]) -> Any:
    from llmrec.embed.encoder import TextEncoder

    if model is None:
        raise ValueError(
            f"the item text must be rebuilt for this split but the embeddings' encoder is unknown (meta "
            f"model_name {embed_meta.get('model_name')!r}, model_path {embed_meta.get('model_path')!r}); "
            f"re-run `llmrec embed`, or evaluate with item_text='as-prepared' (--item-text as-prepared) to "
            f"keep the prepared text"
        )
    key = f"{model}|{embed_meta.get('max_length', 128)}"
    if key not in cache:
        cache[key] = TextEncoder(model, device="cpu", max_length=int(embed_meta.get("max_length", 128)))
    return cache[key]
