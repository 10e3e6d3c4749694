"""``cellp2p export``: a trained run as a bioimage.io package, a TorchScript file or an ONNX file.

Every export takes the *normalised* input (N, C, H, W) — ``(x - vmin) / (vmax - vmin)`` with the
run's own normalisation — and gives the mapped output in [0, 1] (probabilities, or the image in
the target's normalised range), for any height and width (same-padding networks pad themselves
to ``2**depth``; valid-convolution U-Nets take ``min + n * step`` pixels and give
``size + offset``). The run's normalisation, target kind, classes and that size arithmetic
travel in the file (TorchScript ``_extra_files``, ONNX ``metadata_props``, bioimage.io
``config.cellp2p``), which is what :func:`cellp2p.exported.load_exported` reads back.

Before anything is written the exported model is run on a test crop (from the run's validation
slices) and compared with the checkpoint (≤ 1e-4); every file is made in a temporary folder and
renamed into place, so a run that cannot be exported gets one CellP2PError and leaves nothing.
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import cellp2p
from cellp2p import outputs
from cellp2p.errors import CellP2PError
from cellp2p.exportnet import ExportedNet
from cellp2p.predictor import Predictor
from cellp2p.tiling import grid_period, is_valid_convolution, reflect_pad

FORMATS = ("bioimageio", "torchscript", "onnx")
SUFFIXES = {"bioimageio": ".zip", "torchscript": ".pt", "onnx": ".onnx"}
CHECKPOINTS = ("best", "last")
TOLERANCE = 1e-4
META_FILE = "cellp2p.json"  # TorchScript extra file; ONNX metadata key "cellp2p"
META_FORMAT = "cellp2p-export"
META_VERSION = 1
OPSET = 17
TEST_SIZE = 256  # test crops are at most this size (a multiple of the grid, or a valid size)
INSTALL_HINT = "install the export extra: pip install 'cellp2p[export]'"


@dataclass
class Prepared:
    """What every format is made from: the checkpoint, the wrapped network and a test crop."""

    predictor: Predictor
    checkpoint: Path
    net: ExportedNet  # eager: normalised input → mapped output
    meta: dict[str, Any]
    raw: np.ndarray  # (1, C, s, s) float32 input intensities
    x: torch.Tensor  # the same, normalised
    y: np.ndarray  # (1, C_out, s', s') the checkpoint's output in [0, 1]
    from_validation: bool
    x2: torch.Tensor | None = None  # a second, non-square input (see second_input)
    y2: np.ndarray | None = None  # the wrapped network's output on it
    scripted: torch.jit.ScriptModule | None = None  # made once, for TorchScript and ONNX


def export_model(
    run_or_checkpoint: str | Path,
    fmt: str,
    out: str | Path,
    *,
    checkpoint: str = "best",
    authors: Sequence[str] | None = None,
    license: str = "MIT",
    force: bool = False,
) -> Path:
    """Export a run folder (its best.pt, or last.pt) or a checkpoint file; returns the path."""
    if fmt not in FORMATS:
        raise CellP2PError(f"--format {fmt!r} unknown; use one of {', '.join(FORMATS)}")
    require_packages(fmt)
    if fmt == "bioimageio":
        from cellp2p.export_bioimageio import check_options

        check_options(authors, license)
    ckpt = export_checkpoint(run_or_checkpoint, checkpoint)
    dst = output_path(out, fmt, ckpt, force)
    from cellp2p.fsutil import atomic_path, write_failed

    try:  # the work folder sits beside the output: no copy across file systems, no tmpfs
        with tempfile.TemporaryDirectory(prefix=".cellp2p-export-", dir=dst.parent) as tmp:
            made = make(ckpt, fmt, Path(tmp), authors, license)
            with atomic_path(dst) as part:
                os.replace(made, part)
    except OSError as err:
        raise write_failed(dst, err) from None
    return dst


def make(ckpt: Path, fmt: str, work: Path, authors: Sequence[str] | None, license: str) -> Path:
    """Prepare, write and check one format in ``work``; every failure is one CellP2PError."""
    try:
        prep = prepare(ckpt)
        if fmt == "torchscript":
            return write_torchscript(prep, work / "model.pt")
        if fmt == "onnx":
            return write_onnx(prep, work / "model.onnx")
        from cellp2p.export_bioimageio import write_package

        return write_package(prep, work, authors=authors, license=license)
    except (CellP2PError, OSError):
        raise
    except Exception as err:  # torch, onnx and bioimageio raise many types
        first = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise CellP2PError(
            f"{ckpt}: cannot be exported as {fmt} ({type(err).__name__}: {first}); "
            "nothing was written"
        ) from None


def require_packages(fmt: str) -> None:
    """The export extra's packages a format needs, or one line saying how to install them."""
    needed = {"torchscript": [], "onnx": ["onnx", "onnxruntime"]}.get(
        fmt, ["onnx", "onnxruntime", "bioimageio.spec"]
    )
    missing = [name for name in needed if not _installed(name)]
    if missing:
        raise CellP2PError(f"--format {fmt} needs {', '.join(missing)}: {INSTALL_HINT}")


def _installed(name: str) -> bool:
    """Whether a (dotted) module can be imported, without importing it."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def export_checkpoint(run: str | Path, checkpoint: str = "best") -> Path:
    """The checkpoint to export: a run folder's best.pt (else last.pt) or last.pt, or a file."""
    from cellp2p.checkpoint import resolve_checkpoint

    if checkpoint not in CHECKPOINTS:
        raise CellP2PError(f"--checkpoint {checkpoint!r} unknown; use best or last")
    path = Path(run)
    if path.is_dir() and checkpoint == "last":
        for name in ("checkpoints/last.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise CellP2PError(f"{path}: no checkpoints/last.pt in this folder; give a run folder")
    return resolve_checkpoint(path)


def output_path(out: str | Path, fmt: str, ckpt: Path, force: bool) -> Path:
    """``out`` itself, or ``RUN_FORMAT.suffix`` inside ``out`` when it is a folder; checked."""
    from cellp2p.fsutil import check_folder_writable
    from cellp2p.rundir import run_folder

    out = Path(out)
    if out.is_dir():
        out = out / f"{run_folder(ckpt).resolve().name}_{fmt}{SUFFIXES[fmt]}"
    if out.suffix.lower() != SUFFIXES[fmt]:
        raise CellP2PError(f"-o {out}: a {fmt} export is a {SUFFIXES[fmt]} file; rename it")
    if out.exists() and not force:
        raise CellP2PError(f"{out}: already exists; pass --force to overwrite it")
    if out.is_dir():
        raise CellP2PError(f"{out}: is a folder; give a file name ending in {SUFFIXES[fmt]}")
    check_folder_writable(out.parent)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        from cellp2p.fsutil import write_failed

        raise write_failed(out, err) from None
    return out


# -- the network and its test crop ---------------------------------------------------------


def prepare(ckpt: Path) -> Prepared:
    """Load the checkpoint, wrap its network and compute its output on a test crop."""
    from cellp2p.predictor import load_predictor

    pred = load_predictor(ckpt, "cpu", precision="fp32")
    core = copy.deepcopy(pred.net).to(memory_format=torch.contiguous_format).float().eval()
    geo = geometry(core)
    valid = geo["valid_convolution"]
    reflect = getattr(core.config, "pad_mode", "reflect") == "reflect"
    space = outputs.output_space(core)
    net = ExportedNet(core, 1 if valid else geo["grid"], reflect, space, pred.target_kind).eval()
    image, from_validation = validation_slice(pred)
    raw = test_crop(image, geo)[None]
    x = torch.from_numpy(pred.prepare(list(raw)))
    with torch.inference_mode():
        y = pred.forward(x).numpy()
        mine = net(x).numpy()
    check_close("the wrapped network", mine, y, ckpt)
    meta = metadata(pred, core, geo, ckpt, space)
    return Prepared(pred, ckpt, net, meta, raw.astype(np.float32), x, y, from_validation)


def geometry(net: nn.Module) -> dict[str, Any]:
    """Grid period, and for valid convolutions the sizes ``min + n * step`` → ``size + offset``."""
    period = grid_period(net)
    if not is_valid_convolution(net):
        return {"valid_convolution": False, "grid": period, "min": period, "step": period}
    smallest = net.valid_input_size(1)
    sizes = [smallest + k * period for k in range(4)]
    offsets = {net.output_size(s) - s for s in sizes}
    between = [s for s in range(smallest + 1, smallest + period) if net.valid_input_size(s) == s]
    if any(net.valid_input_size(s) != s for s in sizes) or len(offsets) != 1 or between:
        raise CellP2PError(
            "this valid-convolution network's sizes are not min + n * step with a fixed "
            "offset; it cannot be exported (train a same-padding preset, e.g. small)"
        )
    return {
        "valid_convolution": True,
        "grid": period,
        "min": smallest,
        "step": period,
        "offset": offsets.pop(),
    }


def validation_slice(pred: Predictor) -> tuple[np.ndarray, bool]:
    """A validation slice of the run's data in input intensities (C, Y, X), or a stand-in."""
    from cellp2p.config import TrainConfig
    from cellp2p.dataset import load_data

    norms = {
        "input": pred.input_norm.to_dict(),
        "target": pred.target_norm.to_dict() if pred.target_norm else None,
    }
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = load_data(TrainConfig.from_dict(pred.train_config), norms)
        x = data.val_x[0].astype(np.float64)
    except (CellP2PError, OSError, KeyError, TypeError, ValueError, IndexError):
        # the training data moved: a smooth pattern over the normalised range stands in
        yy, xx = np.mgrid[0:TEST_SIZE, 0:TEST_SIZE] / TEST_SIZE
        x = 0.5 + 0.4 * np.sin(9 * yy) * np.cos(7 * xx) + 0.05 * np.sin(40 * (xx + yy))
        x = np.repeat(x[None], pred.in_channels, axis=0)
        from_validation = False
    else:
        from_validation = True
    norm = pred.input_norm
    return (x * (norm.vmax - norm.vmin) + norm.vmin).astype(np.float32), from_validation


def test_size(n: int, geo: dict[str, Any]) -> int:
    """The largest test size up to min(n, TEST_SIZE) the network takes (at least its minimum)."""
    cap = min(n, TEST_SIZE)
    k = max(0, (cap - geo["min"]) // geo["step"])
    return geo["min"] + k * geo["step"]


def test_crop(image: np.ndarray, geo: dict[str, Any]) -> np.ndarray:
    """A centred square crop the network takes, mirror-padded where the slice is smaller."""
    from cellp2p.models.blocks import center_crop

    s = test_size(min(image.shape[-2:]), geo)
    crop = center_crop(image, min(s, image.shape[-2]), min(s, image.shape[-1]))
    h, w = crop.shape[-2:]
    pads = ((s - w) // 2, s - w - (s - w) // 2, (s - h) // 2, s - h - (s - h) // 2)
    return reflect_pad(torch.from_numpy(np.ascontiguousarray(crop))[None], pads)[0].numpy()


def metadata(
    pred: Predictor, core: nn.Module, geo: dict[str, Any], ckpt: Path, space: str
) -> dict[str, Any]:
    """What a loader needs beside the network: normalisation, target, sizes, the run's record."""
    from cellp2p.fsutil import to_json

    return to_json(
        {
            "format": META_FORMAT,
            "version": META_VERSION,
            "cellp2p_version": cellp2p.__version__,
            "mode": pred.mode,
            "task": pred.task,
            "target_kind": pred.target_kind,
            "classes": pred.classes,
            "input_norm": pred.input_norm.to_dict(),
            "target_norm": pred.target_norm.to_dict() if pred.target_norm else None,
            "target_dtype": pred.target_norm.dtype if pred.target_norm else None,
            "in_channels": pred.in_channels,
            "out_channels": pred.out_channels,
            "network": {"kind": core.kind, "config": asdict(core.config), "space": space},
            "parameters": sum(p.numel() for p in core.parameters()),
            "geometry": geo,
            "input": "normalised (x - vmin) / (vmax - vmin), float32 (N, C, H, W)",
            "output": "float32 (N, C_out, H', W') in [0, 1]",
            "train_config": public_config(pred.train_config),
            "record": pred.record,
            "checkpoint": ckpt.name,
        }
    )


def public_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The run's options with file names instead of paths: an export does not carry folders."""
    paths = ("volume", "labels", "manifest", "data_dir")
    return {k: Path(v).name if k in paths and isinstance(v, str) else v for k, v in cfg.items()}


def meta_text(prep: Prepared) -> str:
    """The metadata as strict JSON."""
    return json.dumps(prep.meta, allow_nan=False, sort_keys=True)


# -- checks --------------------------------------------------------------------------------


def check_close(what: str, got: Any, want: np.ndarray, ckpt: Path) -> None:
    """Refuse an export whose output differs from the checkpoint's by more than 1e-4."""
    got = np.asarray(got, dtype=np.float32)
    if got.shape != want.shape:
        raise CellP2PError(
            f"{ckpt}: {what} gives outputs of shape {got.shape}, the checkpoint {want.shape}; "
            "it cannot be exported (nothing was written)"
        )
    diff = float(np.max(np.abs(got - want))) if got.size else 0.0
    if not math.isfinite(diff) or diff > TOLERANCE:
        raise CellP2PError(
            f"{ckpt}: {what} differs from the checkpoint by {diff:.3g} (> {TOLERANCE:g}) on "
            "the test crop; it cannot be exported (nothing was written)"
        )


def second_input(prep: Prepared) -> torch.Tensor:
    """A non-square input of another size, to check the export's dynamic height and width."""
    geo = prep.meta["geometry"]
    s = prep.x.shape[-1]
    if geo["valid_convolution"]:
        h, w = s + geo["step"], s + 2 * geo["step"]
    else:
        h, w = s + geo["grid"] // 2 + 1, s + geo["grid"] + 3
    x = reflect_pad(prep.x, (0, w - s, 0, h - s))
    return torch.cat([x, x.flip(-1)])


def check_export(what: str, run: Any, prep: Prepared) -> None:
    """Run an export (a callable on tensors) on the test crop and a second size; compare."""
    check_close(what, run(prep.x), prep.y, prep.checkpoint)
    if prep.x2 is None or prep.y2 is None:
        prep.x2 = second_input(prep)
        with torch.inference_mode():
            prep.y2 = prep.net(prep.x2).numpy()
    where = f"{what} (at {tuple(prep.x2.shape)})"
    check_close(where, run(prep.x2), prep.y2, prep.checkpoint)


# -- TorchScript and ONNX ------------------------------------------------------------------


def script(prep: Prepared) -> torch.jit.ScriptModule:
    """The wrapped network in TorchScript: the traced network inside the scripted wrapper."""
    net = prep.net
    if prep.scripted is not None:
        return prep.scripted
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            core = torch.jit.trace(net.core, prep.x * 2 - 1, check_trace=False)
            prep.scripted = torch.jit.script(
                ExportedNet(core, net.multiple, net.reflect, net.space, net.target_kind)
            )
        return prep.scripted
    except Exception as err:  # tracing raises many types
        first = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise CellP2PError(
            f"{prep.checkpoint}: the network cannot be traced for TorchScript ({first}); "
            "nothing was written"
        ) from None


def write_torchscript(prep: Prepared, path: Path) -> Path:
    """Write the TorchScript file with the metadata; load it back and check it."""
    module = script(prep)
    torch.jit.save(module, str(path), _extra_files={META_FILE: meta_text(prep)})
    loaded = torch.jit.load(str(path), map_location="cpu")

    def run(x: torch.Tensor) -> np.ndarray:
        """The loaded file's output (no re-optimisation for each new size)."""
        with torch.inference_mode(), torch.jit.optimized_execution(False):
            return loaded(x).numpy()

    check_export("the TorchScript export", run, prep)
    return path


def write_onnx(prep: Prepared, path: Path) -> Path:
    """Write the ONNX file (dynamic batch, height, width) with the metadata; check it."""
    import onnx

    module = script(prep)
    axes = {0: "batch", 2: "y", 3: "x"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                (prep.x,),
                str(path),
                dynamo=False,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": axes, "output": axes},
                opset_version=OPSET,
            )
    except Exception as err:  # the exporter raises many types
        first = (str(err).splitlines() or [type(err).__name__])[0][:160]
        raise CellP2PError(
            f"{prep.checkpoint}: the network cannot be exported to ONNX ({first}); "
            "nothing was written"
        ) from None
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = "cellp2p", meta_text(prep)
    model.producer_name, model.producer_version = "cellp2p", cellp2p.__version__
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    check_export("the ONNX export", onnx_runner(path), prep)
    return path


def onnx_runner(path: Path) -> Any:
    """An onnxruntime session on the CPU as a function of a tensor."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> np.ndarray:
        """The session's output."""
        return session.run(None, {"input": x.detach().cpu().numpy()})[0]

    return run
