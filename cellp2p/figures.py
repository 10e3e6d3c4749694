"""Every picture cellp2p draws: training sample panels and curves, comparison panels, error maps.

One display scaling (:func:`display_scale`) and one curve-drawing core (:func:`_draw_curves`)
serve training (:func:`save_panel`, :func:`plot_curves`) and ``compare``
(:func:`save_slice_panel`, :func:`plot_loss_curves`). Figures are written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellp2p.fsutil import atomic_path, write_failed
from cellp2p.outputs import THRESHOLD

ERROR_LEGEND = {
    "segment": f"error maps at p > {THRESHOLD:g}: red = predicted interior on membrane (false "
    "positive), blue = predicted membrane inside a cell (false negative), white/black = correct",
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

Series = tuple[str, list[tuple[float, float]]]  # (label, (step, value) points)


def _plt() -> Any:
    """matplotlib with the file-only Agg backend (no display on servers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig: Any, path: Path, dpi: int) -> None:
    """Save a figure through a temporary file renamed into place; close it whatever happens."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    except OSError as err:
        raise write_failed(path, err) from None
    finally:
        _plt().close(fig)


# -- display scaling ---------------------------------------------------------------------------


def display_scale(img: np.ndarray) -> np.ndarray:
    """An image for display: float32 in [0, 1], its 0.5-99.5 percentiles stretched to 0-1.

    A channel-first image becomes (Y, X, 3) when it has three channels, else its first channel.
    """
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 3:
        img = np.moveaxis(img, 0, -1) if img.shape[0] == 3 else img[0]
    lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0
    return np.clip((img - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def save_panel(path: Path, images: list[np.ndarray]) -> None:
    """input | target | prediction … side by side as one PNG (training samples)."""
    from PIL import Image

    tiles = [(display_scale(im) * 255).astype(np.uint8) for im in images]
    tiles = [np.repeat(t[..., None], 3, -1) if t.ndim == 2 else t for t in tiles]
    h = max(t.shape[0] for t in tiles)
    gap = np.full((h, 4, 3), 255, np.uint8)
    row = []
    for t in tiles:
        pad = np.zeros((h, t.shape[1], 3), np.uint8)
        pad[: t.shape[0]] = t
        row += [pad, gap]
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(np.concatenate(row[:-1], axis=1)).save(tmp, format="PNG")


# -- curves ------------------------------------------------------------------------------------


def _points(records: Sequence[dict], key: str) -> list[tuple[float, float]]:
    """(step, value) of every record holding ``key``."""
    return [(r["step"], r[key]) for r in records if key in r and r[key] is not None]


def _draw_curves(
    path: Path,
    panels: Sequence[tuple[str, Sequence[Series]]],
    *,
    title: str = "",
    ncols: int = 3,
    legend: Sequence[str] | None = None,
    dpi: int = 90,
) -> Path:
    """One axis per (title, series) panel against step, one PNG.

    Series keep their colour by position; ``legend`` (labels) draws one legend for the figure,
    otherwise every panel has its own.
    """
    plt = _plt()
    ncols = max(1, min(ncols, len(panels)))
    nrows = max(1, math.ceil(len(panels) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.2 * nrows), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (name, series) in zip(axes.flat, panels, strict=False):
        for i, (label, pts) in enumerate(series):
            if pts:
                xs, ys = zip(*pts, strict=True)
                marker = "." if len(pts) < 30 else None
                ax.plot(xs, ys, marker=marker, color=colors(i % 10), label=label)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if legend is None and any(pts for _, pts in series):
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    top = 1 - 0.55 / (3.2 * nrows)
    if legend is not None:
        handles = [plt.Line2D([], [], color=colors(i % 10), label=n) for i, n in enumerate(legend)]
        fig.legend(handles=handles, loc="upper center", ncol=min(len(legend), 6), fontsize=9)
    elif title:
        fig.suptitle(title, fontsize=10)
    # A fixed layout: tight_layout measures every artist and costs seconds per figure.
    bottom = 0.6 / (3.2 * nrows)
    fig.subplots_adjust(left=0.07, right=0.98, bottom=bottom, top=top, wspace=0.28, hspace=0.45)
    _save_figure(fig, path, dpi=dpi)
    return path


def plot_curves(path: Path, records: list[dict], title: str = "") -> None:
    """One run's loss terms and validation metrics against step, one PNG (nothing if no records)."""
    if not records:
        return
    loss_keys = [k for k in records[-1] if k.startswith("loss")]
    val_keys = [k for k in records[-1] if k.startswith("val_")]
    panels = [
        ("training losses", [(k, _points(records, k)) for k in loss_keys]),
        ("validation", [(k, _points(records, k)) for k in val_keys]),
    ]
    _draw_curves(path, panels, title=title, ncols=2, dpi=80)


def plot_loss_curves(path: Path, names: Sequence[str], histories: Sequence[list[dict]]) -> Path:
    """Every run's training losses and validation metrics against step, overlaid, one PNG."""
    keys = [k for k in CURVE_KEYS if any(k in r for h in histories for r in h)]
    seen = {k for h in histories for r in h for k in r if k.startswith("loss")}
    keys += sorted(seen - set(keys) - {"loss_g"})
    panels = [
        (k, [(n, _points(h, k)) for n, h in zip(names, histories, strict=True)]) for k in keys
    ]
    return _draw_curves(path, panels or [("loss", [])], legend=list(names))


# -- comparison panels -------------------------------------------------------------------------


def seg_error_map(prob: np.ndarray, target: np.ndarray) -> np.ndarray:
    """RGB map at p > 0.5: correct interior white, correct membrane black, FP red, FN blue."""
    pred, truth = np.asarray(prob) > THRESHOLD, np.asarray(target) > 0
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
    rows, cols = (3 if seg_row else 2), 2 + len(outputs)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    _tile(axes[0, 0], display_scale(inp), "input")
    if task == "segment":
        _tile(axes[0, 1], np.asarray(target) > 0, "target", vmin=0, vmax=1)
        _segment_columns(axes, names, outputs, target)
    else:
        _tile(axes[0, 1], display_scale(target), "target")
        _translate_columns(axes, names, outputs, target)
    _legend(axes[1, 0], ERROR_LEGEND[task])
    if seg_row:
        _tile(axes[2, 1], seg_error_map(seg_row["real"], seg_row["target"]), "segmenter on target")
        for i, (name, prob) in enumerate(zip(names, seg_row["runs"], strict=True)):
            if prob is not None:
                error_map = seg_error_map(prob, seg_row["target"])
                _tile(axes[2, 2 + i], error_map, f"segmenter on {name}")
        _legend(
            axes[2, 0],
            "segmentability: the segmenter's errors against the labels the images were made "
            "from (colours as above)",
        )
    fig.suptitle(title, fontsize=10)
    # A fixed layout: tight_layout measures every artist and costs seconds per figure.
    top = 1 - 0.7 / (2.9 * rows)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=top, wspace=0.04, hspace=0.12)
    _save_figure(fig, path, dpi=100)
    return path


def as_shown(image: np.ndarray) -> np.ndarray:
    """An image (C, Y, X) as it is (no stretch): 8-bit / 255 as (Y, X, 3) or grey (Y, X)."""
    img = np.asarray(image)
    if img.ndim == 3:
        img = np.moveaxis(img, 0, -1) if img.shape[0] == 3 else img[0]
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    return display_scale(img if img.ndim == 2 else np.moveaxis(img, -1, 0))


def save_ab_panel(
    path: Path,
    title: str,
    a: np.ndarray,
    b: np.ndarray,
    names: Sequence[str],
    outputs: Sequence[np.ndarray],
    labels: tuple[str, str] = ("A (input)", "B (target)"),
) -> Path:
    """A | B | each run's generated image, in one row, the images shown as they are."""
    plt = _plt()
    cols = 2 + len(outputs)
    fig, axes = plt.subplots(1, cols, figsize=(2.6 * cols, 3.0), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    _tile(axes[0, 0], as_shown(a), labels[0], vmin=0, vmax=1)
    _tile(axes[0, 1], as_shown(b), labels[1], vmin=0, vmax=1)
    for i, (name, out) in enumerate(zip(names, outputs, strict=True)):
        _tile(axes[0, 2 + i], as_shown(out), name, vmin=0, vmax=1)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.82, wspace=0.04)
    _save_figure(fig, path, dpi=100)
    return path


def _tile(ax: Any, image: np.ndarray, title: str, **imshow: Any) -> None:
    """One image of a panel with its title (grey unless the image is RGB)."""
    options = {"cmap": "gray", **imshow} if np.ndim(image) == 2 else imshow
    ax.imshow(image, **options)
    ax.set_title(title, fontsize=9)


def _segment_columns(
    axes: Any, names: Sequence[str], outputs: Sequence[np.ndarray], target: np.ndarray
) -> None:
    """Each run's probabilities (top) and error map at the threshold (below)."""
    for i, (name, out) in enumerate(zip(names, outputs, strict=True)):
        _tile(axes[0, 2 + i], out, name, vmin=0, vmax=1)
        _tile(axes[1, 2 + i], seg_error_map(out, target), f"{name}: errors")


def _translate_columns(
    axes: Any, names: Sequence[str], outputs: Sequence[np.ndarray], target: np.ndarray
) -> None:
    """Each run's image (top) and |error| map on one colour scale (below)."""
    t = np.asarray(target, np.float32)
    errs = [np.abs(np.asarray(o, np.float32) - t) for o in outputs]
    vmax = max([float(np.percentile(e, 99.5)) for e in errs] + [1e-6])
    for i, (name, out) in enumerate(zip(names, outputs, strict=True)):
        _tile(axes[0, 2 + i], display_scale(out), name)
        title = f"{name}: |error| 0-{vmax:.3g}"
        _tile(axes[1, 2 + i], errs[i], title, cmap="magma", vmin=0, vmax=vmax)


def _legend(ax: Any, text: str) -> None:
    """A legend written into an empty tile."""
    ax.text(0.0, 0.5, _wrap(text, 34), fontsize=7, va="center", transform=ax.transAxes)


def _wrap(text: str, width: int) -> str:
    """Wrap a legend to fit a panel tile."""
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
