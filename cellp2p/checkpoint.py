"""Checkpoints: the payload that rebuilds the networks and resumes a run, written and loaded safely.

A checkpoint is a plain dict of tensors and primitives, so ``torch.load(weights_only=True)``
reads it and a file carrying a pickled object is refused before anything runs. What a
checkpoint holds is written by :func:`build_payload` and read back by :func:`restore` beside
it; :func:`cellp2p.predictor.load_predictor` reads the same keys (mode, task, train_config,
models, normalization, data, record).

``last.pt`` is the full payload (what ``--resume`` needs); ``best.pt`` is an inference
checkpoint (:func:`inference_payload`): the same without the keys of :data:`RESUME_ONLY` and
with only the network that predicts, so a paper pix2pix run's best.pt is its 218 MB
generator, not the 686 MB of both networks and their optimizer moments. Runs written before
hold a full best.pt, which loads everywhere as before.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import sys
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cellp2p.errors import CellP2PError
from cellp2p.models import model_from_config
from cellp2p.models.blocks import weights_to_come
from cellp2p.modes import make_schedulers
from cellp2p.rundir import best_checkpoint, last_checkpoint

if TYPE_CHECKING:  # the loop's state; only read and set here
    from cellp2p.train import TrainState

FORMAT = "cellp2p-checkpoint"
VERSION = 1
# What only resuming reads: last.pt holds them, best.pt (an inference checkpoint) does not.
RESUME_ONLY = ("optimizers", "schedulers", "rng")
# The network each mode predicts with: the one an inference checkpoint keeps.
PREDICTS = {"unet": "unet", "pix2pix": "generator"}


# -- the payload: built and restored side by side ----------------------------------------------


def build_payload(state: TrainState, record: dict[str, Any]) -> dict[str, Any]:
    """Everything to predict with the run and to resume it exactly, at ``state.step``."""
    cfg, data = state.cfg, state.data
    return {
        "mode": cfg.mode,
        "task": cfg.task,
        "train_config": asdict(cfg),
        "models": {name: model_entry(net) for name, net in state.mode.nets.items()},
        "optimizers": {k: o.state_dict() for k, o in state.mode.optims.items()},
        "schedulers": {k: s.state_dict() for k, s in state.scheds.items()},
        "normalization": {
            "input": data.input_norm.to_dict(),
            "target": data.target_norm.to_dict() if data.target_norm else None,
        },
        "data": {
            "in_channels": data.in_channels,
            "out_channels": data.out_channels,
            "target_kind": data.target_kind,
            "classes": data.classes,
            "spacing": list(data.spacing) if data.spacing else None,
            "crop": cfg.crop,
        },
        "step": state.step,
        "total_steps": state.total,
        "world_size": state.world.size,
        "best": state.best,
        "rng": rng_state(),
        "versions": versions(state.device),
        "record": record,
        "postprocessing": getattr(state, "postprocessing", None),  # issue 15: plain primitives
    }


def inference_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """best.pt's part of a full payload: all but :data:`RESUME_ONLY`, and of the networks only
    the one that predicts (the tensors are shared, not copied)."""
    name = PREDICTS[payload["mode"]]
    kept = {k: v for k, v in payload.items() if k not in RESUME_ONLY}
    return {**kept, "models": {name: payload["models"][name]}}


def check_resumable(ckpt: dict[str, Any]) -> None:
    """Refuse an inference checkpoint (a best.pt) where resuming needs the full one."""
    if any(key not in ckpt for key in RESUME_ONLY):
        raise CellP2PError(
            f"{ckpt.get('path', 'checkpoint')}: an inference checkpoint (no optimizer state, "
            "like best.pt), which cannot be resumed; resume from the checkpoints/last.pt that "
            "'cellp2p train' wrote, or start a new run with another --out"
        )


def restore(state: TrainState, ckpt: dict[str, Any]) -> None:
    """Put a loaded checkpoint back into ``state``: weights, optimizers, schedules, step, best,
    and, last, every random generator state it saved (nothing may draw between the two).

    A checkpoint that does not fit the networks built for this run is one CellP2PError naming
    the file (before anything is written), never a size-mismatch or KeyError traceback.
    """
    check_resumable(ckpt)
    path = ckpt.get("path", "checkpoint")
    try:
        _restore(state, ckpt)
    except CellP2PError:
        raise
    except (KeyError, IndexError, RuntimeError, ValueError, TypeError) as err:
        text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
        first = (text.splitlines() or [""])[0].strip() or type(err).__name__
        raise CellP2PError(
            f"{path}: does not fit the run being resumed ({first[:160]}); resume it with the "
            "options it was trained with, or start a new run with another --out"
        ) from None


def _restore(state: TrainState, ckpt: dict[str, Any]) -> None:
    """:func:`restore`'s work."""
    for name, net in state.mode.nets.items():
        if name not in ckpt["models"]:
            raise KeyError(f"no {name} network in it (it holds {', '.join(ckpt['models'])})")
        net.load_state_dict(build_from_entry(ckpt["models"][name], ckpt["path"]).state_dict())
    for name, opt in state.mode.optims.items():
        opt.load_state_dict(ckpt["optimizers"][name])
    state.step, state.best = int(ckpt["step"]), ckpt.get("best")
    state.postprocessing = ckpt.get("postprocessing")
    # Rebuilt after the optimizers (torch reads their initial_lr) for this run's total steps,
    # which --resume may have changed; then positioned where the saved ones were.
    state.scheds = make_schedulers(
        state.mode.optims, state.total, state.cfg.lr_decay_start, state.step
    )
    for name, sched in state.scheds.items():
        sched.load_state_dict(ckpt["schedulers"][name])
    set_rng_state(ckpt["rng"])


def rng_state() -> dict[str, Any]:
    """The python, numpy (global) and torch (CPU) generator states, as plain data."""
    return {
        "python": _listify(random.getstate()),
        "numpy": _listify(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(rng: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate(_tuple_state(rng["python"]))
    kind, keys, pos, has_gauss, gauss = rng["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(torch.as_tensor(rng["torch"], dtype=torch.uint8).cpu())


def _listify(state: Any) -> Any:
    """Tuples and arrays as lists: what ``torch.load(weights_only=True)`` reads back."""
    if isinstance(state, tuple | list):
        return [_listify(s) for s in state]
    if isinstance(state, np.ndarray):
        return state.tolist()
    return state


def _tuple_state(state: Any) -> Any:
    """Lists back to the nested tuples ``random.setstate`` wants."""
    return tuple(_tuple_state(s) for s in state) if isinstance(state, list) else state


def versions(device: torch.device) -> dict[str, str]:
    """The versions that trained the run (in config.json and every checkpoint)."""
    from importlib.metadata import version  # not ``import monai``: ~1-2 s of imports

    import cellp2p

    return {
        "cellp2p": cellp2p.__version__,
        "torch": str(torch.__version__),
        "monai": version("monai"),
        "numpy": str(np.__version__),
        "python": sys.version.split()[0],
        "device": str(device),
    }


def model_entry(model: nn.Module) -> dict[str, Any]:
    """The network's kind, hyper-parameters and weights."""
    return {"kind": model.kind, "config": asdict(model.config), "state": model.state_dict()}


def write_checkpoints(state: TrainState, record: dict[str, Any], improved: bool) -> Path:
    """``checkpoints/last.pt`` (the full payload) at every evaluation, and ``best.pt`` (its
    :func:`inference_payload`, a file of its own) when the evaluation improved."""
    payload = build_payload(state, record)
    last = save_checkpoint(last_checkpoint(state.out), payload)
    if improved:
        save_checkpoint(best_checkpoint(state.out), inference_payload(payload))
    return last


# -- writing and loading -----------------------------------------------------------------------


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
        with _without_crc32():
            torch.save({"format": FORMAT, "version": VERSION, **payload}, tmp)
        os.replace(tmp, path)
    # torch's zip writer reports a failed write (a full disk) as a RuntimeError whose text need
    # not say "write" ("[enforce fail at inline_container.cc:672] . unexpected pos ..."); the
    # payload is plain data, so any failure here is the file system's.
    except (OSError, RuntimeError) as err:
        raise _save_failed(path, err) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return path


@contextlib.contextmanager
def _without_crc32() -> Iterator[None]:
    """``torch.save`` without the zip members' CRC-32s (restored after): ``torch.load`` never
    reads them (a flipped byte loads all the same), and computing them was most of the time of
    writing a checkpoint (640 MB: 1.1–3.2 s with, 0.3 s without; benchmarks/RESULTS.md).
    Truncated or damaged files are still refused by the zip structure (:func:`load_checkpoint`).
    """
    get = getattr(torch.serialization, "get_crc32_options", None)  # torch >= 2.5
    if get is None:
        yield
        return
    before = get()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


def update_checkpoint(path: str | Path, **changes: Any) -> Path:
    """Write ``path`` again with some of its top-level entries replaced (the tensors are mapped
    from the old file, not read into memory)."""
    ckpt = load_checkpoint(path, mmap=True)
    payload = {k: v for k, v in ckpt.items() if k not in ("format", "version", "path")}
    return save_checkpoint(path, {**payload, **changes})


def _save_failed(path: Path, err: BaseException) -> CellP2PError:
    """One line for a checkpoint that could not be written: the file, the cause, what is kept."""
    from cellp2p.fsutil import free_bytes, is_disk_full

    first = (getattr(err, "strerror", None) or str(err) or type(err).__name__).splitlines()[0]
    free = free_bytes(path.parent)
    full = is_disk_full(err) or (free is not None and free < 64 * 2**20)
    where = "disk full" if full else "the disk may be full"
    room = f", {free / 2**20:.1f} MB free" if free is not None else ""
    kept = f"the previous {path.name} is intact" if path.exists() else "nothing was saved"
    return CellP2PError(
        f"{path}: could not be written ({first[:120]}; {where}{room}); {kept}: free some "
        "space or choose another --out, then --resume"
    )


def _part_name(path: Path) -> Path:
    """The temporary name a checkpoint is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.{os.getpid()}.part")


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


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", *, mmap: bool = False
) -> dict[str, Any]:
    """Load with ``weights_only=True`` and check it is a cellp2p checkpoint.

    ``mmap``: the tensors are mapped from the file, not read, so only what the caller touches
    is read (``predict`` uses one network; a last.pt, or a best.pt written before inference
    checkpoints, also holds the other one and the optimizer moments).

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
            ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        text = " ".join(str(err).split())
        found = re.search(r"unsupported global:?\s+(?:GLOBAL\s+)?([^\s,]+)", text, re.I)
        if found is None:
            first = text.split(". ")[-1][:120] or type(err).__name__
            raise CellP2PError(
                f"{path}: cannot read the checkpoint ({first}); it is damaged or not a cellp2p "
                "checkpoint: use another checkpoint (e.g. checkpoints/last.pt)"
            ) from None
        raise CellP2PError(
            f"{path}: refused to load: it carries code (the pickled object "
            f"{_global_name(found.group(1))!r}, which would run on loading), not plain "
            "weights; only load checkpoints written by cellp2p from sources you trust"
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


def _global_name(name: str) -> str:
    """A pickled global as ``module.name`` (torch names builtins without their module)."""
    name = name.rstrip(".")
    return name if "." in name else f"builtins.{name}"


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
        with torch.device("meta"), weights_to_come():
            skeleton = model_from_config(entry["kind"], entry["config"])
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        stored = {k: tuple(v.shape) for k, v in state.items()}
        if expected != stored:
            diff = sorted(set(expected) ^ set(stored)) or [
                k for k in expected if expected[k] != stored[k]
            ]
            raise RuntimeError(f"weights do not fit the recorded config (first: {diff[0]})")
        with weights_to_come():
            model = model_from_config(entry["kind"], entry["config"])
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError, ValueError, AttributeError, CellP2PError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CellP2PError(
            f"{path}: network does not match its recorded config ({first[:160]}); "
            "use a checkpoint written by 'cellp2p train'"
        ) from None
    return model
