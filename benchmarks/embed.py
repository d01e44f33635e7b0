"""Benchmark `embed_catalog` (Ray Data + encoder actors) against sentence-transformers, MovieLens texts.

Same machine, same run, same texts, same model (the packaged all-MiniLM-L6-v2, max 128 tokens, batch 128):

1. `llmrec.embed.ray_embed.embed_catalog` on a local Ray (timed without `ray.init`, with actor start-up and
   model loads: the wall a user waits for).
2. `sentence_transformers.SentenceTransformer(default_model_path()).encode()` in this process (torch's default
   threads = all cores), timed with and without the model load.
3. `llmrec.embed.encoder.TextEncoder.encode()` in this process (same threads), our core without Ray.

Reports items/s for each, the ratio ours/sentence-transformers, and checks the cosine between our vectors
and sentence-transformers' per item (must be >= 0.999 for every item; exit code 1 otherwise).

Usage::

    .venv/bin/python benchmarks/embed.py --data ../shared/data --n 2000 --out results.json

run from the repository root; `--data` is the datasets folder (../shared/data when it sits beside the
checkout).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmrec.artifacts import write_json_report

logger = logging.getLogger("benchmarks.embed")

MOVIELENS = "movielens-latest-small"


def build_items(data: Path, n: int | None, out_dir: Path) -> Path:
    """First n MovieLens items as a canonical items.parquet (via `llmrec prepare`)."""
    import pandas as pd

    src = data / MOVIELENS if (data / MOVIELENS).is_dir() else data
    if not (src / "movies.csv").is_file():
        raise FileNotFoundError(f"no {MOVIELENS}/movies.csv under {data}; pass --data /path/to/shared/data")
    from llmrec.data.prepare import prepare

    prep = out_dir / "prepared"
    prepare(MOVIELENS, src, prep)
    items = pd.read_parquet(prep / "items.parquet")
    how = "llmrec.data.prepare"
    if n is not None:
        if n > len(items):
            raise ValueError(f"--n {n} > {len(items)} items in {src}; pass at most {len(items)}")
        items = items.iloc[:n]
    f = out_dir / "items.parquet"
    items[["item_id", "text"]].to_parquet(f, index=False)
    logger.info("items: %d rows from %s (%s)", len(items), src, how)
    return f


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", required=True, type=Path, help="shared datasets folder (or the movielens folder)"
    )
    ap.add_argument("--n", type=int, default=None, help="first N items (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="write results JSON here")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--num-actors", type=int, default=None)
    ap.add_argument("--bucketing", default="dataset", choices=["dataset", "group"])
    ap.add_argument("--skip-core", action="store_true", help="skip the in-process TextEncoder row")
    args = ap.parse_args(argv)

    from llmrec.log import setup_logging
    from llmrec.raysetup import local_env_defaults, ray_detail_to_log_files

    local_env_defaults()
    ray_detail_to_log_files()  # Ray Data's progress dumps to the session's log files
    setup_logging("INFO")

    import pandas as pd
    import ray
    import torch

    from llmrec.embed.artifact import load_embeddings
    from llmrec.embed.encoder import TextEncoder, default_model_path
    from llmrec.embed.ray_embed import embed_catalog
    from llmrec.raysetup import init_ray

    res: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda": torch.cuda.is_available(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_start": os.getloadavg(),
        },
        "model": "sentence-transformers/all-MiniLM-L6-v2",
        "batch_size": args.batch_size,
        "max_length": args.max_length,
    }
    with tempfile.TemporaryDirectory(prefix="llmrec-bench-embed-") as tmp:
        tmp_dir = Path(tmp)
        items_file = build_items(args.data, args.n, tmp_dir)
        texts = list(pd.read_parquet(items_file)["text"])
        n = len(texts)
        res["n_items"] = n

        # 1. ours on Ray Data
        t0 = time.perf_counter()
        init_ray(None, dashboard=False)
        res["ray_init_s"] = round(time.perf_counter() - t0, 2)
        meta = embed_catalog(
            items_file,
            tmp_dir / "emb",
            batch_size=args.batch_size,
            max_length=args.max_length,
            num_actors=args.num_actors,
            bucketing=args.bucketing,
        )
        ours = load_embeddings(tmp_dir / "emb").vectors
        res["ray_embed"] = {
            k: meta[k]
            for k in (
                "wall_s",
                "items_per_s",
                "first_batch_s",
                "num_actors",
                "device",
                "n_blocks",
                "bucketing",
                "padding_efficiency",
            )
        }
        res["ray_embed"]["steady_items_per_s"] = round(
            n / max(meta["wall_s"] - meta["first_batch_s"], 1e-9), 1
        )
        ray.shutdown()

        # 2. sentence-transformers, same texts, same process budget
        from sentence_transformers import SentenceTransformer

        t0 = time.perf_counter()
        st = SentenceTransformer(default_model_path(), device="cpu")
        st.max_seq_length = args.max_length
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = st.encode(
            texts,
            batch_size=args.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        enc_s = time.perf_counter() - t0
        res["sentence_transformers"] = {
            "load_s": round(load_s, 2),
            "encode_s": round(enc_s, 2),
            "items_per_s": round(n / enc_s, 1),
            "items_per_s_with_load": round(n / (enc_s + load_s), 1),
        }
        del st

        # 3. our core in-process (no Ray)
        if not args.skip_core:
            t0 = time.perf_counter()
            enc = TextEncoder(device="cpu", max_length=args.max_length)
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            core = enc.encode(texts, batch_size=args.batch_size)
            enc_s = time.perf_counter() - t0
            res["text_encoder_in_process"] = {
                "load_s": round(load_s, 2),
                "encode_s": round(enc_s, 2),
                "items_per_s": round(n / enc_s, 1),
                "max_abs_diff_vs_ray": float(np.abs(core - ours).max()),
            }

    cos = (ours * ref).sum(axis=1)  # (N,) both unit rows
    res["cosine_vs_sentence_transformers"] = {
        "min": float(cos.min()),
        "mean": float(cos.mean()),
        "n_below_0.999": int((cos < 0.999).sum()),
    }
    st_rate = res["sentence_transformers"]
    res["ratio_ours_vs_st"] = {
        "end_to_end": round(meta["items_per_s"] / st_rate["items_per_s_with_load"], 3),
        "steady_state": round(res["ray_embed"]["steady_items_per_s"] / st_rate["items_per_s"], 3),
    }
    res["machine"]["loadavg_end"] = os.getloadavg()
    write_json_report(res, args.out, echo=True)
    ok = res["cosine_vs_sentence_transformers"]["n_below_0.999"] == 0
    if not ok:
        logger.error(
            "cosine(ours, sentence-transformers) < 0.999 for %d items",
            res["cosine_vs_sentence_transformers"]["n_below_0.999"],
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
