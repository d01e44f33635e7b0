"""~2000 malformed / random requests against the running app: zero 5xx, JSON errors, state untouched."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
from test_serve_app import App

pytestmark = pytest.mark.slow  # the app start alone is ~40 s here

ITEMS = ["space-1", "cook-2", "horror-3"]
EVENTS = ["view", "click", "like", "dislike", "skip", "purchase", "rating"]
JUNK = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    1e308,
    "",
    " ",
    "\x00",
    "ü🎉" * 3,
    [],
    {},
    [1, 2],
    {"a": 1},
    "x" * 5000,
]


@pytest.fixture(scope="module")
def app(ray_local, tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory):
    a = App("badinput", tmp_path_factory.mktemp("bad-run"), tiny_model_dir, max_body_bytes=64 * 1024)
    yield a
    a.close()


def _rand_text(rng: random.Random, n: int) -> str:
    alphabet = string.printable + "äöüß漢字🎉\u200b\ud7ff"
    return "".join(rng.choice(alphabet) for _ in range(n))


def _bad_event(rng: random.Random) -> dict:
    """A valid-looking event with exactly one definite defect (so it must be refused)."""
    ev = {
        "user_id": rng.choice(["good-user", "ü-user", "u" * 10]),
        "item_id": rng.choice(ITEMS),
        "event": rng.choice(EVENTS[:6]),
    }
    defect = rng.randrange(12)
    if defect == 0:
        ev["user_id"] = rng.choice(
            [j for j in JUNK if not (isinstance(j, str) and j.strip() and len(j) <= 256)]
        )
    elif defect == 1:
        ev["item_id"] = "unknown-" + _rand_text(rng, 8)
    elif defect == 2:
        ev["item_id"] = rng.choice([0, 1.5, [], {}, True, "x" * 300])
    elif defect == 3:
        ev["event"] = rng.choice(["LIKE", "love", "", None, 3, "like ", "rating2"])
    elif defect == 4:
        ev["event"], ev["value"] = "rating", rng.choice([None, "5", -1, 5.5, 99, True, [4], 10**400])
    elif defect == 5:
        ev["ts"] = rng.choice(["yesterday", -5, 1e300, [], True, 10**400, -(10**400)])
    elif defect == 6:
        ev["text"] = rng.choice(["", " ", "x" * 2001, 42, ["a"]])
    elif defect == 7:
        ev[rng.choice(["extra", "userId", "items", "score"])] = 1
    elif defect == 8:
        del ev[rng.choice(["user_id", "event"])]
    elif defect == 9:
        del ev["item_id"]  # neither item nor text
    elif defect == 10:
        ev = {"user_id": "good-user", "event": "view", "text": "neutral text only"}  # neutral text-only event
    else:
        ev["event_id"] = rng.choice(["", 5, "\x01bad"])
    return ev


def _requests(rng: random.Random, n: int):
    """Yields (method, path, kwargs) of requests that must all be refused with a 4xx."""
    for i in range(n):
        kind = i % 10
        if kind in (0, 1, 2):
            yield "POST", "/feedback", {"json": _bad_event(rng)}
        elif kind == 3:  # a batch with good events and one bad one: the whole batch is refused
            good = [
                {"user_id": "batch-user", "item_id": rng.choice(ITEMS), "event": "like"} for _ in range(3)
            ]
            good.insert(rng.randrange(4), _bad_event(rng))
            yield "POST", "/feedback", {"json": {"events": good}}
        elif kind == 4:
            body = rng.choice(
                [
                    b"",
                    b"{",
                    b"nul",
                    b"[1,2",
                    b'{"user_id": "a", "item_id": "space-1", "event": "like"',
                    bytes(rng.randrange(256) for _ in range(64)),
                    b"\xff\xfe{}",
                    json.dumps(rng.choice(JUNK)).encode(),
                    b'{"events": []}',
                    b'{"events": {}}',
                    b'{"events": "x"}',
                    b"[" * 5000 + b"]" * 5000,
                    json.dumps(
                        {"events": [{"user_id": "a", "item_id": "space-1", "event": "like"}] * 1001}
                    ).encode(),
                    b'{"user_id": "a", "item_id": "space-1", "event": "rating", "value": NaN}',
                    b'{"user_id": "a", "item_id": "space-1", "event": "rating", "value": Infinity}',
                ]
            )
            yield "POST", "/feedback", {"data": body, "headers": {"Content-Type": "application/json"}}
        elif kind == 5:
            yield "POST", "/feedback", {"data": b'{"user_id": "' + b"a" * (70 * 1024) + b'"}'}  # > body limit
        elif kind in (6, 7):
            params = rng.choice(
                [
                    {},
                    {"user_id": ""},
                    {"user_id": "u", "k": rng.choice(["0", "-1", "abc", "1e9", "201", "", "1.5"])},
                    {"user_id": "u" * 300},
                    {"user_id": "u", "q": ""},
                    {"user_id": "u", "q": "x" * 1001},
                    {"user_id": "u", "exclude_seen": rng.choice(["maybe", "2", ""])},
                    {"k": "5"},
                    {"user_id": " "},
                    {"user_id": "u", "q": "   "},
                    {"user_id": "\x00"},  # refused by /feedback, so refused here too (was a 200)
                    {"user_id": "a\x00b", "k": "3"},
                    {"user_id": "u", "q": "space\x00"},
                ]
            )
            yield "GET", "/recommend", {"params": params}
        elif kind == 8:
            yield rng.choice(
                [
                    ("PUT", "/feedback", {}),
                    ("GET", "/feedback", {}),
                    ("POST", "/recommend", {}),
                    ("GET", "/nope/" + _rand_text(rng, 5).replace("/", ""), {}),
                    ("PATCH", "/users/x", {}),
                    ("GET", "/users/" + "u" * 300, {}),
                    ("GET", "/users/%20", {}),
                    ("POST", "/healthz", {}),
                ]
            )
        else:
            yield "GET", f"/users/never-seen-{rng.randrange(10**6)}", {}


def test_random_bad_requests_never_5xx_and_change_nothing(app: App) -> None:
    base = app.call("POST", "/feedback", json={"user_id": "good-user", "item_id": "space-1", "event": "like"})
    assert base.status_code == 200
    before_stats = app.call("GET", "/admin/stats").json()["state"]
    before_user = app.call("GET", "/users/good-user").json()
    rng = random.Random(7)
    statuses: dict[int, int] = {}
    bad = []
    for method, path, kw in _requests(rng, 2000):
        r = app.call(method, path, **kw)
        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
        ok_error = 400 <= r.status_code < 500 and isinstance(r.json().get("error"), str) and r.json()["error"]
        if not ok_error:
            bad.append((method, path, str(kw)[:150], r.status_code, r.text[:200]))
    assert not bad, (
        f"{len(bad)} requests not answered with a 4xx JSON error, e.g. {bad[:5]}; statuses {statuses}"
    )
    assert sum(statuses.values()) == 2000 and not any(s >= 500 for s in statuses)
    assert {400, 404, 405, 413, 422} <= set(statuses), statuses
    h = app.call("GET", "/healthz")
    assert h.status_code == 200 and h.json()["ok"]
    after_stats = app.call("GET", "/admin/stats").json()["state"]
    assert (after_stats["n_users"], after_stats["n_events"]) == (
        before_stats["n_users"],
        before_stats["n_events"],
    )
    assert app.call("GET", "/users/good-user").json() == before_user
    assert app.call("GET", "/users/batch-user").status_code == 404  # no partial batch was applied
    events_dir = Path(app.run) / "events"
    from llmrec.state.event_log import read_events

    assert len(read_events(events_dir)) == 1  # only the one good event reached the durable log


def test_auth_token_guards_every_route_but_healthz(
    ray_local, tiny_model_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Reads used to stay open with a token set (GET /users: a user's whole history and text feedback)."""
    tmp = tmp_path_factory.mktemp("auth-run")
    token_file = tmp / "token"
    token_file.write_text("s3cret\n")
    a = App("authtest", tmp / "run", tiny_model_dir, auth_token_file=str(token_file))
    ok = {"Authorization": "Bearer s3cret"}
    try:
        ev = {"user_id": "z", "item_id": "space-1", "event": "like"}
        assert a.call("POST", "/feedback", json=ev).status_code == 401
        wrong = {"Authorization": "Bearer wrong"}
        assert a.call("POST", "/feedback", json=ev, headers=wrong).status_code == 401
        for method, path in [("DELETE", "/users/z"), ("GET", "/admin/stats"), ("GET", "/users/z"),
                             ("GET", "/recommend?user_id=z"), ("GET", "/users?user_id=z"), ("GET", "/docs"),
                             ("GET", "/openapi.json"), ("DELETE", "/users?user_id=z")]:
            r = a.call(method, path)
            assert r.status_code == 401 and r.json()["error"].startswith("missing or wrong"), (path, r.text)
        assert a.call("GET", "/healthz").status_code == 200  # liveness probes carry no token
        assert a.call("GET", "/users/z", headers=ok).status_code == 404  # nothing was written
        r = a.call("POST", "/feedback", json=ev, headers=ok)
        assert r.status_code == 200 and r.json()["state_version"] == 1
        assert a.call("GET", "/recommend", params={"user_id": "z"}, headers=ok).status_code == 200
        # ids with a slash, "." and "..": accepted by POST, so they must be readable and deletable too
        for uid in ("a/b", ".", ".."):
            assert a.call("POST", "/feedback", json={**ev, "user_id": uid}, headers=ok).status_code == 200
            got = a.call("GET", "/users", params={"user_id": uid}, headers=ok)
            assert got.status_code == 200 and got.json()["user_id"] == uid
            d = a.call("DELETE", "/users", params={"user_id": uid}, headers=ok)
            assert d.json() == {"ok": True, "deleted": True}
            assert a.call("GET", "/users", params={"user_id": uid}, headers=ok).status_code == 404
        assert a.call("POST", "/feedback", json={**ev, "user_id": "c/d"}, headers=ok).status_code == 200
        assert a.call("GET", "/users/c%2Fd", headers=ok).json()["user_id"] == "c/d"
        assert a.call("DELETE", "/users/c/d", headers=ok).json()["deleted"] is True
    finally:
        a.close()
