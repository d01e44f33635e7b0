"""Column, file and artifact names shared by every stage. Import names from here; never spell them inline."""

from __future__ import annotations

SCHEMA_VERSION = 1

# canonical tables (written by `llmrec prepare`)
ITEMS_FILE = "items.parquet"
INTERACTIONS_FILE = "interactions.parquet"
ITEM_ID = "item_id"  # string
TEXT = "text"  # string, the text the encoder reads
USER_ID = "user_id"  # string
TS = "ts"  # int64 unix seconds, or a monotone order when the source has no time
RATING = "rating"  # float64 or null
EVENT = "event"  # string, one of EVENT_KINDS
ITEM_IDX = "item_idx"  # int64 row of an item in the evaluation's ItemSpace (added in memory, never stored)
# optional items column (written by every `llmrec prepare` adapter; older data folders may lack it): a list of
# strings per item, possibly empty, never null: the labels a user could name in feedback ("no more Animation",
# "more Economics"): genres, categories, sections. Read it with llmrec.data.facets.item_facets.
FACETS = "facets"
# optional items column: the text without its user-written part (tags, reviews), when the dataset's item text
# has one; the user-written texts are then in TEXT_EVENTS_FILE (see llmrec.data.item_text)
TEXT_BASE = "text_base"
TEXT_EVENTS_FILE = "text_events.parquet"  # user_id, item_id, ts, text: the user-written item texts

# feedback / interaction event kinds, in the order the HTTP API documents them
EVENT_KINDS = ("view", "click", "like", "dislike", "skip", "purchase", "rating")
# a kind's slot in the scorer's event embedding: 0 = padding, 1.. = EVENT_KINDS order
EVENT_INDEX = {kind: i + 1 for i, kind in enumerate(EVENT_KINDS)}
# The one polarity table (`polarity`), read by serving (state, text feedback, the reasons' history), replay,
# training and the baselines:
#   kind      view  click  like  dislike  skip  purchase  rating
#   polarity   0     +1     +1    -1       -1    +1        +1 if value >= 4, -1 if value <= 2, else 0
# negative feedback: never a training target or a co-occurrence history item; text models subtract their items
NEGATIVE_KINDS = ("dislike", "skip")
# explicitly positive feedback (a text with one of these kinds pulls towards the text); "view" and mid ratings
# are interactions without a direction
POSITIVE_KINDS = ("like", "purchase", "click")
POSITIVE_MIN_RATING = 4.0  # a "rating" event at or above this is positive feedback
NEGATIVE_MAX_RATING = 2.0  # a "rating" event at or below this is negative feedback


def polarity(event: str, value: float | None = None) -> int:
    """+1 explicitly positive, -1 negative, 0 without a direction (view, mid rating, rating without value)."""
    if event in POSITIVE_KINDS:
        return 1
    if event in NEGATIVE_KINDS:
        return -1
    if event == "rating" and value is not None:
        return 1 if value >= POSITIVE_MIN_RATING else (-1 if value <= NEGATIVE_MAX_RATING else 0)
    return 0


def is_positive(event: str, value: float | None = None) -> bool:
    """Explicitly positive feedback: a POSITIVE_KINDS event, or a rating >= POSITIVE_MIN_RATING."""
    return polarity(event, value) > 0


MAX_ID_CHARS = 256  # longest user_id / item_id the HTTP API accepts (serving state skips longer base ids)

# artifacts
META_FILE = "meta.json"
# embeddings artifact: `llmrec embed` writes shards `part-<write id>-<NNNNNN>.parquet` (meta.json key
# "parts_prefix" = "part-<write id>-" names the files of the current version); folders written before hold one
# EMBEDDINGS_FILE instead. Read either with llmrec.embed.artifact.load_embeddings / iter_embeddings.
EMBEDDINGS_FILE = "embeddings.parquet"
EMBEDDINGS_PART_PREFIX = "part-"
EMBEDDING = "embedding"  # fixed_size_list<float32>[dim]
INDEX_FILE = "index.faiss"
INDEX_TORCH_FILE = "index.npy"
INDEX_IDS_FILE = "item_ids.npy"
SCORER_MODEL_FILE = "model.pt"  # {"model_config", "model"} of the scorer checkpoint training chose
SCORER_COOC_FILE = "cooc.npz"  # the co-occurrence matrix of the scorer's hybrid ranking
# float64 (U,) NDCG@10 of every validation user under the served ranking (meta.json "served_val" fingerprints
# the validation set, so two scorers' files pair up user by user)
SCORER_VAL_FILE = "val_ndcg.npy"

# run directory layout (`llmrec pipeline --out RUN`)
RUN_DATA = "data"
RUN_EMBEDDINGS = "embeddings"
RUN_ENCODER = "encoder"  # `llmrec pipeline --tune-encoder`: the tuned text encoder (a model folder)
RUN_INDEX = "index"
RUN_SCORER = "scorer"
RUN_EVAL = "eval"
RUN_EVENTS = "events"  # the serving event log
