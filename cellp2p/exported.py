"""Predicting with an exported model: a bioimage.io package, a TorchScript or an ONNX file.

:func:`load_exported` reads the metadata ``cellp2p export`` wrote into the file (normalisation,
target kind, classes, target range, size arithmetic) and returns a real
:class:`cellp2p.predictor.Predictor` around a small module that runs the exported network. The
predictor gives that module the input in [-1, 1] (as it gives every cellp2p network); the module
maps it back to the normalised [0, 1] the export takes and declares ``output_space = "unit"``,
so tiling, TTA and every ``--output`` work as for a run, with the run's own results (≤ 1e-4).
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cellp2p.errors import CellP2PError
from cellp2p.models.unet import too_small
from cellp2p.predictor import Predictor

RDF_NAMES = ("rdf.yaml", "bioimageio.yaml")
META_FILE = "cellp2p.json"
META_FORMAT = "cellp2p-export"
META_VERSION = 1
INSTALL_HINT = "install the export extra: pip install 'cellp2p[export]'"


def is_exported(path: str | Path) -> bool:
    """Whether ``path`` is a bioimage.io package (zip or folder), a TorchScript or ONNX file."""
    path = Path(path)
    if path.is_dir():
        return any((path / name).is_file() for name in RDF_NAMES)
    if not path.is_file():
        return False
    if path.suffix.lower() == ".onnx":
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, ValueError, zipfile.BadZipFile, zipfile.LargeZipFile):
        return False  # damaged archives (bad names, bad headers) are judged as checkpoints
    if any(name in RDF_NAMES for name in names):
        return True
    return _is_torchscript(names)


def _is_torchscript(names: list[str]) -> bool:
    """A TorchScript archive holds code/ and constants.pkl; a torch.save checkpoint does not."""
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def load_exported(
    path: str | Path,
    device: str = "auto",
    *,
    tta: bool | None = None,
    test_time_dropout: bool = False,
) -> Predictor:
    """A Predictor around an exported model, with the normalisation and target it carries."""
    from cellp2p.runtime import select_device

    path = Path(path)
    if test_time_dropout:
        raise CellP2PError(
            f"{path}: --test-time-dropout needs the network's Dropout layers, which an export "
            "does not keep; predict with the run folder instead"
        )
    dev = select_device(device)
    run, meta = _open(path, dev)
    net = module_for(run, meta)
    return Predictor(
        net,
        mode=str(meta["mode"]),
        task=str(meta["task"]),
        target_kind=meta["target_kind"],
        classes=meta["classes"],
        input_norm=meta["input_norm"],
        target_norm=meta["target_norm"],
        train_config=dict(meta.get("train_config") or {}),
        record=dict(meta.get("record") or {}),
        checkpoint_path=path,
        in_channels=meta["in_channels"],
        out_channels=meta["out_channels"],
        device=dev,
        precision="fp32",
        tta=tta,
    )


def _open(path: Path, device: torch.device) -> tuple[Any, dict[str, Any]]:
    """The exported network (a TorchScript module or an ONNX runner) and its checked metadata."""
    if path.is_dir() or (path.suffix.lower() != ".onnx" and _is_package(path)):
        return _open_package(path, device)
    if path.suffix.lower() == ".onnx":
        return _open_onnx(path.read_bytes(), path)
    return _open_torchscript(path.read_bytes(), path, device)


def _is_package(path: Path) -> bool:
    """Whether a file is a zip holding a bioimage.io description."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name in RDF_NAMES for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


# -- the three formats ---------------------------------------------------------------------


def _open_torchscript(data: bytes, path: Path, device: torch.device) -> tuple[Any, dict]:
    """A TorchScript module on ``device`` and the metadata in its extra files."""
    files = {META_FILE: ""}
    try:
        module = torch.jit.load(io.BytesIO(data), map_location=device, _extra_files=files)
    except Exception as err:  # torch.jit.load raises RuntimeError and others
        first = (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise CellP2PError(f"{path}: not a TorchScript file cellp2p can load ({first})") from None
    return module.eval(), check_meta(files[META_FILE], path)


def _open_onnx(data: bytes, path: Path) -> tuple[Any, dict]:
    """An onnxruntime session (CPU) and the metadata in the model's metadata_props."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise CellP2PError(
            f"{path}: predicting with an ONNX file needs onnxruntime: {INSTALL_HINT}"
        ) from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types
        first = (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise CellP2PError(f"{path}: not an ONNX file onnxruntime can load ({first})") from None
    text = session.get_modelmeta().custom_metadata_map.get("cellp2p", "")
    return session, check_meta(text, path)


def _open_package(path: Path, device: torch.device) -> tuple[Any, dict]:
    """A bioimage.io package: its TorchScript weights (else ONNX) and ``config.cellp2p``."""
    try:
        from bioimageio.spec.utils import open_bioimageio_yaml
    except ImportError:
        raise CellP2PError(
            f"{path}: reading a bioimage.io package needs bioimageio.spec: {INSTALL_HINT}"
        ) from None
    try:
        content = dict(open_bioimageio_yaml(path).content)
    except Exception as err:  # damaged zips and YAML raise many types
        raise CellP2PError(f"{path}: cannot read the bioimage.io package ({err})") from None
    weights = content.get("weights") or {}
    config = content.get("config") or {}
    if not isinstance(config, dict) or "cellp2p" not in config:
        raise CellP2PError(
            f"{path}: this bioimage.io model was not exported by cellp2p; run it with "
            "bioimageio.core (bioimageio predict) or the software it was made for"
        )
    for fmt in ("torchscript", "onnx"):
        entry = weights.get(fmt)
        if isinstance(entry, dict) and isinstance(entry.get("source"), str):
            data = _package_file(path, entry["source"])
            if fmt == "torchscript":
                return _open_torchscript(data, path, device)
            return _open_onnx(data, path)
    raise CellP2PError(f"{path}: the package has no torchscript or onnx weights to predict with")


def _package_file(path: Path, name: str) -> bytes:
    """A file of a package zip or folder."""
    if "://" in name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise CellP2PError(f"{path}: weights {name!r} are not inside the package")
    try:
        if path.is_dir():
            return (path / name).read_bytes()
        with zipfile.ZipFile(path) as archive:
            return archive.read(name)
    except (OSError, KeyError, zipfile.BadZipFile) as err:
        raise CellP2PError(f"{path}: cannot read {name} from the package ({err})") from None


# -- metadata ------------------------------------------------------------------------------


def check_meta(text: str | bytes, path: Path) -> dict[str, Any]:
    """The metadata of an export, checked; its normalisations as Normalization objects."""
    from cellp2p.normalization import Normalization

    if not text:
        raise CellP2PError(
            f"{path}: holds no cellp2p metadata; only files written by 'cellp2p export' can be "
            "predicted with (their normalisation travels in the file)"
        )
    try:
        meta = json.loads(text)
        if meta.get("format") != META_FORMAT:
            raise ValueError("not a cellp2p export")
        if int(meta.get("version", 0)) > META_VERSION:
            raise CellP2PError(f"{path}: written by a newer cellp2p; upgrade cellp2p")
        meta["input_norm"] = _norm(Normalization, meta["input_norm"])
        target = meta.get("target_norm")
        meta["target_norm"] = _norm(Normalization, target) if target else None
        meta["classes"] = [int(c) for c in meta.get("classes") or []]
        meta["in_channels"], meta["out_channels"] = (
            int(meta["in_channels"]),
            int(meta["out_channels"]),
        )
        geo = meta["geometry"]
        geo["grid"], geo["min"], geo["step"] = (int(geo[k]) for k in ("grid", "min", "step"))
        if meta["target_kind"] not in ("binary", "multiclass", "image"):
            raise ValueError(f"target kind {meta['target_kind']!r}")
        if meta["target_kind"] == "image" and meta["target_norm"] is None:
            raise ValueError("a translation model without its target range")
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CellP2PError(
            f"{path}: its cellp2p metadata is damaged ({err}); export the run again"
        ) from None
    return meta


def _norm(cls: Any, record: Any) -> Any:
    """A Normalization from its record, with a finite increasing range and a real dtype."""
    norm = cls.from_dict(dict(record))
    if not (math.isfinite(norm.vmin) and math.isfinite(norm.vmax) and norm.vmax > norm.vmin):
        raise ValueError(f"range {norm.vmin}..{norm.vmax}")
    np.dtype(norm.dtype)
    return norm


# -- the module the predictor runs ---------------------------------------------------------


@dataclass
class _Config:
    """What the predictor's tiling reads of a network's config."""

    depth: int
    in_channels: int
    out_channels: int


class ExportedModule(nn.Module):
    """An exported network as a cellp2p network: [-1, 1] in, outputs in [0, 1] out."""

    output_space = "unit"

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor], meta: dict[str, Any]):
        """``run``: normalised [0, 1] batch → mapped output (TorchScript module or ONNX)."""
        super().__init__()
        self.run = run  # a module is registered, so .to(device) moves it
        grid = int(meta["geometry"]["grid"])
        self.config = _Config(int(math.log2(grid)), meta["in_channels"], meta["out_channels"])
        self.meta = meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] (what the predictor gives every network) → [0, 1] outputs."""
        x = ((x + 1) / 2).float().contiguous()
        with torch.jit.optimized_execution(False):  # no re-profiling for every new tile size
            return self.run(x)


class ValidExportedModule(ExportedModule):
    """An exported valid-convolution U-Net: sizes ``min + n * step`` → ``size + offset``."""

    @property
    def divisor(self) -> int:
        """Spacing of valid input sizes."""
        return int(self.meta["geometry"]["step"])

    def output_size(self, input_size: int) -> int:
        """Output size of one spatial dim for a valid ``input_size``."""
        out = input_size + int(self.meta["geometry"]["offset"])
        if out <= 0:
            raise too_small(input_size, self.valid_input_size(input_size))
        return out

    def valid_input_size(self, size: int) -> int:
        """Nearest valid input size (ties: the larger), as UNet.valid_input_size."""
        geo = self.meta["geometry"]
        low, step = geo["min"], geo["step"]
        if size <= low:
            return low
        below = low + (size - low) // step * step
        return below if size - below < below + step - size else below + step


def module_for(run: Any, meta: dict[str, Any]) -> ExportedModule:
    """The predictor's module around a TorchScript module or an onnxruntime session."""
    fn = run if isinstance(run, nn.Module) else _onnx_function(run)
    cls = ValidExportedModule if meta["geometry"].get("valid_convolution") else ExportedModule
    return cls(fn, meta)


def _onnx_function(session: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """An onnxruntime session (on the CPU) as a function of tensors on any device."""

    def run(x: torch.Tensor) -> torch.Tensor:
        """Normalised batch → the session's output, on the input's device."""
        out = session.run(None, {"input": x.detach().cpu().numpy()})[0]
        return torch.from_numpy(out).to(x.device)

    return run
