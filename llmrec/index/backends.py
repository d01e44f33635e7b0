"""What runs under `ItemIndex`: a faiss index or exact torch top-k, plus the exact search every check uses.

- `FaissBackend`: any faiss index (named kinds and factory strings). Exclusions go to faiss as an
  `IDSelectorNot(IDSelectorBatch(rows))` in the search parameters (`SearchParametersIVF` with the index's
  nprobe, `SearchParametersHNSW` with its efSearch, plain `SearchParameters` otherwise), one faiss call per
  query that excludes something; indexes that refuse search parameters (faiss GPU, `Refine`, flat `PQ`)
  fall back to over-fetching k + |exclusions| and filtering, logged once.
- `TorchBackend`: exact matmul + topk over a host float32 buffer (and an fp16 copy on CUDA); exclusions
  set the excluded scores to -inf, so the result equals brute force over the remaining items.
- `exact_topk`, `recall_at_k`, `RunningTopK`: the exact reference (chunked, optionally excluding rows), the
  recall figure, and exact top-k over items that arrive in chunks (build-time recall without holding them).
Rows are positions in insertion order; -1 marks "no result".
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["FaissBackend", "RunningTopK", "TorchBackend", "exact_topk", "faiss_or_none", "recall_at_k"]

Exclude = Sequence[np.ndarray] | None  # per query, int64 rows to leave out (may be empty)
_GPU_MAX_K = 2048  # faiss GPU returns at most this many results per query


class FaissBackend:
    """A faiss index (CPU, or moved to faiss GPU) with its search knob ("nprobe" / "ef_search" / None)."""

    def __init__(self, index: Any, gpu_device: str | None = None) -> None:
        faiss = faiss_or_none()
        self.knob = _knob(index)
        self.values: dict[str, int] = {}
        self.nlist = 0  # IVF lists (0: not an IVF index)
        if self.knob == "nprobe":
            ivf = faiss.extract_index_ivf(index)
            self.values["nprobe"], self.nlist = int(ivf.nprobe), int(ivf.nlist)
        elif self.knob == "ef_search":
            self.values["ef_search"] = int(_core(index).hnsw.efSearch)
        self._res = None
        self._selector_ok: bool | None = None  # unknown until the first excluding search
        if gpu_device is not None and self.knob != "ef_search":  # faiss has no GPU HNSW
            try:
                res = faiss.StandardGpuResources()
                dev_id = int(gpu_device.split(":")[1]) if ":" in gpu_device else 0
                index = faiss.index_cpu_to_gpu(res, dev_id, index)
                self._res = res
            except (RuntimeError, AttributeError) as e:
                logger.info(
                    "faiss cannot move %s to the GPU (%s): it runs on the CPU", type(index).__name__, e
                )
        self.index = index

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    @property
    def on_gpu(self) -> bool:
        return self._res is not None

    def train(self, xt: np.ndarray) -> None:
        self.index.train(np.ascontiguousarray(xt, dtype=np.float32))

    def add(self, xa: np.ndarray) -> None:
        self.index.add(np.ascontiguousarray(xa, dtype=np.float32))

    def reserve(self, n: int) -> None:
        """Give flat code storage (Flat, HNSW's storage, SQ/PQ flat codes) capacity for n rows up front:
        chunked adds then fill it in place instead of doubling it (which peaks at 3x its size while it
        copies: 2.4 GB for a 1.5 GB flat index at 1M x 384)."""
        faiss = faiss_or_none()
        if self.on_gpu:
            return
        core = _core(self.index)
        store = faiss.downcast_index(core.storage) if hasattr(core, "storage") else core
        if isinstance(store, faiss.IndexFlatCodes) and store.ntotal == 0:
            store.codes.resize(int(n) * int(store.code_size))  # std::vector keeps the capacity ...
            store.codes.resize(0)  # ... when it shrinks back

    def set_search_params(self, p: Mapping[str, Any]) -> None:
        """Apply p["nprobe"] / p["ef_search"] (when set and the index has that knob)."""
        faiss = faiss_or_none()
        if self.knob is None or not p.get(self.knob):
            return
        space = faiss.GpuParameterSpace() if self.on_gpu else faiss.ParameterSpace()
        value = int(p[self.knob])
        space.set_index_parameter(self.index, "nprobe" if self.knob == "nprobe" else "efSearch", value)
        self.values[self.knob] = value

    def search(self, xq: np.ndarray, k: int, exclude: Exclude = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (B, k) float32 scores and int64 rows (-1 = none); `exclude[b]` rows never come back."""
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        if exclude is None:
            return self._search(xq, k)
        dist = np.full((len(xq), k), -np.inf, dtype=np.float32)
        pos = np.full((len(xq), k), -1, dtype=np.int64)
        plain = [r for r, e in enumerate(exclude) if len(e) == 0]
        if plain:
            dist[plain], pos[plain] = self._search(xq[plain], k)
        for r, e in enumerate(exclude):
            if len(e):
                dist[r], pos[r] = self._search_excluding(xq[r : r + 1], k, np.asarray(e, dtype=np.int64))
        return dist, pos

    def reconstruct(self, rows: np.ndarray) -> np.ndarray:
        """float32 (M, D) stored vectors of `rows`: exact for Flat/HNSW-Flat/IVF-Flat, decoded otherwise."""
        if len(rows) == 0:
            return np.zeros((0, self.index.d), np.float32)
        self._ensure_direct_map()
        return np.ascontiguousarray(self.index.reconstruct_batch(np.asarray(rows, dtype=np.int64)))

    def reconstruct_all(self) -> np.ndarray:
        if self.ntotal == 0:
            return np.zeros((0, self.index.d), np.float32)
        self._ensure_direct_map()
        return np.ascontiguousarray(self.index.reconstruct_n(0, self.ntotal), dtype=np.float32)

    def cpu_index(self) -> Any:
        return faiss_or_none().index_gpu_to_cpu(self.index) if self.on_gpu else self.index

    # ------------------------------------------------------------------ internals
    def _search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.on_gpu and k > _GPU_MAX_K:
            raise ValueError(
                f"faiss GPU returns at most {_GPU_MAX_K} results per query, asked for {k} (k, plus the "
                f"exclusions where faiss GPU cannot filter); lower k, or load the index with device='cpu'"
            )
        dist, pos = self.index.search(xq, k)
        return dist.astype(np.float32, copy=False), pos.astype(np.int64, copy=False)

    def _search_excluding(self, q: np.ndarray, k: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One query (1, D) with `rows` left out: an IDSelector where faiss takes one, else over-fetch."""
        faiss = faiss_or_none()
        if self._selector_ok is not False:
            batch = faiss.IDSelectorBatch(rows)  # kept referenced until the search returns
            sel = faiss.IDSelectorNot(batch)
            params = self._selector_params(sel)
            try:
                dist, pos = self.index.search(q, k, params=params)
                self._selector_ok = True
                return dist[0].astype(np.float32), pos[0].astype(np.int64)
            except RuntimeError as e:
                if self._selector_ok:  # it worked before: a real error, not a missing feature
                    raise
                self._selector_ok = False
                first = next((ln for ln in str(e).splitlines() if ln.strip()), "")
                logger.warning(
                    "faiss %s takes no IDSelector search parameters (%s): excluding by over-fetching",
                    type(self.index).__name__,
                    first[:120],
                )
        kk = min(k + len(rows), self.ntotal)
        dist, pos = self._search(q, kk)
        keep = (pos[0] >= 0) & ~np.isin(pos[0], rows)
        d, p = dist[0][keep][:k], pos[0][keep][:k]
        out_d = np.full(k, -np.inf, np.float32)
        out_p = np.full(k, -1, np.int64)
        out_d[: len(d)], out_p[: len(p)] = d, p
        return out_d, out_p

    def _selector_params(self, sel: Any) -> Any:
        faiss = faiss_or_none()
        if self.knob == "nprobe":  # IndexPreTransform hands these to the IVF inside it
            params = faiss.SearchParametersIVF()
            params.nprobe = self.values["nprobe"]
        elif self.knob == "ef_search":
            params = faiss.SearchParametersHNSW()
            params.efSearch = self.values["ef_search"]
        else:
            params = faiss.SearchParameters()
        params.sel = sel
        return params

    def _ensure_direct_map(self) -> None:
        """IVF kinds reconstruct through a direct map (8 bytes per item), made on first use, kept after."""
        if self.on_gpu:
            return
        faiss = faiss_or_none()
        ivf = faiss.try_extract_index_ivf(self.index)
        if ivf is not None and ivf.direct_map.type == faiss.DirectMap.NoMap:
            ivf.make_direct_map()


class TorchBackend:
    """Exact top-k over a host float32 buffer (the index itself; it grows by doubling) and, on CUDA, an fp16
    copy on the GPU that searches. The host copy stays on CUDA too: it is what `save` writes (index.npy),
    exactly, and what `reconstruct` returns."""

    def __init__(self, dim: int, capacity: int, device: str, chunk_elems: int) -> None:
        import torch

        self.device = torch.device(device)
        self.chunk_elems = int(chunk_elems)
        self.n = 0
        self.host = np.empty((max(1, capacity), dim), dtype=np.float32)
        self.gpu: Any = None
        if self.device.type == "cuda":
            self.gpu = torch.empty((max(1, capacity), dim), dtype=torch.float16, device=self.device)

    @classmethod
    def from_array(cls, xb: np.ndarray, device: str, chunk_elems: int) -> TorchBackend:
        backend = cls(xb.shape[1], xb.shape[0], device, chunk_elems)
        backend.add(xb)
        return backend

    @property
    def ntotal(self) -> int:
        return self.n

    def add(self, xa: np.ndarray) -> None:
        import torch

        need = self.n + len(xa)
        if need > self.host.shape[0]:
            grown = np.empty((max(need, 2 * self.host.shape[0]), self.host.shape[1]), dtype=np.float32)
            grown[: self.n] = self.host[: self.n]
            self.host = grown
        self.host[self.n : need] = xa
        if self.gpu is not None:
            if need > self.gpu.shape[0]:
                g = torch.empty(
                    (self.host.shape[0], self.host.shape[1]), dtype=self.gpu.dtype, device=self.device
                )
                g[: self.n] = self.gpu[: self.n]
                self.gpu = g
            self.gpu[self.n : need] = torch.from_numpy(np.ascontiguousarray(xa, np.float32)).to(
                self.device, self.gpu.dtype
            )
        self.n = need

    def search(self, xq: np.ndarray, k: int, exclude: Exclude = None) -> tuple[np.ndarray, np.ndarray]:
        xb = self.gpu[: self.n] if self.gpu is not None else self.host[: self.n]
        return exact_topk(xb, xq, k, chunk_elems=self.chunk_elems, exclude=exclude)

    def set_search_params(self, p: Mapping[str, Any]) -> None:
        pass

    def reconstruct(self, rows: np.ndarray) -> np.ndarray:
        return self.host[np.asarray(rows, dtype=np.int64)]

    def view(self) -> np.ndarray:
        v = self.host[: self.n]
        v.flags.writeable = False
        return v


class RunningTopK:
    """Exact top-k of fixed queries `xq` (B, D) over items fed in chunks; rows count from the first chunk."""

    def __init__(self, xq: np.ndarray, k: int) -> None:
        self.xq = np.ascontiguousarray(xq, dtype=np.float32)
        self.k = int(k)
        self.scores = np.full((len(xq), k), -np.inf, dtype=np.float32)  # (B, k) descending
        self.rows = np.full((len(xq), k), -1, dtype=np.int64)  # (B, k)
        self.n_seen = 0

    def update(self, xb: np.ndarray) -> None:
        """Fold in the next chunk of items (M, D)."""
        if len(self.xq) and len(xb):
            s, r = exact_topk(xb, self.xq, self.k, chunk_elems=1 << 24)  # (B, min(k, M)); 64 MiB of scores
            both_s = np.concatenate([self.scores, s], axis=1)
            both_r = np.concatenate([self.rows, r + self.n_seen], axis=1)
            order = np.argsort(-both_s, axis=1, kind="stable")[:, : self.k]  # earlier rows win ties
            self.scores = np.take_along_axis(both_s, order, 1)
            self.rows = np.take_along_axis(both_r, order, 1)
        self.n_seen += len(xb)


def exact_topk(
    xb: Any, xq: np.ndarray, k: int, chunk_elems: int = 1 << 26, exclude: Exclude = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner product of `xq` (B, D) against `xb` (N, D) (numpy or torch, any device).

    Chunked over items and queries so at most ~`chunk_elems` scores exist at once; 1M x 384 fits.
    `exclude[b]` (int64 rows) are left out of query b's results.

    Returns:
        scores float32 (B, k) descending, rows int64 (B, k); k is capped at N; rows are -1 (score -inf)
        where exclusions leave fewer than k items.
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
            ex = []
            if exclude is not None:
                ex = [
                    (j, torch.as_tensor(np.asarray(e, np.int64), device=xb_t.device))
                    for j, e in enumerate(exclude[q0 : q0 + qb])
                    if len(e)
                ]
            cand_s, cand_i = [], []
            for c0 in range(0, n, cb):
                s = q @ xb_t[c0 : c0 + cb].T  # (b, C)
                for j, e in ex:
                    s[j, e[(e >= c0) & (e < c0 + s.shape[1])] - c0] = -torch.inf
                top = s.topk(min(k, s.shape[1]), dim=1)
                cand_s.append(top.values.float())
                cand_i.append(top.indices + c0)
            s_all, i_all = torch.cat(cand_s, 1), torch.cat(cand_i, 1)  # (b, chunks * k)
            top = s_all.topk(k, dim=1)
            out_s.append(top.values.cpu())
            out_i.append(i_all.gather(1, top.indices).cpu())
    scores = torch.cat(out_s).numpy().astype(np.float32)
    rows = torch.cat(out_i).numpy().astype(np.int64)
    if exclude is not None:
        rows[np.isneginf(scores)] = -1
    return scores, rows


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


def faiss_or_none() -> Any:
    """The faiss module, or None when it is not importable (FaissConflictError with two faiss builds)."""
    from llmrec.device import import_faiss

    return import_faiss()


def _core(index: Any) -> Any:
    """The index under pre-transforms (PCA/OPQ) and refinement wrappers, downcast."""
    faiss = faiss_or_none()
    index = faiss.downcast_index(index)
    while True:
        if isinstance(index, faiss.IndexPreTransform):
            index = faiss.downcast_index(index.index)
        elif isinstance(index, faiss.IndexRefine):
            index = faiss.downcast_index(index.base_index)
        else:
            return index


def _knob(index: Any) -> str | None:
    """The search-time knob tuning turns: "nprobe" (IVF), "ef_search" (HNSW) or None (nothing to tune)."""
    faiss = faiss_or_none()
    if faiss.try_extract_index_ivf(index) is not None:
        return "nprobe"
    return "ef_search" if hasattr(_core(index), "hnsw") else None
