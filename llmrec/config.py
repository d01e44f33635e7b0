"""Typed, frozen configs: the one home of a stage's options and their defaults.

`EmbedConfig` holds every option of `llmrec embed` (`llmrec.embed.ray_embed.embed_catalog(items, out, cfg)`),
`IndexConfig` of `llmrec index` (`llmrec.index.build.build_index(embeddings, out, cfg)`), `ServeConfig` of
`llmrec serve` (and the defaults and checks of `llmrec.serve.app.build_app`'s args),
`TrainConfig` every option of the scorer's training (`llmrec.scorer.train.fit_scorer(cfg, ...)`),
`EncoderTuneConfig` of `llmrec tune-encoder` (`llmrec.finetune.ray_tune.tune_encoder(data, out, cfg)`). Each
field is declared with `option(default, help)`: the help text is the field's documentation and the text of its
command-line flag, so adding an option is one line here. `add_config_arguments(parser, TrainConfig)` turns the
fields into `--flag-name` arguments of `llmrec train` and `config_from_args(TrainConfig, args)` builds the
config back from the parsed flags; job YAML (cluster/jobs/*.yaml) reaches the same flags, and code that
changes a few options from another config uses `dataclasses.replace` (checked again in `__post_init__`).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

C = TypeVar("C")


def option(
    default: Any,
    help: str,
    *,
    cli_none: int | None = None,
    flag: str | None = None,
    aliases: tuple[str, ...] = (),
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    cli: bool = True,
) -> Any:
    """A config field: its default and its documentation (also the help of its command-line flag).

    cli_none: for a field that may be None, the command-line value that stands for None (argparse has no
    None), e.g. `--val-users -1` = None = every eligible user.
    flag: the flag's name when it is not `--field-name` (a flag older than the field, e.g. `--shards` for
    `n_shards`); aliases: more names of the same flag; choices / metavar: as in argparse.
    cli: False = no flag of its own (the command sets the field some other way, e.g. `--param KEY=VALUE`).
    """
    meta = {"help": help, "cli_none": cli_none, "flag": flag, "aliases": aliases, "choices": choices,
            "metavar": metavar, "cli": cli}
    return dataclasses.field(default=default, metadata=meta)


# ---------------------------------------------------------------------------------------------------------
# the item embeddings (`llmrec embed`)
# ---------------------------------------------------------------------------------------------------------
EMBED_DEVICES = ("auto", "cpu", "cuda")
EMBED_BUCKETING = ("group", "dataset")


@dataclass(frozen=True)
class EmbedConfig:
    """Every option of the embed stage (`llmrec embed`, `embed_catalog`), each documented by its `option`.

    Raises:
        ValueError: a field has the wrong type or is out of range (the message names both).

    Example::

        cfg = EmbedConfig(batch_size=256, device="cpu")
        meta = embed_catalog("run/data", "run/embeddings", cfg)
    """

    # the flags `llmrec embed` has always had (names, defaults and meanings are pinned by test_config.py)
    model: str | None = option(None, "local HF model folder or hub name (none: packaged all-MiniLM-L6-v2)")
    batch_size: int = option(128, "rows per encoder forward pass")
    max_length: int = option(128, "token limit per text")
    num_actors: int | None = option(None, "encoder actors (none: one per GPU, else sized to the CPUs leaving "
                                    "one for reads)")
    # the library also takes "cuda:i"; the command line offers the three names it always had
    device: str = option("auto", "auto: GPU actors when the Ray cluster has GPUs or its autoscaler can start "
                         "GPU nodes; cuda: request GPU actors", choices=EMBED_DEVICES)
    num_gpus: int | None = option(None, "request N encoder actors of 1 GPU each, even when no GPU node is up "
                                  "yet (an autoscaler starts them)")
    bucketing: str = option("group", "length bucketing within each block of rows (group; dataset: its old "
                            "name, which sorted the whole catalog)", choices=EMBED_BUCKETING)
    rows_per_block: int | None = option(None, "rows per block: the unit of tokenizing, length bucketing, "
                                        "encoding and one output file (none: ~2 blocks per actor, 8 batches "
                                        "to 8,192 rows)")

    def __post_init__(self) -> None:
        check_types(self)
        for name, low in {"batch_size": 1, "max_length": 2}.items():
            if getattr(self, name) < low:
                raise ValueError(f"EmbedConfig.{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("num_actors", "num_gpus", "rows_per_block"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"EmbedConfig.{name} must be >= 1 or None, got {value}")
        if self.device not in EMBED_DEVICES and not re.fullmatch(r"cuda:\d+", self.device):
            raise ValueError(f"EmbedConfig.device must be one of {list(EMBED_DEVICES)} or 'cuda:i', "
                             f"got {self.device!r}")
        if self.bucketing not in EMBED_BUCKETING:
            raise ValueError(f"EmbedConfig.bucketing must be 'group' (or its old name 'dataset'), "
                             f"got {self.bucketing!r}")
        if self.model is not None and not self.model.strip():
            raise ValueError("EmbedConfig.model must be a model folder or hub name, or None (the packaged "
                             "model), got ''")


# ---------------------------------------------------------------------------------------------------------
# the item index (`llmrec index`)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IndexConfig:
    """Every option of the index stage (`llmrec index`, `build_index`, `add_to_index`), each documented by
    its `option`. The kind parameters (M ... chunk_elems) are set on the command line by `--param KEY=VALUE`;
    None = the kind's default, and a kind refuses the ones it has not (`ItemIndex.build`).

    Raises:
        ValueError: a field has the wrong type or is out of range (the message names both).

    Example::

        cfg = IndexConfig(kind="hnsw", M=16, ef_search=64)
        meta = build_index("run/embeddings", "run/index", cfg)
    """

    # the flags `llmrec index` has always had (names, defaults and meanings are pinned by test_config.py)
    kind: str = option(
        "auto",
        "auto | flat | hnsw | ivf | torch, or a FAISS index_factory string such as IVF4096,SQ8, "
        "IVF4096,PQ48, HNSW32,SQ8 (inner product). auto: exact flat below 50k items, HNSW below 1M, "
        "IVF{~4 sqrt N},SQ8 from 1M; on a GPU below 1M faiss GPU flat or torch",
        aliases=("--index-kind",), metavar="KIND",
    )
    check: bool = option(False, "also measure recall@10 for the exact kinds (flat, torch); approximate kinds "
                         "always measure it against exact search on --sample catalog items (stored in "
                         "meta.json)")
    sample: int = option(1000, "catalog items used as recall queries")
    device: str = option("auto", "auto | cpu | cuda | cuda:i")
    skip_existing: bool = option(False, "with --add-embeddings: leave out items already indexed instead of "
                                 "refusing")
    batch_rows: int = option(65_536, "embedding rows read per chunk (the index is built streaming)")
    # --- kind parameters (`--param KEY=VALUE`); 0 for nlist / nprobe / ef_search / train_size = None (auto)
    M: int | None = option(None, "hnsw: graph neighbours per node (default 32)", cli=False)
    ef_construction: int | None = option(None, "hnsw: build-time search width (default 40)", cli=False)
    ef_search: int | None = option(None, "hnsw and factory strings: query-time search width (default: the "
                                   "smallest that reaches target_recall)", cli=False)
    target_recall: float | None = option(None, "hnsw, ivf, factory strings: recall@10 the tuned ef_search / "
                                         "nprobe must reach (default 0.97)", cli=False)
    nlist: int | None = option(None, "ivf: inverted lists (default ~sqrt N, at most N / 39)", cli=False)
    nprobe: int | None = option(None, "ivf and factory strings: lists searched per query (default: the "
                                "smallest that reaches target_recall)", cli=False)
    train_size: int | None = option(None, "ivf and factory strings: rows the quantizer trains on (default "
                                    "max(100k, 64 per list), at most N)", cli=False)
    chunk_elems: int | None = option(None, "torch: queries x items scores held at once (default 2^26)",
                                     cli=False)

    def __post_init__(self) -> None:
        check_types(self)
        if not self.kind.strip():
            raise ValueError("IndexConfig.kind must be auto, flat, hnsw, ivf, torch or a FAISS index_factory "
                             "string, got ''")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"IndexConfig.device must be auto, cpu, cuda or cuda:i, got {self.device!r}")
        for name in ("sample", "batch_rows"):
            if getattr(self, name) < 1:
                raise ValueError(f"IndexConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name, low in {"M": 1, "ef_construction": 1, "chunk_elems": 1, "ef_search": 0, "nlist": 0,
                          "nprobe": 0, "train_size": 0}.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"IndexConfig.{name} must be >= {low} or None (the kind's default), "
                                 f"got {value}")
        if self.target_recall is not None and not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"IndexConfig.target_recall must be in (0, 1] or None (0.97), got "
                             f"{self.target_recall}")

    def params(self) -> dict[str, int | float]:
        """The kind parameters that are set (not None), as `ItemIndex.build(**params)` takes them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if not f.metadata.get("cli", True) and getattr(self, f.name) is not None}


# ---------------------------------------------------------------------------------------------------------
# the HTTP app (`llmrec serve`, `build_app`)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServeConfig:
    """Every option of `llmrec serve` but its paths, each documented by its `option`; `build_app(args)` takes
    its defaults and checks from here too (`app_args()` maps the fields to build_app's keys).

    No field holds a secret: the bearer token is read from `--auth-token-file` or $LLMREC_AUTH_TOKEN and the
    Redis URL from $LLMREC_STATE_URL when the app starts (`llmrec.serve.auth`), so printing or logging a
    ServeConfig shows none of them.

    Raises:
        ValueError: a field has the wrong type or is out of range (the message names both).

    Example::

        cfg = ServeConfig(shards=8, replicas=2)
        app = build_app({"run_dir": "runs/ml", **cfg.app_args()})
    """

    # the flags `llmrec serve` has always had (names, defaults and meanings are pinned by test_config.py)
    host: str = option("127.0.0.1", "HTTP host (0.0.0.0 exposes it)")
    port: int = option(8000, "HTTP port")
    shards: int = option(4, "user-state shard actors (build_app: n_shards)")
    replicas: int = option(1, "replicas per deployment (build_app: num_replicas)")
    model: str | None = option(None, "text encoder for q and text feedback (none: the embeddings' model)")
    log_user_ids: bool = option(False, "log user ids in clear (off: hashed)")
    # the flag has always been the negative one, --no-run-users
    load_run_users: bool = option(True, "start the state shards from the users of "
                                  "RUN/data/interactions.parquet (--no-run-users: start them empty)",
                                  flag="--run-users")
    history_len: int = option(200, "events kept per user in memory")
    log_retention_days: float | None = option(None, "delete event-log segments older than this that a "
                                              "snapshot covers (none: keep all; `llmrec train --events` "
                                              "reads the log)")
    shard_memory_mb: int = option(256, "Ray memory reserved per state shard (about 6 KB per active user; "
                                  "0 = no reservation)")
    state_backend: str = option("file", "where the state shards keep log, snapshots and tombstones: file "
                                "(RUN/events) or redis (the URL, password included, from $LLMREC_STATE_URL; "
                                "survives node loss)", choices=("file", "redis"))
    split_model: bool = option(False, "run the model (index, scorer, text encoder) as a Recommender "
                               "deployment of its own instead of inside each Ingress replica: its replicas "
                               "scale (and may take GPUs) apart from the HTTP ones, at the cost of one more "
                               "hop per request (benchmarks/serve_load.py measures both)")
    train_in_background: bool = option(False, "serve at once and train the scorer meanwhile in a separate "
                                       "process (llmrec pipeline --stages train; log in "
                                       "RUN/logs/train-background.log), then redeploy so that it serves when "
                                       "ready")

    _RANGES: typing.ClassVar[dict[str, tuple[int, int]]] = {
        "port": (1, 65535), "shards": (1, 1024), "replicas": (1, 1000), "history_len": (1, 100_000),
        "shard_memory_mb": (0, 1 << 20),
    }
    _APP_KEYS: typing.ClassVar[dict[str, str]] = {"shards": "n_shards", "replicas": "num_replicas"}

    def __post_init__(self) -> None:
        check_types(self)
        for name, (low, high) in self._RANGES.items():
            value = getattr(self, name)
            if not low <= value <= high:
                alias = f" (build_app arg {self._APP_KEYS[name]})" if name in self._APP_KEYS else ""
                raise ValueError(f"ServeConfig.{name}{alias} must be an integer in [{low}, {high}], "
                                 f"got {value}")
        days = self.log_retention_days
        if days is not None and not days > 0:  # also rejects NaN
            raise ValueError(f"ServeConfig.log_retention_days must be > 0 (or None to keep the whole log), "
                             f"got {days}")
        if self.state_backend not in ("file", "redis"):
            raise ValueError(f"ServeConfig.state_backend must be 'file' or 'redis', "
                             f"got {self.state_backend!r}")
        if not self.host.strip():
            raise ValueError("ServeConfig.host must be a host name or address (127.0.0.1, 0.0.0.0), got ''")

    def app_args(self) -> dict[str, Any]:
        """The `build_app` args these options set (it also takes run_dir, auth, log_dir, state_url*)."""
        return {
            "n_shards": self.shards,
            "num_replicas": self.replicas,
            "model": self.model,
            "log_user_ids": self.log_user_ids,
            "load_run_users": self.load_run_users,
            "history_len": self.history_len,
            "log_retention_days": self.log_retention_days,
            "shard_memory_mb": self.shard_memory_mb,
            "split_model": self.split_model,
        }


# ---------------------------------------------------------------------------------------------------------
# the scorer's training
# ---------------------------------------------------------------------------------------------------------
USER_ENCODERS = ("transformer", "gru")  # TrainConfig / ScorerConfig.user_encoder
COOC_KINDS = ("auto", "itemknn", "ease")  # TrainConfig.cooc_kind (llmrec.cooc.candidate_terms)
COLD_CHOICE_KINDS = ("made-cold", "held-out-new")  # TrainConfig.cold_choice
HELD_OUT_KINDS = COLD_CHOICE_KINDS[1:]  # the kinds made on items held out of a second training


@dataclass(frozen=True)
class TrainConfig:
    """Every option of the scorer's training, each field documented by its `option(default, help)`.

    Raises:
        ValueError: a field has the wrong type or is out of range (the message names both).

    Example::

        cfg = TrainConfig(epochs=5, dim=32)
        fine_tune = dataclasses.replace(cfg, epochs=1, max_steps=200)
    """

    # --- the flags `llmrec train` has always had (names, defaults and meanings are pinned by test_config.py)
    num_workers: int = option(1, "Ray Train workers, 1 CPU (or GPU) each; 0 = train in this process (Ray "
                             "Train's local mode: no worker actors, no retry after a failure)")
    use_gpu: bool = option(False, "one GPU per worker")
    epochs: int = option(10, "maximum epochs; early stopping may end sooner (a resumed run continues up to "
                         "this count)")
    batch_size: int = option(256, "global batch size; each worker takes batch_size // num_workers")
    lr: float = option(3e-3, "Adam learning rate")
    patience: int = option(2, "epochs without a better val ndcg@10 before stopping")
    dim: int = option(64, "model / retrieval dim")
    n_neg: int = option(128, "sampled negatives per batch; -1 = full softmax over the whole catalog "
                        "(small catalogs)")
    max_len: int = option(50, "history events the user encoder reads")
    # the callers that split (`llmrec train`, LLMRecRecommender) hold the validation events out; fit_scorer
    # itself trains on the split it is given and only records the value
    val_users: int | None = option(
        1000,
        "hold out the last event of this many random users (>= 2 events) for validation / early stopping; "
        "-1 (None in code) = every such user, 0 = no validation (the last epoch is kept); every other event "
        "is trained on",
        cli_none=-1,
    )
    # the co-occurrence term and its weight are chosen on validation after training (`tune_behaviour`)
    cooc_neighbors: int = option(100, "item co-occurrence neighbours kept per item for the ranking's "
                                 "co-occurrence term, whose weight is chosen on validation (0 = neural "
                                 "ranking only)")
    cooc_kind: str = option("auto", "the co-occurrence term: item-kNN cosine, EASE (its l2 chosen on "
                            "validation) or auto (both tried, the better on validation kept; EASE only for "
                            "catalogs of at most 16,384 items)", choices=COOC_KINDS)
    seed: int = option(0, "seed of the initialisation, sampling, shuffling and the validation users")
    max_failures: int = option(0, "worker failures to recover from by restarting the workers from the last "
                               "checkpoint (Ray Train FailureConfig)")
    # --- the model and the loss (ScorerConfig's fields of the same name; see scorer/model.py for their why)
    n_layers: int = option(1, "layers of the user encoder")
    user_encoder: str = option("transformer", "sequence model of the user encoder: a causal transformer or a "
                               "GRU", choices=USER_ENCODERS)
    n_heads: int = option(2, "attention heads (dim must be divisible by it)")
    mlp_hidden: int = option(128, "hidden width of the MLP re-ranker")
    id_dropout: float = option(0.3, "probability of dropping an item's ID embedding during training")
    dropout: float = option(0.1, "dropout of the user encoder")
    use_ids: bool = option(True, "learn an ID embedding for every item seen in training (off: text only)")
    head_neg: int = option(31, "negatives per row for the MLP head, drawn from the row's retrieval top list")
    weight_decay: float = option(0.0, "Adam weight decay")
    n_candidates: int = option(200, "retrieval candidates the MLP head re-ranks (training and validation)")
    min_rating: float | None = option(None, "interactions rated below this are not training targets "
                                      "(none: every target kind counts)")
    grad_clip: float = option(5.0, "gradient-norm clip (0 = off)")
    logit_scale: float = option(20.0, "initial inverse temperature of the softmax over scale * u.v (learned)")
    warm_start: bool = option(True, "start at the zero-shot text model (ScorerModel.warm_start)")
    logq_correction: bool = option(True, "subtract log q(candidate) from the sampled-softmax logits "
                                   "(candidate_log_q)")
    # needs item facets and the text encoder; 0 = the text-feedback gains stay at their start values
    feedback_p: float = option(0.3, "share of training pairs that get one synthesised text feedback "
                               "(scorer.feedback)")
    text_arm: bool = option(True, "full-dimension text arm (ScorerConfig.text_arm)")
    rare_dropout_c: float = option(2.0, "extra ID dropout c / (c + n) for items seen n times")
    cold_quota: int = option(0, "retrieval candidates reserved for cold items (0 = no quota)")
    cold_impute_k: int = option(10, "cold items borrow ID vectors / co-occurrences of k text neighbours "
                                "(0 = off)")
    # made-cold: `finalize.tune_cold_bonus` on the validation with a tenth of the trained items stripped of
    # their IDs; the held-out kinds: `llmrec.eval.cold_choice.held_out_cold_choice`, made by the callers above
    # the scorer (`llmrec train`, `llmrec evaluate`) and handed to `fit_scorer(cold_pick=)`
    cold_choice: str = option("made-cold", "how the cold-item bonus, imputation, slots and neural places are "
                              "chosen: made-cold = on the validation with a tenth of the trained items made "
                              "cold (no extra cost); held-out-new = the best for a tenth of the items held "
                              "out of a second training, every validation target new: for traffic whose next "
                              "item is nearly always new (the cold protocol's choice; about twice the "
                              "training time, and costly for any traffic with warm items: README)",
                              choices=COLD_CHOICE_KINDS)
    # bounds the time of a fine-tune (`llmrec learn`)
    max_steps: int | None = option(None, "batches per epoch at most (none: the whole epoch)")

    def __post_init__(self) -> None:
        check_types(self)
        at_least = {"num_workers": 0, "epochs": 1, "patience": 0, "dim": 1, "n_neg": -1, "max_len": 1,
                    "cooc_neighbors": 0, "seed": 0, "max_failures": 0, "n_layers": 1, "n_heads": 1,
                    "mlp_hidden": 1, "head_neg": 0, "weight_decay": 0.0, "n_candidates": 1, "grad_clip": 0.0,
                    "rare_dropout_c": 0.0, "cold_quota": 0, "cold_impute_k": 0}
        for name, low in at_least.items():
            value = getattr(self, name)
            if not value >= low:  # also rejects NaN
                raise ValueError(f"TrainConfig.{name} must be >= {low}, got {value}")
        if self.num_workers == 0 and self.use_gpu:
            raise ValueError("TrainConfig.num_workers=0 (in this process) cannot take use_gpu=True: GPUs are "
                             "requested per Ray Train worker; give num_workers >= 1")
        if self.batch_size < self.num_workers:
            raise ValueError(f"TrainConfig.batch_size must be >= num_workers ({self.num_workers}: every "
                             f"worker takes batch_size // num_workers), got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr must be a finite number > 0, got {self.lr}")
        if self.dim % self.n_heads:
            raise ValueError(f"TrainConfig.dim must be divisible by n_heads ({self.n_heads}), got {self.dim}")
        for name in ("id_dropout", "dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.feedback_p <= 1.0:
            raise ValueError(f"TrainConfig.feedback_p must be in [0, 1], got {self.feedback_p}")
        if not 0.0 < self.logit_scale <= 100.0:
            raise ValueError(f"TrainConfig.logit_scale must be in (0, 100], got {self.logit_scale}")
        if self.val_users is not None and self.val_users < 0:
            raise ValueError(f"TrainConfig.val_users must be >= 0, or None (-1 on the command line) for "
                             f"every user with >= 2 events, got {self.val_users}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(
                f"TrainConfig.max_steps must be >= 1 or None (the whole epoch), got {self.max_steps}"
            )
        if self.min_rating is not None and not math.isfinite(self.min_rating):
            raise ValueError(f"TrainConfig.min_rating must be a finite number or None, got {self.min_rating}")
        if self.cold_choice not in COLD_CHOICE_KINDS:
            raise ValueError(f"TrainConfig.cold_choice must be one of {', '.join(COLD_CHOICE_KINDS)}, got "
                             f"{self.cold_choice!r}")
        if self.cold_choice in HELD_OUT_KINDS and self.val_users == 0:
            raise ValueError(f"TrainConfig.cold_choice={self.cold_choice!r} trains an inner model with a "
                             "validation, as the final fit does, but val_users is 0 (no validation): give "
                             "val_users > 0 (or -1: every user), or cold_choice='made-cold'")
        if self.cooc_kind not in COOC_KINDS:
            raise ValueError(f"TrainConfig.cooc_kind must be one of {', '.join(COOC_KINDS)}, got "
                             f"{self.cooc_kind!r}")


# ---------------------------------------------------------------------------------------------------------
# fine-tuning the text encoder (`llmrec tune-encoder`)
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class EncoderTuneConfig:
    """Every option of the text-encoder fine-tune (`llmrec tune-encoder`,
    `llmrec.finetune.ray_tune.tune_encoder`), each documented by its `option`.

    Raises:
        ValueError: a field has the wrong type or is out of range (the message names both).

    Example::

        cfg = EncoderTuneConfig(max_steps=200, train_layers=2)
    """

    model: str | None = option(None, "the encoder to start from: local HF model folder or hub name (none: "
                               "packaged all-MiniLM-L6-v2)")
    train_layers: int = option(2, "top transformer layers trained; the embeddings and the layers below stay "
                               "frozen (more than the model has = all of them)")
    max_steps: int = option(300, "optimizer steps at most")
    max_seconds: float | None = option(None, "stop after this many seconds of training (none: no limit)")
    batch_size: int = option(32, "(context item, next item) pairs per step; the other pairs' items are the "
                             "negatives")
    lr: float = option(2e-5, "AdamW learning rate")
    temperature: float = option(0.05, "softmax temperature of the contrastive loss over cosines")
    max_length: int = option(128, "token limit per item text (as `llmrec embed --max-length`)")
    eval_every: int = option(100, "steps between validation passes (the best pass, step 0 included, is kept)")
    val_pairs: int = option(2000, "validation pairs at most (each from a different user)")
    eval_max_items: int = option(20000, "items ranked per validation pass: the whole catalog up to this "
                                 "many, else the validation targets plus a seeded sample")
    seed: int = option(0, "seed of the split's tie order, pair sampling and validation users")
    cache_max_bytes: int = option(2 << 30, "cache the frozen layers' token states of every item when they "
                                  "fit in this many bytes (one worker only): a step then runs only the "
                                  "trained layers")
    num_workers: int = option(1, "Ray Train workers (DDP), 1 CPU (or GPU) each")
    use_gpu: bool = option(False, "one GPU per worker")

    def __post_init__(self) -> None:
        check_types(self)
        at_least = {"train_layers": 1, "max_steps": 1, "batch_size": 2, "max_length": 2, "eval_every": 1,
                    "val_pairs": 1, "eval_max_items": 10, "seed": 0, "num_workers": 1, "cache_max_bytes": 0}
        for name, low in at_least.items():
            if getattr(self, name) < low:
                raise ValueError(f"EncoderTuneConfig.{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("lr", "temperature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"EncoderTuneConfig.{name} must be a finite number > 0, got {value}")
        if self.max_seconds is not None and not (math.isfinite(self.max_seconds) and self.max_seconds > 0):
            raise ValueError(f"EncoderTuneConfig.max_seconds must be > 0 or None, got {self.max_seconds}")
        if self.model is not None and not self.model.strip():
            raise ValueError("EncoderTuneConfig.model must be a model folder or hub name, or None (the "
                             "packaged model), got ''")


# ---------------------------------------------------------------------------------------------------------
# helpers shared by every config
# ---------------------------------------------------------------------------------------------------------
def config_from_dict(cls: type[C], values: Mapping[str, Any], source: str = "") -> C:
    """`cls(**values)`, but an unknown key raises a ValueError that lists the valid keys (not a TypeError)."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(names))
    if unknown:
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}unknown {cls.__name__} option(s) {unknown}; valid: {sorted(names)}")
    return cls(**values)


def with_overrides(cfg: C, overrides: Mapping[str, Any], source: str = "") -> C:
    """`dataclasses.replace(cfg, **overrides)` (checked again by `__post_init__`), but an unknown key raises a
    ValueError that lists the valid keys."""
    names = {f.name for f in dataclasses.fields(cfg)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - names)
    if unknown:
        where = f"{source}: " if source else ""
        raise ValueError(f"{where}unknown {type(cfg).__name__} option(s) {unknown}; valid: {sorted(names)}")
    return dataclasses.replace(cfg, **overrides)  # type: ignore[type-var]


def check_types(cfg: Any) -> None:
    """Raise a ValueError naming the field when a value does not have the field's type; ints given for float
    fields become floats (a YAML or JSON `1` for `lr`)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        base, optional = _base_type(hints[f.name])
        if value is None and optional:
            continue
        ok = isinstance(value, base) and not (base is not bool and isinstance(value, bool))
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            object.__setattr__(cfg, f.name, float(value))
            ok = True
        if not ok:
            allowed = base.__name__ + (" or None" if optional else "")
            raise ValueError(f"{type(cfg).__name__}.{f.name} must be {allowed}, got {value!r} "
                             f"({type(value).__name__})")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, defaults: Any = None) -> None:
    """One `--field-name` flag per field of `cls`, defaulted by `defaults` (an instance; default `cls()`).

    bool fields get `--x` / `--no-x`; a field that may be None takes its `cli_none` value for None; a field's
    `flag`, `aliases`, `choices` and `metavar` (see `option`) shape its flag, and `cli=False` fields get none.
    """
    base_cfg = defaults if defaults is not None else cls()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.metadata.get("cli", True):
            continue
        flags = [f.metadata.get("flag") or "--" + f.name.replace("_", "-"), *f.metadata.get("aliases", ())]
        default = getattr(base_cfg, f.name)
        base, _ = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if base is bool:
            parser.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=f"{help_text} (default: {'on' if default else 'off'})")
            continue
        cli_none = f.metadata.get("cli_none")
        if default is None and cli_none is not None:
            default = cli_none
        shown = "none" if default is None else default
        extra = {k: f.metadata[k] for k in ("choices", "metavar") if f.metadata.get(k) is not None}
        parser.add_argument(*flags, dest=f.name, type=base, default=default,
                            help=f"{help_text} (default: {shown})", **extra)


def config_from_args(cls: type[C], args: argparse.Namespace) -> C:
    """The config of the flags `add_config_arguments` added (each field read from `args.<field name>`)."""
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if not f.metadata.get("cli", True):
            continue  # the field's default, or whatever the command sets afterwards (dataclasses.replace)
        value = getattr(args, f.name)
        cli_none = f.metadata.get("cli_none")
        values[f.name] = None if cli_none is not None and value == cli_none else value
    return cls(**values)


def _base_type(hint: Any) -> tuple[type, bool]:
    """(the non-None type, whether None is allowed) of a field annotation such as `int | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        assert len(args) == 1, f"config fields are T or T | None, got {hint}"
        return args[0], True
    return hint, False
