"""Does the model keep learning from live feedback? `llmrec replay` with the learning loop (issue 14).

On a prepared run (data/, embeddings/, index/): the last `--test-frac` of events (by time) are the stream.
1. A scorer is trained on the events before the cutoff only (`llmrec.scorer.train.fit_scorer`, the run
   scorer's settings; into `--work`/scorer), so nothing it learned comes from the stream.
2. `llmrec.eval.replay.replay` streams the events in time order through the real state update and ranks,
   before each event, (a) frozen: state and model as of the cutoff, (b) online: live user state, the
   pre-cutoff model, (c) learning: live state, and a `llmrec learn` round every `--learn-every` events
   (fine-tune from the serving model, judged on the newest held-back events, swapped in only when not worse).
3. Prints and writes replay.json: next-event Recall@10 / NDCG@10 per list, paired 95% bootstrap intervals of
   the NDCG differences (online - frozen, learning - online), every learning round (events, seconds,
   accepted, why), model freshness.

    python benchmarks/replay_learning.py --run runs/amazon-magazine-subscriptions-2018 \
        --max-events 3000 --learn-every 750 --out runs/bench/replay-learning-magazine.json
    # rounds that choose the co-occurrence weight, text boosts and cold-item settings again vs rounds that
    # keep the serving model's (`llmrec learn --choices`), the same pre-cutoff model and stream
    python benchmarks/replay_learning.py --run runs/amazon-magazine-subscriptions-2018 \
        --learn-num-workers 0 --learn-choices refit,reuse --out runs/bench/replay-learning-choices.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from llmrec.artifacts import write_json_report

logger = logging.getLogger("replay_learning")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="prepared run folder (data/, embeddings/, index/)")
    p.add_argument("--test-frac", type=float, default=0.1, help="share of events streamed (default 0.1)")
    p.add_argument("--max-events", type=int, default=3000, help="stream at most this many events")
    p.add_argument("--learn-every", type=int, default=750, help="a learning round every N events")
    p.add_argument("--learn-max-steps", type=int, default=200, help="batches per fine-tune epoch")
    p.add_argument("--learn-num-workers", default="1",
                   help="Ray Train workers of each round; a comma list replays once per value with the same "
                   "pre-cutoff model (e.g. 1,0: worker processes vs Ray Train's local mode)")
    p.add_argument("--learn-choices", default="refit",
                   help="post-training choices of each round (`llmrec learn --choices`: reuse or refit); a "
                   "comma list replays once per value with the same pre-cutoff model (e.g. refit,reuse)")
    p.add_argument("--epochs", type=int, default=5, help="epochs of the pre-cutoff scorer (default 5)")
    p.add_argument("--work", default=None, help="work folder (default RUN/replay-learning)")
    p.add_argument("--out", default=None, help="JSON report path (default WORK/replay.json)")
    args = p.parse_args(argv)

    from llmrec import schema
    from llmrec.config import TrainConfig
    from llmrec.data.tables import read_interactions, read_items
    from llmrec.embed.artifact import load_item_space
    from llmrec.eval.replay import cutoff_split, replay
    from llmrec.log import setup_logging
    from llmrec.metrics import bootstrap_ci
    from llmrec.raysetup import init_ray, local_env_defaults, ray_detail_to_log_files
    from llmrec.scorer.train import fit_scorer

    workers = [int(w) for w in args.learn_num_workers.split(",")]
    if not workers or min(workers) < 0:
        raise SystemExit(f"--learn-num-workers takes counts >= 0, comma-separated: {args.learn_num_workers}")
    choices = args.learn_choices.split(",")
    if not set(choices) <= {"reuse", "refit"}:
        raise SystemExit(f"--learn-choices takes reuse and/or refit, comma-separated: {args.learn_choices}")
    settings = [(n, c) for n in workers for c in choices]
    local_env_defaults()
    ray_detail_to_log_files()  # Ray Data's progress dumps to the session's log files
    setup_logging("INFO")
    run = Path(args.run)
    work = Path(args.work) if args.work else run / "replay-learning"
    work.mkdir(parents=True, exist_ok=True)
    inter = read_interactions(run / schema.RUN_DATA)
    hist, _, cutoff = cutoff_split(inter, args.test_frac)
    init_ray()
    # a run folder whose scorer learned from the pre-cutoff events only (embeddings / index linked)
    for part in (schema.RUN_EMBEDDINGS, schema.RUN_INDEX):
        link = work / part
        if not link.exists():
            link.symlink_to((run / part).resolve(), target_is_directory=True)
    t0 = time.perf_counter()
    scorer_dir = work / schema.RUN_SCORER
    meta_file = scorer_dir / schema.META_FILE
    reuse = meta_file.is_file() and json.loads(meta_file.read_text()).get("data_ts_max") == int(
        hist[schema.TS].max()
    )
    if not reuse:
        items, embed_meta = load_item_space(run / schema.RUN_EMBEDDINGS, read_items(run / schema.RUN_DATA))
        fit_scorer(TrainConfig(epochs=args.epochs), hist, items, scorer_dir, embed_meta=embed_meta)
    train_s = time.perf_counter() - t0
    outs = {}
    for n, choice in settings:
        registry = work / "models.json"
        if registry.exists():
            registry.unlink()  # every measurement starts from the pre-cutoff model
        out = replay(
            work,
            run / schema.RUN_DATA,
            max_events=args.max_events,
            test_frac=args.test_frac,
            out_dir=work,
            learn_every=args.learn_every,
            learn_config={"max_steps": args.learn_max_steps, "epochs": 1, "num_workers": n,
                          "choices": choice},
        )
        out["pre_cutoff_scorer_train_s"] = round(train_s, 1)
        out["pre_cutoff_scorer_reused"] = reuse
        out["cutoff_ts"] = int(cutoff)
        out["learn_num_workers"] = n
        out["learn_choices"] = choice
        outs[f"workers={n},choices={choice}"] = out
    first = next(iter(outs))
    base = outs[first]
    report = base if len(outs) == 1 else {
        "by_setting": outs,
        # each setting against the first one (the named baseline of this run): round seconds p50 as a ratio,
        # and the learning lists' NDCG@10 target by target (the same stream): paired 95% bootstrap interval
        "round_s_p50_ratio": {k: o["model_freshness"]["round_s_p50"] / base["model_freshness"]["round_s_p50"]
                              for k, o in outs.items()},
        "learning_ndcg@10_minus_first_ci95": {
            k: list(bootstrap_ci(np.asarray(o["ndcg@10_per_target"]["learning"]),
                                 np.asarray(base["ndcg@10_per_target"]["learning"])))
            for k, o in outs.items() if k != first},
    }
    write_json_report(report, args.out or work / "replay.json")
    keys = ("frozen", "online", "learning", "diff_ci95", "model_freshness", "learn_rounds", "n_targets")
    for name, out in outs.items():
        print(f"{name}:", json.dumps({k: out.get(k) for k in keys}, indent=2))
    if len(outs) > 1:
        print("round seconds p50 / first setting's:", json.dumps(report["round_s_p50_ratio"]))
        print("learning NDCG@10 - first setting's (paired 95%):",
              json.dumps(report["learning_ndcg@10_minus_first_ci95"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
