"""Device choice, precision and seeding shared by training and prediction."""

from __future__ import annotations

import contextlib
import os
import random
import re

import numpy as np
import torch

from cellp2p.errors import CellP2PError

DEVICES = ("auto", "cpu", "cuda", "mps")
# fp16 would need loss scaling (GradScaler); bf16 has fp32 range and needs none.
PRECISIONS = ("auto", "fp32", "bf16")


def check_device(name: str) -> str:
    """A device name cellp2p knows (auto, cpu, cuda, cuda:N, mps), without probing hardware."""
    if name not in DEVICES and not re.fullmatch(r"cuda:\d+", str(name)):
        raise CellP2PError(f"--device {name!r} unknown; use one of {', '.join(DEVICES)}")
    return name


def select_device(name: str = "auto") -> torch.device:
    """CUDA, then MPS, then CPU for ``auto``; an explicit device must exist."""
    check_device(name)
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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware: CUDA GPUs (tensor cores), and
    CPUs with Intel AMX tiles (Xeon 4th generation, Sapphire Rapids, and later), where oneDNN
    runs bf16 convolutions 2–2.8x faster than fp32 (benchmarks/RESULTS.md). Other CPUs
    emulate bf16, which is slower than fp32."""
    if device.type == "cuda":
        return True
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch >= 2.3
    return device.type == "cpu" and probe is not None and bool(probe())


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` is bf16 where the device computes it natively (:func:`native_bf16`; bf16 keeps
    fp32's range, so no loss scaling is needed), fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise CellP2PError(f"--precision {precision!r} unknown; use one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
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


def memory_bytes(device: torch.device | None = None) -> int | None:
    """Memory a run on ``device`` can use: free GPU memory on CUDA, else the host's available
    memory (``MemAvailable``, else free pages from ``os.sysconf``); None when unknown."""
    if device is not None and device.type == "cuda":
        with contextlib.suppress(RuntimeError, AssertionError):
            return int(torch.cuda.mem_get_info(device)[0])
        return None
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/meminfo") as fh:
            line = next(ln for ln in fh if ln.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError, AttributeError):
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    return None


def check_batch_memory(
    batch_size: int, crop: int, channels: int, features: int, device: torch.device
) -> None:
    """Refuse a batch that cannot fit, before any of it is drawn (not minutes of swapping later).

    The estimate is a lower bound: each step holds at least the batch's input and target crops
    (``channels``) and, forward and backward, the first layer's ``features`` maps, in float32.
    """
    need = batch_size * crop * crop * (channels + 2 * features) * 4
    have = memory_bytes(device)
    if have is not None and need > have:
        raise CellP2PError(
            f"--batch-size {batch_size} with --crop {crop}: a training step needs at least "
            f"{_size(need)} but {_size(have)} is available on {device.type}; use a smaller "
            "--batch-size or --crop"
        )


def _size(n: float) -> str:
    """Bytes in words: 1.5 GB, 300 MB."""
    for unit, scale in (("TB", 2**40), ("GB", 2**30), ("MB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.0f} kB"
