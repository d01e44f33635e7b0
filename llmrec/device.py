"""The one place that asks torch and faiss about accelerators."""

from __future__ import annotations

import os
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
            raise ValueError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu or auto")
        return device
    raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:i', got {device!r}")


def num_gpus() -> int:
    """CUDA GPUs torch can see on this process (0 without torch CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def faiss_num_gpus() -> int:
    """GPUs faiss can use (0 for faiss-cpu or no faiss)."""
    try:
        import faiss
    except ImportError:
        return 0
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get else 0
