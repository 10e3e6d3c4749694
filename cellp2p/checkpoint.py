"""Checkpoints: everything needed to rebuild the networks and resume a run, loaded safely.

A checkpoint is a plain dict of tensors and primitives, so ``torch.load(weights_only=True)``
reads it and a file carrying a pickled object is refused before anything runs.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import warnings
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
    """Write atomically: a temporary file in the same folder, then rename.

    A failure on the way (disk full, a folder that cannot be made) raises a CellP2PError and
    leaves neither the temporary file nor anything new at ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CellP2PError(
            f"{path.parent}: cannot create the checkpoint folder ({err.strerror}); "
            "choose another --out"
        ) from None
    tmp = _part_name(path)
    try:
        torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
        os.replace(tmp, path)
    except OSError as err:
        from cellp2p.fsutil import write_failed

        raise write_failed(path, err) from None
    except RuntimeError as err:  # torch's zip writer reports a failed write as RuntimeError
        if "write" not in str(err).lower():
            raise
        first = str(err).splitlines()[0][:120]
        raise CellP2PError(
            f"{path}: could not be written ({first}); nothing was saved: free some space "
            "or choose another --out"
        ) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


def _part_name(path: Path) -> Path:
    """The temporary name a checkpoint is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.part")


def copy_checkpoint(saved: Path, path: str | Path, payload: dict[str, Any]) -> Path:
    """Make ``path`` an independent copy of the just-written checkpoint ``saved``.

    A file copy (in the kernel, a reflink where the file system has them) is much cheaper than
    serialising a paper pix2pix run's 690 MB again; it goes through a temporary name renamed
    into place, like every write. If the copy fails, the payload is saved the normal way.
    """
    path = Path(path)
    tmp = _part_name(path)
    try:
        shutil.copyfile(saved, tmp)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        return save_checkpoint(path, payload)
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
    """Load with ``weights_only=True`` and check it is a cellp2p checkpoint.

    Only PyTorch's zip format (what ``torch.save`` writes) is opened; a file carrying pickled
    objects (classes, functions: code that would run on loading) is refused by the restricted
    unpickler before anything runs.
    """
    path = resolve_checkpoint(path)
    try:
        is_zip = zipfile.is_zipfile(path)
    except OSError as err:
        raise CellP2PError(f"{path}: cannot read the checkpoint ({err.strerror})") from None
    if not is_zip:
        raise CellP2PError(
            f"{path}: not a checkpoint (not the zip format torch.save writes); give a run "
            "folder or a .pt file written by 'cellp2p train'"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol N" on damaged files
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        text = " ".join(str(err).split())
        found = re.search(r"unsupported (GLOBAL|global)\s+([^\s,]+)", text)
        if found is None:
            first = text.split(". ")[-1][:120] or type(err).__name__
            raise CellP2PError(
                f"{path}: cannot read the checkpoint ({first}); it is damaged or not a cellp2p "
                "checkpoint: use another checkpoint (e.g. checkpoints/last.pt)"
            ) from None
        raise CellP2PError(
            f"{path}: refused to load: it is not a plain-weights checkpoint (it carries the "
            f"object {found.group(2).rstrip('.')!r}, code that would run on loading); only "
            "load checkpoints written by cellp2p from sources you trust"
        ) from None
    except Exception as err:  # damaged archives raise many types (KeyError, IndexError, ...)
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CellP2PError(
            f"{path}: cannot read the checkpoint ({first[:120]}); it is truncated or not a "
            "cellp2p checkpoint: use another checkpoint (e.g. checkpoints/last.pt)"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CellP2PError(f"{path}: not a cellp2p checkpoint; give one written by 'cellp2p train'")
    version = ckpt.get("version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CellP2PError(f"{path}: damaged checkpoint (version {version!r}); use another one")
    if version > VERSION:
        raise CellP2PError(f"{path}: written by a newer cellp2p (format {version}); upgrade")
    ckpt["path"] = str(path)
    return ckpt


def build_from_entry(entry: dict[str, Any], path: str | Path = "checkpoint") -> nn.Module:
    """Rebuild a network from its checkpoint entry and load its weights.

    The recorded config is first built on the ``meta`` device (no memory) and its parameter
    shapes compared with the stored weights, so a damaged or hostile config (say, a billion
    channels) is refused before anything is allocated.
    """
    try:
        if not isinstance(entry, dict) or not isinstance(entry.get("config"), dict):
            raise TypeError("the network entry is not a {kind, config, state} record")
        state = entry["state"]
        if not isinstance(state, dict) or not all(
            isinstance(v, torch.Tensor) for v in state.values()
        ):
            raise TypeError("the weights are not a dict of tensors")
        # Each of depth x n_convs layers holds at least one tensor: a config asking for more
        # layers than there are weights is damaged, and would take long to build even on meta.
        levels = [entry["config"].get(k, 1) for k in ("depth", "n_convs")]
        if all(isinstance(n, int) for n in levels) and levels[0] * levels[1] > len(state):
            raise ValueError(
                f"depth {levels[0]} x n_convs {levels[1]} layers but only {len(state)} tensors"
            )
        with torch.device("meta"):
            skeleton = model_from_config(entry["kind"], entry["config"])
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        stored = {k: tuple(v.shape) for k, v in state.items()}
        if expected != stored:
            diff = sorted(set(expected) ^ set(stored)) or [
                k for k in expected if expected[k] != stored[k]
            ]
            raise RuntimeError(f"weights do not fit the recorded config (first: {diff[0]})")
        model = model_from_config(entry["kind"], entry["config"])
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError, ValueError, AttributeError, CellP2PError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CellP2PError(
            f"{path}: network does not match its recorded config ({first[:160]}); "
            "use a checkpoint written by 'cellp2p train'"
        ) from None
    return model
