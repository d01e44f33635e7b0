"""TextEncoder: shapes, unit norm, determinism, batch/order invariance, the real MiniLM's semantics."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from llmrec.embed.encoder import (
    DEFAULT_MODEL_NAME,
    TextEncoder,
    TextTokenizer,
    attention_mask_from_length,
    default_model_path,
    resolve_model,
)


def _movie_texts(data_dir: Path, n: int) -> list[str]:
    with open(data_dir / "movielens-latest-small" / "movies.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:n]
    return [f"{r['title']} {r['genres'].replace('|', ', ')}" for r in rows]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: str) -> TextEncoder:
    return TextEncoder(tiny_model_dir, device="cpu", max_length=32)


@pytest.fixture(scope="module")
def minilm(minilm_path: str) -> TextEncoder:
    return TextEncoder(minilm_path, device="cpu")


@pytest.fixture(scope="module")
def texts(data_dir: Path) -> list[str]:
    # real titles of varied length, plus a very long one (truncated at max_length) and a 1-word one
    return _movie_texts(data_dir, 60) + ["word " * 200, "Heat"]


def test_shapes_dtype_unit_norm(tiny: TextEncoder, texts: list[str]) -> None:
    v = tiny.encode(texts, batch_size=16)
    assert v.shape == (len(texts), 32) and v.dtype == np.float32
    assert tiny.dim == 32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert len({tuple(np.round(r, 5)) for r in v}) == len(texts)  # distinct texts, distinct vectors
    e = tiny.encode([])
    assert e.shape == (0, 32) and e.dtype == np.float32


def test_deterministic_across_calls_and_instances(
    tiny: TextEncoder, tiny_model_dir: str, texts: list[str]
) -> None:
    a = tiny.encode(texts)
    np.testing.assert_array_equal(a, tiny.encode(texts))
    other = TextEncoder(tiny_model_dir, device="cpu", max_length=32)
    np.testing.assert_allclose(a, other.encode(texts), atol=1e-6)


def test_order_and_batch_size_do_not_change_vectors(tiny: TextEncoder, texts: list[str]) -> None:
    # reference: every text alone (batch_size=1, no padding at all)
    ref = tiny.encode(texts, batch_size=1)
    for bs in (3, 16, 128):
        np.testing.assert_allclose(
            tiny.encode(texts, batch_size=bs), ref, atol=1e-5, err_msg=f"batch_size={bs}"
        )
    perm = np.random.default_rng(0).permutation(len(texts))
    got = tiny.encode([texts[i] for i in perm], batch_size=7)
    np.testing.assert_allclose(got, ref[perm], atol=1e-5)


def test_tokenize_and_forward_pieces_match_encode(tiny: TextEncoder, texts: list[str]) -> None:
    tok = tiny.tokenize(texts, pad_to_max_length=True)
    ids, length = tok["input_ids"], tok["length"]
    assert ids.dtype == np.int32 and ids.shape == (len(texts), 32)
    assert length.dtype == np.int32 and length.shape == (len(texts),)
    assert length.max() == 32 and length[-2] == 32  # the 200-word text is truncated to max_length
    assert (ids[:, 0] == 101).all()  # [CLS] first (BERT vocab)
    # padding is the pad id beyond each row's length
    assert all((ids[i, n:] == tiny.tokenizer.pad_token_id).all() for i, n in enumerate(length))
    # "longest" padding: width is the longest row of this call
    short = tiny.tokenize(texts[:3])
    assert short["input_ids"].shape[1] == short["length"].max()
    # forward over fully padded rows == encode (padding under the mask changes nothing)
    full = tiny.forward(ids, attention_mask_from_length(length, ids.shape[1]))
    np.testing.assert_allclose(full, tiny.encode(texts), atol=1e-5)
    # a standalone tokenizer gives the same ids as the encoder's
    np.testing.assert_array_equal(
        TextTokenizer(tiny.model_path, 32)(texts, pad_to_max_length=True)["input_ids"], ids
    )


def test_mean_pooling_by_hand(tiny: TextEncoder) -> None:
    import torch

    tok = tiny.tokenize(["Toy Story (1995)", "Heat"])
    ids, length = tok["input_ids"], tok["length"]
    with torch.inference_mode():
        h = tiny._model(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(attention_mask_from_length(length, ids.shape[1])),
        ).last_hidden_state.numpy()  # (2, L, D)
    want = np.stack([h[i, : length[i]].mean(0) for i in range(2)])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(tiny.encode(["Toy Story (1995)", "Heat"]), want, atol=1e-5)


def test_model_name_rules(tiny_model_dir: str, minilm_path: str) -> None:
    assert default_model_path() == minilm_path and Path(minilm_path, "config.json").is_file()
    assert resolve_model(None) == (minilm_path, DEFAULT_MODEL_NAME)
    assert resolve_model(minilm_path)[1] == DEFAULT_MODEL_NAME  # the packaged default, whatever its path
    path, name = resolve_model(tiny_model_dir)
    assert path == name == str(Path(tiny_model_dir).resolve())
    assert resolve_model("org/some-model") == ("org/some-model", "org/some-model")  # hub names pass through


def test_bad_inputs_have_clear_errors(tiny: TextEncoder, tiny_model_dir: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a CUDA device"):
        TextEncoder(tiny_model_dir, device="cpu", fp16=True)
    with pytest.raises(ValueError, match=r"texts\[1\] must be a str, got NoneType"):
        tiny.encode(["ok", None])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="single str"):
        tiny.encode("just one")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        tiny.encode(["a"], batch_size=0)
    with pytest.raises(ValueError, match="max_length must be an int >= 2"):
        TextTokenizer(tiny_model_dir, max_length=1)
    with pytest.raises(ValueError, match="has no config.json"):
        TextEncoder(str(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="input_ids and attention_mask must both be"):
        tiny.forward(np.zeros((2, 3), np.int32), np.ones((2, 4), np.int32))


def test_minilm_neighbours_are_sensible(minilm: TextEncoder) -> None:
    # hand-checked: each anchor's related title must be closer than the unrelated one
    cases = [
        (
            "Toy Story (1995) Animation, Children's, Comedy",
            "Toy Story 2 (1999) Adventure, Animation, Children, Comedy",
            "Schindler's List (1993) Drama, War",
        ),
        (
            "Alien (1979) Horror, Sci-Fi",
            "Aliens (1986) Action, Adventure, Horror, Sci-Fi",
            "Sense and Sensibility (1995) Drama, Romance",
        ),
        (
            "The Godfather (1972) Crime, Drama",
            "The Godfather: Part II (1974) Crime, Drama",
            "Finding Nemo (2003) Adventure, Animation, Children, Comedy",
        ),
    ]
    flat = [t for c in cases for t in c]
    v = minilm.encode(flat).reshape(len(cases), 3, -1)  # (cases, [anchor, near, far], D)
    assert minilm.dim == 384 and minilm.model_name == DEFAULT_MODEL_NAME
    for (a, _, _), (va, vn, vf) in zip(cases, v, strict=True):
        assert va @ vn > va @ vf + 0.1, f"{a!r}: near {va @ vn:.3f} vs far {va @ vf:.3f}"


def test_minilm_matches_sentence_transformers(
    minilm: TextEncoder, minilm_path: str, texts: list[str]
) -> None:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(minilm_path, device="cpu")
    st.max_seq_length = minilm.max_length
    ref = st.encode(texts[:40], batch_size=16, normalize_embeddings=True, convert_to_numpy=True)
    got = minilm.encode(texts[:40], batch_size=16)
    cos = (ref * got).sum(1)
    assert cos.min() >= 0.9999, cos.min()


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs 1 CUDA GPU")
def test_cuda_fp16_matches_cpu(minilm: TextEncoder, minilm_path: str, texts: list[str]) -> None:
    gpu = TextEncoder(minilm_path, device="cuda")
    assert gpu.fp16 and gpu.device.startswith("cuda")
    cos = (gpu.encode(texts) * minilm.encode(texts)).sum(1)
    assert cos.min() >= 0.999, cos.min()


# ------------------------------------------------------- sentence-transformers folders: their config rules
# Each folder is the tiny random-init BERT saved by sentence-transformers itself with one config (pooling
# mode, prompts, Normalize or not); the reference is SentenceTransformer(folder).encode on the same texts.
ST_TEXTS = ["Toy Story (1995) Animation, Children, Comedy", "Heat", "a much longer text " * 6,
            "Alien (1979) Horror, Sci-Fi", "The Godfather: Part II (1974) Crime, Drama"]
PROMPTS = {"query": "query: ", "document": "passage: "}


def _st_folder(out: Path, base_dir: str, pooling: str | tuple[str, ...] = "mean", normalize: bool = True,
               prompts: dict[str, str] | None = None, default_prompt_name: str | None = None,
               include_prompt: bool = True, similarity: str | None = None) -> str:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as models

    word = models.Transformer(base_dir)
    mods = [word, models.Pooling(32, pooling_mode=pooling, include_prompt=include_prompt)]
    mods += [models.Normalize()] if normalize else []
    st = SentenceTransformer(modules=mods, prompts=prompts, default_prompt_name=default_prompt_name,
                             similarity_fn_name=similarity, device="cpu")
    st.save(str(out))
    return str(out)


def _st_reference(folder: str, texts: list[str], max_length: int, **kw: object) -> np.ndarray:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(folder, device="cpu")
    st.max_seq_length = max_length
    ref = st.encode(texts, convert_to_numpy=True, **kw)
    return ref / np.linalg.norm(ref, axis=1, keepdims=True)  # llmrec's rows are unit rows (cosine)


@pytest.mark.parametrize(
    "pooling", ["cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken", ("cls", "mean")],
    ids=lambda p: "+".join(p) if isinstance(p, tuple) else p,
)
def test_st_pooling_modes_match_sentence_transformers(tiny_model_dir: str, tmp_path: Path,
                                                      pooling: str | tuple[str, ...]) -> None:
    folder = _st_folder(tmp_path / "st", tiny_model_dir, pooling=pooling)
    enc = TextEncoder(folder, device="cpu", max_length=32)
    modes = (pooling,) if isinstance(pooling, str) else pooling
    assert enc.config.pooling == modes and enc.dim == 32 * len(modes)
    got = enc.encode(ST_TEXTS, batch_size=2)  # batches of unequal lengths: padding must not leak in
    np.testing.assert_allclose(got, _st_reference(folder, ST_TEXTS, 32), atol=2e-5)


def test_cls_pooling_is_not_mean_pooling(tiny_model_dir: str, tmp_path: Path) -> None:
    # the bug this guards: a CLS-pooled model (BGE) encoded with hard-coded mean pooling
    cls_dir = _st_folder(tmp_path / "cls", tiny_model_dir, pooling="cls")
    cls = TextEncoder(cls_dir, device="cpu", max_length=32)
    mean = TextEncoder(tiny_model_dir, device="cpu", max_length=32)  # plain HF folder: mean pooling
    cos = (cls.encode(ST_TEXTS) * mean.encode(ST_TEXTS)).sum(1)
    assert cos.max() < 0.99, cos


def test_legacy_pooling_config_is_read(tiny_model_dir: str, tmp_path: Path) -> None:
    """1_Pooling/config.json as sentence-transformers < 5 wrote it (pooling_mode_*_tokens booleans)."""
    import json

    folder = Path(_st_folder(tmp_path / "st", tiny_model_dir, pooling="cls"))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False}))
    enc = TextEncoder(str(folder), device="cpu", max_length=32)
    assert enc.config.pooling == ("cls",)
    np.testing.assert_allclose(enc.encode(ST_TEXTS), _st_reference(str(folder), ST_TEXTS, 32), atol=2e-5)


def test_default_prompt_is_prepended_like_sentence_transformers(tiny_model_dir: str, tmp_path: Path) -> None:
    folder = _st_folder(tmp_path / "e5", tiny_model_dir, prompts=PROMPTS, default_prompt_name="query")
    enc = TextEncoder(folder, device="cpu", max_length=32)
    assert enc.tokenizer.prompt == "query: "
    got = enc.encode(ST_TEXTS)
    np.testing.assert_allclose(got, _st_reference(folder, ST_TEXTS, 32), atol=2e-5)
    # the prompt matters: without it (the old behaviour) the vectors are others
    bare = TextEncoder(folder, device="cpu", max_length=32, prompt_name="")
    assert bare.tokenizer.prompt == "" and (got * bare.encode(ST_TEXTS)).sum(1).max() < 0.999
    # a named prompt, as sentence-transformers' encode(prompt_name=...)
    doc = TextEncoder(folder, device="cpu", max_length=32, prompt_name="document")
    np.testing.assert_allclose(doc.encode(ST_TEXTS),
                               _st_reference(folder, ST_TEXTS, 32, prompt_name="document"), atol=2e-5)
    with pytest.raises(ValueError, match=r"prompt_name 'passage' is not defined .* \['document', 'query'\]"):
        TextEncoder(folder, device="cpu", prompt_name="passage")


def test_prompts_without_default_encode_bare_with_a_warning(tiny_model_dir: str, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    folder = _st_folder(tmp_path / "st", tiny_model_dir, prompts=PROMPTS)
    with caplog.at_level("WARNING", logger="llmrec.embed.encoder"):
        enc = TextEncoder(folder, device="cpu", max_length=32)
    assert enc.tokenizer.prompt == "" and "no default_prompt_name" in caplog.text
    np.testing.assert_allclose(enc.encode(ST_TEXTS), _st_reference(folder, ST_TEXTS, 32), atol=2e-5)


def test_include_prompt_false_pools_without_the_prompt_tokens(tiny_model_dir: str, tmp_path: Path) -> None:
    folder = _st_folder(tmp_path / "instr", tiny_model_dir, pooling="mean", prompts=PROMPTS,
                        default_prompt_name="query", include_prompt=False)
    enc = TextEncoder(folder, device="cpu", max_length=32)
    assert enc.tokenizer.prompt_length == 3  # [CLS] "query" ":" (MiniLM's vocab); the last [SEP] is not
    got = enc.encode(ST_TEXTS, batch_size=2)
    np.testing.assert_allclose(got, _st_reference(folder, ST_TEXTS, 32), atol=2e-5)
    # the split the Ray pipeline uses: a standalone tokenizer, then forward, gives the same vectors
    tok = TextTokenizer(folder, 32)(ST_TEXTS, pad_to_max_length=True)
    fwd = enc.forward(tok["input_ids"], attention_mask_from_length(tok["length"], 32))
    np.testing.assert_allclose(fwd, got, atol=1e-5)


def test_normalisation_from_config(tiny_model_dir: str, tmp_path: Path) -> None:
    # a cosine model without a Normalize module: unit rows, the same directions as sentence-transformers
    folder = _st_folder(tmp_path / "cos", tiny_model_dir, pooling="max", normalize=False)
    got = TextEncoder(folder, device="cpu", max_length=32).encode(ST_TEXTS)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, _st_reference(folder, ST_TEXTS, 32), atol=2e-5)
    # a dot-product model without Normalize: unit rows would change its rankings, so it is refused
    dot = _st_folder(tmp_path / "dot", tiny_model_dir, normalize=False, similarity="dot")
    with pytest.raises(ValueError, match="'dot'-similarity model without a Normalize module"):
        TextEncoder(dot, device="cpu")


def test_unsupported_modules_are_refused_by_name(tiny_model_dir: str, tmp_path: Path) -> None:
    import json

    folder = Path(_st_folder(tmp_path / "dense", tiny_model_dir))
    mods = json.loads((folder / "modules.json").read_text())
    mods.insert(2, {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    (folder / "modules.json").write_text(json.dumps(mods))
    want = r"does not implement \['2_Dense \(sentence_transformers.models.Dense\)'\]"
    with pytest.raises(ValueError, match=want):
        TextEncoder(str(folder), device="cpu")


def test_minilm_config_is_mean_pooling_normalised(minilm_path: str) -> None:
    from llmrec.embed.encoder import read_sentence_config

    cfg = read_sentence_config(minilm_path)  # modules.json: Transformer, Pooling (legacy keys), Normalize
    assert (cfg.pooling, cfg.normalize, cfg.include_prompt, cfg.prompt()) == (("mean",), True, True, "")
