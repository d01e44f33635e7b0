"""Train the scorer with Ray Train (`fit_scorer`), or in one plain process (`fit_local`, same core, no Ray).

The worker loop (`train_loop_per_worker`) and `fit_local` share the training core below: the catalog-sized
inputs every worker gets (`static_from_counts`), the model (`build_model`, starting at the zero-shot text
solution, `warm_start`) and one pass over the batches (`train_epoch`). Around it: the loss in
`scorer/loss.py`, per-epoch validation and early stopping in `scorer/validate.py`, checkpoints, resuming and
the published scorer folder in `scorer/artifact.py`, and the post-training choices measured on validation
(re-ranker, co-occurrence weight, text boost, cold bonus) in `scorer/finalize.py`.

Checkpoints: rank 0 writes `checkpoint.pt` each epoch and reports it with the epoch's metrics; Ray keeps the
2 best by `val_best_ndcg@10` (plus the latest). Resuming (`resume_from` = a Ray checkpoint dir or a previous
`llmrec train` output dir) continues at the saved epoch + 1.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from llmrec.artifacts import load_torch_file, read_meta
from llmrec.config import HELD_OUT_KINDS, TrainConfig
from llmrec.cooc import candidate_terms
from llmrec.data.histories import attach_item_idx
from llmrec.protocol import ItemSpace
from llmrec.schema import TS
from llmrec.scorer import data as sdata
from llmrec.scorer.artifact import (
    CHECKPOINT_FILE,
    LAST_CHECKPOINT_DIR,
    load_train_state,
    resolve_resume,
    save_checkpoint,
    transfer_weights,
    write_scorer,
)
from llmrec.scorer.feedback import FeedbackBank, FeedbackBanks, banks_for, sample_feedback
from llmrec.scorer.finalize import BehaviourTerms, cooc_counts, finalize_ranking
from llmrec.scorer.loss import batch_loss, candidate_log_q, log_q_tensor
from llmrec.scorer.model import ScorerConfig, ScorerModel
from llmrec.scorer.validate import SCORE_METRIC, best_checkpoint, evaluate, update_early_stop
from llmrec.storage.uri import filesystem_and_path
from llmrec.storage.uri import join as storage_join

logger = logging.getLogger(__name__)


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
    reuse_choices_from: str | os.PathLike | None = None,
    cold_pick: tuple[dict[str, Any], dict[str, Any]] | None = None,
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
        reuse_choices_from: a scorer folder (usually `init_from`) whose post-training choices this fit keeps
            (co-occurrence term and weight, text boosts, cold-item bonus / imputation / slots:
            `finalize_ranking(reuse=)`) instead of choosing them again on validation; `llmrec learn
            --choices reuse`.
        cold_pick: the cold-item choices (`finalize.COLD_CHOICES` fields, and their summary for meta.json
            "cold_bonus") made on items held out of a second training (`llmrec.eval.cold_choice`), used in
            place of the made-cold validation's; required when `cfg.cold_choice` is a held-out kind (unless
            `reuse_choices_from` keeps another model's), refused otherwise.

    Returns:
        The written meta (config, best_epoch, metrics, per-epoch history, wall_s, examples_per_s).

    Example::

        meta = fit_scorer(TrainConfig(epochs=2, dim=16), "runs/ml/data", items, "runs/ml/scorer")
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from llmrec.raysetup import init_ray
    from llmrec.scorer.dataset import cooc_matrices, focus_samples, storage_path, training_data

    _check_config(cfg, "fit_scorer(cfg, train_df, items, out_dir)")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if valid_df is not None and not isinstance(train_df, pd.DataFrame):
        raise ValueError("an explicit valid_df needs train_df as a DataFrame too; or pass val_users instead")
    resume_file = resolve_resume(resume_from) if resume_from is not None else None
    if cfg.cold_choice in HELD_OUT_KINDS and cold_pick is None and reuse_choices_from is None:
        raise ValueError(
            f"TrainConfig.cold_choice={cfg.cold_choice!r} needs the choice itself: make it with "
            "llmrec.eval.cold_choice.held_out_cold_choice(train, items, train_kwargs) and pass "
            "it as cold_pick (`llmrec train --cold-choice held-out-new` does both), or use "
            "cold_choice='made-cold'"
        )
    if cold_pick is not None and cfg.cold_choice not in HELD_OUT_KINDS:
        raise ValueError(f"cold_pick is a held-out cold-item choice, but cfg.cold_choice is "
                         f"{cfg.cold_choice!r}: set the kind it was made with ({', '.join(HELD_OUT_KINDS)}) "
                         "so meta.json says how it was made")

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
    run_name = f"train-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{int(time.time() * 1e3) % 1000:03d}"
    store = storage_path(out, checkpoint_dir)
    local = cfg.num_workers == 0  # Ray Train's local mode: no controller keeps checkpoints
    config = {
        "train_config": dataclasses.asdict(cfg),  # plain values to every worker (TrainConfig rebuilt there)
        "static": ray.put(static),
        "resume_from": str(resume_file) if resume_file else None,
        "init_state": ray.put(init_state) if init_state is not None else None,
        "local_checkpoints": storage_join(store, run_name) if local else None,
    }
    if local:
        ds.context.execution_options.preserve_order = True  # what `_ordered_ingest` asks of Train's ingest
    has_val = static["val"] is not None and static["val"].n_users > 0
    ckpt_cfg = CheckpointConfig(
        num_to_keep=2,
        checkpoint_score_attribute=SCORE_METRIC if has_val else "epoch",
        checkpoint_score_order="max",
    )
    resources = {"CPU": 1, "GPU": 1} if cfg.use_gpu else {"CPU": 1}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker=None if local else resources,
        ),
        run_config=RunConfig(
            name=run_name,
            storage_path=store,
            checkpoint_config=ckpt_cfg,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets={"train": ds},
        dataset_config=_ordered_ingest(),
    )
    logger.info(
        "TorchTrainer: %s, gpu=%s, %d samples, %d epochs, checkpoints in %s",
        "in this process (local mode)" if local else f"{cfg.num_workers} workers",
        cfg.use_gpu,
        data.n_samples,
        cfg.epochs,
        store,
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if local:
        result = local_result(result.return_value, has_val)
    best = best_checkpoint(result, has_val)
    with best.as_directory() as d:
        state = load_torch_file(Path(d) / CHECKPOINT_FILE, map_location="cpu")
    with result.checkpoint.as_directory() as d:
        last = out / LAST_CHECKPOINT_DIR
        last.mkdir(exist_ok=True)
        shutil.copyfile(Path(d) / CHECKPOINT_FILE, last / CHECKPOINT_FILE)
        last_state = load_torch_file(Path(d) / CHECKPOINT_FILE, map_location="cpu")
    terms = None
    if cfg.cooc_neighbors > 0:
        names, k = candidate_terms(cfg.cooc_kind, items.n_items), cfg.cooc_neighbors
        if explicit_val:  # both frames are in memory already
            train_counts = cooc_counts(train_df, items)
            full_counts = cooc_counts(pd.concat([train_df, valid_df]), items)
            terms = BehaviourTerms({t: train_counts.matrix(t, k) for t in names},
                                   lambda t: full_counts.matrix(t, k))
        else:
            train_m, full_m = cooc_matrices(data.user_items, items.n_items, k, names, names[:1])
            terms = BehaviourTerms(train_m, lambda t: full_m[t] if t in full_m else cooc_matrices(
                data.user_items, items.n_items, k, (), (t,))[1][t])
    reuse = None
    if reuse_choices_from is not None:
        prev = read_meta(reuse_choices_from, stage="train")
        reuse = {"from": str(reuse_choices_from), "model_config": prev.get("model_config", {}),
                 "term": prev.get("cooc", {}).get("term")}
    state, cooc, cooc_info, boost_info, cold_info, served = finalize_ranking(
        state, static, terms, cfg, reuse, cold_pick
    )
    ts_max = [data.ts_max] if data.ts_max is not None else []
    if explicit_val and TS in valid_df.columns:
        ts_max.append(int(valid_df[TS].max()))
    wall = time.perf_counter() - t0
    epochs_run = list(last_state.get("run_epochs", []))
    return write_scorer(
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
        served=served,
        data_ts_max=max(ts_max) if ts_max else None,
        extra={
            "ray_run": run_name,
            "resumed_from": str(resume_file) if resume_file else None,
        },
    )


def train_loop_per_worker(config: dict) -> list[tuple[str, dict]] | None:
    """Ray Train worker: DDP model, Ray Data shard batches, per-epoch validation + checkpoint + early stop.

    In Ray Train's local mode (`num_workers=0`, config["local_checkpoints"] set) the loop runs in the driver,
    writes each epoch's checkpoint under that folder itself and returns [(checkpoint folder, metrics)] (no
    controller keeps them); else None."""
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
    neg_p = torch.as_tensor(np.array(static["neg_p"], np.float32), device=device)  # a writable copy
    log_q = log_q_tensor(static, cfg, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)
    rng = np.random.default_rng([cfg.seed, rank, start_epoch])  # text-feedback synthesis
    per_worker_batch = max(1, cfg.batch_size // world)
    run_epochs: list[int] = []  # epochs trained by this run (a resumed run starts after the saved epoch)
    local_dir, reported = config.get("local_checkpoints"), []
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
        saved = _report(metrics, model, optimizer, epoch, stop_state, rank, run_epochs, history, local_dir)
        if saved is not None:
            reported.append((saved, dict(metrics)))
        if rank == 0:
            logger.info(
                "epoch %d: %s",
                epoch,
                {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()},
            )
        if stop:
            break
    return reported if local_dir else None


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
    neg_p = torch.as_tensor(np.array(static["neg_p"], np.float32), device=device)  # a writable copy
    log_q = log_q_tensor(static, cfg, device)
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


def build_model(static: dict, cfg: TrainConfig) -> ScorerModel:
    n, d_text = static["text_vectors"].shape
    model_cfg = ScorerConfig(
        text_dim=d_text,
        n_items=n,
        n_id_slots=int(static["id_slots"].max()) + 1,
        dim=cfg.dim,
        max_len=cfg.max_len,
        n_layers=cfg.n_layers,
        user_encoder=cfg.user_encoder,
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
    local_dir: str | None = None,
) -> str | None:
    """Report the epoch's metrics; rank 0 adds the checkpoint. Ray Train persists it to the run's storage; in
    local mode (`local_dir`) it is written to `local_dir/checkpoint_EPOCH` here, and that folder returned."""
    import pyarrow.fs as pafs
    import ray.train

    if rank != 0:
        ray.train.report(metrics)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), model, optimizer, epoch, stop_state, metrics, run_epochs, history)
        if local_dir is None:
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
            return None
        dest = storage_join(local_dir, f"checkpoint_{epoch:06d}")
        fs, path = filesystem_and_path(dest)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(tmp, path, destination_filesystem=fs)
    ray.train.report(metrics)
    return dest


def local_result(reported: list[tuple[str, dict]], has_val: bool) -> Any:
    """A local-mode fit's result in the shape `best_checkpoint` reads (`checkpoint`: the last epoch's,
    `best_checkpoints`: [(Checkpoint, metrics)]); checkpoints other than the best and the last are deleted,
    as `CheckpointConfig(num_to_keep=2)` does for a distributed run."""
    import types

    from ray.train import Checkpoint

    if not reported:
        raise RuntimeError("the local-mode training loop reported no checkpoint (no epoch ran)")
    cps = []
    for folder, metrics in reported:
        fs, path = filesystem_and_path(folder)
        cps.append((Checkpoint(path=path, filesystem=fs), metrics))
    result = types.SimpleNamespace(checkpoint=cps[-1][0], best_checkpoints=cps)
    keep = {best_checkpoint(result, has_val).path, cps[-1][0].path}
    for cp, _ in cps:
        if cp.path not in keep:
            cp.filesystem.delete_dir(cp.path)
    result.best_checkpoints = [(cp, m) for cp, m in cps if cp.path in keep]
    return result
