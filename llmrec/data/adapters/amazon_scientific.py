"""Amazon "Scientific" from UniSRec: item text for every item, user sequences without timestamps.

- Items: `Scientific.text` (`item_id<TAB>text`, text = "title. category path. brand."). `title` keeps the
  part before the first ". " (a heuristic, for reports only).
- Facets: the category path, parsed from the text: the last ". "-delimited segment that starts with the top
  category "Industrial & Scientific ", without that top, up to the next ". " (`category_path`). The path has
  no level delimiters ("Abrasive & Finishing Products Manual Sanding Products Sanding Rolls": level names
  hold spaces and "&"), so the whole path is one facet. Items whose text has no such segment (an empty
  category: "title. . brand.") get [] and are counted (meta `n_items_without_category_path`) and logged.
- Interactions: each user's sequence is rebuilt from `Scientific.test.inter` as history + target (the
  history is capped at 50 by the UniSRec preprocessing). The integer ids are mapped back through
  `Scientific.item2index` / `Scientific.user2index`, so item_id/user_id are the original Amazon ids.
  `ts` = position in the user's sequence (0, 1, ...: a monotone order, not time), event "purchase",
  rating null. Tests: tests/test_prepare.py.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from llmrec.data.adapters import Loaded, require_files
from llmrec.schema import EVENT, FACETS, ITEM_ID, RATING, TEXT, TS, USER_ID

logger = logging.getLogger(__name__)

NAME = "amazon-scientific-unisrec"
FILES = ["Scientific.text", "Scientific.test.inter", "Scientific.item2index", "Scientific.user2index"]
HOMEPAGE = "https://github.com/RUCAIBox/UniSRec"  # its processed Amazon "Scientific" dataset
TOP_CATEGORY = "Industrial & Scientific"
# "<TOP> <path>" at the text start or after ". ", ending at the next "." followed by a space or the end. 24
# items have a scraping-artefact title "Industrial & Scientific />" before the real path: the last match wins.
_PATH = re.compile(r"(?:^|(?<=\. ))" + re.escape(TOP_CATEGORY) + r" (.+?)\.(?= |$)")


def category_path(text: str) -> str | None:
    """The category path below "Industrial & Scientific" in an item text, or None when there is none.

    Example: "Gorilla Glue, 8 ounce. Industrial & Scientific Tapes, Adhesives & Sealants Urethane Adhesives.
    Gorilla." -> "Tapes, Adhesives & Sealants Urethane Adhesives".
    """
    matches = _PATH.findall(text.strip())
    path = matches[-1].strip() if matches else ""
    return path or None


def _read_tsv(path: Path, n_cols: int, header: bool) -> list[list[str]]:
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.rstrip("\n").rstrip("\r")
            if (header and i == 0) or not line.strip():
                continue
            parts = line.split("\t", n_cols - 1)
            if len(parts) != n_cols:
                raise ValueError(
                    f"{path}: line {i + 1} has {len(parts)} tab-separated fields, expected {n_cols}"
                )
            out.append(parts)
    return out


def _index_map(path: Path) -> dict[str, str]:
    """index (as written in .inter files) -> original id."""
    rows = _read_tsv(path, 2, header=False)
    out = {idx.strip(): orig.strip() for orig, idx in rows}
    if len(out) != len(rows):
        raise ValueError(f"{path}: {len(rows) - len(out)} duplicate indices; the file is corrupt, re-copy it")
    return out


def load(source: Path) -> Loaded:
    text_p, test_p, item_p, user_p = require_files(source, FILES, NAME, HOMEPAGE)
    text_rows = _read_tsv(text_p, 2, header=True)
    texts = [t.strip() for _, t in text_rows]
    paths = [category_path(t) for t in texts]
    n_no_path = sum(p is None for p in paths)
    items = pd.DataFrame(
        {
            ITEM_ID: [i.strip() for i, _ in text_rows],
            TEXT: texts,
            "title": [t.split(". ", 1)[0] for t in texts],
            FACETS: [[p] if p else [] for p in paths],
        }
    )
    if n_no_path:
        ex = [i for i, p in zip(items[ITEM_ID], paths, strict=True) if p is None][:5]
        logger.warning(
            "scientific: %d of %d items have no %r category path in their text (facets []), e.g. %s",
            n_no_path,
            len(items),
            TOP_CATEGORY,
            ex,
        )
    item_of = _index_map(item_p)
    user_of = _index_map(user_p)

    users: list[str] = []
    seq_items: list[str] = []
    pos: list[int] = []
    for n, (u, hist, target) in enumerate(_read_tsv(test_p, 3, header=True)):
        seq = hist.split() + [target.strip()]
        try:
            orig_u = user_of[u.strip()]
            orig_items = [item_of[s] for s in seq]
        except KeyError as e:
            raise ValueError(
                f"{test_p}: data row {n} uses index {e.args[0]!r} that is not in item2index/user2index; "
                f"the dataset files do not belong together, re-copy the folder"
            ) from None
        users.extend([orig_u] * len(seq))
        seq_items.extend(orig_items)
        pos.extend(range(len(seq)))
    interactions = pd.DataFrame(
        {
            USER_ID: users,
            ITEM_ID: seq_items,
            TS: np.asarray(pos, dtype=np.int64),
            RATING: np.full(len(users), np.nan),
            EVENT: "purchase",
        }
    )
    logger.info(
        "scientific: %d items, %d users, %d interactions", len(items), len(set(users)), len(interactions)
    )
    return Loaded(
        items=items,
        interactions=interactions,
        files=[text_p, test_p, item_p, user_p],
        notes={"ts_is_order": True, "n_items_without_category_path": n_no_path},
        facet_source=f"category path below {TOP_CATEGORY!r} parsed from Scientific.text, one facet per item",
    )
