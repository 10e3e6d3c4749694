"""A trained network rebuilt from its checkpoint, with its normalisation: raw slices in,
outputs in [0, 1] out (tiled and test-time augmented as asked)."""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cellp2p import outputs
from cellp2p.checks import check_finite_slice
from cellp2p.errors import CellP2PError
from cellp2p.instances import check_postprocessing
from cellp2p.outputs import to_model_range, to_unit
from cellp2p.tiling import (
    DEFAULT_TILE,
    WHOLE_SLICE_MAX,
    check_tiling,
    dihedral_mean,
    grid_period,
    is_valid_convolution,
    overlap_tile_plan,
    tiled_inference,
    tiles_exactly,
)

_DROPOUTS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


class Predictor:
    """A trained network rebuilt from its checkpoint, with the normalisation it was trained with."""

    def __init__(
        self,
        net: nn.Module,
        *,
        mode: str,
        task: str,
        target_kind: str,
        classes: list[int],
        input_norm: Any,
        target_norm: Any | None,
        train_config: dict[str, Any],
        record: dict[str, Any],
        checkpoint_path: Path | None,
        in_channels: int,
        out_channels: int,
        device: torch.device,
        precision: str = "fp32",
        tta: bool | None = None,
        test_time_dropout: bool = False,
        postprocessing: dict[str, Any] | None = None,
    ):
        # channels-last convolutions are ~1.8x faster on CPU (oneDNN) and suit tensor cores.
        self.channels_last = device.type in ("cpu", "cuda")
        net = net.to(device)
        self.net = net.to(memory_format=torch.channels_last) if self.channels_last else net
        self.mode, self.task, self.target_kind = mode, task, target_kind
        self.classes = list(classes)
        self.input_norm, self.target_norm = input_norm, target_norm
        self.train_config, self.record = train_config, record
        self.checkpoint_path = checkpoint_path
        self.in_channels, self.out_channels = in_channels, out_channels
        self.device, self.precision = device, precision
        self.tta = tta  # None: as :meth:`uses_tta` decides
        self.test_time_dropout = test_time_dropout
        self.postprocessing = postprocessing  # ``--output labels``; None: connected components
        self.space = outputs.output_space(net)
        self._plans: dict[tuple[int, int], tuple[int, ...]] = {}
        self.set_eval(test_time_dropout)

    # -- state ---------------------------------------------------------------------------------
    def set_eval(self, test_time_dropout: bool = False) -> int:
        """Eval mode (batch-norm running statistics, no dropout), or only Dropout layers active.

        Returns the number of Dropout layers left active (0 without ``test_time_dropout``).
        """
        self.net.eval()
        self.test_time_dropout = test_time_dropout
        active = 0
        if test_time_dropout:
            for m in self.net.modules():
                if isinstance(m, _DROPOUTS) and m.p > 0:
                    m.train()  # pix2pix-paper noise: dropout on, batch norm still frozen
                    active += 1
        return active

    @property
    def n_dropout(self) -> int:
        """Dropout layers with p > 0 in the network."""
        return sum(isinstance(m, _DROPOUTS) and m.p > 0 for m in self.net.modules())

    @property
    def valid_convolution(self) -> bool:
        """Whether the network's output is smaller than its input (overlap-tile path)."""
        return is_valid_convolution(self.net)

    @property
    def tiles_exactly(self) -> bool:
        """Whether tiles reproduce the whole slice (else whole slices only, see tiling)."""
        return tiles_exactly(self.net)

    @property
    def divisor(self) -> int:
        """Period of the network's pooling/stride grid (2**depth), which tiles are aligned to."""
        return grid_period(self.net)

    def default_tile(self, shape: Sequence[int]) -> int | None:
        """None (whole slice) up to 1024 px a side, else 512 or the training crop if larger.

        Networks that cannot be tiled exactly (:func:`tiles_exactly`) always see whole slices.
        """
        if max(shape[-2:]) <= WHOLE_SLICE_MAX or not self.tiles_exactly:
            return None
        crop = self.train_config.get("crop") or DEFAULT_TILE
        return max(DEFAULT_TILE, int(crop))

    def uses_tta(self, output: str | None = None) -> bool:
        """Whether outputs are test-time augmented: as asked (``tta`` True/False), else only for
        ``--output labels`` where training's tuning chose it (the post-processing's ``"tta"``)."""
        if self.tta is not None:
            return bool(self.tta)
        return output == "labels" and bool((self.postprocessing or {}).get("tta"))

    def single_window(self, shape: Sequence[int], tile: int | None) -> bool:
        """Whether a slice of ``shape`` goes through the network in one piece."""
        tile = self.default_tile(shape) if tile is None or not self.tiles_exactly else tile
        return tile is None or max(shape[-2:]) <= tile

    # -- network -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [0, 1] batch (N, C, H, W) → float32 outputs in [0, 1] (:func:`to_unit`)."""
        from cellp2p.runtime import autocast

        x = to_model_range(x)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            out = self.net(x)
        return to_unit(out, self.space, self.target_kind)

    def _plan(self, n: int, tile: int) -> tuple[int, int, int, int, int, int]:
        """:func:`overlap_tile_plan` of the network, cached per slice size (it searches)."""
        key = (n, tile)
        if key not in self._plans:
            self._plans[key] = overlap_tile_plan(self.net, n, tile)
        return self._plans[key]

    def _tiled(self, x: torch.Tensor, tile: int | None, overlap: float, batch: int) -> torch.Tensor:
        """Outputs for a batch of normalised slices, tiled as the slice size asks."""
        tile = self.default_tile(x.shape[-2:]) if tile is None or not self.tiles_exactly else tile
        return tiled_inference(self.forward, self.net, x, tile, overlap, batch, self._plan)

    # -- slices --------------------------------------------------------------------------------
    def prepare(self, images: Sequence[np.ndarray], source: str = "input") -> np.ndarray:
        """Raw slices (Y, X) or (C, Y, X) → normalised (N, C, Y, X) float32, checked."""
        planes = []
        for image in images:
            image = np.asarray(image)
            if image.ndim == 2:
                image = image[None]
            if image.ndim != 3:
                raise CellP2PError(
                    f"{source}: slice of shape {image.shape}; give (Y, X) or (C, Y, X)"
                )
            if image.shape[0] != self.in_channels:
                raise CellP2PError(
                    f"{source}: {image.shape[0]} channel(s) but the model was trained on "
                    f"{self.in_channels}; give a stack with {self.in_channels} channel(s) "
                    "(several channels as ZCYX)"
                )
            check_finite_slice(image, source)
            planes.append(self.input_norm.apply(image))
        if len({p.shape for p in planes}) > 1:
            raise CellP2PError(f"{source}: slices of different sizes cannot form one batch")
        return np.stack(planes)

    def predict_slices(
        self,
        images: Sequence[np.ndarray],
        tile: int | None = None,
        overlap: float = 0.25,
        batch_size: int = 4,
        source: str = "input",
        output: str | None = None,
    ) -> np.ndarray:
        """Several raw slices of one size → float32 (N, C_out, Y, X) in [0, 1]; ``output``:
        the kind they become (``labels`` may ask for test-time augmentation, :meth:`uses_tta`)."""
        check_tiling(tile, overlap, batch_size)
        x = torch.from_numpy(self.prepare(images, source)).to(self.device)
        run = functools.partial(self._tiled, tile=tile, overlap=overlap, batch=batch_size)
        with torch.inference_mode():
            out = dihedral_mean(run, x) if self.uses_tta(output) else run(x)
        return out.float().contiguous().cpu().numpy()

    def predict_slice(
        self,
        image: np.ndarray,
        tile: int | None = None,
        overlap: float = 0.25,
        batch_size: int = 4,
    ) -> np.ndarray:
        """One raw slice (Y, X) or (C, Y, X) → float32 (C_out, Y, X) in [0, 1]."""
        return self.predict_slices([image], tile, overlap, batch_size)[0]

    # -- outputs -------------------------------------------------------------------------------
    def resolve_output(self, output: str) -> str:
        """``auto`` → prob (segmentation) or image (translation); refuse kinds that do not fit."""
        return outputs.resolve_output(output, self.target_kind, self.target_norm is not None)

    def output_plane(self, output: str, yx: Sequence[int]) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of one output slice of size ``yx`` (what :meth:`to_output` returns)."""
        dtype = self.target_norm.dtype if self.target_norm is not None else None
        kind = self.resolve_output(output)
        return outputs.output_plane(
            kind, yx, self.out_channels, self.target_kind, self.classes, dtype
        )

    def to_output(
        self, prob: np.ndarray, output: str, threshold: float | None = None
    ) -> np.ndarray:
        """One slice of [0, 1] values (C_out, Y, X) → the output kind (see :mod:`outputs`);
        ``threshold`` None: 0.5 for masks, the tuned post-processing's for labels.

        Labels without any object are an all-zero image, with one note on stderr per predictor.
        """
        out = outputs.to_output(
            prob,
            self.resolve_output(output),
            target_kind=self.target_kind,
            classes=self.classes,
            target_norm=self.target_norm,
            threshold=threshold,
            postprocessing=self.postprocessing,
        )
        if output == "labels" and not out.any() and not getattr(self, "_noted_empty", False):
            self._noted_empty = True
            print(
                "note: no objects found in a slice (nothing above the threshold): its label "
                "image is empty",
                file=sys.stderr,
            )
        return out


def _section(ckpt: dict[str, Any], key: str, path: Any) -> Any:
    if key not in ckpt or ckpt[key] is None:
        raise CellP2PError(
            f"{path}: checkpoint has no {key!r} record; it was not written by 'cellp2p train' "
            "(or by an older version): use a run folder or a checkpoint from 'cellp2p train'"
        )
    return ckpt[key]


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
        raise ValueError(f"class value {value!r} is not an integer")
    return int(value)


def _normalization(record: Any) -> Any:
    """A checkpoint's normalisation record, checked: finite range, vmax > vmin, a real dtype."""
    from cellp2p.normalization import Normalization

    if not isinstance(record, dict):
        raise TypeError(f"normalisation {record!r} is not a record")
    norm = Normalization.from_dict(record)
    vmin, vmax = norm.vmin, norm.vmax
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (vmin, vmax)):
        raise TypeError(f"range {vmin!r}..{vmax!r} is not numeric")
    if not (math.isfinite(vmin) and math.isfinite(vmax) and vmax > vmin):
        raise ValueError(f"range {vmin!r}..{vmax!r} is not a finite, increasing range")
    if not isinstance(norm.dtype, str) or np.dtype(norm.dtype).kind not in "biuf":
        raise ValueError(f"dtype {norm.dtype!r} is not an image type")
    return norm


def load_predictor(
    model: str | Path,
    device: str = "auto",
    *,
    tta: bool | None = None,
    test_time_dropout: bool = False,
    precision: str = "auto",
) -> Predictor:
    """Rebuild the network of a run folder (best.pt, else last.pt) or checkpoint file, or load
    an export (bioimage.io package, TorchScript, ONNX: :mod:`cellp2p.exported`)."""
    from cellp2p.exported import is_exported, load_exported  # exported imports Predictor

    if is_exported(model):
        return load_exported(model, device, tta=tta, test_time_dropout=test_time_dropout)
    from cellp2p.checkpoint import load_checkpoint
    from cellp2p.runtime import resolve_precision, select_device

    dev = select_device(device)
    prec = resolve_precision(precision, dev)
    ckpt = load_checkpoint(model, mmap=True)  # only the network it runs is read
    path = ckpt["path"]
    for key in ("mode", "models", "normalization", "data"):
        _section(ckpt, key, path)
    mode, net = _network(ckpt, path)
    records = _records(ckpt, path, int(net.config.out_channels))
    target_kind = records["target_kind"]
    return Predictor(
        net,
        mode=mode,
        task=str(ckpt.get("task") or ("translate" if target_kind == "image" else "segment")),
        **records,
        checkpoint_path=Path(path),
        in_channels=int(net.config.in_channels),
        out_channels=int(net.config.out_channels),
        device=dev,
        precision=prec,
        tta=tta,
        test_time_dropout=test_time_dropout,
    )


def _network(ckpt: dict[str, Any], path: Any) -> tuple[str, nn.Module]:
    """The checkpoint's mode and the network that predicts (the U-Net, or the generator)."""
    from cellp2p.checkpoint import PREDICTS, build_from_entry

    mode = _section(ckpt, "mode", path)
    models = _section(ckpt, "models", path)
    name = PREDICTS.get(mode) if isinstance(mode, str) else None
    if name is None or not isinstance(models, dict) or name not in models:
        raise CellP2PError(f"{path}: checkpoint of mode {mode!r} holds no network to predict with")
    entry = models[name]
    if not isinstance(entry, dict) or entry.get("kind") != name:
        raise CellP2PError(
            f"{path}: the {name} entry is not a {name} network; use a checkpoint written by "
            "'cellp2p train'"
        )
    return mode, build_from_entry(entry, path)


def _records(ckpt: dict[str, Any], path: Any, out_channels: int) -> dict[str, Any]:
    """Normalisations, target kind, classes, training config and record, checked."""
    norms = _section(ckpt, "normalization", path)
    data = _section(ckpt, "data", path)
    if not isinstance(norms, dict) or not isinstance(data, dict):
        raise CellP2PError(
            f"{path}: normalisation or data record is damaged; use another checkpoint"
        )
    try:
        target = norms.get("target")
        out = {
            "input_norm": _normalization(norms["input"]),
            "target_norm": _normalization(target) if target else None,
            "target_kind": str(data["target_kind"]),
            "classes": [_int(c) for c in data.get("classes") or []],
            "train_config": dict(ckpt.get("train_config") or {}),
            "record": dict(ckpt.get("record") or {}),
            "postprocessing": check_postprocessing(ckpt.get("postprocessing"), str(path)),
        }
    except (KeyError, TypeError, ValueError) as err:
        raise CellP2PError(
            f"{path}: normalisation record is incomplete or damaged ({err}); "
            "use a checkpoint written by 'cellp2p train'"
        ) from None
    kind = out["target_kind"]
    if kind not in outputs.TARGET_KINDS or (kind == "image" and out["target_norm"] is None):
        raise CellP2PError(f"{path}: unknown target kind {kind!r}; use another checkpoint")
    if kind == "multiclass" and len(out["classes"]) != out_channels:
        raise CellP2PError(
            f"{path}: {len(out['classes'])} class values for {out_channels} outputs; "
            "the checkpoint is damaged: use another one"
        )
    return out
