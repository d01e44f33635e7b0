"""`llmrec tune-encoder`: prepared interactions -> a text encoder fine-tuned on them (a model folder).

Trains the top layers of the text encoder (default the packaged MiniLM) on Ray Train so that an item embeds
close to the item the same user took next (`llmrec.finetune.tune`): pairs come only from the training events
of the leave-last-out split that `llmrec train --holdout loo` and `llmrec evaluate` use (same --seed), so
neither the validation nor the test targets are seen. The best validation pass is kept (step 0, the frozen
encoder, when tuning does not help: meta.json `improved` false). Use the folder as any model:

    llmrec tune-encoder --data runs/D/data --out runs/D/encoder
    llmrec embed --items runs/D/data --model runs/D/encoder --out runs/D/embeddings-tuned

Queries and text feedback are then encoded by the tuned model too (serving reads it from the embeddings'
meta.json), so every vector shares its space.
"""

from __future__ import annotations

import argparse
import logging

from llmrec.config import EncoderTuneConfig, add_config_arguments, config_from_args
from llmrec.storage import Arg, In, Out

logger = logging.getLogger(__name__)

HELP = "fine-tune the text encoder's top layers on (item, next item) pairs of the interactions (Ray Train)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="folder written by `llmrec prepare` (items, interactions)")
    p.add_argument("--out", required=True, help="tuned model folder (weights, tokenizer, meta.json, ray/)")
    # every option (--model, --max-steps, --train-layers, ...) is a field of EncoderTuneConfig
    add_config_arguments(p, EncoderTuneConfig)
    p.add_argument(
        "--checkpoint-dir", default=None,
        help="Ray Train storage every node reaches: a shared folder or a URI; default OUT/ray here",
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local Ray)"
    )


def storage_args(args: argparse.Namespace) -> dict[str, Arg]:
    return {"data": In("prepare"), "model": In(), "out": Out()}


def run(args: argparse.Namespace) -> int:
    from llmrec.finetune.ray_tune import tune_encoder

    meta = tune_encoder(args.data, args.out, config_from_args(EncoderTuneConfig, args),
                        ray_address=args.address, checkpoint_dir=args.checkpoint_dir)
    before, after = meta["val_frozen"], meta["val_best"]
    verdict = (f"kept step {meta['best_step']}" if meta["improved"]
               else "no step beat the frozen encoder: the folder holds the frozen weights")
    print(
        f"tuned {meta['base_model_name']} on {meta['pairs']['n_train_pairs']} pairs in {meta['steps']} steps "
        f"({meta['s_per_step']:.2f} s/step): val ndcg@10 {before.get('ndcg@10', float('nan')):.4f} frozen -> "
        f"{after.get('ndcg@10', float('nan')):.4f}, {verdict}; wrote {args.out}"
    )
    return 0
