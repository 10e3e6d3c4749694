"""Applying a trained network to slices and stacks of any size.

Per slice: raw pixels → the run's input :class:`Normalization` → ``x*2-1`` → network → [0, 1]
(U-Net: sigmoid / softmax / clipped image; generator: ``(tanh+1)/2``) → the requested output
(probabilities, mask, instance labels, or the image back in the target's dtype and range).

Tiling (``tile``; default: the whole slice up to 1024 px a side, else 512 or the training crop):

* same-padding networks (``small`` U-Net, every pix2pix generator): MONAI's
  ``sliding_window_inference`` with Gaussian blending. The slice is first reflect-padded into a
  canvas on which every tile starts at a multiple of the network's ``divisor`` (2**depth), with
  the phase of the whole-slice forward: all tiles then share the whole slice's pooling/stride grid
  and differ from it only through the zero padding near their own borders, which the Gaussian
  weights (≈3e-4 at a tile edge) suppress. Slices smaller than the tile along an axis take one
  window spanning that axis; the network pads it (reflect) to its divisor and crops back.
* valid-convolution U-Nets (``paper``, ``course``): the U-Net paper's overlap-tile strategy. Each
  output tile is computed from an input window holding its real context (mirror padding only at
  the slice border), tiles are aligned to the pooling grid of the whole-slice
  :func:`forward_full`, so tiled and whole-slice results agree to float precision and no
  blending is needed.

Stacks are streamed slice by slice (StackReader → StackWriter's temporary file, renamed when
complete), so memory does not grow with the number of slices.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cellp2p.errors import CellP2PError

OUTPUTS = ("auto", "prob", "mask", "labels", "image")
WHOLE_SLICE_MAX = 1024  # slices up to this size (both sides) go through the network in one piece
DEFAULT_TILE = 512
MIN_TILE = 16
# The 8 symmetries of the square: (quarter turns, horizontal flip first).
DIHEDRAL = tuple((k, flip) for flip in (False, True) for k in range(4))
_DROPOUTS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def forward_full(
    predict: Callable[[torch.Tensor], torch.Tensor], net: nn.Module, x: torch.Tensor
) -> torch.Tensor:
    """Output for the whole (N, C, H, W) input at the input's size.

    Same-padding networks take any size. A valid-convolution U-Net sees a mirror-padded input
    large enough that its (smaller) output covers every input pixel, then is cropped back.
    """
    output_size = getattr(net, "output_size", None)
    H, W = x.shape[-2:]
    if output_size is None or output_size(max(H, W) + 1000) >= max(H, W) + 1000:
        return predict(x)
    sizes = []
    for n in (H, W):
        s = net.valid_input_size(n)
        while output_size(s) < n:
            s = net.valid_input_size(s + net.divisor)
        sizes.append(s)
    (sh, sw) = sizes
    top, left = (sh - H) // 2, (sw - W) // 2
    pads = (left, sw - W - left, top, sh - H - top)
    # Reflection needs the pad smaller than the slice; tiny slices fall back to edge values.
    mode = "reflect" if max(pads) < min(H, W) else "replicate"
    padded = F.pad(x, pads, mode=mode)
    out = predict(padded)
    mh, mw = (sh - out.shape[-2]) // 2, (sw - out.shape[-1]) // 2
    r0, c0 = top - mh, left - mw
    return out[..., r0 : r0 + H, c0 : c0 + W]


# -- geometry ----------------------------------------------------------------------------------


def is_valid_convolution(net: nn.Module) -> bool:
    """True for networks whose output is smaller than their input (valid-convolution U-Nets)."""
    output_size = getattr(net, "output_size", None)
    if output_size is None:
        return False
    try:
        return output_size(2048) < 2048
    except CellP2PError:
        return True


def grid_period(net: nn.Module) -> int:
    """2**depth (the same-padding U-Net reports ``divisor`` 1: it pads itself, but pools)."""
    depth = getattr(getattr(net, "config", None), "depth", None)
    if isinstance(depth, int) and depth > 0:
        return 2**depth
    return max(1, int(getattr(net, "divisor", 1)))


def reflect_pad(x: torch.Tensor, pads: tuple[int, int, int, int]) -> torch.Tensor:
    """Mirror-pad (left, right, top, bottom), reflecting repeatedly when a pad exceeds the size."""
    while any(pads):
        h, w = x.shape[-2:]
        step = (min(pads[0], w - 1), min(pads[1], w - 1), min(pads[2], h - 1), min(pads[3], h - 1))
        if not any(step):  # a 1-pixel axis cannot be reflected: repeat the edge
            return F.pad(x, pads, mode="replicate")
        x = F.pad(x, step, mode="reflect")
        pads = tuple(p - s for p, s in zip(pads, step, strict=True))  # type: ignore[assignment]
    return x


def _sliding_plan(n: int, tile: int, overlap: float, divisor: int) -> tuple[int, int, int, int]:
    """(window, interval, pad before, pad after) along one axis for same-padding networks."""
    if n <= tile:
        return n, n, 0, 0
    interval = max(1, int(tile * (1 - overlap)))
    before = 0
    if divisor > 1 and interval >= divisor:
        interval = interval // divisor * divisor
        # The network pads an input centred up to a multiple of its divisor: choose the canvas
        # offset so that every tile's grid coincides with the grid of the whole-slice forward.
        whole = ((-n) % divisor) // 2
        inner = ((-tile) % divisor) // 2
        before = (whole - inner) % divisor
    steps = math.ceil(max(0, before + n - tile) / interval)
    after = tile + steps * interval - before - n
    return tile, interval, before, after


def _monai_overlap(window: int, interval: int) -> float:
    """The overlap for which MONAI's ``int(window * (1 - overlap))`` is exactly ``interval``."""
    if interval >= window:
        return 0.0
    return 1.0 - (interval + 0.5) / window


def _valid_input(net: Any, n: int) -> int:
    """Smallest valid input size (as :func:`forward_full` picks it) whose output covers ``n``."""
    s = net.valid_input_size(n)
    while net.output_size(s) < n:
        s = net.valid_input_size(s + net.divisor)
    return s


def _overlap_tile_plan(net: Any, n: int, tile: int) -> tuple[int, int, int, int, int, int]:
    """(input window, output window, stride, pad before, pad after, output offset) along one axis.

    The pad before is congruent (mod the divisor) to the one :func:`forward_full` uses for the
    whole slice, so the pooling grid of every tile is the whole-slice grid.
    """
    s_in = _valid_input(net, min(n, tile))
    s_out = net.output_size(s_in)
    margin = (s_in - s_out) // 2  # output pixel j sees input pixel j + margin at the centre
    d = max(1, int(net.divisor))
    whole_before = (_valid_input(net, n) - n) // 2
    before = margin + (whole_before - margin) % d
    offset = before - margin  # where the slice's first pixel lands in the output canvas
    stride = s_out // d * d if s_out >= d else s_out
    count = 1 if offset + n <= s_out else math.ceil((offset + n - s_out) / stride) + 1
    after = (count - 1) * stride + s_in - before - n
    return s_in, s_out, stride, before, after, offset


# -- the predictor -----------------------------------------------------------------------------


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
        tta: bool = False,
        test_time_dropout: bool = False,
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
        self.tta = tta
        self.test_time_dropout = test_time_dropout
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
    def divisor(self) -> int:
        """Period of the network's pooling/stride grid (2**depth), which tiles are aligned to."""
        return grid_period(self.net)

    def default_tile(self, shape: Sequence[int]) -> int | None:
        """None (whole slice) up to 1024 px a side, else 512 or the training crop if larger."""
        if max(shape[-2:]) <= WHOLE_SLICE_MAX:
            return None
        crop = self.train_config.get("crop") or DEFAULT_TILE
        return max(DEFAULT_TILE, int(crop))

    def single_window(self, shape: Sequence[int], tile: int | None) -> bool:
        """Whether a slice of ``shape`` goes through the network in one piece."""
        tile = self.default_tile(shape) if tile is None else tile
        return tile is None or max(shape[-2:]) <= tile

    # -- network -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised [0, 1] batch (N, C, H, W) → float32 outputs in [0, 1]."""
        from cellp2p.runtime import autocast

        x = x * 2 - 1
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            out = self.net(x)
        out = out.float()
        if self.mode == "pix2pix":
            return ((out + 1) / 2).clamp_(0, 1)
        if self.target_kind == "binary":
            return torch.sigmoid(out)
        if self.target_kind == "multiclass":
            return torch.softmax(out, dim=1)
        return out.clamp_(0, 1)  # targets were clipped to [0, 1] at training

    def _tiled(self, x: torch.Tensor, tile: int | None, overlap: float, batch: int) -> torch.Tensor:
        """Outputs for a batch of normalised slices, tiled as the slice size asks."""
        H, W = x.shape[-2:]
        tile = self.default_tile((H, W)) if tile is None else tile
        if tile is None or max(H, W) <= tile:
            return torch.cat(
                [forward_full(self.forward, self.net, c) for c in x.split(batch)], dim=0
            )
        if self.valid_convolution:
            return self._overlap_tile(x, tile, batch)
        return self._sliding(x, tile, overlap, batch)

    def _sliding(self, x: torch.Tensor, tile: int, overlap: float, batch: int) -> torch.Tensor:
        from monai.inferers import sliding_window_inference

        H, W = x.shape[-2:]
        (wy, iy, ty, by), (wx, ix, tx, bx) = (
            _sliding_plan(n, tile, overlap, self.divisor) for n in (H, W)
        )
        canvas = reflect_pad(x, (tx, bx, ty, by))
        out = sliding_window_inference(
            canvas,
            roi_size=(wy, wx),
            sw_batch_size=batch,
            predictor=self.forward,
            overlap=(_monai_overlap(wy, iy), _monai_overlap(wx, ix)),
            mode="gaussian",
        )
        return out[..., ty : ty + H, tx : tx + W]

    def _plan(self, n: int, tile: int) -> tuple[int, ...]:
        key = (n, tile)
        if key not in self._plans:  # valid_input_size searches: cache per slice size
            self._plans[key] = _overlap_tile_plan(self.net, n, tile)
        return self._plans[key]

    def _overlap_tile(self, x: torch.Tensor, tile: int, batch: int) -> torch.Tensor:
        N, _, H, W = x.shape
        iy, oy, sy, by, ay, offy = self._plan(H, tile)
        ix, ox, sx, bx, ax, offx = self._plan(W, tile)
        canvas = reflect_pad(x, (bx, ax, by, ay))
        ys = range(0, canvas.shape[-2] - iy + 1, sy)
        xs = range(0, canvas.shape[-1] - ix + 1, sx)
        out = torch.empty(
            (N, self.out_channels, (len(ys) - 1) * sy + oy, (len(xs) - 1) * sx + ox),
            device=x.device,
        )
        windows = [(i, y, z) for i in range(N) for y in ys for z in xs]
        for k in range(0, len(windows), batch):
            chunk = windows[k : k + batch]
            pred = self.forward(
                torch.stack([canvas[i, :, y : y + iy, z : z + ix] for i, y, z in chunk])
            )
            for (i, y, z), p in zip(chunk, pred, strict=True):
                out[i, :, y : y + oy, z : z + ox] = p
        return out[..., offy : offy + H, offx : offx + W]

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
    ) -> np.ndarray:
        """Several raw slices of one size → float32 (N, C_out, Y, X) in [0, 1]."""
        check_tiling(tile, overlap, batch_size)
        x = torch.from_numpy(self.prepare(images, source)).to(self.device)
        with torch.inference_mode():
            if not self.tta:
                out = self._tiled(x, tile, overlap, batch_size)
            else:  # the 8 flips/rotations, each undone, averaged (probabilities, not logits)
                out = torch.zeros((x.shape[0], self.out_channels, *x.shape[-2:]), device=x.device)
                for k, flip in DIHEDRAL:
                    t = torch.flip(x, (-1,)) if flip else x
                    y = self._tiled(torch.rot90(t, k, (-2, -1)), tile, overlap, batch_size)
                    y = torch.rot90(y, -k, (-2, -1))
                    out += torch.flip(y, (-1,)) if flip else y
                out /= len(DIHEDRAL)
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
        if output not in OUTPUTS:
            raise CellP2PError(f"--output {output!r} unknown; use one of {', '.join(OUTPUTS[1:])}")
        if output == "auto":
            return "image" if self.target_kind == "image" else "prob"
        if output == "image" and self.target_norm is None:
            raise CellP2PError(
                "--output image is for translation models; this model segments: use prob, "
                "mask or labels"
            )
        if output in ("mask", "labels") and self.target_kind == "image":
            raise CellP2PError(
                f"--output {output} needs a segmentation model; this one translates "
                "(--task translate): use image or prob"
            )
        return output

    def _mask_dtype(self) -> np.dtype:
        top = max(self.classes, default=255)
        if min(self.classes, default=0) < 0:
            return np.dtype(np.int32)
        return np.dtype(np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32)

    def output_plane(self, output: str, yx: Sequence[int]) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of one output slice of size ``yx`` (what :meth:`to_output` returns)."""
        output = self.resolve_output(output)
        yx = tuple(int(n) for n in yx[-2:])
        if output in ("prob", "image"):
            shape = yx if self.out_channels == 1 else (self.out_channels, *yx)
            if output == "prob":
                return shape, np.dtype(np.float32)
            dtype = np.dtype(self.target_norm.dtype)
            return shape, dtype if dtype.kind in "uif" else np.dtype(np.float32)
        if output == "mask":
            binary = self.target_kind != "multiclass"
            return yx, np.dtype(np.uint8) if binary else self._mask_dtype()
        return yx, np.dtype(np.uint16)

    def _foreground(self, prob: np.ndarray, threshold: float) -> np.ndarray:
        if self.target_kind == "multiclass":  # class index 0 (the smallest value) is background
            return prob.argmax(0) != 0
        return prob[0] >= threshold

    def to_output(self, prob: np.ndarray, output: str, threshold: float = 0.5) -> np.ndarray:
        """One slice of probabilities (C_out, Y, X) → the output kind.

        ``prob``: float32 as is (the channel axis dropped when there is one); ``mask``: uint8
        0/255 (``prob >= threshold``), or the class values of the argmax for multiclass;
        ``labels``: 4-connected components of the foreground, uint16 (uint32 beyond 65535
        objects), numbered per slice; ``image``: the target's dtype and range.
        """
        output = self.resolve_output(output)
        prob = np.asarray(prob, dtype=np.float32)
        if prob.ndim == 2:
            prob = prob[None]
        if output == "prob":
            return prob[0] if prob.shape[0] == 1 else prob
        if output == "image":
            return self.target_norm.invert(prob[0] if prob.shape[0] == 1 else prob)
        if output == "mask":
            if self.target_kind == "multiclass":
                values = np.asarray(self.classes, dtype=self._mask_dtype())
                return values[prob.argmax(0)]
            return (prob[0] >= threshold).astype(np.uint8) * np.uint8(255)
        from skimage.measure import label

        # 4-connectivity: cells separated by a one-pixel diagonal membrane stay apart.
        labels, count = label(self._foreground(prob, threshold), connectivity=1, return_num=True)
        return labels.astype(np.uint16 if count <= 65535 else np.uint32)


def check_finite_slice(image: np.ndarray, source: str = "input", index: int | None = None) -> None:
    """Refuse NaN/inf in a float slice (they would poison the whole tile)."""
    if not np.issubdtype(image.dtype, np.floating):
        return
    bad = ~np.isfinite(image)
    if bad.any():
        where = f" in slice {index}" if index is not None else ""
        raise CellP2PError(
            f"{source}: contains {int(bad.sum())} NaN/inf values{where}; replace them first "
            "(e.g. Fiji: Process > Math > Remove NaNs)"
        )


def check_tiling(tile: int | None, overlap: float, batch_size: int) -> None:
    """Option values for tiling."""
    if tile is not None and tile < MIN_TILE:
        raise CellP2PError(f"--tile {tile}: use at least {MIN_TILE} pixels (or leave it out)")
    if not 0 <= overlap < 1:
        raise CellP2PError(f"--overlap {overlap}: give a fraction in [0, 1), e.g. 0.25")
    if batch_size < 1:
        raise CellP2PError(f"--batch-size {batch_size}: must be at least 1")


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
    from cellp2p.transforms import Normalization

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
    tta: bool = False,
    test_time_dropout: bool = False,
    precision: str = "auto",
) -> Predictor:
    """Rebuild the network of a run folder (best.pt, else last.pt) or checkpoint file."""
    from cellp2p.checkpoint import build_from_entry, load_checkpoint
    from cellp2p.runtime import resolve_precision, select_device

    dev = select_device(device)
    prec = resolve_precision(precision, dev)
    ckpt = load_checkpoint(model)
    path = ckpt["path"]
    mode = _section(ckpt, "mode", path)
    models = _section(ckpt, "models", path)
    norms = _section(ckpt, "normalization", path)
    data = _section(ckpt, "data", path)
    name = {"unet": "unet", "pix2pix": "generator"}.get(mode) if isinstance(mode, str) else None
    if name is None or not isinstance(models, dict) or name not in models:
        raise CellP2PError(f"{path}: checkpoint of mode {mode!r} holds no network to predict with")
    if not isinstance(norms, dict) or not isinstance(data, dict):
        raise CellP2PError(
            f"{path}: normalisation or data record is damaged; use another checkpoint"
        )
    entry = models[name]
    if not isinstance(entry, dict) or entry.get("kind") != name:
        raise CellP2PError(
            f"{path}: the {name} entry is not a {name} network; use a checkpoint written by "
            "'cellp2p train'"
        )
    net = build_from_entry(entry, path)
    try:
        input_norm = _normalization(norms["input"])
        target = norms.get("target")
        target_norm = _normalization(target) if target else None
        target_kind = str(data["target_kind"])
        classes = [_int(c) for c in data.get("classes") or []]
        train_config = dict(ckpt.get("train_config") or {})
        record = dict(ckpt.get("record") or {})
    except (KeyError, TypeError, ValueError) as err:
        raise CellP2PError(
            f"{path}: normalisation record is incomplete or damaged ({err}); "
            "use a checkpoint written by 'cellp2p train'"
        ) from None
    if target_kind not in ("binary", "multiclass", "image") or (
        target_kind == "image" and target_norm is None
    ):
        raise CellP2PError(f"{path}: unknown target kind {target_kind!r}; use another checkpoint")
    if target_kind == "multiclass" and len(classes) != int(net.config.out_channels):
        raise CellP2PError(
            f"{path}: {len(classes)} class values for {net.config.out_channels} outputs; "
            "the checkpoint is damaged: use another one"
        )
    return Predictor(
        net,
        mode=mode,
        task=str(ckpt.get("task") or ("translate" if target_kind == "image" else "segment")),
        target_kind=target_kind,
        classes=classes,
        input_norm=input_norm,
        target_norm=target_norm,
        train_config=train_config,
        record=record,
        checkpoint_path=Path(path),
        in_channels=int(net.config.in_channels),
        out_channels=int(net.config.out_channels),
        device=dev,
        precision=prec,
        tta=tta,
        test_time_dropout=test_time_dropout,
    )


# -- stacks ------------------------------------------------------------------------------------


def default_output(path: str | Path) -> Path:
    """``NAME_pred.tif`` next to a file, ``FOLDER_pred.tif`` beside a folder."""
    path = Path(path)
    if path.is_dir():
        return path.with_name(f"{path.name}_pred.tif")
    name = path.name
    for suffix in (".ome.tiff", ".ome.tif", *(s for s in (path.suffix,) if s)):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    return path.with_name(f"{name}_pred.tif")


def output_paths(inputs: Sequence[Path], out: str | Path | None) -> list[Path]:
    """Where each input's prediction goes: ``-o`` is a file for one input, else a folder."""
    if out is None:
        paths = [default_output(p) for p in inputs]
    else:
        out = Path(out)
        as_file = out.suffix.lower() in (".tif", ".tiff") and not out.is_dir()
        if as_file and len(inputs) > 1:
            raise CellP2PError(
                f"-o {out}: {len(inputs)} inputs need an output folder, not a file name"
            )
        if not as_file and out.suffix and not out.is_dir():
            raise CellP2PError(f"-o {out}: give a .tif file name or a folder")
        paths = [out] if as_file else [out / default_output(p).name for p in inputs]
    seen: dict[Path, Path] = {}
    sources = {p.resolve() for p in inputs}
    for src, dst in zip(inputs, paths, strict=True):
        key = dst.resolve()
        if key in seen:
            raise CellP2PError(
                f"{src} and {seen[key]} would both be written to {dst}; predict them in "
                "separate calls or rename one"
            )
        if key in sources:
            raise CellP2PError(f"{dst}: is an input; choose another output name")
        seen[key] = src
    return paths


def _drop_mapped_pages(reader: Any) -> None:
    """Release the pages of a memory-mapped stack already read.

    An uncompressed TIFF is memory-mapped by StackReader; touched pages stay in the process's
    resident set, which would then grow with the number of slices (they remain in the page
    cache; re-reading them is cheap).
    """
    raw = getattr(getattr(reader, "_mm", None), "_mmap", None)
    if raw is not None and hasattr(mmap, "MADV_DONTNEED"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            raw.madvise(mmap.MADV_DONTNEED)


def _flat_heap() -> None:
    """Fix glibc's mmap threshold, so slice-sized tensors go back to the OS when freed.

    glibc raises the threshold after each large free; slice-sized tensors then come from the
    heap, whose fragmentation made the peak RSS creep up with the number of slices (+11% from
    16 to 128 slices of 1024x1024); with a fixed threshold the peak is flat (and lower).
    Process-wide and permanent, harmless elsewhere: other platforms are left alone.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return
    mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB


class _NeedsWiderLabels(Exception):
    """A slice holds more than 65535 objects: the stack is rewritten as uint32."""


def predict_stack(
    inputs: Sequence[str | Path],
    model: str | Path,
    *,
    out: str | Path | None = None,
    output: str = "auto",
    threshold: float = 0.5,
    tile: int | None = None,
    overlap: float = 0.25,
    tta: bool = False,
    batch_size: int = 4,
    device: str = "auto",
    force: bool = False,
    quiet: bool = False,
    test_time_dropout: bool = False,
    slices: str | Sequence[int] | None = None,
) -> list[Path]:
    """Predict each stack (TIFF, 2D image or folder of images) into a TIFF; returns the paths.

    Everything is checked before any computing: inputs readable with the model's channel
    count and free of NaN/inf, the checkpoint, the options, and that no output exists (unless
    ``force``). Outputs are written slice by slice to a temporary file renamed when complete.
    ``slices`` (``"25-29"`` or indices) predicts only those slices of every input.
    """
    from tqdm import tqdm

    from cellp2p.io import StackReader, check_output
    from cellp2p.transforms import parse_slices

    if not inputs:
        raise CellP2PError("no input: give one or more stacks, images or folders")
    check_tiling(tile, overlap, batch_size)
    if not 0 <= threshold <= 1:
        raise CellP2PError(f"--threshold {threshold}: give a probability in [0, 1]")
    jobs = []
    for src in map(Path, inputs):
        with StackReader(src) as reader:
            n = len(reader)
            if slices is None:
                ids = list(range(n))
            elif isinstance(slices, str):
                ids = parse_slices(slices, n) or list(range(n))
            else:
                ids = parse_slices(",".join(str(int(i)) for i in slices), n) or list(range(n))
            jobs.append(
                _Job(src, tuple(reader.shape), reader.spacing, reader.unit, reader.dtype, ids)
            )
    from cellp2p import distributed

    world = distributed.setup(device)  # under torchrun: joins the group, on cuda:LOCAL_RANK
    device = str(world.device) if world.size > 1 else device
    predictor = load_predictor(model, device, tta=tta, test_time_dropout=test_time_dropout)
    kind = predictor.resolve_output(output)
    for job in jobs:
        nchan = 1 if len(job.shape) == 3 else job.shape[1]
        if nchan != predictor.in_channels:
            raise CellP2PError(
                f"{job.src}: {nchan} channel(s) but the model was trained on "
                f"{predictor.in_channels}; give a stack with {predictor.in_channels} channel(s)"
            )
    for job, dst in zip(jobs, output_paths([j.src for j in jobs], out), strict=True):
        job.dst = check_output(dst, force)
    # Float stacks are scanned for NaN/inf first, so a bad slice in the last input does not
    # leave the earlier ones written.
    for job in jobs:
        if np.issubdtype(job.dtype, np.floating):
            with StackReader(job.src) as reader:
                for i in job.ids:
                    check_finite_slice(reader[i], str(job.src), i)
                    _drop_mapped_pages(reader)
    if test_time_dropout and predictor.n_dropout == 0 and not quiet:
        print(
            "note: --test-time-dropout: this network has no dropout layers; output is "
            "deterministic",
            file=sys.stderr,
        )
    # Under torchrun each process has checked every input and output; now rank r takes
    # stacks r, r+W, ... (and returns those), and only rank 0 shows progress.
    jobs = world.shard(jobs)
    quiet = quiet or not world.is_main

    _flat_heap()
    total = sum(len(job.ids) for job in jobs)
    overall = tqdm(
        total=total, desc="predict", unit="slice", disable=quiet, file=sys.stderr, position=0
    )
    options = dict(
        kind=kind,
        threshold=threshold,
        tile=tile,
        overlap=overlap,
        batch_size=batch_size,
        force=force,
        quiet=quiet,
        overall=overall,
    )
    try:
        for job in jobs:
            done = overall.n
            try:
                _predict_one(job, predictor, **options)
            except _NeedsWiderLabels:
                overall.n = done  # rare: more than 65535 objects in a slice; redo as uint32
                _predict_one(job, predictor, label_dtype=np.uint32, **options)
    finally:
        overall.close()
    return [job.dst for job in jobs]


class _Job:
    """One input stack, what is known of it before predicting, and where it goes."""

    def __init__(
        self,
        src: Path,
        shape: tuple[int, ...],
        spacing: tuple[float, float, float] | None,
        unit: str,
        dtype: np.dtype,
        ids: list[int],
    ):
        self.src, self.shape, self.spacing, self.unit = src, shape, spacing, unit
        self.dtype, self.ids = np.dtype(dtype), ids
        self.dst = src


def _predict_one(
    job: _Job,
    predictor: Predictor,
    *,
    kind: str,
    threshold: float,
    tile: int | None,
    overlap: float,
    batch_size: int,
    force: bool,
    quiet: bool,
    overall: Any,
    label_dtype: type = np.uint16,
) -> None:
    """One stack into one TIFF, ``batch_size`` slices per forward when a slice is one window."""
    from tqdm import tqdm

    from cellp2p.io import StackReader, StackWriter

    plane, dtype = predictor.output_plane(kind, job.shape[-2:])
    if kind == "labels":
        dtype = np.dtype(label_dtype)
    group = batch_size if predictor.single_window(job.shape, tile) else 1
    bar = tqdm(
        total=len(job.ids),
        desc=job.src.name,
        unit="slice",
        leave=False,
        disable=quiet,
        file=sys.stderr,
        position=1,
    )
    try:
        with (
            StackReader(job.src) as reader,
            StackWriter(
                job.dst,
                shape=(len(job.ids), *plane),
                dtype=dtype,
                spacing=job.spacing,
                unit=job.unit,
                force=force,
            ) as writer,
        ):
            for start in range(0, len(job.ids), group):
                ids = job.ids[start : start + group]
                planes = [reader[i] for i in ids]
                _drop_mapped_pages(reader)
                source = f"{job.src} slice {ids[0]}"
                probs = predictor.predict_slices(planes, tile, overlap, batch_size, source)
                for prob in probs:
                    result = predictor.to_output(prob, kind, threshold)
                    if kind == "labels" and result.dtype.itemsize > dtype.itemsize:
                        raise _NeedsWiderLabels
                    writer.write(result)
                bar.update(len(ids))
                overall.update(len(ids))
    finally:
        bar.close()
