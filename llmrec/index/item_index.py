"""ItemIndex: top-k inner-product retrieval over item vectors: FAISS (named kinds or any factory string) or
exact torch.

Kinds (`ItemIndex.build(..., kind=...)`, resolved by `llmrec.index.kinds`):
- "flat": exact `IndexFlatIP` (faiss GPU `GpuIndexFlatIP` when `device` is CUDA and faiss sees a GPU).
- "hnsw": `HNSW{M}` (IndexHNSWFlat, inner product), M=32, efConstruction=40.
- "ivf": `IVF{nlist},Flat`, nlist ~ sqrt(N) (at least 39 items per list).
- a FAISS `index_factory` string: "IVF4096,PQ48", "IVF4096,SQ8", "HNSW32,SQ8", "OPQ48,IVF4096,PQ48", ...
  (inner-product metric; IDMap is refused: the index numbers items itself).
- "torch": exact `q @ X.T` + `topk` in torch, chunked over items so 1M x 384 fits (fp16 on CUDA, fp32 on
  CPU). It stands in wherever faiss (or faiss-gpu) is missing.
- "auto": `kinds.auto_kind`: flat below 50k items, HNSW below 1M, `IVF{~4 sqrt N},SQ8` from 1M on; on CUDA
  below 1M faiss GPU flat, or torch without faiss GPU.

Building streams: `build_from_batches` takes a callable that yields (item_ids, vectors) chunks and reads it
once for exact kinds and twice for the others: a first pass keeps only a seeded sample (the quantizer's
training rows, at most max(100k, 64 x nlist), and the recall queries), the second adds chunk by chunk and
folds each chunk into the exact top-10 of the sampled queries. So no full float32 copy of the matrix exists
next to a compressed index at any time (the torch kind holds one: it is that index; so does faiss flat).
IVF k-means runs 10 iterations (quality saturates early; nprobe tuning covers the rest); 8-bit PQ skips
faiss's polysemous training (minutes of annealing for a search mode never used here). Flat code storage is
reserved for N rows before the adds, so it is not doubled-and-copied on the way.

Approximate kinds tune their search knob (IVF nprobe: powers of two up to min(nlist, 2048); HNSW efSearch:
64..512) on 500 sampled catalog items to the smallest value that reaches `target_recall` (default 0.97) @10,
or, where the quantization caps recall below that, the value after which doubling gains < 0.005 recall.
Recall@10 against exact search is then measured on a disjoint sample (`recall_sample`, default 1000) and
kept in `build_stats` (written to meta.json by `save`). Each query item is dropped from both lists.

Choices where docs/design.md is silent:
- Vectors are indexed as given and the score is the raw inner product. They are expected to be
  L2-normalised (so the score is the cosine); non-unit vectors are accepted with a logged warning, or
  normalised when `normalize=True`. Queries are never normalised (ranking does not depend on their norm).
- `vector`, `vectors_for` and `vectors` reconstruct from the index: exact for flat, torch, HNSW (Flat) and
  IVF (Flat); the decoded approximation for compressed kinds (SQ8, PQ).
- `exclude` names item ids to drop per query; ids that are not in the index are ignored. They never come
  back: faiss filters them during the search (an IDSelector in the search parameters; one faiss call per
  query that excludes something), torch sets their scores to -inf. Exact kinds therefore return exactly
  the brute-force top-k over the remaining items. Where faiss refuses search parameters (faiss GPU,
  `Refine`, flat `PQ`) the backend over-fetches k + |exclusions| and filters (logged once).
- Missing results (fewer than k items, or filtered out) are padded with item id "" and score -inf.
- `search` and `add` hold one lock, so a serving actor may call them from several threads.
- After a fallback (no faiss, or no faiss GPU) `.kind` is the kind that actually runs ("torch").
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llmrec.artifacts import ArtifactError, atomic_write, check_compatible, read_meta, write_meta
from llmrec.index.backends import (
    FaissBackend,
    RunningTopK,
    TorchBackend,
    exact_topk,
    faiss_or_none,
    recall_at_k,
)
from llmrec.index.kinds import (
    AUTO_FLAT_MAX_ITEMS,
    NAMED_KINDS,
    auto_kind,
    check_factory,
    faiss_error_reason,
    is_named,
)
from llmrec.schema import INDEX_FILE, INDEX_IDS_FILE, INDEX_TORCH_FILE

logger = logging.getLogger(__name__)

__all__ = ["AUTO_FLAT_MAX_ITEMS", "KINDS", "Batches", "IndexKind", "ItemIndex", "exact_topk", "recall_at_k"]

IndexKind = Literal["auto", "flat", "hnsw", "ivf", "torch"] | str  # or a FAISS index_factory string
KINDS = NAMED_KINDS
# a callable returning a fresh iterator of (item_ids (M,), vectors (M, D)) chunks, same order every call
Batches = Callable[[], Iterable[tuple[Sequence[str], np.ndarray]]]
RECALL_K = 10
_TUNE_QUERIES = 500  # catalog items used as queries when tuning efSearch / nprobe
_PLATEAU_GAIN = 0.005  # tuning stops where doubling the knob gains less recall@10 than this
_CHUNK_ROWS = 65_536  # rows per chunk when `build` streams an in-memory matrix
_TRAIN_MIN_ROWS = 100_000  # training sample: at least this many rows (all when fewer) ...
_TRAIN_ROWS_PER_LIST = 64  # ... and 64 per IVF list: plenty for a coarse quantizer (k-means saturates)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "flat": {},
    "hnsw": {"M": 32, "ef_construction": 40, "ef_search": None, "target_recall": 0.97},
    "ivf": {"nlist": None, "nprobe": None, "target_recall": 0.97, "train_size": None},
    "torch": {"chunk_elems": 1 << 26},  # max (queries x items) scores held at once, 256 MiB in fp32
    "factory": {"nprobe": None, "ef_search": None, "target_recall": 0.97, "train_size": None},
}
EXACT_KINDS = ("flat", "torch")


class ItemIndex:
    """Top-k inner-product search over item vectors, keyed by string item ids.

    Build with `ItemIndex.build`, `ItemIndex.build_from_batches` or `ItemIndex.load`, not the constructor.

    Example::

        idx = ItemIndex.build(np.eye(3, dtype=np.float32), ["a", "b", "c"], kind="flat")
        scores, ids = idx.search(np.eye(3, dtype=np.float32)[:1], k=2)  # ids[0, 0] == "a"
        scores, ids = idx.search(np.eye(3, dtype=np.float32)[:1], k=2, exclude=[["a"]])  # ids[0, 0] != "a"
    """

    def __init__(
        self,
        kind: str,
        backend: FaissBackend | TorchBackend,
        item_ids: Sequence[str],
        params: dict[str, Any],
        device: str,
        embed_meta: Mapping[str, Any] | None = None,
        factory: str | None = None,
    ) -> None:
        self._kind = kind
        self._backend = backend
        self._factory = factory
        self._dim = int(backend.host.shape[1] if isinstance(backend, TorchBackend) else backend.index.d)
        self._ids: list[str] = list(item_ids)
        self._pos: dict[str, int] = {iid: i for i, iid in enumerate(self._ids)}
        self._n = len(self._ids)
        self._ids_arr: np.ndarray | None = None
        self.params = params
        self.device = device
        self.embed_meta: dict[str, Any] | None = dict(embed_meta) if embed_meta else None
        self.meta: dict[str, Any] | None = None  # the meta.json it was loaded from or saved to; None: built
        self.build_stats: dict[
            str, Any
        ] = {}  # recall_at_10, recall_queries, train_size, tuning ... (build only)
        self._lock = threading.RLock()
        if backend.ntotal != self._n:
            raise ArtifactError(f"the index holds {backend.ntotal} vectors for {self._n} item ids")

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        vectors: np.ndarray,
        item_ids: Sequence[str],
        kind: IndexKind = "auto",
        device: str = "auto",
        *,
        normalize: bool = False,
        embed_meta: Mapping[str, Any] | None = None,
        recall_sample: int = 1000,
        **params: Any,
    ) -> ItemIndex:
        """Index `vectors` (N, D) under `item_ids` (N,) for inner-product search.

        Args:
            vectors: float array (N, D), N >= 1, ideally L2-normalised rows. Not kept (faiss and the torch
                kind copy what they hold), so later edits of the caller's array change nothing.
            item_ids: N unique non-empty strings, row order of `vectors`.
            kind: "auto" | "flat" | "hnsw" | "ivf" | "torch" | a FAISS index_factory string (see the
                module docstring).
            device: "auto" | "cpu" | "cuda[:i]" (resolved by `llmrec.device.resolve_device`).
            normalize: L2-normalise the rows before indexing.
            embed_meta: the embeddings meta the vectors come from (named in errors, written by `save`).
            recall_sample: catalog items whose recall@10 vs exact search approximate kinds measure.
            **params: kind parameters: hnsw `M`, `ef_construction`, `ef_search`, `target_recall`;
                ivf `nlist`, `nprobe`, `target_recall`, `train_size`; factory strings `nprobe` / `ef_search`,
                `target_recall`, `train_size`; torch `chunk_elems`.

        Returns:
            the index; `.kind` is the kind that runs (after "auto" and fallbacks).

        Raises:
            ValueError: bad shapes, non-finite values, duplicate/empty ids, unknown kind or params, or
                "hnsw"/"ivf"/a factory string asked for without faiss installed.
        """
        xb = _as_matrix(vectors, "vectors")
        if xb.shape[0] == 0:
            raise ValueError("vectors is empty (0 rows); an index needs at least one item")
        ids = _as_ids(item_ids, xb.shape[0])

        def batches() -> Iterable[tuple[Sequence[str], np.ndarray]]:
            for s in range(0, len(ids), _CHUNK_ROWS):
                yield ids[s : s + _CHUNK_ROWS], xb[s : s + _CHUNK_ROWS]

        return cls.build_from_batches(
            batches,
            n_items=xb.shape[0],
            dim=xb.shape[1],
            kind=kind,
            device=device,
            normalize=normalize,
            embed_meta=embed_meta,
            recall_sample=recall_sample,
            **params,
        )

    @classmethod
    def build_from_batches(
        cls,
        batches: Batches,
        n_items: int,
        dim: int,
        kind: IndexKind = "auto",
        device: str = "auto",
        *,
        normalize: bool = False,
        embed_meta: Mapping[str, Any] | None = None,
        recall_sample: int = 1000,
        check: bool = False,
        seed: int = 0,
        **params: Any,
    ) -> ItemIndex:
        """Index items that arrive in chunks, holding at most a chunk and a sample besides the index.

        Args:
            batches: callable returning a fresh iterator of (item_ids (M,), vectors float (M, D)) chunks, in
                the same order on every call (e.g. `llmrec.embed.artifact.iter_embeddings(dir)`); called
                once for exact kinds without `check`, twice otherwise (sample, then add).
            n_items: total rows the chunks hold (N); the sample is drawn from it and checked at the end.
            dim: D.
            kind, device, normalize, embed_meta, **params: as in `build`.
            recall_sample: queries (catalog items, seeded sample) for recall@10 vs exact search; always
                measured for approximate kinds, for exact kinds only with `check`.
            check: also measure recall for the exact kinds (a self-test: it must come out 1.0).
            seed: seeds the training and query samples.

        Returns:
            the index, with `build_stats` {build_s, recall_at_10, recall_queries, recall_at_10_n_items,
            train_size, tuning: [[knob value, recall@10 on the tuning queries], ...]}.
        """
        from llmrec.device import faiss_num_gpus, resolve_device

        if not isinstance(n_items, (int, np.integer)) or n_items < 1:
            raise ValueError(
                f"n_items must be a positive int (an index needs at least one item), got {n_items!r}"
            )
        if recall_sample < 0:
            raise ValueError(f"recall_sample must be >= 0 catalog items, got {recall_sample}")
        t0 = time.perf_counter()
        dev = resolve_device(device)
        on_cuda = dev.startswith("cuda")
        faiss_gpu = on_cuda and faiss_num_gpus() > 0
        kind, p, factory = _resolve(kind, int(n_items), int(dim), dev, faiss_gpu, params, normalize)
        n = int(n_items)
        approximate = kind not in EXACT_KINDS
        if kind == "torch":
            backend: FaissBackend | TorchBackend = TorchBackend(dim, n, dev, int(p["chunk_elems"]))
            index = None
        else:
            index = _empty_faiss(kind, factory, p, n, dim)
            backend = None  # type: ignore[assignment]

        # ---- pass 1 (kinds that train or measure recall): a seeded sample, never the whole matrix
        rng = np.random.default_rng(seed)
        n_tune, n_check = _query_split(
            n, _TUNE_QUERIES if approximate else 0, recall_sample if (approximate or check) else 0
        )
        q_rows = (
            rng.choice(n, size=n_tune + n_check, replace=False) if n_tune + n_check else np.zeros(0, np.int64)
        )
        needs_train = index is not None and not index.is_trained
        train_rows = np.zeros(0, np.int64)
        if needs_train:
            n_train = _train_size(index, p, n)
            train_rows = rng.choice(n, size=n_train, replace=False)
        stats: dict[str, Any] = {}
        if len(q_rows) or len(train_rows):
            xq, xt = _gather_rows(batches, [q_rows, train_rows], n, dim, normalize)
            if needs_train:
                t1 = time.perf_counter()
                _train(index, kind, xt, n)
                stats.update(train_size=len(train_rows), train_s=round(time.perf_counter() - t1, 3))
            del xt
        else:
            xq = np.zeros((0, dim), np.float32)
        if index is not None:
            backend = FaissBackend(index, gpu_device=dev if faiss_gpu else None)
            backend.reserve(n)

        # ---- pass 2: add chunk by chunk, and fold each chunk into the sampled queries' exact top-(k+1)
        truth = RunningTopK(xq, min(RECALL_K + 1, n))
        ids: list[str] = []
        pos: dict[str, int] = {}
        not_unit, worst = 0, 0.0
        for chunk_ids, chunk in batches():
            x = _prep(chunk, dim, normalize)
            cids = _as_ids(chunk_ids, x.shape[0])
            dup = [i for i in cids if i in pos]
            if dup:
                raise ValueError(f"{len(dup)} duplicate item ids, e.g. {dup[:5]}; item ids must be unique")
            for j, iid in enumerate(cids):
                pos[iid] = len(ids) + j
            ids.extend(cids)
            if not normalize:
                dev_norm = np.abs(np.linalg.norm(x, axis=1) - 1.0)
                not_unit += int((dev_norm > 1e-3).sum())
                worst = max(worst, float(dev_norm.max(initial=0.0)))
            backend.add(x)
            truth.update(x)
        if len(ids) != n:
            raise ValueError(
                f"the batches yielded {len(ids)} items, n_items says {n}; the embeddings changed while "
                f"indexing or their meta.json is stale (re-run `llmrec embed`)"
            )
        if not_unit:
            logger.warning(
                "%d of %d vectors are not L2-normalised (max |norm-1| %.3g): scores are raw inner "
                "products; pass normalize=True for cosine",
                not_unit,
                n,
                worst,
            )
        idx = cls(kind, backend, ids, p, dev, embed_meta, factory=factory)
        del pos

        # ---- tune the search knob on the first queries, measure recall on the others
        self_rows = q_rows
        if approximate and n_tune:
            stats["tuning"] = idx._tune(xq[:n_tune], truth.rows[:n_tune], self_rows[:n_tune])
        else:
            backend.set_search_params(p)
        if n_check:
            _, got = backend.search(xq[n_tune:], truth.k)
            rec = recall_at_k(got, truth.rows[n_tune:], RECALL_K, self_pos=self_rows[n_tune:])
            stats.update(recall_at_10=round(rec, 4), recall_queries=n_check, recall_at_10_n_items=n)
        stats["build_s"] = round(time.perf_counter() - t0, 3)
        idx.build_stats = stats
        logger.info(
            "built %s index over %d x %d on %s in %.2fs (params %s%s)",
            kind,
            n,
            dim,
            dev,
            stats["build_s"],
            idx.params,
            f", recall@10 {stats['recall_at_10']:.4f} on {n_check} catalog items" if n_check else "",
        )
        return idx

    @classmethod
    def load(
        cls,
        index_dir: str | os.PathLike,
        expect_embed_meta: Mapping[str, Any] | None = None,
        device: str = "auto",
    ) -> ItemIndex:
        """Load an index folder written by `save`, checking meta.json before touching faiss.

        Args:
            index_dir: folder with meta.json, item_ids.npy and index.faiss (or index.npy for "torch").
            expect_embed_meta: the embeddings meta the caller's queries come from; its `model_name` and
                `dim` must match the index's.
            device: "auto" | "cpu" | "cuda[:i]". A faiss index moves to faiss GPU when faiss sees one (and
                has a GPU version of it); a "flat" index on CUDA without faiss GPU is served by the torch
                kind.

        Raises:
            ArtifactError (a ValueError): missing/incompatible meta, or files that disagree with it.
        """
        from llmrec.device import faiss_num_gpus, resolve_device

        d = Path(index_dir)
        meta = read_meta(d, "index")
        kind, dim, n = meta.get("kind"), meta.get("dim"), meta.get("n_items")
        embed = meta.get("embed") or {}
        if meta.get("metric") != "ip":
            raise ArtifactError(
                f"{d}: metric {meta.get('metric')!r}, this llmrec reads 'ip'; re-run `llmrec index`"
            )
        if (
            not isinstance(kind, str)
            or not kind
            or kind == "auto"
            or not isinstance(dim, int)
            or not isinstance(n, int)
        ):
            raise ArtifactError(
                f"{d}/meta.json: bad kind/dim/n_items {kind!r}/{dim!r}/{n!r}; re-run `llmrec index`"
            )
        if expect_embed_meta is not None:
            check_compatible(
                embed,
                expect_embed_meta,
                ["model_name", "dim"],
                found_name=f"index {d}",
                expected_name="embeddings",
                rerun=f"llmrec index --out {d}",
            )
        ids_path = d / INDEX_IDS_FILE
        data_path = d / (INDEX_TORCH_FILE if kind == "torch" else INDEX_FILE)
        for path in (ids_path, data_path):
            if not path.is_file():
                raise ArtifactError(f"{d}: {path.name} is missing; re-run `llmrec index --out {d}`")
        ids = np.load(ids_path, allow_pickle=False)
        if ids.shape != (n,):
            raise ArtifactError(
                f"{ids_path}: {ids.shape[0] if ids.ndim else 0} ids, meta.json says n_items={n}; "
                f"re-run `llmrec index --out {d}`"
            )
        dev = resolve_device(device)
        params = dict(meta.get("params") or {})
        t0 = time.perf_counter()
        backend: FaissBackend | TorchBackend
        if kind == "torch":
            xb = np.load(data_path, allow_pickle=False)
            if xb.shape != (n, dim):
                raise ArtifactError(
                    f"{data_path}: shape {xb.shape}, meta.json says ({n}, {dim}); "
                    f"re-run `llmrec index --out {d}`"
                )
            backend = TorchBackend.from_array(xb, dev, int(params.get("chunk_elems", 1 << 26)))
            del xb
        else:
            faiss = faiss_or_none()
            if faiss is None:
                raise ArtifactError(
                    f"{d} holds a faiss {kind!r} index but faiss is not importable; "
                    f"`pip install faiss-cpu`, or rebuild with `llmrec index --kind torch`"
                )
            index = faiss.read_index(str(data_path))
            if index.ntotal != n or index.d != dim:
                raise ArtifactError(
                    f"{data_path}: {index.ntotal} x {index.d} vectors, meta.json says "
                    f"{n} x {dim}; re-run `llmrec index --out {d}`"
                )
            on_cuda = dev.startswith("cuda")
            if kind == "flat" and on_cuda and faiss_num_gpus() == 0:
                logger.info("faiss sees no GPU on %s: serving the flat index with the torch kind", dev)
                kind = "torch"
                params = dict(_DEFAULTS["torch"])
                xb = np.ascontiguousarray(index.reconstruct_n(0, n), dtype=np.float32)
                del index
                backend = TorchBackend.from_array(xb, dev, int(params["chunk_elems"]))
                del xb
            else:
                backend = FaissBackend(index, gpu_device=dev if (on_cuda and faiss_num_gpus() > 0) else None)
                backend.set_search_params(params)
        logger.info("loaded %s index %d x %d from %s in %.2fs", kind, n, dim, d, time.perf_counter() - t0)
        idx = cls(kind, backend, [str(x) for x in ids], params, dev, embed, factory=meta.get("factory"))
        idx.meta = meta
        return idx

    # ------------------------------------------------------------------ properties
    @property
    def kind(self) -> str:
        """The kind that runs: "flat" | "hnsw" | "ivf" | "torch" | the factory string it was built from."""
        return self._kind

    @property
    def factory(self) -> str | None:
        """The FAISS index_factory string of the faiss index ("Flat", "HNSW32", ...); None for torch."""
        return self._factory

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def n_items(self) -> int:
        return self._n

    def __len__(self) -> int:
        return self._n

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._pos

    @property
    def item_ids(self) -> np.ndarray:
        """Object array (N,) of item ids in index order (row i of `vectors`)."""
        with self._lock:
            if self._ids_arr is None or len(self._ids_arr) != self._n:
                self._ids_arr = np.array(self._ids, dtype=object)
            return self._ids_arr

    @property
    def vectors(self) -> np.ndarray:
        """Read-only float32 (N, D) of the indexed vectors, in index order.

        The torch kind returns a view of its buffer; faiss kinds reconstruct a new array on each call
        (O(N D) memory; decoded approximations for compressed kinds, see the module docstring).
        """
        with self._lock:
            if isinstance(self._backend, TorchBackend):
                return self._backend.view()
            v = self._backend.reconstruct_all()
        v.flags.writeable = False
        return v

    def position(self, item_id: str) -> int:
        """Row of `item_id` in index order; KeyError naming the id when it is not indexed."""
        try:
            return self._pos[item_id]
        except KeyError:
            raise KeyError(f"item id {item_id!r} is not in the index ({self._n} items)") from None

    def vector(self, item_id: str) -> np.ndarray:
        """float32 (D,) copy of one item's vector (decoded for compressed kinds)."""
        row = self.position(item_id)
        with self._lock:
            return self._backend.reconstruct(np.array([row]))[0].copy()

    def vectors_for(self, item_ids: Iterable[str]) -> np.ndarray:
        """float32 (M, D) copy of the vectors of `item_ids`; KeyError listing ids that are not indexed."""
        ids = list(item_ids)
        missing = [i for i in ids if i not in self._pos]
        if missing:
            raise KeyError(f"{len(missing)} of {len(ids)} item ids are not in the index, e.g. {missing[:5]}")
        with self._lock:
            return self._backend.reconstruct(np.array([self._pos[i] for i in ids], dtype=np.int64))

    # ------------------------------------------------------------------ search / add
    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Iterable[str]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items by inner product for each query.

        Args:
            queries: float array (B, D) (a single (D,) vector is treated as B=1).
            k: results per query, >= 1.
            exclude: optional, B iterables of item ids to leave out of each query's results (ids not in
                the index are ignored). Filtered inside the search, not by over-fetching: exact kinds
                return the brute-force top-k over the remaining items.

        Returns:
            scores float32 (B, k) descending, item_ids object (B, k); padded with -inf / "" when fewer
            than k items remain.
        """
        xq = _as_matrix(queries, "queries", allow_1d=True)
        if xq.shape[1] != self._dim:
            model = (self.embed_meta or {}).get("model_name", "an unknown model (built in memory)")
            raise ValueError(
                f"query dim {xq.shape[1]} != index dim {self._dim} (index built with {model!r}); "
                f"encode queries with the same encoder, or re-run `llmrec index` on embeddings "
                f"from your encoder"
            )
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        b = xq.shape[0]
        excl: list[np.ndarray] | None = None
        if exclude is not None:
            if isinstance(exclude, str) or len(exclude) != b:
                raise ValueError(
                    f"exclude must hold one iterable of item ids per query ({b}), got "
                    f"{type(exclude).__name__} of length {len(exclude)}"
                )
            get = self._pos.get
            excl = [
                np.unique(np.array([r for r in map(get, ex) if r is not None], np.int64)) for ex in exclude
            ]
            if not any(len(e) for e in excl):
                excl = None
        with self._lock:
            kk = min(int(k), self._n)
            t0 = time.perf_counter()
            dist, pos = self._backend.search(xq, kk, excl)  # (B, kk) float32, int64 rows (-1 = none)
            id_arr = self.item_ids
        logger.debug("searched %d queries (k=%d) in %.1f ms", b, k, 1e3 * (time.perf_counter() - t0))
        if kk == k and (pos >= 0).all():  # the common case: no padding
            return dist.copy(), id_arr[pos]
        scores = np.full((b, k), -np.inf, dtype=np.float32)
        out_ids = np.full((b, k), "", dtype=object)
        found = pos >= 0  # faiss and exact_topk put missing results last
        scores[:, :kk][found] = dist[found]
        out_ids[:, :kk][found] = id_arr[pos[found]]
        return scores, out_ids

    def add(self, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add items; they are searchable as soon as this returns (no rebuild, no retraining: IVF/PQ kinds
        encode them with the quantizer trained at build time).

        Args:
            item_ids: M new unique non-empty strings, none already indexed.
            vectors: float array (M, D) (a single (D,) vector with one id is accepted).

        Raises:
            ValueError: dim mismatch, duplicate ids (within the batch or already indexed), bad values.
        """
        if isinstance(item_ids, str):
            item_ids = [item_ids]
        xa = _as_matrix(vectors, "vectors", allow_1d=True)
        if xa.shape[1] != self._dim:
            model = (self.embed_meta or {}).get("model_name", "an unknown model")
            raise ValueError(
                f"added vectors have dim {xa.shape[1]}, the index has dim {self._dim} (built with "
                f"{model!r}); embed the new items with the same encoder"
            )
        ids = _as_ids(item_ids, xa.shape[0])
        if self.params.get("normalize"):
            xa = _l2_normalize(xa)
        with self._lock:
            dup = [i for i in ids if i in self._pos]
            if dup:
                raise ValueError(
                    f"{len(dup)} of {len(ids)} item ids are already in the index, e.g. {dup[:5]}; "
                    f"add only new items"
                )
            if xa.shape[0] == 0:
                return
            t0 = time.perf_counter()
            self._backend.add(xa)
            for j, iid in enumerate(ids):
                self._pos[iid] = self._n + j
            self._ids.extend(ids)
            self._n += len(ids)
        logger.debug(
            "added %d items to the %s index in %.1f ms (now %d)",
            len(ids),
            self._kind,
            1e3 * (time.perf_counter() - t0),
            self._n,
        )

    # ------------------------------------------------------------------ persistence
    def save(
        self, out_dir: str | os.PathLike, embed_meta: Mapping[str, Any] | None = None, **extra: Any
    ) -> dict[str, Any]:
        """Write index.faiss (index.npy for "torch"), item_ids.npy and meta.json; returns the meta.

        `embed_meta` (default: the one given to build/load) is stored under "embed"; meta.json also gets
        `build_stats` (after a build) and `index_bytes`; `extra` adds (or overrides) meta keys.
        Files are written to temporary names and renamed, meta.json last.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        embed = dict(embed_meta) if embed_meta is not None else dict(self.embed_meta or {})
        if embed.get("dim") not in (None, self._dim):
            raise ValueError(
                f"embed_meta says dim {embed.get('dim')}, the index has dim {self._dim}; "
                f"pass the meta of the embeddings this index was built from"
            )
        with self._lock:
            ids = np.array(self._ids, dtype=str)
            if isinstance(self._backend, TorchBackend):
                data = out / INDEX_TORCH_FILE
                atomic_write(data, lambda p: np.save(p, self._backend.host[: self._n]))
                stale = out / INDEX_FILE
            else:
                faiss = faiss_or_none()
                cpu_index = self._backend.cpu_index()
                data = out / INDEX_FILE
                atomic_write(data, lambda p: faiss.write_index(cpu_index, str(p)))
                stale = out / INDEX_TORCH_FILE
            atomic_write(out / INDEX_IDS_FILE, lambda p: np.save(p, ids))
            if stale.exists():  # a previous index of the other family in the same folder
                stale.unlink()
            fields = {**self.build_stats, "index_bytes": data.stat().st_size, **extra}
            if self._factory is not None:
                fields["factory"] = self._factory
            meta = write_meta(
                out,
                "index",
                kind=self._kind,
                dim=self._dim,
                metric="ip",
                n_items=self._n,
                embed=embed,
                params=self.params,
                **fields,
            )
        self.embed_meta = embed or None
        self.meta = meta
        logger.info("saved %s index (%d items) to %s", self._kind, self._n, out)
        return meta

    # ------------------------------------------------------------------ internals
    def _tune(self, xq: np.ndarray, truth: np.ndarray, self_rows: np.ndarray) -> list[list[float]]:
        """Set the knob (nprobe / ef_search) unless given: the smallest grid value reaching
        params["target_recall"]@10 on `xq` (exact rows `truth`, own rows `self_rows` dropped), or the one
        after which doubling gains less than `_PLATEAU_GAIN`. Returns [[value, recall], ...] as tried."""
        backend, p = self._backend, self.params
        knob = getattr(backend, "knob", None)
        if knob is None or p.get(knob):
            backend.set_search_params(p)
            return []
        if knob == "ef_search":
            grid = [64, 128, 256, 512]
        else:
            nlist = backend.nlist
            grid = sorted({min(2**e, nlist) for e in range(0, 12)})
        trace: list[list[float]] = []
        best = grid[-1]
        for value in grid:
            backend.set_search_params({knob: value})
            _, approx = backend.search(xq, truth.shape[1])
            rec = recall_at_k(approx, truth, RECALL_K, self_pos=self_rows)
            logger.debug("%s %s=%d: recall@10 %.4f", self._kind, knob, value, rec)
            trace.append([value, round(rec, 4)])
            if rec >= p["target_recall"]:
                best = value
                break
            if len(trace) > 1 and rec - trace[-2][1] < _PLATEAU_GAIN:  # quantization caps recall here
                best = int(trace[-2][0])
                break
        p[knob] = best
        backend.set_search_params(p)
        return trace


def _resolve(
    kind: Any, n: int, dim: int, dev: str, faiss_gpu: bool, params: Mapping[str, Any], normalize: bool
) -> tuple[str, dict[str, Any], str | None]:
    """(kind that runs, its params with defaults, faiss factory string or None) for a build request."""
    has_faiss = faiss_or_none() is not None
    on_cuda = dev.startswith("cuda")
    if not isinstance(kind, str) or not kind.strip():
        raise ValueError(
            f"kind must be one of {KINDS} or a FAISS index_factory string (e.g. 'IVF4096,SQ8'), got {kind!r}"
        )
    kind = kind.strip()
    if kind == "auto":
        kind = auto_kind(n, dim, on_cuda=on_cuda, faiss_gpu=faiss_gpu, has_faiss=has_faiss)
    if kind != "torch" and kind != "flat" and not has_faiss:
        raise ValueError(
            f"kind {kind!r} needs faiss, which is not importable; `pip install 'llmrec[cpu]'` "
            f"(faiss-cpu; or 'llmrec[gpu]': faiss-gpu), or use kind 'flat'/'torch' (exact search in torch)"
        )
    if kind == "flat" and not has_faiss:
        logger.warning("faiss is not importable: using the exact torch index instead of faiss flat")
        kind = "torch"
    elif kind == "flat" and on_cuda and not faiss_gpu:
        logger.info("faiss sees no GPU on %s: using the exact torch index on the GPU", dev)
        kind = "torch"
    elif kind == "hnsw" and on_cuda:
        logger.info("faiss has no GPU HNSW: the hnsw index runs on the CPU")
    defaults = _DEFAULTS[kind] if is_named(kind) else _DEFAULTS["factory"]
    unknown = set(params) - set(defaults)
    if unknown:
        raise ValueError(f"unknown params {sorted(unknown)} for kind {kind!r}; valid: {sorted(defaults)}")
    p = {**defaults, **params, "normalize": bool(normalize)}
    if kind == "torch":
        return kind, p, None
    if kind == "flat":
        return kind, p, "Flat"
    if kind == "hnsw":
        return kind, p, f"HNSW{int(p['M'])}"
    if kind == "ivf":
        nlist = int(p["nlist"] or max(1, min(int(np.sqrt(n)), n // 39)))
        if nlist > n:
            raise ValueError(f"ivf nlist {nlist} > {n} items; pass a smaller nlist or use kind 'flat'")
        p["nlist"] = nlist
        return kind, p, f"IVF{nlist},Flat"
    check_factory(kind, dim)  # a clear error for strings faiss refuses, before any data is read
    return kind, p, kind


def _empty_faiss(kind: str, factory: str | None, p: Mapping[str, Any], n: int, dim: int) -> Any:
    """The untrained, empty CPU faiss index for `factory` (inner product)."""
    faiss = faiss_or_none()
    index = (
        check_factory(factory, dim)
        if not is_named(kind)
        else faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    )
    if kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = int(p["ef_construction"])
    core = faiss.downcast_index(faiss.try_extract_index_ivf(index) or index)
    if getattr(core, "do_polysemous_training", False):
        # faiss's default for 8-bit PQ: minutes of annealing that only polysemous search (polysemous_ht,
        # never set here) uses; the codebooks and the recall are the same without it
        core.do_polysemous_training = False
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        if ivf.nlist > n:
            raise ValueError(
                f"index kind {kind!r} has {ivf.nlist} IVF lists for {n} items; an IVF needs at least as many "
                f"items as lists (39 per list for good k-means): use IVF{max(1, n // 39)} or fewer, or kind "
                f"'flat' / 'hnsw'"
            )
        ivf.cp.niter = 10  # k-means quality for IVF saturates early; nprobe tuning covers the rest
    return index


def _train_size(index: Any, p: Mapping[str, Any], n: int) -> int:
    """Rows the quantizer trains on: params["train_size"] or max(100k, 64 per IVF list), at most n."""
    if p.get("train_size"):
        size = int(p["train_size"])
    else:
        ivf = faiss_or_none().try_extract_index_ivf(index)
        size = max(_TRAIN_MIN_ROWS, _TRAIN_ROWS_PER_LIST * (ivf.nlist if ivf is not None else 0))
    return max(1, min(n, size))


def _train(index: Any, kind: str, xt: np.ndarray, n: int) -> None:
    t0 = time.perf_counter()
    try:
        index.train(np.ascontiguousarray(xt, dtype=np.float32))
    except RuntimeError as e:
        raise ValueError(
            f"training the {kind!r} index on {len(xt)} of {n} items failed ({faiss_error_reason(e)}); the "
            f"kind needs more items than this catalog has (fewer IVF lists, a smaller PQ), or use kind "
            f"'flat' / 'hnsw'"
        ) from None
    logger.info(
        "trained the %s quantizer on %d of %d items in %.1fs", kind, len(xt), n, time.perf_counter() - t0
    )


def _query_split(n: int, n_tune: int, n_check: int) -> tuple[int, int]:
    """(tuning queries, recall queries): disjoint, their sum at most n (a third tune when n is small)."""
    if n_tune + n_check <= n:
        return n_tune, n_check
    tune = min(n_tune, max(1, n // 3)) if n_tune else 0
    return tune, min(n_check, n - tune)


def _gather_rows(
    batches: Batches, row_sets: Sequence[np.ndarray], n: int, dim: int, normalize: bool
) -> list[np.ndarray]:
    """For each array of stream offsets in `row_sets`, float32 (len(rows), D) of those rows in that order;
    one pass over the chunks, nothing else held."""
    outs = [np.empty((len(rows), dim), dtype=np.float32) for rows in row_sets]
    orders = [np.argsort(rows, kind="stable") for rows in row_sets]
    sorted_rows = [rows[o] for rows, o in zip(row_sets, orders, strict=True)]
    seen = 0
    for _, chunk in batches():
        m = len(chunk)
        for out, order, srt in zip(outs, orders, sorted_rows, strict=True):
            lo, hi = np.searchsorted(srt, [seen, seen + m])
            if hi > lo:
                out[order[lo:hi]] = _prep(np.asarray(chunk)[srt[lo:hi] - seen], dim, normalize)
        seen += m
    if seen != n:
        raise ValueError(
            f"the batches yielded {seen} items, n_items says {n}; the embeddings changed while indexing or "
            f"their meta.json is stale (re-run `llmrec embed`)"
        )
    return outs


def _prep(x: Any, dim: int, normalize: bool) -> np.ndarray:
    a = _as_matrix(x, "vectors")
    if a.shape[1] != dim:
        raise ValueError(f"vectors have dim {a.shape[1]}, expected {dim} (the embeddings' meta.json says so)")
    return _l2_normalize(a) if normalize else a


def _as_matrix(x: Any, name: str, allow_1d: bool = False) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a float array (N, D), got {type(x).__name__}: {e}") from None
    if a.ndim == 1 and allow_1d:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{name} must be a 2-d float array (N, D) with D >= 1, got shape {a.shape}")
    if not np.isfinite(a).all():
        bad = int((~np.isfinite(a)).any(axis=1).sum())
        raise ValueError(f"{name} has {bad} rows with NaN or inf; fix the embeddings (re-run `llmrec embed`)")
    return np.ascontiguousarray(a)


def _as_ids(item_ids: Any, n: int) -> list[str]:
    ids = list(item_ids.tolist() if isinstance(item_ids, np.ndarray) else item_ids)
    if len(ids) != n:
        raise ValueError(f"got {len(ids)} item ids for {n} vectors; pass one id per row")
    bad = [i for i in ids if not isinstance(i, str) or not i]
    if bad:
        raise ValueError(
            f"item ids must be non-empty strings, got {len(bad)} others, e.g. {bad[:5]!r}; "
            f"convert them with str()"
        )
    if len(set(ids)) != n:
        seen: set[str] = set()
        dup = [i for i in ids if i in seen or seen.add(i)]
        raise ValueError(f"{len(dup)} duplicate item ids, e.g. {dup[:5]}; item ids must be unique")
    return ids


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError(f"{int((norms == 0).sum())} zero vectors cannot be L2-normalised")
    return (x / norms).astype(np.float32)


