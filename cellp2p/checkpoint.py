"""Checkpoints: everything needed to rebuild the networks and resume a run, loaded safely.

A checkpoint is a plain dict of tensors and primitives, so ``torch.load(weights_only=True)``
reads it and a file carrying a pickled object is refused before anything runs.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cellp2p.errors import CellP2PError
from cellp2p.models import model_from_config

FORMAT = "cellp2p-checkpoint"
VERSION = 1


def model_entry(model: nn.Module) -> dict[str, Any]:
    """The network's kind, hyper-parameters and weights."""
    return {"kind": model.kind, "config": asdict(model.config), "state": model.state_dict()}


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write atomically: a temporary file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder means its best.pt, else last.pt; a file is taken as it is."""
    path = Path(path)
    if path.is_dir():
        for name in ("checkpoints/best.pt", "checkpoints/last.pt", "best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CellP2PError(
            f"{path}: no checkpoint in this folder (looked for checkpoints/best.pt and last.pt); "
            "give a run folder written by 'cellp2p train' or a .pt file"
        )
    if not path.exists():
        raise CellP2PError(f"{path}: no such checkpoint; give a run folder or a .pt file")
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True`` and check it is a cellp2p checkpoint."""
    path = resolve_checkpoint(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [x.strip() for x in str(err).splitlines() if "Unsupported global" in x]
        first = lines[0] if lines else "unsafe content"
        raise CellP2PError(
            f"{path}: refused to load: it is not a plain-weights checkpoint ({first[:120]}); "
            "only load checkpoints written by cellp2p from sources you trust"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CellP2PError(
            f"{path}: cannot read the checkpoint ({first[:120]}); it is truncated or not a "
            "cellp2p checkpoint: use another checkpoint (e.g. checkpoints/last.pt)"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CellP2PError(f"{path}: not a cellp2p checkpoint; give one written by 'cellp2p train'")
    if ckpt.get("version", 0) > VERSION:
        raise CellP2PError(
            f"{path}: written by a newer cellp2p (format {ckpt['version']}); upgrade"
        )
    ckpt["path"] = str(path)
    return ckpt


def build_from_entry(entry: dict[str, Any], path: str | Path = "checkpoint") -> nn.Module:
    """Rebuild a network from its checkpoint entry and load its weights."""
    try:
        model = model_from_config(entry["kind"], entry["config"])
        model.load_state_dict(entry["state"])
    except (KeyError, TypeError, RuntimeError) as err:
        first = str(err).splitlines()[0]
        raise CellP2PError(
            f"{path}: network does not match its recorded config ({first[:160]})"
        ) from None
    return model
