"""The served model listens (issue 11): over HTTP, with a trained scorer serving, a text dislike moves the
ranking away from the disliked topic, a text wish towards a topic, and a like of a cold item brings its text
neighbours up.

The run is built here: 3 topics x 10 items whose texts are encoded by the real MiniLM (text feedback has to
mean something), two cold items (no interaction anywhere), 60 users who each mostly like one topic, a scorer
trained by `fit_scorer` (Ray Train, synthesised facet feedback on), then the Serve app on the shared session
Ray. The batch command (`llmrec.batch`) ranks the same run: its users file, sharding and order are checked
against a single-shard run of itself and the served ranking.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_replay import make_run
from test_serve_app import start_serve

from llmrec import schema

TOPICS = {
    "Animation": [
        "an animated cartoon for kids about talking toys", "an animated family film about a lost puppy",
        "a cartoon musical for children with singing animals", "an animated adventure of a little fish",
        "a kids cartoon about a brave young dragon", "an animated comedy about monsters in a closet",
        "a children's animated film about friendly robots", "a cartoon fairy tale with a princess and a frog",
        "an animated movie about toys that come alive", "a family cartoon about a bear cub in the forest",
    ],
    "Science Fiction": [
        "a space adventure with astronauts on an alien planet", "a science fiction epic about a galactic war",
        "astronauts stranded on mars fight to survive", "a starship crew explores a distant galaxy",
        "aliens invade earth and a pilot fights back", "a time travel thriller in a dystopian future",
        "a robot uprising on a futuristic space station", "a voyage through a wormhole to another universe",
        "a lone astronaut drifts between the stars", "colonists on a frozen alien moon",
    ],
    "Romance": [
        "a romantic comedy about two strangers in paris", "a love story between a baker and a painter",
        "two old friends fall in love at a wedding", "a summer romance on a greek island",
        "a heartfelt love letter changes two lives", "a bride runs away and finds true love",
        "a romantic drama about lovers separated by war", "a chance meeting on a train turns into love",
        "a dating app mix-up leads to romance", "an unlikely couple falls in love in new york",
    ],
}
COLD = {"cold-space": ("a brand new science fiction story of astronauts on a distant alien planet",
                       "Science Fiction"),
        "cold-anim": ("a new animated cartoon for children about a clumsy little robot", "Animation")}
N_USERS = 60


@pytest.fixture(scope="module")
def listening_run(ray_local, tmp_path_factory, minilm_path) -> tuple[Path, dict[str, str]]:
    """(the run folder, item id -> topic)."""
    from llmrec.config import TrainConfig
    from llmrec.data.tables import read_items
    from llmrec.embed.artifact import load_item_space
    from llmrec.embed.encoder import TextEncoder
    from llmrec.scorer.recommender import split_last_event
    from llmrec.scorer.train import fit_scorer

    run = Path(tmp_path_factory.mktemp("listen-run"))
    ids, texts, topic = [], [], {}
    for t, tx in TOPICS.items():
        for j, x in enumerate(tx):
            ids.append(f"{t[:4].lower()}-{j}")
            texts.append(x)
            topic[ids[-1]] = t
    for cid, (x, t) in COLD.items():
        ids.append(cid)
        texts.append(x)
        topic[cid] = t
    rng = np.random.default_rng(0)
    rows = []
    names = list(TOPICS)
    for u in range(N_USERS):
        main = names[u % 3]
        pool = [i for i in ids if topic[i] == main and not i.startswith("cold")]
        other = [i for i in ids if topic[i] != main and not i.startswith("cold")]
        seq = list(rng.choice(pool, 7, replace=False)) + [str(rng.choice(other))]
        rng.shuffle(seq)
        rows += [(f"u{u}", it, 1_700_000_000 + 60 * j, np.nan, "like") for j, it in enumerate(seq)]
    inter = pd.DataFrame(
        rows, columns=[schema.USER_ID, schema.ITEM_ID, schema.TS, schema.RATING, schema.EVENT]
    )
    enc = TextEncoder(minilm_path, device="cpu")
    make_run(
        run, ids, enc.encode(texts), texts, enc.model_name, model_path=enc.model_path, interactions=inter
    )
    items_df = read_items(run / schema.RUN_DATA)
    items_df[schema.FACETS] = [[topic[i]] for i in items_df[schema.ITEM_ID]]
    from llmrec.data.tables import write_items

    write_items(items_df, run / schema.RUN_DATA)
    items, embed_meta = load_item_space(run / schema.RUN_EMBEDDINGS, read_items(run / schema.RUN_DATA))
    assert items.facets is not None and items.text_model
    train, valid = split_last_event(inter, 30, 0)
    cfg = TrainConfig(epochs=4, batch_size=64, lr=1e-2, dim=16, max_len=10, n_neg=16, head_neg=7,
                      mlp_hidden=16, n_candidates=20, feedback_p=0.5,
                      num_workers=0)  # in this process: the Ray Train workers are tested in test_train
    fit_scorer(cfg, train, items, run / schema.RUN_SCORER, valid_df=valid, embed_meta=embed_meta)
    return run, topic


@pytest.fixture(scope="module")
def listening_app(listening_run):
    from ray import serve

    from llmrec.serve.app import build_app

    run, topic = listening_run
    port = start_serve()
    name = f"listen{uuid.uuid4().hex[:6]}"
    # the model in a Recommender deployment of its own (split_model): the other served-app tests
    # (test_serve_app) run the default app, with the model inside the Ingress
    serve.run(build_app({"run_dir": str(run), "n_shards": 2, "state_name": f"test-state-{name}",
                         "num_cpus": 0.1, "log_dir": str(run / "events-test"), "split_model": True}),
              name=name, route_prefix=f"/{name}")
    import requests

    http = requests.Session()
    url = f"http://127.0.0.1:{port}/{name}"
    assert http.get(f"{url}/admin/stats", timeout=60).json()["model"]["scorer"] is True  # the scorer serves
    assert set(serve.status().applications[name].deployments) == {"Ingress", "Recommender"}
    yield http, url, topic, run
    serve.delete(name)


def _top(http, url, user: str, k: int) -> list[dict]:
    r = http.get(f"{url}/recommend", params={"user_id": user, "k": k}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["items"]


def _post(http, url, events: list[dict]) -> None:
    r = http.post(f"{url}/feedback", json={"events": events}, timeout=60)
    assert r.status_code == 200, r.text


def _share(items: list[dict], topic: dict[str, str], t: str) -> float:
    return float(np.mean([topic[it["item_id"]] == t for it in items]))


def test_text_dislike_moves_the_ranking_away_from_the_topic(listening_app):
    http, url, topic, _ = listening_app
    user = f"fan-{uuid.uuid4().hex[:6]}"
    _post(http, url, [
        {"user_id": user, "item_id": f"anim-{j}", "event": "like", "ts": 100.0 + j} for j in range(3)
    ])
    before = _top(http, url, user, 7)
    assert _share(before, topic, "Animation") >= 4 / 7  # the scorer follows the likes
    _post(http, url, [
        {"user_id": user, "event": "dislike", "text": "no more animated cartoons for kids please"}
    ])
    after = _top(http, url, user, 7)
    assert _share(after, topic, "Animation") <= _share(before, topic, "Animation") / 2, (before, after)


def test_text_wish_moves_the_ranking_towards_the_topic(listening_app):
    http, url, topic, _ = listening_app
    user = f"fan-{uuid.uuid4().hex[:6]}"
    _post(http, url, [
        {"user_id": user, "item_id": f"roma-{j}", "event": "like", "ts": 100.0 + j} for j in range(3)
    ])
    before = _top(http, url, user, 7)
    _post(http, url, [{"user_id": user, "event": "like", "text": "I want space adventures with astronauts"}])
    after = _top(http, url, user, 7)
    assert _share(after, topic, "Science Fiction") > _share(before, topic, "Science Fiction")
    assert any(it["reason"].startswith("because you said") for it in after)  # the reason names the text


def test_like_of_a_cold_item_brings_its_text_neighbours_up(listening_app):
    http, url, topic, _ = listening_app
    user = f"new-{uuid.uuid4().hex[:6]}"
    before = _top(http, url, user, 5)  # a brand-new user: popularity
    _post(http, url, [{"user_id": user, "item_id": "cold-space", "event": "like"}])
    after = _top(http, url, user, 5)
    assert _share(after, topic, "Science Fiction") >= 0.8 > _share(before, topic, "Science Fiction")


def test_served_ranking_of_a_known_user_equals_the_batch_command(listening_app, tmp_path):
    """A user the run knows is personalised from the first request, and `/recommend` gives exactly what
    `llmrec recommend` writes for that user (one ranking path: the state shard's base history +
    RecommendCore)."""
    import pandas as pd

    from llmrec.commands import recommend

    http, url, _, run = listening_app
    users = ["u0", "u1", "u2"]
    (tmp_path / "users.txt").write_text("\n".join(users) + "\n")
    out = tmp_path / "recs.parquet"
    import argparse

    parser = argparse.ArgumentParser()
    recommend.add_arguments(parser)
    args = parser.parse_args(
        ["--run", str(run), "--users", str(tmp_path / "users.txt"), "--k", "5", "--out", str(out)]
    )
    assert recommend.run(args) == 0
    batch = pd.read_parquet(out)
    for u in users:
        served = _top(http, url, u, 5)
        assert not any(it["reason"].startswith("popular") for it in served)  # personalised at once
        expect = batch[batch["user_id"] == u].sort_values("rank")["item_id"].tolist()
        assert [it["item_id"] for it in served] == expect


def _batch(run: Path, users, out: Path, **kw) -> pd.DataFrame:
    from llmrec.batch import recommend_users

    res = recommend_users(run, run / schema.RUN_DATA, users, 5, out, **kw)
    df = pd.read_parquet(out)
    assert res["n_rows"] == len(df) and res["n_users"] == df["user_id"].nunique()
    return df


def test_batch_reads_users_files_in_order_once_per_id_and_shards_change_nothing(listening_run, tmp_path):
    """The users file is read by Ray Data (text, csv, a folder of parquet parts in several blocks); every id
    is ranked once at its first position; the ranking of a user does not depend on how many shards the users
    are cut into (many shards of 7 users vs one shard holding all)."""
    run, _ = listening_run
    rng = np.random.default_rng(1)
    order = [f"u{i}" for i in rng.permutation(N_USERS)]
    listed = order[:40] + order[5:10] + order[40:]  # five repeats
    (tmp_path / "users.txt").write_text("# users to score\n\n" + "\n".join(f" {u} " for u in listed) + "\n")
    one = _batch(run, tmp_path / "users.txt", tmp_path / "one.parquet", n_shards=1)
    assert list(dict.fromkeys(one["user_id"])) == order  # file order, first occurrence, comments/blanks out
    assert (one.groupby("user_id", sort=False)["rank"].apply(list) == [[1, 2, 3, 4, 5]] * N_USERS).all()
    seen = pd.read_parquet(run / schema.RUN_DATA / "interactions.parquet").groupby("user_id")["item_id"]
    assert all(not set(g["item_id"]) & set(seen.get_group(u)) for u, g in one.groupby("user_id"))

    # a folder of parquet parts (several blocks) in many shards of 7 users, one output file: the same rows in
    # the same order
    parts = tmp_path / "users-parts"
    parts.mkdir()
    for j, s in enumerate(range(0, len(listed), 20)):
        pd.DataFrame({"user_id": listed[s : s + 20]}).to_parquet(parts / f"part-{j}.parquet")
    # two rankers share the shards (the default takes one for these few users)
    two = _batch(run, parts, tmp_path / "p.parquet", users_per_shard=7, num_rankers=2)
    pd.testing.assert_frame_equal(two, one)
    # a csv in shards of 7, written by the workers as a folder of parts: the same rows
    pd.DataFrame({"user_id": listed, "note": "x"}).to_csv(tmp_path / "users.csv", index=False)
    parts_out = _batch(run, tmp_path / "users.csv", tmp_path / "recs-folder", users_per_shard=7)
    assert (tmp_path / "recs-folder").is_dir()
    key = ["user_id", "rank"]
    pd.testing.assert_frame_equal(parts_out.sort_values(key, ignore_index=True), one.sort_values(key,
                                  ignore_index=True))


def test_batch_users_file_errors(listening_run, tmp_path):
    from llmrec.batch import recommend_users

    run, _ = listening_run
    (tmp_path / "users.txt").write_text("u1\nnobody\nu2\n")
    with pytest.raises(ValueError, match=r"1 of 3 users have no interactions .*nobody.*--skip-unknown"):
        recommend_users(run, run / schema.RUN_DATA, tmp_path / "users.txt", 5, tmp_path / "r.parquet")
    res = recommend_users(run, run / schema.RUN_DATA, tmp_path / "users.txt", 5, tmp_path / "r.parquet",
                          skip_unknown=True)
    assert (res["n_unknown"], res["n_users"]) == (1, 2)
    assert res["n_rankers"] == 1  # 3 ids: a second ranker on the 2 CPUs would only load the run again
    with pytest.raises(ValueError, match="num_rankers must be >= 1 or None, got 0"):
        recommend_users(run, run / schema.RUN_DATA, tmp_path / "users.txt", 5, tmp_path / "r.parquet",
                        num_rankers=0)
    assert list(dict.fromkeys(pd.read_parquet(tmp_path / "r.parquet")["user_id"])) == ["u1", "u2"]
    (tmp_path / "blank.txt").write_text("# nobody here\n\n")
    with pytest.raises(ValueError, match="lists no user ids"):
        recommend_users(run, run / schema.RUN_DATA, tmp_path / "blank.txt", 5, tmp_path / "r.parquet")
    pd.DataFrame({"uid": ["u1"]}).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"has no 'user_id' column \(columns: \['uid'\]\)"):
        recommend_users(run, run / schema.RUN_DATA, tmp_path / "bad.parquet", 5, tmp_path / "r.parquet")
    with pytest.raises(FileNotFoundError, match="users file .*missing.txt not found"):
        recommend_users(run, run / schema.RUN_DATA, tmp_path / "missing.txt", 5, tmp_path / "r.parquet")


def test_batch_on_uris_stages_the_run_per_worker_and_equals_local(listening_run, tmp_path, monkeypatch):
    """Run, data, users file and output given as URIs (file://, which pyarrow opens like a bucket): the
    rankers stage the run into their node's artifact cache themselves, the read tasks open the users URI,
    the workers' parts go to a staging folder beside the output; the result equals the local-path run, a
    second write to the same output folder replaces the first, and no staging folder is left behind."""
    from llmrec import storage
    from llmrec.batch import recommend_users

    run, _ = listening_run
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    users = [f"u{i}" for i in (7, 3, 11, 0, 3)]
    (tmp_path / "users.txt").write_text("\n".join(users) + "\n")
    local = _batch(run, tmp_path / "users.txt", tmp_path / "local.parquet")
    uri = f"file://{run}"
    out_dir = tmp_path / "out"
    res = recommend_users(uri, storage.join(uri, schema.RUN_DATA), f"file://{tmp_path}/users.txt", 5,
                          f"file://{out_dir}/recs.parquet")
    assert (res["n_users"], res["n_rows"]) == (4, 20)
    pd.testing.assert_frame_equal(pd.read_parquet(out_dir / "recs.parquet"), local)
    for _ in range(2):  # the second write replaces the first folder's parts
        recommend_users(uri, storage.join(uri, schema.RUN_DATA), f"file://{tmp_path}/users.txt", 5,
                        f"file://{out_dir}/folder", users_per_shard=2)
    folder = pd.read_parquet(out_dir / "folder")
    key = ["user_id", "rank"]
    pd.testing.assert_frame_equal(folder.sort_values(key, ignore_index=True),
                                  local.sort_values(key, ignore_index=True))
    assert sorted(p.name for p in out_dir.iterdir()) == ["folder", "recs.parquet"]  # no staging left
    with pytest.raises(FileNotFoundError, match=r"nothing/embeddings has no meta.json: run `llmrec embed`"):
        recommend_users(f"file://{tmp_path}/nothing", str(run / schema.RUN_DATA), users, 5,
                        f"file://{out_dir}/x.parquet")
