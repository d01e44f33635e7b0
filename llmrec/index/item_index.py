"""ItemIndex: top-k inner-product retrieval over item vectors, FAISS (flat / HNSW / IVF) with a torch twin.

Kinds (`ItemIndex.build(..., kind=...)`):
- "flat": exact `IndexFlatIP` (faiss GPU `GpuIndexFlatIP` when `device` is CUDA and faiss sees a GPU).
- "hnsw": `IndexHNSWFlat` (inner product), M=32, efConstruction=40; efSearch is tuned at build time on a
  sample of catalog items (exact search as reference) to the smallest value in 64..512 that reaches
  `target_recall` (default 0.97) @10. faiss has no GPU HNSW, so it always runs on the CPU.
- "ivf": `IndexIVFFlat` (inner product), nlist ~ sqrt(N) (at least 39 items per list), k-means with 10
  iterations on at most 64 x nlist items; nprobe is tuned the same way (smallest power of two reaching
  `target_recall`). Moved to faiss GPU when available.
- "torch": exact `q @ X.T` + `topk` in torch, chunked over items so 1M x 384 fits (fp16 on CUDA, fp32 on
  CPU). It stands in wherever faiss (or faiss-gpu) is missing.
- "auto": on CUDA, "flat" on faiss GPU if faiss sees a GPU, else "torch" on CUDA; on CPU, "flat" below
  `AUTO_FLAT_MAX_ITEMS` items and "hnsw" above.

Choices where docs/design.md is silent:
- Vectors are indexed as given and the score is the raw inner product. They are expected to be
  L2-normalised (so the score is the cosine); non-unit vectors are accepted with a logged warning, or
  normalised when `normalize=True`. Queries are never normalised (ranking does not depend on their norm).
- A float32 copy of every vector is kept next to the index (`vectors_for`, `vector`, recall checks,
  rebuilds); it grows by doubling so `add` of one item is amortised O(D).
- `exclude` names item ids to drop per query; ids that are not in the index are ignored (excluding what is
  not there is a no-op). Results are over-fetched by the longest exclusion list, then filtered.
- Missing results (fewer than k items, or filtered out) are padded with item id "" and score -inf.
- `search` and `add` hold one lock, so a serving actor may call them from several threads.
- After a fallback (no faiss, or no faiss GPU) `.kind` is the kind that actually runs ("torch").
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from llmrec.artifacts import ArtifactError, check_compatible, read_meta, write_meta
from llmrec.schema import INDEX_FILE, INDEX_IDS_FILE, INDEX_TORCH_FILE

logger = logging.getLogger(__name__)

__all__ = ["AUTO_FLAT_MAX_ITEMS", "KINDS", "IndexKind", "ItemIndex", "recall_at_k"]

IndexKind = Literal["auto", "flat", "hnsw", "ivf", "torch"]
KINDS = ("auto", "flat", "hnsw", "ivf", "torch")
FAISS_KINDS = ("flat", "hnsw", "ivf")
AUTO_FLAT_MAX_ITEMS = 50_000  # "auto" picks exact flat search below this many items, HNSW above
_TUNE_QUERIES = 500  # catalog items used as queries when tuning efSearch / nprobe
_DEFAULTS: dict[str, dict[str, Any]] = {
    "flat": {},
    "hnsw": {"M": 32, "ef_construction": 40, "ef_search": None, "target_recall": 0.97},
    "ivf": {"nlist": None, "nprobe": None, "target_recall": 0.97},
    "torch": {"chunk_elems": 1 << 26},  # max (queries x items) scores held at once, 256 MiB in fp32
}


class ItemIndex:
    """Top-k inner-product search over item vectors, keyed by string item ids.

    Build with `ItemIndex.build` or `ItemIndex.load`, not the constructor.

    Example::

        idx = ItemIndex.build(np.eye(3, dtype=np.float32), ["a", "b", "c"], kind="flat")
        scores, ids = idx.search(np.eye(3, dtype=np.float32)[:1], k=2)  # ids[0, 0] == "a"
    """

    def __init__(
        self,
        kind: str,
        backend: _Backend,
        vectors: np.ndarray,
        item_ids: Sequence[str],
        params: dict[str, Any],
        device: str,
        embed_meta: Mapping[str, Any] | None = None,
    ) -> None:
        self._kind = kind
        self._backend = backend
        self._dim = int(vectors.shape[1])
        self._buf = np.ascontiguousarray(vectors, dtype=np.float32)  # capacity >= n rows, grows by doubling
        self._n = int(vectors.shape[0])
        self._ids: list[str] = list(item_ids)
        self._pos: dict[str, int] = {iid: i for i, iid in enumerate(self._ids)}
        self._ids_arr: np.ndarray | None = None
        self.params = params
        self.device = device
        self.embed_meta: dict[str, Any] | None = dict(embed_meta) if embed_meta else None
        self._lock = threading.RLock()
        if isinstance(backend, _TorchBackend) and backend.device.type == "cpu":
            backend.share_host(lambda: self._buf[: self._n])

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
        **params: Any,
    ) -> ItemIndex:
        """Index `vectors` (N, D) under `item_ids` (N,) for inner-product search.

        Args:
            vectors: float array (N, D), N >= 1, ideally L2-normalised rows.
            item_ids: N unique non-empty strings, row order of `vectors`.
            kind: "auto" | "flat" | "hnsw" | "ivf" | "torch" (see the module docstring).
            device: "auto" | "cpu" | "cuda[:i]" (resolved by `llmrec.device.resolve_device`).
            normalize: L2-normalise the rows before indexing.
            embed_meta: the embeddings meta the vectors come from (named in errors, written by `save`).
            **params: kind parameters: hnsw `M`, `ef_construction`, `ef_search`, `target_recall`;
                ivf `nlist`, `nprobe`, `target_recall`; torch `chunk_elems`.

        Returns:
            the index; `.kind` is the kind that runs (after "auto" and fallbacks).

        Raises:
            ValueError: bad shapes, non-finite values, duplicate/empty ids, unknown kind or params, or
                "hnsw"/"ivf" asked for without faiss installed.
        """
        from llmrec.device import faiss_num_gpus, resolve_device

        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        xb = _as_matrix(vectors, "vectors")
        if isinstance(vectors, np.ndarray) and np.may_share_memory(xb, vectors):
            xb = xb.copy()  # the index keeps its own copy: later edits of the caller's array change nothing
        if xb.shape[0] == 0:
            raise ValueError("vectors is empty (0 rows); an index needs at least one item")
        ids = _as_ids(item_ids, xb.shape[0])
        if normalize:
            xb = _l2_normalize(xb)
        else:
            _warn_if_not_unit(xb)
        dev = resolve_device(device)
        on_cuda = dev.startswith("cuda")
        faiss_gpu = on_cuda and faiss_num_gpus() > 0
        has_faiss = _faiss() is not None
        if kind == "auto":
            if on_cuda:
                kind = "flat" if faiss_gpu else "torch"
            else:
                kind = "flat" if xb.shape[0] < AUTO_FLAT_MAX_ITEMS else "hnsw"
        if kind in ("hnsw", "ivf") and not has_faiss:
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
        unknown = set(params) - set(_DEFAULTS[kind])
        if unknown:
            raise ValueError(
                f"unknown params {sorted(unknown)} for kind {kind!r}; valid: {sorted(_DEFAULTS[kind])}"
            )
        p = {**_DEFAULTS[kind], **params, "normalize": bool(normalize)}
        t0 = time.perf_counter()
        if kind == "torch":
            backend: _Backend = _TorchBackend(xb, dev, int(p["chunk_elems"]))
        else:
            backend = _FaissBackend.create(kind, xb, p, gpu_device=dev if faiss_gpu else None)
        idx = cls(kind, backend, xb, ids, p, dev, embed_meta)
        if kind in ("hnsw", "ivf"):
            idx._tune(p)
        logger.info(
            "built %s index over %d x %d on %s in %.2fs (params %s)",
            kind,
            xb.shape[0],
            xb.shape[1],
            dev,
            time.perf_counter() - t0,
            idx.params,
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
            device: "auto" | "cpu" | "cuda[:i]". A faiss index moves to faiss GPU when faiss sees one; a
                "flat" index on CUDA without faiss GPU is served by the torch kind.

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
        if kind not in KINDS or kind == "auto" or not isinstance(dim, int) or not isinstance(n, int):
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
        if kind == "torch":
            xb = np.load(data_path, allow_pickle=False)
            if xb.shape != (n, dim):
                raise ArtifactError(
                    f"{data_path}: shape {xb.shape}, meta.json says ({n}, {dim}); "
                    f"re-run `llmrec index --out {d}`"
                )
            xb = np.ascontiguousarray(xb, dtype=np.float32)
            backend: _Backend = _TorchBackend(xb, dev, int(params.get("chunk_elems", 1 << 26)))
        else:
            faiss = _faiss()
            if faiss is None:
                raise ArtifactError(
                    f"{d} holds a faiss {kind!r} index but faiss is not importable; "
                    f"`pip install 'llmrec[cpu]'` (or 'llmrec[gpu]'); or rebuild: `llmrec index --kind torch`"
                )
            index = faiss.read_index(str(data_path))
            if index.ntotal != n or index.d != dim:
                raise ArtifactError(
                    f"{data_path}: {index.ntotal} x {index.d} vectors, meta.json says "
                    f"{n} x {dim}; re-run `llmrec index --out {d}`"
                )
            xb = _reconstruct_all(index, kind)
            on_cuda = dev.startswith("cuda")
            if kind == "flat" and on_cuda and faiss_num_gpus() == 0:
                logger.info("faiss sees no GPU on %s: serving the flat index with the torch kind", dev)
                kind = "torch"
                params = dict(_DEFAULTS["torch"])
                backend = _TorchBackend(xb, dev, int(params["chunk_elems"]))
            else:
                gpu = dev if (on_cuda and kind != "hnsw" and faiss_num_gpus() > 0) else None
                backend = _FaissBackend(index, gpu_device=gpu)
                backend.set_search_params(kind, params)
        logger.info("loaded %s index %d x %d from %s in %.2fs", kind, n, dim, d, time.perf_counter() - t0)
        return cls(kind, backend, xb, [str(x) for x in ids], params, dev, embed)

    # ------------------------------------------------------------------ properties
    @property
    def kind(self) -> str:
        return self._kind

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
        """Read-only float32 view (N, D) of the indexed vectors, in index order."""
        v = self._buf[: self._n]
        v.flags.writeable = False
        return v

    def position(self, item_id: str) -> int:
        """Row of `item_id` in index order; KeyError naming the id when it is not indexed."""
        try:
            return self._pos[item_id]
        except KeyError:
            raise KeyError(f"item id {item_id!r} is not in the index ({self._n} items)") from None

    def vector(self, item_id: str) -> np.ndarray:
        """float32 (D,) copy of one item's vector."""
        return self._buf[self.position(item_id)].copy()

    def vectors_for(self, item_ids: Iterable[str]) -> np.ndarray:
        """float32 (M, D) copy of the vectors of `item_ids`; KeyError listing ids that are not indexed."""
        ids = list(item_ids)
        missing = [i for i in ids if i not in self._pos]
        if missing:
            raise KeyError(f"{len(missing)} of {len(ids)} item ids are not in the index, e.g. {missing[:5]}")
        return self._buf[[self._pos[i] for i in ids]] if ids else np.zeros((0, self._dim), np.float32)

    # ------------------------------------------------------------------ search / add
    def search(
        self, queries: np.ndarray, k: int, exclude: Sequence[Iterable[str]] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items by inner product for each query.

        Args:
            queries: float array (B, D) (a single (D,) vector is treated as B=1).
            k: results per query, >= 1.
            exclude: optional, B iterables of item ids to leave out of each query's results.

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
        excl: list[set[int]] | None = None
        if exclude is not None:
            if isinstance(exclude, str) or len(exclude) != b:
                raise ValueError(
                    f"exclude must hold one iterable of item ids per query ({b}), got "
                    f"{type(exclude).__name__} of length {len(exclude)}"
                )
            excl = [{self._pos[i] for i in ex if i in self._pos} for ex in exclude]
        with self._lock:
            n = self._n
            extra = max((len(e) for e in excl), default=0) if excl else 0
            kk = min(int(k) + extra, n)
            t0 = time.perf_counter()
            dist, pos = self._backend.search(xq, kk)  # (B, kk) float32, int64 rows (-1 = none)
        id_arr = self.item_ids
        if (
            not (excl and any(excl)) and kk >= k and (pos >= 0).all()
        ):  # the common case: no filtering, no padding
            return dist[:, :k].copy(), id_arr[pos[:, :k]]
        scores = np.full((b, k), -np.inf, dtype=np.float32)
        out_ids = np.full((b, k), "", dtype=object)
        for r in range(b):
            keep = pos[r] >= 0
            if excl and excl[r]:
                keep &= ~np.isin(pos[r], list(excl[r]))
            p = pos[r][keep][:k]
            scores[r, : len(p)] = dist[r][keep][:k]
            out_ids[r, : len(p)] = id_arr[p]
        logger.debug(
            "searched %d queries (k=%d, fetched %d) in %.1f ms", b, k, kk, 1e3 * (time.perf_counter() - t0)
        )
        return scores, out_ids

    def add(self, item_ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add items; they are searchable as soon as this returns (no rebuild).

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
            need = self._n + xa.shape[0]
            if need > self._buf.shape[0]:
                grown = np.empty((max(need, 2 * self._buf.shape[0]), self._dim), dtype=np.float32)
                grown[: self._n] = self._buf[: self._n]
                self._buf = grown
            self._buf[self._n : need] = xa
            for j, iid in enumerate(ids):
                self._pos[iid] = self._n + j
            self._ids.extend(ids)
            self._n = need
        logger.info(
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

        `embed_meta` (default: the one given to build/load) is stored under "embed"; `extra` adds meta keys.
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
            if self._kind == "torch":
                _atomic(out / INDEX_TORCH_FILE, lambda p: np.save(p, self._buf[: self._n]))
                stale = out / INDEX_FILE
            else:
                faiss = _faiss()
                cpu_index = self._backend.cpu_index()
                _atomic(out / INDEX_FILE, lambda p: faiss.write_index(cpu_index, str(p)))
                stale = out / INDEX_TORCH_FILE
            _atomic(out / INDEX_IDS_FILE, lambda p: np.save(p, ids))
            if stale.exists():  # a previous index of the other family in the same folder
                stale.unlink()
            meta = write_meta(
                out,
                "index",
                kind=self._kind,
                dim=self._dim,
                metric="ip",
                n_items=self._n,
                embed=embed,
                params=self.params,
                **extra,
            )
        self.embed_meta = embed or None
        logger.info("saved %s index (%d items) to %s", self._kind, self._n, out)
        return meta

    # ------------------------------------------------------------------ internals
    def _tune(self, p: dict[str, Any]) -> None:
        """Pick HNSW efSearch / IVF nprobe: the smallest value reaching p["target_recall"]@10 on a sample."""
        name, given = ("ef_search", p["ef_search"]) if self._kind == "hnsw" else ("nprobe", p["nprobe"])
        if given is not None:
            self._backend.set_search_params(self._kind, p)
            return
        if self._kind == "hnsw":
            grid = [64, 128, 256, 512]
        else:
            nlist = int(p["nlist"])
            grid = sorted({min(2**e, nlist) for e in range(0, 12)})
        n, k = self._n, 10
        rng = np.random.default_rng(0)
        sample = rng.choice(n, size=min(_TUNE_QUERIES, n), replace=False)
        xq = self._buf[sample]
        kk = min(k + 1, n)
        _, exact = exact_topk(self._buf[: self._n], xq, kk)
        best = grid[-1]
        for value in grid:
            self._backend.set_search_params(self._kind, {**p, name: value})
            _, approx = self._backend.search(xq, kk)
            rec = recall_at_k(approx, exact, k, self_pos=sample)
            logger.debug("%s %s=%d: recall@10 %.4f", self._kind, name, value, rec)
            if rec >= p["target_recall"]:
                best = value
                break
        p[name] = best
        self.params = p
        self._backend.set_search_params(self._kind, p)


class _Backend:
    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:  # (B, k) f32, (B, k) i64
        raise NotImplementedError

    def add(self, xa: np.ndarray) -> None:
        raise NotImplementedError

    def set_search_params(self, kind: str, p: Mapping[str, Any]) -> None:
        pass

    def cpu_index(self) -> Any:
        raise NotImplementedError


class _FaissBackend(_Backend):
    def __init__(self, index: Any, gpu_device: str | None = None) -> None:
        self._res = None
        if gpu_device is not None:
            faiss = _faiss()
            self._res = faiss.StandardGpuResources()
            dev_id = int(gpu_device.split(":")[1]) if ":" in gpu_device else 0
            index = faiss.index_cpu_to_gpu(self._res, dev_id, index)
        self.index = index

    @classmethod
    def create(cls, kind: str, xb: np.ndarray, p: dict[str, Any], gpu_device: str | None) -> _FaissBackend:
        faiss = _faiss()
        n, d = xb.shape
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, int(p["M"]), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(p["ef_construction"])
            gpu_device = None
        else:
            nlist = int(p["nlist"] or max(1, min(int(np.sqrt(n)), n // 39)))
            if nlist > n:
                raise ValueError(f"ivf nlist {nlist} > {n} items; pass a smaller nlist or use kind 'flat'")
            p["nlist"] = nlist
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.cp.niter = 10  # k-means quality for IVF saturates early; nprobe tuning covers the rest
            train = xb
            if n > 64 * nlist:  # bounded training cost: 64 points per list is plenty for a coarse quantizer
                train = xb[np.random.default_rng(0).choice(n, 64 * nlist, replace=False)]
            index.train(train)
        backend = cls(index, gpu_device=gpu_device)
        backend.add(xb)
        return backend

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._res is not None and k > 2048:
            raise ValueError(
                f"faiss GPU returns at most 2048 results per query, asked for {k} (k plus the longest "
                f"exclude list); lower k / shorten exclude, or load the index with device='cpu'"
            )
        dist, pos = self.index.search(np.ascontiguousarray(xq, dtype=np.float32), k)
        return dist.astype(np.float32, copy=False), pos.astype(np.int64, copy=False)

    def add(self, xa: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(xa, dtype=np.float32))

    def set_search_params(self, kind: str, p: Mapping[str, Any]) -> None:
        if kind == "hnsw" and p.get("ef_search"):
            self.index.hnsw.efSearch = int(p["ef_search"])
        elif kind == "ivf" and p.get("nprobe"):
            self.index.nprobe = int(p["nprobe"])

    def cpu_index(self) -> Any:
        return _faiss().index_gpu_to_cpu(self.index) if self._res is not None else self.index


class _TorchBackend(_Backend):
    """Exact matmul + topk. On CUDA the items live on the GPU (fp16) in a buffer that grows by doubling; on
    the CPU the backend reads the owning ItemIndex's float32 buffer (`share_host`), so vectors are held once.
    """

    def __init__(self, xb: np.ndarray, device: str, chunk_elems: int) -> None:
        import torch

        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.chunk_elems = chunk_elems
        self.n = xb.shape[0]
        self.host: Any = None
        self.buf = torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32)).to(self.device, self.dtype)

    def share_host(self, view: Any) -> None:
        """Search `view()` (the owner's (N, D) float32 rows) instead of a copy; CPU only."""
        assert self.device.type == "cpu", "share_host is for the CPU torch backend"
        self.host, self.buf = view, None

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        xb = self.host() if self.host is not None else self.buf[: self.n]
        return exact_topk(xb, xq, k, chunk_elems=self.chunk_elems)

    def add(self, xa: np.ndarray) -> None:
        import torch

        if self.host is not None:  # the owner appends to the shared buffer right after this call
            return
        new = torch.from_numpy(np.ascontiguousarray(xa, dtype=np.float32)).to(self.device, self.dtype)
        need = self.n + new.shape[0]
        if need > self.buf.shape[0]:
            grown = torch.empty(
                (max(need, 2 * self.buf.shape[0]), self.buf.shape[1]), dtype=self.dtype, device=self.device
            )
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : need] = new
        self.n = need


def exact_topk(xb: Any, xq: np.ndarray, k: int, chunk_elems: int = 1 << 26) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner product of `xq` (B, D) against `xb` (N, D) (numpy or torch, any device).

    Chunked over items and queries so at most ~`chunk_elems` scores exist at once; 1M x 384 fits.

    Returns:
        scores float32 (B, k) descending, rows int64 (B, k); k is capped at N.
    """
    import torch

    if isinstance(xb, np.ndarray):
        with warnings.catch_warnings():  # a read-only view (ItemIndex.vectors) is fine: it is never written
            warnings.simplefilter("ignore", UserWarning)
            xb_t = torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32))
    else:
        xb_t = xb
    n = xb_t.shape[0]
    k = min(k, n)
    q_all = torch.from_numpy(np.ascontiguousarray(xq, dtype=np.float32)).to(xb_t.device, xb_t.dtype)
    qb = max(1, min(q_all.shape[0], 4096))
    cb = max(k, min(n, chunk_elems // qb))
    out_s, out_i = [], []
    with torch.inference_mode():
        for q0 in range(0, q_all.shape[0], qb):
            q = q_all[q0 : q0 + qb]  # (b, D)
            cand_s, cand_i = [], []
            for c0 in range(0, n, cb):
                s = q @ xb_t[c0 : c0 + cb].T  # (b, C)
                top = s.topk(min(k, s.shape[1]), dim=1)
                cand_s.append(top.values.float())
                cand_i.append(top.indices + c0)
            s_all, i_all = torch.cat(cand_s, 1), torch.cat(cand_i, 1)  # (b, chunks * k)
            top = s_all.topk(k, dim=1)
            out_s.append(top.values.cpu())
            out_i.append(i_all.gather(1, top.indices).cpu())
    return torch.cat(out_s).numpy().astype(np.float32), torch.cat(out_i).numpy().astype(np.int64)


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int, self_pos: np.ndarray | None = None) -> float:
    """Mean |approx top-k ∩ exact top-k| / k over rows of (B, >=k) result rows (-1 = none).

    With `self_pos` (B,), each query's own row is dropped from both lists first (a catalog item used as a
    query finds itself trivially), so pass k+1 columns.
    """
    hits, total = 0, 0
    for r in range(exact.shape[0]):
        a, e = approx[r], exact[r]
        if self_pos is not None:
            a, e = a[a != self_pos[r]], e[e != self_pos[r]]
        e = e[e >= 0][:k]
        hits += len(np.intersect1d(a[a >= 0][:k], e))
        total += len(e)
    return hits / total if total else 1.0


def _faiss() -> Any:
    from llmrec.device import import_faiss

    return import_faiss()  # None without faiss; FaissConflictError with two faiss builds installed


def _reconstruct_all(index: Any, kind: str) -> np.ndarray:
    if index.ntotal == 0:
        return np.zeros((0, index.d), np.float32)
    if kind == "ivf":
        index.make_direct_map()
        xb = index.reconstruct_n(0, index.ntotal)
        index.set_direct_map_type(_faiss().DirectMap.NoMap)
        return np.ascontiguousarray(xb, dtype=np.float32)
    return np.ascontiguousarray(index.reconstruct_n(0, index.ntotal), dtype=np.float32)


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


def _warn_if_not_unit(x: np.ndarray) -> None:
    dev = np.abs(np.linalg.norm(x, axis=1) - 1.0)
    if (dev > 1e-3).any():
        logger.warning(
            "%d of %d vectors are not L2-normalised (max |norm-1| %.3g): scores are raw inner "
            "products; pass normalize=True for cosine",
            int((dev > 1e-3).sum()),
            len(x),
            dev.max(),
        )


def _atomic(path: Path, write: Any) -> None:
    """Write via `write(tmp_path)` then rename (tmp keeps the suffix, so np.save appends nothing)."""
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    write(tmp)
    os.replace(tmp, path)
