"""Device choice, precision and seeding shared by training and prediction."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from cellp2p.errors import CellP2PError

DEVICES = ("auto", "cpu", "cuda", "mps")
# fp16 would need loss scaling (GradScaler); bf16 has fp32 range and needs none.
PRECISIONS = ("auto", "fp32", "bf16")


def select_device(name: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU for ``auto``; an explicit device must exist."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise CellP2PError(f"--device {name!r} unknown; use one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CellP2PError("--device cuda: no CUDA GPU is visible here; use --device auto or cpu")
    if name == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise CellP2PError("--device mps: MPS is not available here; use --device auto or cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 on CUDA (tensor cores, no loss scaling needed) and fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise CellP2PError(f"--precision {precision!r} unknown; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for the precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    # Training crops have one size: cuDNN may time its kernels once and keep the fastest
    # (CUDA only; not measured here, no GPU; off for --deterministic, whose choice must not vary).
    torch.backends.cudnn.benchmark = not deterministic
