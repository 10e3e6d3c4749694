"""Every picture cellp2p draws: sample panels, loss curves, comparison panels and error maps."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellp2p.fsutil import write_failed


def _to_uint8(img: np.ndarray) -> np.ndarray:
    img = img[0] if img.ndim == 3 and img.shape[0] not in (3,) else img
    if img.ndim == 3:
        img = np.moveaxis(img, 0, -1)
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0, 1)
    hi = hi if hi > lo else lo + 1
    return (np.clip((img - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def save_panel(path: Path, images: list[np.ndarray]) -> None:
    """input | target | prediction … side by side as one PNG."""
    from PIL import Image

    tiles = [_to_uint8(im) for im in images]
    tiles = [np.repeat(t[..., None], 3, -1) if t.ndim == 2 else t for t in tiles]
    h = max(t.shape[0] for t in tiles)
    gap = np.full((h, 4, 3), 255, np.uint8)
    row = []
    for t in tiles:
        pad = np.zeros((h, t.shape[1], 3), np.uint8)
        pad[: t.shape[0]] = t
        row += [pad, gap]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(row[:-1], axis=1)).save(path)


def plot_curves(path: Path, records: list[dict], title: str = "") -> None:
    """Loss terms and validation metrics against step, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not records:
        return
    steps = [r["step"] for r in records]
    loss_keys = [k for k in records[-1] if k.startswith("loss")]
    val_keys = [k for k in records[-1] if k.startswith("val_")]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for k in loss_keys:
        axes[0].plot(steps, [r.get(k, np.nan) for r in records], label=k)
    axes[0].set_xlabel("step")
    axes[0].set_title("training losses")
    axes[0].legend(fontsize=8)
    for k in val_keys:
        axes[1].plot(steps, [r.get(k, np.nan) for r in records], label=k)
    axes[1].set_xlabel("step")
    axes[1].set_title("validation")
    axes[1].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.part.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


def _plt() -> Any:
    """matplotlib with the file-only Agg backend (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grey(img: np.ndarray) -> np.ndarray:
    """Display scaling: 0.5-99.5 percentiles to [0, 1]."""
    img = np.asarray(img, dtype=np.float32)
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0)


def seg_error_map(prob: np.ndarray, target: np.ndarray) -> np.ndarray:
    """RGB map at p > 0.5: correct interior white, correct membrane black, FP red, FN blue."""
    pred, truth = prob > 0.5, np.asarray(target) > 0
    rgb = np.zeros((*pred.shape, 3), np.float32)
    rgb[pred & truth] = 1.0
    rgb[pred & ~truth] = (0.9, 0.1, 0.1)
    rgb[~pred & truth] = (0.1, 0.3, 1.0)
    return rgb


def save_slice_panel(
    path: Path,
    title: str,
    inp: np.ndarray,
    target: np.ndarray,
    names: Sequence[str],
    outputs: Sequence[np.ndarray],
    task: str,
    seg_row: dict[str, Any] | None = None,
) -> Path:
    """input | target | each run (top), each run's error map (below), as one PNG.

    ``seg_row`` (segmentability): {"real": prob, "runs": [prob per run], "target": labels}
    adds a third row with the segmenter's error maps on the real and the generated images.
    """
    plt = _plt()
    n = len(outputs)
    rows = 3 if seg_row else 2
    fig, axes = plt.subplots(rows, 2 + n, figsize=(2.6 * (2 + n), 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(_grey(inp), cmap="gray")
    axes[0, 0].set_title("input", fontsize=9)
    if task == "segment":
        axes[0, 1].imshow(np.asarray(target) > 0, cmap="gray", vmin=0, vmax=1)
    else:
        axes[0, 1].imshow(_grey(target), cmap="gray")
    axes[0, 1].set_title("target", fontsize=9)
    if task == "translate":
        t = np.asarray(target, np.float32)
        errs = [np.abs(np.asarray(o, np.float32) - t) for o in outputs]
        vmax = max([float(np.percentile(e, 99.5)) for e in errs] + [1e-6])
    for i, (name, out) in enumerate(zip(names, outputs, strict=True)):
        col = 2 + i
        if task == "segment":
            axes[0, col].imshow(out, cmap="gray", vmin=0, vmax=1)
            axes[1, col].imshow(seg_error_map(out, target))
            axes[1, col].set_title(f"{name}: errors", fontsize=9)
        else:
            axes[0, col].imshow(_grey(out), cmap="gray")
            axes[1, col].imshow(errs[i], cmap="magma", vmin=0, vmax=vmax)
            axes[1, col].set_title(f"{name}: |error| 0-{vmax:.3g}", fontsize=9)
        axes[0, col].set_title(name, fontsize=9)
    axes[1, 0].text(
        0.0,
        0.5,
        _wrap(ERROR_LEGEND[task], 34),
        fontsize=7,
        va="center",
        transform=axes[1, 0].transAxes,
    )
    if seg_row:
        axes[2, 1].imshow(seg_error_map(seg_row["real"], seg_row["target"]))
        axes[2, 1].set_title("segmenter on target", fontsize=9)
        for i, (name, prob) in enumerate(zip(names, seg_row["runs"], strict=True)):
            if prob is not None:
                axes[2, 2 + i].imshow(seg_error_map(prob, seg_row["target"]))
                axes[2, 2 + i].set_title(f"segmenter on {name}", fontsize=9)
        axes[2, 0].text(
            0.0,
            0.5,
            _wrap(
                "segmentability: the segmenter's errors against the labels the images were "
                "made from (colours as above)",
                34,
            ),
            fontsize=7,
            va="center",
            transform=axes[2, 0].transAxes,
        )
    fig.suptitle(title, fontsize=10)
    # A fixed layout: tight_layout measures every artist and costs seconds per figure.
    top = 1 - 0.7 / (2.9 * rows)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.04, hspace=0.12)
    _save_figure(fig, path, dpi=100)
    return path


def _save_figure(fig: Any, path: Path, dpi: int) -> None:
    """Save a figure through a temporary file renamed into place; close it whatever happens."""
    import os

    tmp = path.with_name(f".{path.stem}.{os.getpid()}.part{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    except OSError as err:
        raise write_failed(path, err) from None
    finally:
        _plt().close(fig)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def _wrap(text: str, width: int) -> str:
    """Wrap a legend to fit a panel tile."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def plot_loss_curves(path: Path, names: Sequence[str], histories: Sequence[list[dict]]) -> Path:
    """Every run's training losses and validation metrics against step, overlaid, one PNG."""
    plt = _plt()
    keys = [k for k in CURVE_KEYS if any(k in r for h in histories for r in h)]
    seen = {k for h in histories for r in h for k in r if k.startswith("loss")}
    extra = sorted(seen - set(keys) - {"loss_g"})
    keys += extra
    if not keys:
        keys = ["loss"]
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.2 * nrows), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, key in zip(axes.flat, keys, strict=False):
        for i, (name, hist) in enumerate(zip(names, histories, strict=True)):
            pts = [(r["step"], r[key]) for r in hist if key in r and r[key] is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(
                    xs, ys, marker="." if len(pts) < 30 else None, color=colors(i % 10), label=name
                )
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colors(i % 10), label=name) for i, name in enumerate(names)]
    fig.legend(handles=handles, loc="upper center", ncol=min(len(names), 6), fontsize=9)
    top = 1 - 0.55 / (3.2 * nrows)
    fig.subplots_adjust(
        left=0.07, right=0.98, bottom=0.6 / (3.2 * nrows), top=top, wspace=0.28, hspace=0.45
    )
    _save_figure(fig, path, dpi=90)
    return path


ERROR_LEGEND = {
    "segment": "error maps at p > 0.5: red = predicted interior on membrane (false positive), "
    "blue = predicted membrane inside a cell (false negative), white/black = correct",
    "translate": "error maps: |prediction - target|, one colour scale per slice (magma)",
}


# loss_g (the weighted sum of the two terms) would only repeat other panels.
CURVE_KEYS = (
    "loss",
    "loss_g_l1",
    "loss_g_gan",
    "loss_d",
    "val_pixel_error",
    "val_dice_1",
    "val_psnr",
    "val_ssim",
)
