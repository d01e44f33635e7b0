"""`tune_encoder`: the text-encoder fine-tune (`llmrec.finetune.tune`) on Ray Train, written as a model
folder.

The driver reads the prepared items and interactions and builds the (context, next item) pairs (int64 (P, 2):
16 bytes per pair, no texts or events beyond that step); the texts and pairs go to the `TorchTrainer` workers
through the object store. Worker rank 0 saves the tuned model folder as the run's checkpoint (Ray Train
storage: OUT/ray, or `checkpoint_dir`, a shared folder or URI); the driver copies it to OUT and writes
meta.json last. Read OUT with `llmrec embed --model OUT` to re-embed the catalog with it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from llmrec.config import EncoderTuneConfig

logger = logging.getLogger(__name__)

STAGE = "tune-encoder"


def tune_encoder(
    data: str | os.PathLike,
    out: str | os.PathLike,
    cfg: EncoderTuneConfig,
    ray_address: str | None = None,
    checkpoint_dir: str | None = None,
) -> dict[str, Any]:
    """Fine-tune `cfg.model` on `data`'s interactions and write the tuned model folder + meta.json to `out`.

    Args:
        data: folder written by `llmrec prepare` (items.parquet, interactions.parquet).
        out: the tuned model folder (a Hugging Face / sentence-transformers folder plus meta.json).
        cfg: every option (`EncoderTuneConfig`).
        ray_address: the cluster to join (None: $RAY_ADDRESS or a local Ray).
        checkpoint_dir: Ray Train storage every node reaches (default OUT/ray on this machine).

    Returns:
        The written meta: pairs, validation before (frozen) and after, the kept step, seconds per step.
    """
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from llmrec.artifacts import write_meta
    from llmrec.data.tables import read_interactions, read_items
    from llmrec.embed.encoder import resolve_model
    from llmrec.finetune.tune import build_pairs
    from llmrec.raysetup import init_ray
    from llmrec.schema import ITEM_ID, TEXT
    from llmrec.scorer.dataset import storage_path

    t0 = time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_path, model_name = resolve_model(cfg.model)
    items = read_items(data)
    texts = items[TEXT].astype(str).tolist()
    item_ids = items[ITEM_ID].astype(str).to_numpy()
    pairs = build_pairs(read_interactions(data), item_ids, cfg.seed, cfg.val_pairs)
    logger.info("tune-encoder: %d training pairs, %d validation pairs over %d items",
                len(pairs.train), len(pairs.val), len(texts))
    init_ray(ray_address)
    run_name = f"tune-encoder-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "model_path": model_path,
                           "texts": ray.put(texts), "pairs": ray.put(pairs)},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu),
        run_config=RunConfig(name=run_name, storage_path=storage_path(out_dir, checkpoint_dir),
                             failure_config=FailureConfig(max_failures=0)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    if result.checkpoint is None:
        raise RuntimeError(f"tune-encoder run {run_name} reported no checkpoint; see its Ray Train logs")
    m = result.metrics
    with result.checkpoint.as_directory() as d:
        shutil.copytree(d, out_dir, dirs_exist_ok=True)
    wall = time.perf_counter() - t0
    meta = write_meta(
        out_dir, STAGE,
        base_model_name=model_name, base_model_path=model_path, config=dataclasses.asdict(cfg),
        pairs=pairs.stats, improved=bool(m["best_step"] > 0), best_step=int(m["best_step"]),
        val_frozen=m["frozen_metrics"], val_best=m["best_metrics"], history=m["history"],
        steps=int(m["steps"]), train_s=float(m["train_s"]),
        s_per_step=float(m["train_s"]) / max(1, int(m["steps"])), mean_loss_last=m["mean_loss_last"],
        n_items=len(texts), ray_run=run_name, wall_s=wall,
    )
    logger.info(
        "tune-encoder: val ndcg@10 %.4f frozen -> %.4f kept (step %d of %d, %.2f s/step); wrote %s",
        m["frozen_metrics"].get("ndcg@10", float("nan")), m["best_metrics"].get("ndcg@10", float("nan")),
        m["best_step"], m["steps"], meta["s_per_step"], out_dir,
    )
    return meta


def _worker(config: dict[str, Any]) -> None:
    """Ray Train worker: load the encoder, run `tune_loop`, rank 0 reports the tuned folder as checkpoint."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    from llmrec.embed.encoder import TextEncoder
    from llmrec.finetune.tune import save_tuned, tune_loop

    cfg = EncoderTuneConfig(**config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    device = str(ray.train.torch.get_device()) if cfg.use_gpu else "cpu"
    enc = TextEncoder(config["model_path"], device=device, max_length=cfg.max_length, fp16=False)
    texts, pairs = ray.get(config["texts"]), ray.get(config["pairs"])
    wrap = ray.train.torch.prepare_model if world > 1 else None
    res = tune_loop(enc, texts, pairs, cfg, rank=rank, world=world, wrap=wrap)
    metrics = {"best_step": res.best_step, "best_metrics": res.best_metrics,
               "frozen_metrics": res.frozen_metrics, "history": res.history, "steps": res.steps,
               "train_s": res.train_s, "mean_loss_last": res.mean_loss_last}
    with tempfile.TemporaryDirectory() as tmp:
        if rank == 0:
            save_tuned(enc, tmp)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)
