"""The one place that asks torch and faiss about accelerators."""

from __future__ import annotations

import functools
import os
from types import ModuleType
from typing import Literal

DeviceArg = Literal["auto", "cpu", "cuda"] | str


def resolve_device(device: DeviceArg = "auto") -> str:
    """Map "auto" | "cpu" | "cuda" | "cuda:i" to a torch device string.

    "auto" gives cuda:LOCAL_RANK when CUDA is available (Ray Train sets LOCAL_RANK), else "cpu".
    """
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
        return "cpu"
    if device == "cpu":
        return "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu or auto"
            )
        return device
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:i', got {device!r}")


def num_gpus() -> int:
    """CUDA GPUs torch can see on this process (0 without torch CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# pip distributions that install the `faiss` module; two in one environment overwrite each other's files
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss")


class FaissConflictError(ImportError):
    """More than one faiss distribution is installed: the `faiss` module is whichever was written last."""


@functools.lru_cache(maxsize=1)
def installed_faiss_distributions() -> tuple[str, ...]:
    """The FAISS_DISTRIBUTIONS installed in this environment (by their metadata, without importing faiss).

    Cached: the environment does not change under a running process (`.cache_clear()` re-reads it).
    """
    from importlib.metadata import PackageNotFoundError, distribution

    found = []
    for name in FAISS_DISTRIBUTIONS:
        try:
            distribution(name)
        except PackageNotFoundError:
            continue
        found.append(name)
    return tuple(found)


def import_faiss() -> ModuleType | None:
    """The `faiss` module, or None when no faiss is installed (callers fall back to the torch index).

    Raises:
        FaissConflictError: two faiss distributions are installed (e.g. `llmrec[cpu,gpu]`, or faiss-cpu next
            to faiss-gpu): their files overwrite each other, so which build runs is an accident; uninstall
            all and install one extra.
    """
    dists = installed_faiss_distributions()
    if len(dists) > 1:
        raise FaissConflictError(
            f"several faiss builds are installed ({', '.join(dists)}); they share the `faiss` module and "
            f"overwrite each other: pip uninstall -y {' '.join(dists)}, then install one: "
            "pip install 'llmrec[cpu]' (faiss-cpu) or 'llmrec[gpu]' (faiss-gpu, CUDA 12 on Linux x86_64)"
        )
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def faiss_num_gpus() -> int:
    """GPUs faiss can use (0 for faiss-cpu or no faiss)."""
    faiss = import_faiss()
    if faiss is None:
        return 0
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0
