"""Train the scorer with Ray Train (`fit_scorer`), or in one plain process (`fit_local`, same core, no Ray).

Loss per batch of B (history, next item) samples: the candidates are the B targets (in-batch negatives) plus
`n_neg` items sampled from 0.5 * uniform + 0.5 * popularity^0.75 (shared by the batch); accidental hits (a
candidate equal to the row's own target at another column) are masked. Loss = softmax cross-entropy of the
retrieval logits scale * u.v - log q(candidate) over the candidates (logQ correction) + softmax cross-entropy
of the MLP head over the positive and `head_neg` (31) items drawn from the row's retrieval top-`n_candidates`
over the whole catalog (what the head re-ranks at inference; rows whose positive is not in that top list
add nothing; the head sees detached u, v so its loss never reaches retrieval; see ScorerModel.forward).
The model starts at the
zero-shot text solution (`warm_start`).

Validation (per epoch): for each validation user, full ranking over the catalog with the user's train items
excluded: retrieval top-`n_candidates` by u.v, re-ranked by the MLP head, then the rest by u.v (the
production two-stage pipeline) -> `val_recall@10`, `val_ndcg@10`; also `val_retrieval_*` for u.v alone.
Workers evaluate disjoint user slices and all-reduce the sums, so every rank takes the same early-stopping
decision.

Checkpoints: rank 0 writes `checkpoint.pt` = {model, optimizer, epoch, model_config, early-stop state} and
reports it with the epoch's metrics; Ray keeps the 2 best by `val_ndcg@10` (plus the latest). Resuming
(`resume_from` = a Ray checkpoint dir or a previous `llmrec train` output dir) restores model, optimizer and
early-stop state and continues at the saved epoch + 1.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from llmrec.artifacts import load_torch_file, write_meta
from llmrec.config import TrainConfig
from llmrec.cooc import cooccurrence_similarity, history_scores
from llmrec.data.histories import attach_item_idx
from llmrec.metrics import recall_ndcg
from llmrec.protocol import ItemSpace
from llmrec.schema import INDEX_IDS_FILE, TS, USER_ID
from llmrec.schema import SCORER_COOC_FILE as COOC_FILE
from llmrec.schema import SCORER_MODEL_FILE as MODEL_FILE
from llmrec.scorer import data as sdata
from llmrec.scorer.feedback import FeedbackBank, FeedbackBanks, banks_for, sample_feedback
from llmrec.scorer.model import ScorerConfig, ScorerModel, cooc_neighbours, two_stage_rank

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
LAST_CHECKPOINT_DIR = "last_checkpoint"
SCORE_METRIC = "val_best_ndcg@10"  # max of two-stage and retrieval-only ndcg@10 (see ScorerConfig.rerank)

class TrainingDiverged(RuntimeError):
    """Training ended with weights that cannot rank (non-finite or zero scale): a learning rate too high."""


# co-occurrence weights tried on validation, in logit units (the head's scale; u.v is divided by `scale`)
COOC_GRID = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
# multipliers of the text-arm gain tried per history-length bucket after training (tune_text_boost)
TEXT_BOOST_GRID = (1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 8.0, 16.0)
# A tie, in the post-training choices that prefer text (`largest_tied`: text boost, cold bonus): a value
# whose validation NDCG is within TEXT_BOOST_Z standard errors of the paired difference to the best (1.96: not
# worse at 95%, the yardstick by which a ranking change counts as no regression) AND within TIE_REL of the
# best's mean. The relative bound matters for small buckets, whose wide standard errors alone would let a
# boost cost a third of the bucket's NDCG (MovieLens, 145 users: 16x text at 0.084 vs 0.133). Text is what a
# user can see and steer, so it wins every tie.
TEXT_BOOST_Z = 1.96
TIE_REL = 0.02
# cold-item bonuses tried on validation (u.v units, tune_cold_bonus), with this share of the warm items made
# cold
COLD_BONUS_GRID = (0.0, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8)
COLD_VAL_FRAC = 0.1


# ---------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------
def fit_scorer(
    cfg: TrainConfig,
    train_df: Any,
    items: ItemSpace,
    out_dir: str | os.PathLike,
    *,
    valid_df: pd.DataFrame | None = None,
    resume_from: str | os.PathLike | None = None,
    embed_meta: dict | None = None,
    feedback: FeedbackBanks | None = None,
    checkpoint_dir: str | None = None,
    init_from: str | os.PathLike | None = None,
    focus_after_ts: int | None = None,
) -> dict:
    """Train the scorer on Ray Train (`TorchTrainer`, DDP) and write `out_dir/model.pt` + `meta.json`.

    The training samples are built on Ray Data in tasks and streamed to the workers (`scorer.dataset`); the
    driver holds only catalog-sized arrays and the validation users' rows.

    Args:
        cfg: every training option (`llmrec.config.TrainConfig`: epochs, batch size, model size, workers,
            ...); recorded as meta.json "config". `ScalingConfig(cfg.num_workers, cfg.use_gpu,
            resources_per_worker={"CPU": 1[, "GPU": 1]})`.
        train_df: canonical interactions (user_id, item_id, ts, rating, event): a parquet file / folder / URI,
            a `RUN/data` folder, a `ray.data.Dataset`, or a pandas DataFrame.
        items: catalog index space (text vectors (N, D)).
        out_dir: artifact folder.
        valid_df: an explicit validation frame (then `train_df` must be a DataFrame too); without it the last
            event of `cfg.val_users` seeded-hash-chosen users with >= 2 events is held out for per-epoch
            validation / early stopping / the post-training choices (0 = no validation: the last epoch is
            kept).
        resume_from: folder with `checkpoint.pt` (a Ray checkpoint or a previous out_dir); training continues
            up to `cfg.epochs`.
        embed_meta: the embeddings artifact's meta, recorded under meta["embed"].
        feedback: phrase banks for synthesised text feedback (default: built from items.facets with the
            items.text_model encoder when both are known, see `scorer.feedback.banks_for`).
        checkpoint_dir: Ray Train run storage for checkpoints: a folder every node reaches or a URI
            (s3://..., gs://...); default OUT/ray on this machine (single node).
        init_from: a previous scorer folder to start from (fine-tuning): its weights are copied where shapes
            match and its ID embeddings carried over by item id (`transfer_weights`); training then runs
            `cfg.epochs` epochs on the given data.
        focus_after_ts: train on every sample whose target is later than this ts plus as many older samples
            drawn at random (a fine-tune on new feedback that does not forget the rest).

    Returns:
        The written meta (config, best_epoch, metrics, per-epoch history, wall_s, examples_per_s).

    Example::

        meta = fit_scorer(TrainConfig(epochs=2, dim=16), "runs/ml/data", items, "runs/ml/scorer")
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from llmrec.raysetup import init_ray
    from llmrec.scorer.dataset import cooc_matrices, storage_path, training_data

    _check_config(cfg, "fit_scorer(cfg, train_df, items, out_dir)")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if valid_df is not None and not isinstance(train_df, pd.DataFrame):
        raise ValueError("an explicit valid_df needs train_df as a DataFrame too; or pass val_users instead")
    resume_file = resolve_resume(resume_from) if resume_from is not None else None

    init_ray()
    explicit_val = valid_df is not None and len(valid_df) > 0
    val_users = 0 if valid_df is not None else cfg.val_users
    data = training_data(train_df, items, cfg.max_len, cfg.min_rating, val_users, cfg.seed)
    if data.n_samples == 0:
        raise ValueError(
            f"no training samples from {data.n_events} interactions: every user needs >= 2 events with a "
            "target kind (not dislike/skip); give more interactions"
        )
    val = data.val
    if explicit_val:
        val = sdata.build_validation(
            attach_item_idx(train_df, items), valid_df, items, max_len=cfg.max_len,
            min_rating=cfg.min_rating,
        )
    static = static_from_counts(items, data.item_counts, data.target_counts, val, cfg, feedback)
    ds = data.samples
    if focus_after_ts is not None:
        ds = focus_samples(ds, int(focus_after_ts), cfg.seed)
    init_state = None
    if init_from is not None:
        init_state = transfer_weights(build_model(static, cfg), init_from, items.item_ids)
    config = {
        "train_config": dataclasses.asdict(cfg),  # plain values to every worker (TrainConfig rebuilt there)
        "static": ray.put(static),
        "resume_from": str(resume_file) if resume_file else None,
        "init_state": ray.put(init_state) if init_state is not None else None,
    }
    has_val = static["val"] is not None and static["val"].n_users > 0
    ckpt_cfg = CheckpointConfig(
        num_to_keep=2,
        checkpoint_score_attribute=SCORE_METRIC if has_val else "epoch",
        checkpoint_score_order="max",
    )
    resources = {"CPU": 1, "GPU": 1} if cfg.use_gpu else {"CPU": 1}
    run_name = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{int(time.time() * 1e3) % 1000:03d}"
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_path(out, checkpoint_dir),
            checkpoint_config=ckpt_cfg,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": ds},
        dataset_config=_ordered_ingest(),
    )
    logger.info(
        "TorchTrainer: %d workers, gpu=%s, %d samples, %d epochs, checkpoints in %s",
        cfg.num_workers,
        cfg.use_gpu,
        data.n_samples,
        cfg.epochs,
        storage_path(out, checkpoint_dir),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    best = _pick_best(result, has_val)
    with best.as_directory() as d:
        state = load_torch_file(Path(d) / CHECKPOINT_FILE, map_location="cpu")
    with result.checkpoint.as_directory() as d:
        last = out / LAST_CHECKPOINT_DIR
        last.mkdir(exist_ok=True)
        shutil.copyfile(Path(d) / CHECKPOINT_FILE, last / CHECKPOINT_FILE)
        last_state = load_torch_file(Path(d) / CHECKPOINT_FILE, map_location="cpu")
    sims = None
    if cfg.cooc_neighbors > 0:
        if explicit_val:  # both frames are in memory already
            sims = (cooc_matrix(train_df, items, cfg.cooc_neighbors),
                    cooc_matrix(pd.concat([train_df, valid_df]), items, cfg.cooc_neighbors))
        else:
            sims = cooc_matrices(data.user_items, items.n_items, cfg.cooc_neighbors)
    state, cooc, cooc_info, boost_info, cold_info = finalize_ranking(state, static, sims, cfg)
    ts_max = [data.ts_max] if data.ts_max is not None else []
    if explicit_val and TS in valid_df.columns:
        ts_max.append(int(valid_df[TS].max()))
    wall = time.perf_counter() - t0
    epochs_run = list(last_state.get("run_epochs", []))
    return _write_artifact(
        out,
        state,
        last_state,
        items,
        cfg,
        embed_meta,
        wall=wall,
        epochs_run=epochs_run,
        cooc=cooc,
        cooc_info=cooc_info,
        boost_info=boost_info,
        cold_info=cold_info,
        feedback_info=feedback_summary(static, cfg),
        data_ts_max=max(ts_max) if ts_max else None,
        extra={
            "ray_run": run_name,
            "resumed_from": str(resume_file) if resume_file else None,
        },
    )


def _plain(x: Any) -> Any:
    """Numbers, strings, lists and dicts only (numpy scalars -> float/int), so `weights_only` loads it."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, (bool, str)) or x is None:
        return x
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x)
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    return str(x)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: DDP model, Ray Data shard batches, per-epoch validation + checkpoint + early stop."""
    import ray
    import ray.train
    import ray.train.torch

    cfg = TrainConfig(**config["train_config"])
    static = config["static"]
    if isinstance(static, ray.ObjectRef):
        static = ray.get(static)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's weights)
    model = build_model(static, cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start_epoch, stop_state = 0, {"best": -math.inf, "best_epoch": -1, "bad_epochs": 0}
    history: list[dict] = []  # per-epoch metrics, carried over by a resumed run
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            state = load_torch_file(Path(d) / CHECKPOINT_FILE, map_location=device)
    elif config.get("resume_from"):
        state = load_torch_file(config["resume_from"], map_location=device)
    else:
        state = None
        if config.get("init_state") is not None:  # fine-tune: start from another scorer's weights
            init = config["init_state"]
            model.load_state_dict(ray.get(init) if isinstance(init, ray.ObjectRef) else init)
    if state is not None:
        start_epoch, stop_state = load_train_state(model, optimizer, state)
        history = list(state.get("history", []))
        if rank == 0:
            logger.info("resuming at epoch %d (best %s=%.4f)", start_epoch, SCORE_METRIC, stop_state["best"])
    ddp_model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"broadcast_buffers": False})
    shard = ray.train.get_dataset_shard("train")
    neg_p = torch.as_tensor(static["neg_p"], dtype=torch.float32, device=device)
    log_q = _log_q_tensor(static, cfg, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)
    rng = np.random.default_rng([cfg.seed, rank, start_epoch])  # text-feedback synthesis
    per_worker_batch = max(1, cfg.batch_size // world)
    run_epochs: list[int] = []  # epochs trained by this run (a resumed run starts after the saved epoch)
    for epoch in range(start_epoch, cfg.epochs):
        run_epochs.append(epoch)
        t0 = time.perf_counter()
        # the samples come in one seeded global order (llmrec.scorer.dataset); each epoch permutes them within
        # windows of SHUFFLE_WINDOW batches with a seeded rng (Ray's local shuffle buffer is not reproducible)
        batches = shuffled_batches(
            shard.iter_torch_batches(batch_size=per_worker_batch),
            per_worker_batch,
            SHUFFLE_WINDOW,
            np.random.default_rng([cfg.seed, epoch, rank, 17]),
        )
        loss_sum, n_ex = train_epoch(
            ddp_model, optimizer, batches, neg_p, cfg, gen, device, log_q, static["bank"], rng
        )
        train_s = time.perf_counter() - t0
        totals = torch.tensor([loss_sum, n_ex], dtype=torch.float64)
        metrics = evaluate(
            model, static["val"], cfg.n_candidates, rank=rank, world=world, device=device, bank=static["bank"]
        )
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(totals)
        metrics.update(
            epoch=epoch,
            train_loss=float(totals[0] / max(totals[1], 1)),
            examples=int(totals[1]),
            train_s=train_s,
            examples_per_s=float(totals[1]) / train_s,
        )
        stop = update_early_stop(stop_state, metrics, epoch, cfg.patience)
        metrics["best_epoch"] = stop_state["best_epoch"]
        history.append(dict(metrics))
        _report(metrics, model, optimizer, epoch, stop_state, rank, run_epochs, history)
        if rank == 0:
            logger.info(
                "epoch %d: %s",
                epoch,
                {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
            )
        if stop:
            break


def fit_local(
    cfg: TrainConfig,
    train_df: pd.DataFrame,
    items: ItemSpace,
    valid_df: pd.DataFrame | None = None,
    *,
    device: str = "cpu",
    feedback: FeedbackBanks | None = None,
) -> tuple[ScorerModel, list[dict]]:
    """The same training in one plain process (no Ray): for tests, benchmarks and debugging.

    Returns the best model (by val_ndcg@10 when valid_df is given, else the last) in eval mode, and the
    per-epoch metrics. The post-training choices of `fit_scorer` (re-ranker on/off, co-occurrence weight:
    `finalize_ranking`) are not made here: the model ranks with its network alone. Of `cfg`, the Ray options
    (num_workers, use_gpu, max_failures) and val_users (`valid_df` is the validation) are not used.
    """
    _check_config(cfg, "fit_local(cfg, train_df, items)")
    static, samples = prepare_static(train_df, items, valid_df, cfg, feedback)
    torch.manual_seed(cfg.seed)
    model = build_model(static, cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    neg_p = torch.as_tensor(static["neg_p"], dtype=torch.float32, device=device)
    log_q = _log_q_tensor(static, cfg, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000)
    rng = np.random.default_rng(cfg.seed)
    fb_rng = np.random.default_rng([cfg.seed, 0, 0])
    stop_state = {"best": -math.inf, "best_epoch": -1, "bad_epochs": 0}
    history, best_sd = [], None
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        loss_sum, n_ex = train_epoch(
            model, optimizer, iter_numpy_batches(samples, cfg.batch_size, rng, device), neg_p, cfg, gen,
            device, log_q, static["bank"], fb_rng,
        )
        train_s = time.perf_counter() - t0
        metrics = evaluate(model, static["val"], cfg.n_candidates, device=device, bank=static["bank"])
        metrics.update(
            epoch=epoch,
            train_loss=loss_sum / max(n_ex, 1),
            examples=n_ex,
            train_s=train_s,
            examples_per_s=n_ex / train_s,
        )
        stop = update_early_stop(stop_state, metrics, epoch, cfg.patience)
        if stop_state["best_epoch"] == epoch:
            best_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(metrics)
        logger.info(
            "fit_local epoch %d: loss %.4f, %.0f ex/s",
            epoch,
            metrics["train_loss"],
            metrics["examples_per_s"],
        )
        if stop:
            break
    if best_sd is not None:
        model.load_state_dict(best_sd)
    return model.eval(), history


# ---------------------------------------------------------------------------------------------------------
# the training core shared by the Ray worker and fit_local
# ---------------------------------------------------------------------------------------------------------
def prepare_static(
    train_df: pd.DataFrame,
    items: ItemSpace,
    valid_df: pd.DataFrame | None,
    cfg: TrainConfig,
    feedback: FeedbackBanks | None = None,
) -> tuple[dict, dict[str, np.ndarray]]:
    """In-process preparation (`fit_local`): samples built here, then `static_from_counts`."""
    train_df = attach_item_idx(train_df, items)
    samples = sdata.build_samples(train_df, items, max_len=cfg.max_len, min_rating=cfg.min_rating)
    if len(samples["target"]) == 0:
        raise ValueError(
            f"no training samples from {len(train_df)} interactions: "
            "every user needs >= 2 events with a target "
            "kind (not dislike/skip); give more interactions"
        )
    val = None
    if valid_df is not None and len(valid_df):
        val = sdata.build_validation(
            train_df, valid_df, items, max_len=cfg.max_len, min_rating=cfg.min_rating
        )
    pop = sdata.popularity(train_df, items)
    targets = np.bincount(samples["target"], minlength=items.n_items).astype(np.float64)
    return static_from_counts(items, pop, targets, val, cfg, feedback), samples


SHUFFLE_WINDOW = 8  # batches permuted together per epoch (train_loop_per_worker)


def shuffled_batches(
    batches: Iterable[dict[str, torch.Tensor]], batch_size: int, window: int, rng: np.random.Generator
) -> Iterator[dict[str, torch.Tensor]]:
    """Re-batch `batches` after permuting their rows within windows of `window` batches (seeded: the same
    input stream and rng give the same batches)."""

    def flush(buf: list[dict[str, torch.Tensor]]) -> Iterator[dict[str, torch.Tensor]]:
        cat = {k: torch.cat([b[k] for b in buf]) for k in buf[0]}
        m = int(next(iter(cat.values())).shape[0])
        perm = torch.from_numpy(rng.permutation(m))
        for s in range(0, m, batch_size):
            idx = perm[s : s + batch_size]
            yield {k: v[idx] for k, v in cat.items()}

    buf: list[dict[str, torch.Tensor]] = []
    for b in batches:
        buf.append(b)
        if len(buf) >= window:
            yield from flush(buf)
            buf = []
    if buf:
        yield from flush(buf)


def _ordered_ingest() -> Any:
    """Ray Train's data ingest with blocks in dataset order (not task completion order): one seed, one
    model."""
    from ray.train import DataConfig

    opts = DataConfig.default_ingest_options()
    opts.preserve_order = True
    return DataConfig(execution_options=opts)


def focus_samples(samples: Any, after_ts: int, seed: int = 0) -> Any:
    """Every sample with target_ts > after_ts plus about as many older ones (a Ray Dataset op), in the
    samples' own seeded order (`llmrec.scorer.dataset`: new and old interleaved). The older ones are those
    whose content hash falls below n_new / n_old of the hash range, so the choice does not depend on how the
    samples are cut into blocks."""
    from llmrec.scorer.dataset import ORDER_KEY, ordered_blocks, with_order_key

    n_new = samples.filter(lambda r: r["target_ts"] > after_ts).count()
    n_old = samples.count() - n_new
    if n_new == 0:
        raise ValueError(f"no training sample has a target after ts {after_ts}; nothing new to learn from")
    limit = 2**64 if n_old <= n_new else int(n_new / n_old * 2**64)
    with ordered_blocks():  # blocks in the samples' order
        keyed = samples.map_batches(with_order_key, fn_kwargs={"seed": seed + 1}, batch_format="numpy")
        kept = keyed.filter(lambda r: r["target_ts"] > after_ts or int(r[ORDER_KEY]) < limit)
        out = kept.drop_columns([ORDER_KEY]).materialize()
    logger.info("fine-tune focus: %d samples after ts %d + ~%d of %d older ones", n_new, after_ts,
                min(n_old, n_new), n_old)
    return out


def transfer_weights(model: ScorerModel, scorer_dir: str | os.PathLike, item_ids: np.ndarray) -> dict:
    """The state dict of `model` with the weights of the scorer in `scorer_dir` copied in: every parameter of
    the same shape, and the ID embedding row of every item both catalogs know (slots differ when the training
    data grew). The catalog buffers (text vectors, ID slots, counts) stay the new data's."""
    from llmrec.schema import INDEX_IDS_FILE

    d = Path(scorer_dir)
    old = load_torch_file(d / MODEL_FILE, map_location="cpu")["model"]
    old_ids = np.load(d / INDEX_IDS_FILE, allow_pickle=False).astype(str)
    new = model.state_dict()
    skip = {"text_vectors", "id_slots", "item_counts", "id_emb.weight"}
    copied = 0
    for k, v in old.items():
        if k not in skip and k in new and tuple(new[k].shape) == tuple(v.shape):
            new[k] = v.clone()
            copied += 1
    pos = {iid: i for i, iid in enumerate(np.asarray(item_ids).astype(str))}
    o_slots, n_slots = old["id_slots"].numpy(), new["id_slots"].numpy()
    rows_new, rows_old = [], []
    for i, iid in enumerate(old_ids):
        j = pos.get(iid)
        if j is not None and o_slots[i] > 0 and n_slots[j] > 0:
            rows_new.append(int(n_slots[j]))
            rows_old.append(int(o_slots[i]))
    emb = new["id_emb.weight"].clone()
    if rows_new and old["id_emb.weight"].shape[1] == emb.shape[1]:
        emb[torch.as_tensor(rows_new)] = old["id_emb.weight"][torch.as_tensor(rows_old)]
    new["id_emb.weight"] = emb
    logger.info("fine-tune from %s: %d tensors copied, %d item ID embeddings carried over", d, copied,
                len(rows_new))
    return new


def static_from_counts(
    items: ItemSpace,
    item_counts: np.ndarray,
    target_counts: np.ndarray,
    val: sdata.ValidationSet | None,
    cfg: TrainConfig,
    feedback: FeedbackBanks | None = None,
) -> dict:
    """What every worker needs (catalog-sized): text vectors, ID slots and counts, negative distribution,
    logQ, the validation set (with one synthesised held-out-phrasing text feedback per user when there are
    phrase banks) and the training phrase bank."""
    text = np.asarray(items.text_vectors, dtype=np.float32)
    if text.ndim != 2 or text.shape[0] != items.n_items:
        raise ValueError(f"items.text_vectors must be (N={items.n_items}, D), got {text.shape}")
    pop = np.asarray(item_counts, dtype=np.float64)
    seen = pop > 0
    slots = np.zeros(items.n_items, np.int64)
    if cfg.use_ids:
        slots[seen] = np.arange(1, int(seen.sum()) + 1)
    neg_p = sdata.negative_distribution(pop)
    if cfg.feedback_p > 0 and feedback is None:
        feedback = banks_for(items)
    if val is not None and feedback is not None:
        first = np.array([int(t[0]) if len(t) else 0 for t in val.targets], np.int64)
        fv, fp, ff = sample_feedback(
            feedback.heldout, first, val.hist_idx, val.hist_len, np.random.default_rng([cfg.seed, 7]), 1.0
        )
        val = dataclasses.replace(val, fb_vec=fv, fb_pol=fp, fb_facet=ff)
    return {"text_vectors": text, "id_slots": slots, "item_counts": pop.astype(np.float32), "neg_p": neg_p,
            "val": val, "bank": feedback.train if feedback is not None and cfg.feedback_p > 0 else None,
            "log_q": candidate_log_q(target_counts, neg_p, cfg.batch_size, cfg.n_neg)}


def feedback_summary(static: dict, cfg: TrainConfig) -> dict:
    """meta.json "feedback": what synthesised text feedback training used (facets, share, phrasings)."""
    bank = static.get("bank")
    if bank is None:
        return {"used": False, "p": cfg.feedback_p}
    from llmrec.scorer.feedback import HELDOUT_TEMPLATES

    return {"used": True, "p": cfg.feedback_p, "n_facets": bank.n_facets,
            "train_templates": {str(k): list(v) for k, v in bank.templates.items()},
            "heldout_templates": {str(k): list(v) for k, v in HELDOUT_TEMPLATES.items()}}


def _log_q_tensor(static: dict, cfg: TrainConfig, device: torch.device | str) -> torch.Tensor | None:
    if not cfg.logq_correction:
        return None
    return torch.as_tensor(static["log_q"], dtype=torch.float32, device=device)


def candidate_log_q(target_counts: np.ndarray, neg_p: np.ndarray, batch_size: int, n_neg: int) -> np.ndarray:
    """float32 (N,) log-probability that an item enters a batch's candidate pool (logQ correction).

    The pool is B in-batch targets (drawn like training targets, i.e. by popularity: `target_counts` (N,)
    training targets per item) plus n_neg draws from neg_p. Without subtracting log q from the sampled-softmax
    logits, popular items are over-represented as negatives and the model learns to rank them down, which
    costs full-ranking accuracy (Yi et al., 2019).
    """
    tgt = np.asarray(target_counts, dtype=np.float64).copy()
    tgt /= max(tgt.sum(), 1.0)
    n_neg = max(int(n_neg), 0)  # -1 = full softmax (no sampling; log q unused)
    q = (batch_size * tgt + n_neg * np.asarray(neg_p, dtype=np.float64)) / (batch_size + n_neg)
    return np.log(np.maximum(q, 1e-12)).astype(np.float32)


def build_model(static: dict, cfg: TrainConfig) -> ScorerModel:
    n, d_text = static["text_vectors"].shape
    model_cfg = ScorerConfig(
        text_dim=d_text,
        n_items=n,
        n_id_slots=int(static["id_slots"].max()) + 1,
        dim=cfg.dim,
        max_len=cfg.max_len,
        n_layers=cfg.n_layers,
        n_heads=cfg.n_heads,
        mlp_hidden=cfg.mlp_hidden,
        id_dropout=cfg.id_dropout,
        dropout=cfg.dropout,
        logit_scale=cfg.logit_scale,
        text_arm=cfg.text_arm,
        rare_dropout_c=cfg.rare_dropout_c,
        cold_quota=cfg.cold_quota,
        cold_impute_k=cfg.cold_impute_k,
    )
    # np.require copies the read-only arrays Ray hands a worker (the model registers them as buffers)
    model = ScorerModel(
        model_cfg,
        *(torch.from_numpy(np.require(static[k], requirements="W"))
          for k in ("text_vectors", "id_slots", "item_counts")),
    )
    if cfg.warm_start:
        model.warm_start()
    return model


def batch_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    neg_p: torch.Tensor,
    n_neg: int,
    gen: torch.Generator,
    head_neg: int = 31,
    log_q: torch.Tensor | None = None,
    head_pool: int = 200,
) -> torch.Tensor:
    """Sampled-softmax loss (retrieval u.v + MLP head) for one batch; see the module docstring.

    log_q: float32 (N,) candidate log-probabilities subtracted from the retrieval logits (logQ correction).
    batch may carry text feedback ("fb_vec" (B, T, D), "fb_pol" (B, T)) for the user encoder.
    """
    target = batch["target"].long()  # (B,)
    B = target.shape[0]
    rows = torch.arange(B, device=target.device)
    if n_neg < 0:  # full softmax over the whole catalog: no sampling, so no logQ and no accidental hits
        # positive = own index
        cand, pos, hit = torch.arange(neg_p.shape[0], device=target.device), target, None
    else:  # the B targets first (row b's positive is column b), then n_neg sampled negatives
        negs = torch.multinomial(neg_p, n_neg, replacement=True, generator=gen) if n_neg > 0 else target[:0]
        cand, pos = torch.cat([target, negs]), rows  # (C,)
        hit = cand[None, :] == target[:, None]  # (B, C)
        hit[rows, rows] = False
    retrieval, head = model(
        batch["hist_idx"].long(),
        batch["hist_event"].long(),
        batch["hist_rating"].float(),
        batch["hist_len"].long(),
        cand,
        head_neg,
        hit,
        pos,
        head_pool,
        batch.get("fb_vec"),
        batch.get("fb_pol"),
    )  # (B, C), (B, 1 + head_neg)
    if log_q is not None and n_neg >= 0:
        retrieval = retrieval - log_q[cand][None, :]  # (B, C)
    return F.cross_entropy(retrieval, pos) + F.cross_entropy(head, torch.zeros_like(rows))


def train_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[dict[str, torch.Tensor]],
    neg_p: torch.Tensor,
    cfg: TrainConfig,
    gen: torch.Generator,
    device: torch.device | str,
    log_q: torch.Tensor | None = None,
    bank: FeedbackBank | None = None,
    rng: np.random.Generator | None = None,
) -> tuple[float, int]:
    """One pass over `batches`; returns (sum of per-example loss, examples).

    With a phrase bank, a share cfg.feedback_p of the rows gets one synthesised text feedback
    (`scorer.feedback.sample_feedback`) drawn from `rng`."""
    model.train()
    loss_sum, n_ex = 0.0, 0
    max_steps = cfg.max_steps
    for step, batch in enumerate(batches):
        if max_steps is not None and step >= int(max_steps):
            break
        batch = {k: v.to(device) for k, v in batch.items()}
        if bank is not None and cfg.feedback_p > 0:
            fv, fp, _ = sample_feedback(
                bank,
                batch["target"].cpu().numpy(),
                batch["hist_idx"].cpu().numpy(),
                batch["hist_len"].cpu().numpy(),
                rng if rng is not None else np.random.default_rng(),
                cfg.feedback_p,
            )
            batch["fb_vec"], batch["fb_pol"] = (
                torch.from_numpy(fv).to(device), torch.from_numpy(fp).to(device)
            )
        loss = batch_loss(model, batch, neg_p, cfg.n_neg, gen, cfg.head_neg, log_q, cfg.n_candidates)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        b = int(batch["target"].shape[0])
        loss_sum += float(loss.detach()) * b
        n_ex += b
    return loss_sum, n_ex


@torch.no_grad()
def evaluate(
    model: ScorerModel,
    val: sdata.ValidationSet | None,
    n_candidates: int = 200,
    k: int = 10,
    rank: int = 0,
    world: int = 1,
    device: torch.device | str = "cpu",
    chunk: int = 256,
    bank: FeedbackBank | None = None,
) -> dict[str, float]:
    """Full-ranking recall@k / ndcg@k of this rank's user slice, all-reduced over ranks when world > 1.

    `val_*` rank without text feedback (what early stopping reads); when the validation set carries
    synthesised feedback, `val_fb_*` rank the same users with it, and for the users whose text is negative
    `val_fb_neg_share_before/after` are the shares of their top k that carry the facet the text rejects
    (item facets from `bank`), the responsiveness the serving benchmark measures. Returns {} without a
    validation set.
    """
    if val is None or val.n_users == 0:
        return {}
    was_training = model.training
    # recall, ndcg, retrieval recall, retrieval ndcg, users | fb recall, fb ndcg, fb users | neg users, share
    # of the rejected facet before, after
    sums = torch.zeros(11, dtype=torch.float64)
    users = np.arange(rank, val.n_users, world)
    with_fb = val.fb_vec is not None and bool((val.fb_pol != 0).any())
    tops: dict[int, np.ndarray] = {}
    for ub, retrieval, cand, head in _two_stage_chunks(
        model, val, users, max(n_candidates, k), device, chunk
    ):
        top_two = torch.gather(cand, 1, head.topk(k, dim=1).indices).cpu().numpy()  # (b, k)
        top_ret = retrieval.topk(k, dim=1).indices.cpu().numpy()
        for j, b in enumerate(ub):
            r2, n2 = recall_ndcg(top_two[j], val.targets[b], k)
            r1, n1 = recall_ndcg(top_ret[j], val.targets[b], k)
            sums[:5] += torch.tensor([r2, n2, r1, n1, 1.0], dtype=torch.float64)
            tops[int(b)] = top_two[j]
    if with_fb:
        for ub, _, cand, head in _two_stage_chunks(
            model, val, users, max(n_candidates, k), device, chunk, feedback=True
        ):
            top_fb = torch.gather(cand, 1, head.topk(k, dim=1).indices).cpu().numpy()
            for j, b in enumerate(ub):
                if val.fb_pol[b, 0] == 0:
                    continue
                r, n = recall_ndcg(top_fb[j], val.targets[b], k)
                sums[5:8] += torch.tensor([r, n, 1.0], dtype=torch.float64)
                if val.fb_pol[b, 0] < 0 and bank is not None:
                    f = int(val.fb_facet[b])
                    share = [
                        np.mean([f in bank.facets_of(int(i)) for i in t]) for t in (tops[int(b)], top_fb[j])
                    ]
                    sums[8:] += torch.tensor([1.0, *share], dtype=torch.float64)
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(sums)
    model.train(was_training)
    n = max(float(sums[4]), 1.0)
    out = {
        f"val_recall@{k}": float(sums[0]) / n,
        f"val_ndcg@{k}": float(sums[1]) / n,
        f"val_retrieval_recall@{k}": float(sums[2]) / n,
        f"val_retrieval_ndcg@{k}": float(sums[3]) / n,
        f"val_best_ndcg@{k}": max(float(sums[1]), float(sums[3])) / n,
        "val_users": int(sums[4]),
    }
    if with_fb:
        n_fb = max(float(sums[7]), 1.0)
        out.update({f"val_fb_recall@{k}": float(sums[5]) / n_fb, f"val_fb_ndcg@{k}": float(sums[6]) / n_fb})
        if float(sums[8]) > 0:
            out.update(val_fb_neg_share_before=float(sums[9]) / float(sums[8]),
                       val_fb_neg_share_after=float(sums[10]) / float(sums[8]))
    return out


def _two_stage_chunks(
    model: ScorerModel,
    val: sdata.ValidationSet,
    users: np.ndarray,
    n_candidates: int,
    device: torch.device | str = "cpu",
    chunk: int = 256,
    feedback: bool = False,
) -> Iterator[tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Validation users in chunks through `two_stage_rank` (eval mode; each user's train items excluded;
    with `feedback`, the user encoder also reads the validation set's synthesised text).

    Yields (user rows ub, retrieval (b, N), candidates (b, n), ranking scores (b, n) with -inf where the
    candidate is excluded).
    """
    model.eval()
    reps = model.all_item_reps()  # (N, r)
    for s in range(0, len(users), chunk):
        ub = users[s : s + chunk]
        t = lambda a, dt, ub=ub: torch.as_tensor(a[ub], device=device).to(dt)  # noqa: E731
        fb = (t(val.fb_vec, torch.float32), t(val.fb_pol, torch.float32)) if feedback else (None, None)
        u = model.user_vectors(
            t(val.hist_idx, torch.long),
            t(val.hist_event, torch.long),
            t(val.hist_rating, torch.float32),
            t(val.hist_len, torch.long),
            *fb,
        )
        excl = torch.zeros(len(ub), reps.shape[0], dtype=torch.bool, device=device)
        for j, b in enumerate(ub):
            excl[j, torch.as_tensor(val.exclude[b], device=device)] = True
        retrieval, cand, head = two_stage_rank(model, u, reps, excl, n_candidates)
        yield ub, retrieval, cand, head


def update_early_stop(state: dict, metrics: dict, epoch: int, patience: int) -> bool:
    """Update {best, best_epoch, bad_epochs} in place; True when training should stop."""
    score = metrics.get(SCORE_METRIC)
    if score is None:  # no validation: the latest epoch is the best
        state.update(best=float(epoch), best_epoch=epoch, bad_epochs=0)
        return False
    if score > state["best"]:
        state.update(best=float(score), best_epoch=epoch, bad_epochs=0)
        return False
    state["bad_epochs"] += 1
    return state["bad_epochs"] >= patience


def load_train_state(model: ScorerModel, optimizer: torch.optim.Optimizer, state: dict) -> tuple[int, dict]:
    """Restore model/optimizer from a checkpoint dict; returns (next epoch, early-stop state)."""
    saved = state["model_config"]
    if saved != model.cfg.to_dict():
        diff = {k: (saved.get(k), v) for k, v in model.cfg.to_dict().items() if saved.get(k) != v}
        raise ValueError(
            f"checkpoint does not match this run's model config (checkpoint, now): {diff}; "
            "resume with the same data, embeddings and model options, or train from scratch"
        )
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return int(state["epoch"]) + 1, dict(state["early_stop"])


def resolve_resume(path: str | os.PathLike) -> Path:
    """A Ray checkpoint dir or a previous `llmrec train` output dir -> its checkpoint.pt."""
    p = Path(path)
    for cand in (p / CHECKPOINT_FILE, p / LAST_CHECKPOINT_DIR / CHECKPOINT_FILE, p):
        if cand.is_file():
            return cand
    raise FileNotFoundError(
        f"no {CHECKPOINT_FILE} under {p} (looked at {p / CHECKPOINT_FILE} and "
        f"{p / LAST_CHECKPOINT_DIR / CHECKPOINT_FILE}); "
        "pass a Ray checkpoint folder or the --out folder of an earlier `llmrec train`"
    )


def iter_numpy_batches(
    samples: dict[str, np.ndarray],
    batch_size: int,
    rng: np.random.Generator,
    device: str | torch.device = "cpu",
) -> Iterator[dict[str, torch.Tensor]]:
    """Shuffled in-process batches (fit_local / benchmark twin of the Ray Data shard iterator)."""
    n = len(samples["target"])
    perm = rng.permutation(n)
    for s in range(0, n, batch_size):
        idx = perm[s : s + batch_size]
        yield {k: torch.from_numpy(samples[k][idx]).to(device) for k in sdata.SAMPLE_COLUMNS}


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------
def _check_config(cfg: Any, call: str) -> None:
    """A clear error for the pre-TrainConfig call style `fit_scorer(train_df, items, out, epochs=...)`."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(
            f"{call}: cfg must be a llmrec.config.TrainConfig, got {type(cfg).__name__}; the training "
            "options moved into it: fit_scorer(TrainConfig(epochs=5, dim=32), train_df, items, out_dir)"
        )


def _report(
    metrics: dict,
    model: ScorerModel,
    optimizer,
    epoch: int,
    stop_state: dict,
    rank: int,
    run_epochs: list[int],
    history: list[dict],
) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(
            {
                "model": {k: v.cpu() for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "model_config": model.cfg.to_dict(),
                # plain Python only (no numpy scalars): loaded with torch.load(weights_only=True)
                "early_stop": _plain(dict(stop_state)),
                "metrics": _plain(metrics),
                "run_epochs": [int(e) for e in run_epochs],
                "history": _plain(history),
                "worker_pid": os.getpid(),  # which process wrote it (fault-tolerance tests, debugging)
            },
            Path(tmp) / CHECKPOINT_FILE,
        )
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _pick_best(result, has_val: bool):
    key = SCORE_METRIC if has_val else "epoch"
    cands = [(c, m) for c, m in (result.best_checkpoints or []) if key in m]
    if not cands:
        return result.checkpoint
    return max(cands, key=lambda cm: (cm[1][key], cm[1]["epoch"]))[0]


def finalize_ranking(
    state: dict,
    static: dict,
    sims: tuple[sp.csr_matrix, sp.csr_matrix] | None,
    cfg: TrainConfig,
) -> tuple[dict, sp.csr_matrix | None, dict, dict, dict]:
    """Post-training choices, each measured on validation: the MLP re-ranker on/off, then the co-occurrence
    weight (`tune_cooc_weight`), then the text boost per history-length bucket (`tune_text_boost`), then the
    cold-item bonus (`tune_cold_bonus`).

    sims: (co-occurrence similarity of the training events, of training + validation events) or None (no
    co-occurrence term). Returns (state with model_config updated, the co-occurrence matrix to ship (train +
    validation) or None, the co-occurrence, text-boost and cold-bonus summaries for meta.json)."""
    m = state["metrics"]
    mc = dict(state["model_config"])
    if "val_ndcg@10" in m and "val_retrieval_ndcg@10" in m:
        # measured, not assumed: keep the MLP re-ranker only if it beat retrieval alone on validation
        mc["rerank"] = bool(m["val_ndcg@10"] >= m["val_retrieval_ndcg@10"])
        logger.info("re-ranker %s: val ndcg@10 two-stage %.4f vs retrieval-only %.4f",
                    "on" if mc["rerank"] else "off", m["val_ndcg@10"], m["val_retrieval_ndcg@10"])
    info: dict[str, Any] = {"cooc_neighbors": cfg.cooc_neighbors}
    boost_info: dict[str, Any] = {}
    cold_info: dict[str, Any] = {}
    mc["cooc_weight"] = 0.0
    t0 = time.perf_counter()
    val = static["val"]
    has_val = val is not None and val.n_users > 0

    def model_for(c: dict) -> ScorerModel:
        mod = ScorerModel(  # torch.tensor copies: the arrays may be read-only views of Ray's object store
            ScorerConfig(**c),
            torch.tensor(static["text_vectors"]),
            torch.tensor(static["id_slots"]),
            torch.tensor(static["item_counts"]),
        )
        mod.load_state_dict(state["model"])
        return mod

    sim_train = None
    if sims is not None and has_val:
        sim_train = sims[0]
        weight, table = tune_cooc_weight(model_for(mc), val, sim_train, cfg.n_candidates)
        mc["cooc_weight"] = weight
        info.update(val_ndcg_by_weight=table, cooc_weight=weight)
        logger.info("co-occurrence weight %.4g chosen on validation (ndcg@10 by weight: %s)", weight, table)
    elif sims is not None:
        logger.info("no validation set: co-occurrence weight stays 0 (neural ranking only)")
    if has_val and mc.get("text_arm", True):
        boost, boost_info = tune_text_boost(model_for(mc), val, sim_train, cfg.n_candidates)
        mc["text_boost"] = list(boost)
        logger.info("text boost per history-length bucket %s chosen on validation: %s",
                    list(boost_info["buckets"]), boost)
    if has_val:
        bonus, cold_info = tune_cold_bonus(model_for(mc), val, sim_train, cfg.n_candidates)
        mc["cold_bonus"] = bonus
        logger.info("cold-item bonus %.4g chosen on validation (%s)", bonus,
                    f"{cold_info['n_cold_targets']} targets of "
                    f"{cold_info['n_pseudo_cold_items']} items made cold"
                    if cold_info.get("measured") else cold_info.get("why", ""))
    if sims is None:
        return {**state, "model_config": mc}, None, info, boost_info, cold_info
    sim = sims[1]
    info.update(nnz=int(sim.nnz), seconds=time.perf_counter() - t0)
    return {**state, "model_config": mc}, sim, info, boost_info, cold_info


@torch.no_grad()
def tune_text_boost(
    model: ScorerModel,
    val: sdata.ValidationSet,
    sim: sp.csr_matrix | None,
    n_candidates: int = 200,
    k: int = 10,
    grid: Iterable[float] = TEXT_BOOST_GRID,
    min_users: int = 30,
    chunk: int = 256,
) -> tuple[tuple[float, ...], dict[str, Any]]:
    """The multiplier of the text-arm gain beta(n) per history-length bucket (`ScorerConfig.text_boost`).

    Every grid value is applied to all validation users (final ranking as served, co-occurrence term
    included), then `choose_text_boost` picks per bucket from the per-user NDCG@k. Returns (boost per bucket,
    {buckets, grid, n_users, val_ndcg (per bucket per grid value), chosen, measured, z}).
    """
    from llmrec.scorer.model import LEN_BUCKETS

    grid = [float(g) for g in grid]
    lens = np.minimum(np.asarray(val.hist_len), model.cfg.max_len)
    bucket = np.clip(np.searchsorted(LEN_BUCKETS, lens, side="right") - 1, 0, None)
    impute = (
        cooc_neighbours(sim, model.text_vectors.numpy(), model.cfg.cold_impute_k) if sim is not None else None
    )
    per = np.zeros((len(grid), val.n_users))
    saved = model.text_boost.clone()
    try:
        for gi, g in enumerate(grid):
            model.text_boost.fill_(g)
            per[gi] = served_val_ndcg(model, val, sim, impute, n_candidates, k, chunk)
    finally:
        model.text_boost.copy_(saved)
    chosen, measured = choose_text_boost(per, bucket, grid, len(LEN_BUCKETS), min_users)
    table = {
        str(LEN_BUCKETS[b]): [float(x) for x in per[:, bucket == b].mean(1)] if (bucket == b).any() else []
        for b in range(len(LEN_BUCKETS))
    }
    return chosen, {"buckets": list(LEN_BUCKETS), "grid": grid, "chosen": list(chosen), "measured": measured,
                    "z": TEXT_BOOST_Z, "rel": TIE_REL,
                    "n_users": [int((bucket == b).sum()) for b in range(len(LEN_BUCKETS))], "val_ndcg": table}


def choose_text_boost(
    per: np.ndarray,
    bucket: np.ndarray,
    grid: Sequence[float],
    n_buckets: int,
    min_users: int = 30,
    z: float = TEXT_BOOST_Z,
    rel: float = TIE_REL,
) -> tuple[tuple[float, ...], list[bool]]:
    """Per history-length bucket, the text boost to rank with, from per-user validation NDCG.

    Args:
        per: float (G, U), NDCG@k of validation user u ranked with grid value g.
        bucket: int (U,), each user's history-length bucket in [0, n_buckets).
        grid: the G boosts tried.
        min_users: a bucket with fewer validation users is not measured.
        z: tolerance in standard errors of the paired difference (`TEXT_BOOST_Z`).
        rel: tolerance relative to the best mean (`TIE_REL`).

    A measured bucket takes the LARGEST boost that ties with the bucket's best (`largest_tied`: within z
    standard errors of the paired difference and within rel of its mean; text wins ties). An unmeasured
    bucket takes the choice of the nearest measured shorter bucket, or when there is none, of the nearest
    measured longer one (a one-like user in a dataset whose validation users all have longer histories gets at
    least the text of the shortest measured histories); with no measured bucket every boost is 1. Measured
    choices never grow with history length (each is capped by the previous measured one). Returns (boost per
    bucket, measured per bucket).
    """
    per = np.asarray(per, dtype=np.float64)
    bucket = np.asarray(bucket)
    if per.ndim != 2 or per.shape != (len(grid), len(bucket)):
        raise ValueError(f"per must be (len(grid)={len(grid)}, users={len(bucket)}), got {per.shape}")
    picks: list[float | None] = []
    for b in range(n_buckets):
        sel = bucket == b
        n = int(sel.sum())
        if n < max(min_users, 2):
            picks.append(None)
            continue
        pick = largest_tied(per[:, sel], grid, z, rel)
        prev = next((p for p in reversed(picks) if p is not None), None)
        picks.append(pick if prev is None else min(pick, prev))
    measured = [p is not None for p in picks]
    out: list[float] = []
    for b in range(n_buckets):
        shorter = [p for p in picks[:b + 1] if p is not None]
        longer = [p for p in picks[b:] if p is not None]
        out.append(shorter[-1] if shorter else (longer[0] if longer else 1.0))
    return tuple(out), measured


@torch.no_grad()
def tune_cold_bonus(
    model: ScorerModel,
    val: sdata.ValidationSet,
    sim: sp.csr_matrix | None,
    n_candidates: int = 200,
    k: int = 10,
    grid: Iterable[float] = COLD_BONUS_GRID,
    frac: float = COLD_VAL_FRAC,
    seed: int = 0,
    min_targets: int = 30,
    chunk: int = 256,
) -> tuple[float, dict[str, Any]]:
    """The cold-item bonus (`ScorerConfig.cold_bonus`, u.v units), chosen on validation in a world with cold
    items.

    Validation targets are almost never cold (an item without training events rarely is anyone's next one), so
    a seeded `frac` of the items that have an ID embedding is made cold for the measurement: their ID slots
    set to 0 (they then borrow their text neighbours' ID vectors, as a real cold item does) and their rows and
    columns of the co-occurrence matrix removed. Every grid value ranks every validation user (final ranking
    as served); the choice is the LARGEST bonus whose overall NDCG@k ties with the best bonus's
    (`largest_tied`; cold items are text, and text wins ties). The overall NDCG counts
    warm-target users too, so each cold item pushed up costs what it costs them. Fewer than `min_targets`
    validation users with a made-cold target -> bonus 0, not measured. Returns (bonus, summary for meta.json:
    measured, grid, val_ndcg, val_ndcg_cold_targets, n_pseudo_cold_items, n_cold_targets, chosen).
    """
    grid = [float(g) for g in grid]
    n = model.cfg.n_items
    warm = np.flatnonzero(model.id_slots.cpu().numpy() > 0)
    rng = np.random.default_rng(seed)
    pseudo = np.sort(rng.choice(warm, size=int(round(frac * len(warm))), replace=False))
    is_cold = np.zeros(n, dtype=bool)
    is_cold[pseudo] = True
    cold_users = np.array([bool(is_cold[val.targets[b]].any()) for b in range(val.n_users)], dtype=bool)
    summary: dict[str, Any] = {"n_pseudo_cold_items": int(len(pseudo)),
                               "n_cold_targets": int(cold_users.sum()),
                               "grid": grid, "frac": frac, "seed": seed}
    if cold_users.sum() < max(min_targets, 2):
        why = (
            f"{int(cold_users.sum())} validation targets among the items made cold, fewer than {min_targets}"
        )
        return 0.0, {**summary, "measured": False, "why": why, "chosen": 0.0}
    keep = sp.diags((~is_cold).astype(np.float32))
    sim_c = (keep @ sim @ keep).tocsr() if sim is not None else None
    impute = (
        cooc_neighbours(sim_c, model.text_vectors.numpy(), model.cfg.cold_impute_k)
        if sim_c is not None
        else None
    )
    per = np.zeros((len(grid), val.n_users))
    saved_cfg = model.cfg
    try:
        with model.items_made_cold(pseudo):
            for gi, g in enumerate(grid):
                model.cfg = dataclasses.replace(saved_cfg, cold_bonus=g)
                per[gi] = served_val_ndcg(model, val, sim_c, impute, n_candidates, k, chunk)
    finally:
        model.cfg = saved_cfg
    pick = largest_tied(per, grid)
    return pick, {**summary, "measured": True, "chosen": pick, "z": TEXT_BOOST_Z, "rel": TIE_REL,
                  "val_ndcg": [float(x) for x in per.mean(1)],
                  "val_ndcg_cold_targets": [float(x) for x in per[:, cold_users].mean(1)]}


@torch.no_grad()
def served_val_ndcg(
    model: ScorerModel,
    val: sdata.ValidationSet,
    sim: sp.csr_matrix | None,
    impute: tuple[np.ndarray, np.ndarray] | None,
    n_candidates: int = 200,
    k: int = 10,
    chunk: int = 256,
) -> np.ndarray:
    """(U,) NDCG@k of every validation user under the final ranking as served: the two-stage scores plus
    `cooc_weight` x the co-occurrence score (sim, with `impute` for items without co-occurrence data) when
    both are there."""
    out = np.zeros(val.n_users)
    w = float(model.cfg.cooc_weight)
    users = np.arange(val.n_users)
    for ub, _, cand, head in _two_stage_chunks(model, val, users, max(n_candidates, k), chunk=chunk):
        f, cand_np = head.numpy(), cand.numpy()
        if sim is not None and w > 0:
            f = f + w * history_scores(sim, [val.positives[b] for b in ub], cand_np, impute=impute)
        top = np.take_along_axis(cand_np, np.argsort(-f, axis=1, kind="stable")[:, :k], axis=1)
        out[ub] = [recall_ndcg(top[j], val.targets[b], k)[1] for j, b in enumerate(ub)]
    return out


def largest_tied(
    per: np.ndarray, grid: Sequence[float], z: float = TEXT_BOOST_Z, rel: float = TIE_REL
) -> float:
    """The largest grid value whose per-user scores (row of per, (G, U)) tie with the best row's (highest
    mean): the mean paired difference is within z standard errors, and the mean within `rel` of the best's."""
    per = np.asarray(per, dtype=np.float64)
    means = per.mean(1)
    best = int(np.argmax(means))
    n = per.shape[1]
    for gi in sorted(range(len(grid)), key=lambda i: -grid[i]):
        diff = per[gi] - per[best]
        if diff.mean() >= -z * diff.std(ddof=1) / np.sqrt(n) and means[gi] >= (1.0 - rel) * means[best]:
            return float(grid[gi])
    return float(grid[best])


def cooc_matrix(df: pd.DataFrame, items: ItemSpace, n_neighbors: int) -> sp.csr_matrix:
    """Co-occurrence similarity (llmrec.cooc) of the positive events of a canonical interactions frame."""
    df = attach_item_idx(df, items)
    df = df[sdata.target_mask(df)] if len(df) else df
    return cooccurrence_similarity(
        df[USER_ID].astype(str).to_numpy(), df["item_idx"].to_numpy(np.int64), items.n_items, n_neighbors
    )


@torch.no_grad()
def tune_cooc_weight(
    model: ScorerModel,
    val: sdata.ValidationSet,
    sim: sp.csr_matrix,
    n_candidates: int = 200,
    k: int = 10,
    grid: Iterable[float] = COOC_GRID,
    chunk: int = 256,
) -> tuple[float, dict[str, float]]:
    """The co-occurrence weight with the best validation ndcg@k of the final ranking.

    Final ranking (as in `Scorer.recommend`): retrieval top-n_candidates by u.v (train items excluded), scored
    by `model.rank_pairs` + w * co-occurrence score of the user's positive train items. `grid` is in logit
    units; with the re-ranker off rank_pairs is u.v, so the weights tried are grid / scale. Ties go to the
    smaller weight. Returns (weight, {weight: ndcg@k}).
    """
    scale = float(model.scale)
    if not math.isfinite(scale) or scale <= 0.0:
        raise TrainingDiverged(f"the trained scale (inverse temperature) is {scale}; lower the learning rate")
    unit = 1.0 if model.cfg.rerank else 1.0 / scale
    weights = [float(g) * unit for g in grid]
    impute = cooc_neighbours(sim, model.text_vectors.numpy(), model.cfg.cold_impute_k)
    sums = np.zeros(len(weights))
    users = np.arange(val.n_users)
    for ub, _, cand, head in _two_stage_chunks(model, val, users, max(n_candidates, k), chunk=chunk):
        co = history_scores(sim, [val.positives[b] for b in ub], cand.numpy(), impute=impute)  # (b, n)
        base, cand_np = head.numpy(), cand.numpy()  # base is -inf at excluded candidates
        for wi, w in enumerate(weights):
            f = base + w * co
            top = np.take_along_axis(cand_np, np.argsort(-f, axis=1, kind="stable")[:, :k], axis=1)
            sums[wi] += sum(recall_ndcg(top[j], val.targets[b], k)[1] for j, b in enumerate(ub))
    ndcg = sums / max(val.n_users, 1)
    best = int(np.argmax(ndcg))  # first maximum = smallest weight among ties
    return weights[best], {f"{w:.6g}": float(x) for w, x in zip(weights, ndcg, strict=True)}


def _write_artifact(
    out: Path,
    state: dict,
    last_state: dict,
    items: ItemSpace,
    cfg: TrainConfig,
    embed_meta: dict | None,
    wall: float,
    epochs_run: list[int],
    extra: dict,
    cooc: sp.csr_matrix | None = None,
    cooc_info: dict | None = None,
    boost_info: dict | None = None,
    cold_info: dict | None = None,
    feedback_info: dict | None = None,
    data_ts_max: int | None = None,
) -> dict:
    torch.save({"model_config": state["model_config"], "model": state["model"]}, out / MODEL_FILE)
    np.save(out / INDEX_IDS_FILE, np.asarray(items.item_ids).astype(str))
    if cooc is not None:
        sp.save_npz(out / COOC_FILE, cooc)
    elif (out / COOC_FILE).exists():
        (out / COOC_FILE).unlink()  # an older run's matrix must not be paired with this model
    hist = last_state["metrics"]
    meta = write_meta(
        out,
        "train",
        embed=embed_meta or {},
        config={**dataclasses.asdict(cfg), **extra},  # the keys meta.json readers know
        model_config=state["model_config"],
        cooc=cooc_info or {},
        text_boost=boost_info or {},
        cold_bonus=cold_info or {},
        feedback=feedback_info or {},
        data_ts_max=data_ts_max,  # the latest event it learned from (replay refuses it for earlier cutoffs)
        metrics=state["metrics"],
        best_epoch=int(state["epoch"]),
        last_epoch=int(last_state["epoch"]),
        early_stop=last_state["early_stop"],
        epochs_run=epochs_run,
        history=last_state.get("history", []),
        item_ids_file=INDEX_IDS_FILE,
        model_file=MODEL_FILE,
        n_items=items.n_items,
        text_dim=int(np.asarray(items.text_vectors).shape[1]),
        dim=cfg.dim,
        wall_s=wall,
        examples_per_s=hist.get("examples_per_s"),
    )
    logger.info(
        "scorer written to %s: best epoch %d, %s=%s, %.1fs",
        out,
        meta["best_epoch"],
        SCORE_METRIC,
        state["metrics"].get(SCORE_METRIC),
        wall,
    )
    return meta
