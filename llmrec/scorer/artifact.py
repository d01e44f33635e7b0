"""The files of scorer training: Ray Train checkpoints, the published scorer folder, and a previous scorer's
weights for fine-tuning.

Checkpoints: rank 0 writes `checkpoint.pt` = {model, optimizer, epoch, model_config, early-stop state}
(`save_checkpoint`) and reports it with the epoch's metrics; Ray keeps the 2 best by `val_best_ndcg@10` (plus
the latest), and `fit_scorer` copies the latest to `OUT/last_checkpoint/`. Resuming (`resume_from` = a Ray
checkpoint dir or a previous `llmrec train` output dir, `resolve_resume`) restores model, optimizer and
early-stop state (`load_train_state`) and continues at the saved epoch + 1. The scorer folder (`write_scorer`:
model.pt, item_ids.npy, cooc.npz, meta.json) is what `scorer.inference.Scorer.load` reads; `transfer_weights`
starts a fine-tune from one.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from llmrec.artifacts import load_torch_file, write_meta
from llmrec.config import TrainConfig
from llmrec.protocol import ItemSpace
from llmrec.schema import INDEX_IDS_FILE
from llmrec.schema import SCORER_COOC_FILE as COOC_FILE
from llmrec.schema import SCORER_MODEL_FILE as MODEL_FILE
from llmrec.schema import SCORER_VAL_FILE as VAL_FILE
from llmrec.scorer.model import ScorerModel
from llmrec.scorer.validate import SCORE_METRIC

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
LAST_CHECKPOINT_DIR = "last_checkpoint"


def save_checkpoint(
    folder: Path,
    model: ScorerModel,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    stop_state: dict,
    metrics: dict,
    run_epochs: list[int],
    history: list[dict],
) -> None:
    """Write `folder/checkpoint.pt` for epoch `epoch` (read back by `load_train_state`)."""
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
        Path(folder) / CHECKPOINT_FILE,
    )


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


def write_scorer(
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
    served: dict | None = None,
) -> dict:
    """Publish the scorer folder `out`: model.pt (the chosen state's model_config + weights), item_ids.npy,
    cooc.npz (removed when this run has none), then meta.json (`write_meta`: config + `extra`, metrics and
    history of the checkpoints, the post-training choices; with `served` (`finalize_ranking`'s validation of
    the served ranking) also val_ndcg.npy and meta "served_val"). Returns the written meta."""
    torch.save({"model_config": state["model_config"], "model": state["model"]}, out / MODEL_FILE)
    np.save(out / INDEX_IDS_FILE, np.asarray(items.item_ids).astype(str))
    if cooc is not None:
        sp.save_npz(out / COOC_FILE, cooc)
    elif (out / COOC_FILE).exists():
        (out / COOC_FILE).unlink()  # an older run's matrix must not be paired with this model
    served = dict(served or {})
    per_user = served.pop("per_user", None)
    if per_user is not None:
        np.save(out / VAL_FILE, np.asarray(per_user, dtype=np.float64))
        served["file"] = VAL_FILE
    elif (out / VAL_FILE).exists():
        (out / VAL_FILE).unlink()
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
        served_val=served,
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


def transfer_weights(model: ScorerModel, scorer_dir: str | os.PathLike, item_ids: np.ndarray) -> dict:
    """The state dict of `model` with the weights of the scorer in `scorer_dir` copied in: every parameter of
    the same shape, and the ID embedding row of every item both catalogs know (slots differ when the training
    data grew). The catalog buffers (text vectors, ID slots, counts) stay the new data's."""
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
