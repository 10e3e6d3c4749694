"""``cellp2p compare``: several trained runs on the same held-out slices, as one report.

Writes ``report.md``, ``report.json`` and ``report.html`` (images inline) into ``out``, with
``panels/*.png`` (input | target | each run | each run's error map, one PNG per slice and
task/direction) and ``loss_curves.png`` (every run's losses and validation metrics overlaid).
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellp2p import io
from cellp2p.errors import CellP2PError
from cellp2p.evaluate import to_json, write_json, write_text_atomic
from cellp2p.metrics import evaluate_arrays
from cellp2p.transforms import parse_slices

Echo = Callable[[str], Any]

# Metrics where a smaller value is better (every other scored metric: larger is better).
LOWER_BETTER = {"pixel_error", "mae", "seg_pixel_error"}
NOT_RANKED = {"v_rand_threshold", "v_info_threshold"}
SEG_SCORE_KEYS = ("dice_1", "pixel_error", "v_rand")  # the segmentability (FCN-score) columns
RUN_COLUMNS = (
    ("run", "run"),
    ("mode", "mode"),
    ("loss", "loss"),
    ("preset", "preset"),
    ("parameters", "params"),
    ("steps_shown", "steps"),
    ("train_time_s", "train time"),
    ("images_per_s", "img/s"),
)
# loss_g (the weighted sum of the two terms) and val_l1 (= MAE) would only repeat other panels.
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
ERROR_LEGEND = {
    "segment": "error maps at p > 0.5: red = predicted interior on membrane (false positive), "
    "blue = predicted membrane inside a cell (false negative), white/black = correct",
    "translate": "error maps: |prediction - target|, one colour scale per slice (magma)",
}


# -- runs ---------------------------------------------------------------------------------------


def run_folder(run: str | Path) -> Path:
    """The run folder of a run folder or of a checkpoint file inside it."""
    path = Path(run)
    if path.is_file():
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if not path.is_dir():
        raise CellP2PError(f"{path}: no such run folder; give folders written by 'cellp2p train'")
    return path


def read_records(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (one per evaluation), oldest first."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: the others still describe the run
    return records


def training_speed(records: Sequence[dict], batch_size: int) -> tuple[float | None, float | None]:
    """(seconds spent in training steps, images per second) from the records' images/s.

    Each record holds the throughput of the steps since the previous one, so the step time is
    the sum of (steps x batch / images_per_s); validation and checkpoint writing are excluded.
    """
    seconds, images, prev = 0.0, 0, 0
    for r in records:
        n = int(r.get("step", prev)) - prev
        ips = r.get("images_per_s")
        prev = int(r.get("step", prev))
        if n <= 0 or not ips:
            continue
        seconds += n * batch_size / float(ips)
        images += n * batch_size
    if images == 0:
        return None, None
    return seconds, images / seconds


def loss_description(cfg: dict, target_kind: str) -> dict[str, Any]:
    """The run's objective: a short label and its parts (unet loss, or pix2pix GAN/λ settings)."""
    if cfg.get("mode") == "unet":
        loss = cfg.get("loss") or ("l1" if target_kind == "image" else "bcedice")
        return {"loss": loss, "unet_loss": loss}
    l1, gan = float(cfg.get("lambda_l1", 100.0)), float(cfg.get("lambda_gan", 1.0))
    conditional = not cfg.get("unconditional", False)
    gan_mode = cfg.get("gan_mode", "vanilla")
    parts = []
    if gan > 0:
        weight = "" if gan == 1 else f"{gan:g}·"
        parts.append(f"{weight}{gan_mode} {'cGAN' if conditional else 'GAN'}")
    if l1 > 0:
        parts.append(f"{l1:g}·L1")
    return {
        "loss": " + ".join(parts),
        "gan_mode": gan_mode,
        "lambda_l1": l1,
        "lambda_gan": gan,
        "conditional": conditional,
    }


def _unique_names(runs: Sequence[Path], names: Sequence[str] | None) -> list[str]:
    """Folder names, made unique with their parent folder where two runs share a name."""
    if names is not None:
        if len(names) != len(runs):
            raise CellP2PError(f"--names: {len(names)} names for {len(runs)} runs; give one each")
        out = [str(n) for n in names]
    else:
        out = [p.resolve().name for p in runs]
        for i, n in enumerate(out):
            if out.count(n) > 1:
                out[i] = f"{runs[i].resolve().parent.name}/{n}"
    for i, n in enumerate(out):
        if out.count(n) > 1:
            out[i] = f"{n} ({i + 1})"
    return out


def describe_run(name: str, run_dir: Path, predictor: Any) -> dict[str, Any]:
    """Name, objective, size, steps and training speed of one run (a table row without metrics)."""
    from cellp2p.models import count_parameters

    cfg = dict(predictor.train_config or {})
    records = read_records(run_dir)
    record = predictor.record or (records[-1] if records else {})
    step = int(record.get("step", 0)) if record else None
    used = [r for r in records if step is None or int(r.get("step", 0)) <= step]
    seconds, ips = training_speed(used, int(cfg.get("batch_size", 1)))
    return {
        "run": name,
        "path": str(run_dir),
        "checkpoint": str(predictor.checkpoint_path),
        "mode": predictor.mode,
        "task": predictor.task,
        "direction": cfg.get("direction", "AtoB"),
        "target_kind": predictor.target_kind,
        "preset": cfg.get("preset"),
        **loss_description(cfg, predictor.target_kind),
        "parameters": count_parameters(predictor.net),
        "steps": step,
        "total_steps": _total_steps(run_dir),
        "train_time_s": seconds,
        "images_per_s": ips,
        "batch_size": cfg.get("batch_size"),
        "crop": cfg.get("crop"),
        "seed": cfg.get("seed"),
    }


def _total_steps(run_dir: Path) -> int | None:
    """The planned number of steps from config.json (None when it is missing)."""
    try:
        return int(json.loads((run_dir / "config.json").read_text())["total_steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- data ---------------------------------------------------------------------------------------


def resolve_data(
    volume: str | Path | None,
    labels: str | Path | None,
    manifest: str | None,
    data_dir: str | Path | None,
    run_configs: Sequence[dict],
    echo: Echo | None = None,
) -> tuple[Path, Path, list[int] | None, dict[str, Any]]:
    """Volume and labels paths, the manifest's val split (if any) and a description for the report.

    Without --volume/--labels/--manifest the data recorded in the first run's config is used.
    """
    if manifest and (volume or labels):
        raise CellP2PError("give either --manifest or --volume/--labels, not both")
    if not manifest and not volume and not labels and run_configs:
        cfg = run_configs[0]
        manifest, data_dir = cfg.get("manifest"), cfg.get("data_dir")
        volume, labels = cfg.get("volume"), cfg.get("labels")
        if echo and (manifest or volume):
            echo(f"data: none given, using the first run's training data ({manifest or volume})")
    if manifest:
        from cellp2p.data import load_manifest, resolve_files

        man = load_manifest(manifest)
        files = resolve_files(man, data_dir, roles=("volume", "labels"))
        val = (man.split or {}).get("val") or None
        info = {
            "manifest": str(manifest),
            "volume": str(files["volume"]),
            "labels": str(files["labels"]),
        }
        return files["volume"], files["labels"], list(val) if val else None, info
    if not volume or not labels:
        raise CellP2PError(
            "no data to compare on: give --volume V.tif --labels L.tif, or --manifest NAME "
            "(e.g. isbi2012)"
        )
    return Path(volume), Path(labels), None, {"volume": str(volume), "labels": str(labels)}


def held_out_slices(
    n: int,
    slices: str | Sequence[int] | None,
    manifest_val: Sequence[int] | None,
    run_configs: Sequence[dict],
    echo: Echo | None = None,
) -> tuple[list[int], str]:
    """Slices to score on and where the choice came from.

    Order: ``slices``, the manifest's val split, the runs' recorded validation slices, and
    otherwise the last fifth of the stack (the hold-out ``cellp2p train`` uses by default).
    """
    if slices is not None:
        spec = slices if isinstance(slices, str) else ",".join(str(int(i)) for i in slices)
        return parse_slices(spec, n) or [], "--slices"
    if manifest_val:
        bad = [i for i in manifest_val if not 0 <= i < n]
        if bad:
            raise CellP2PError(f"manifest val slice {bad[0]} is out of range for {n} slices")
        return list(manifest_val), "the manifest's val split"
    recorded = []
    for cfg in run_configs:
        if cfg.get("val_slices"):
            recorded.append(tuple(parse_slices(cfg["val_slices"], n) or []))
        elif cfg.get("train_slices"):
            train = set(parse_slices(cfg["train_slices"], n) or [])
            recorded.append(tuple(i for i in range(n) if i not in train))
        elif cfg.get("manifest"):  # trained on a manifest: it validated on the manifest's split
            from cellp2p.data import load_manifest

            val = (load_manifest(cfg["manifest"]).split or {}).get("val")
            if val and all(0 <= i < n for i in val):
                recorded.append(tuple(val))
    if recorded:
        if echo and len(set(recorded)) > 1:
            echo("warning: the runs were validated on different slices; scoring all on the first's")
        return list(recorded[0]), "the runs' validation slices"
    n_val = max(1, n // 5) if n > 1 else 1
    return list(range(n - n_val, n)), "the last fifth of the stack"


# -- prediction and scoring ---------------------------------------------------------------------


def foreground(predictor: Any, prob: np.ndarray) -> np.ndarray:
    """Cell-interior probability (Y, X) from a segmentation run's output (C, Y, X) in [0, 1]."""
    if predictor.target_kind == "multiclass":
        # Several classes: foreground = any class but the first (the lowest label value).
        return 1.0 - prob[0]
    return prob[-1]  # one channel: sigmoid or pix2pix (G+1)/2; two: softmax, interior last


def run_outputs(predictor: Any, inputs: np.ndarray) -> np.ndarray:
    """(Z, Y, X) outputs: interior probability (segment) or the image in the target's units."""
    outs = []
    for x in inputs:
        prob = predictor.predict_slice(x)
        if predictor.task == "segment":
            outs.append(foreground(predictor, prob).astype(np.float32))
        else:
            img = np.asarray(predictor.to_output(prob, "image"))
            if img.ndim == 3:
                if img.shape[0] != 1:
                    raise CellP2PError(
                        f"{predictor.checkpoint_path}: {img.shape[0]}-channel output; compare "
                        "scores single-channel translation only"
                    )
                img = img[0]
            outs.append(img)
    return np.stack(outs)


def _seg_metrics(prob: np.ndarray, target: np.ndarray, ids: list[int]) -> dict:
    """Segmentation metrics of interior probabilities (clipped to [0, 1] against float error)."""
    return evaluate_arrays(np.clip(prob, 0.0, 1.0), target, "segment", kind="prob", slice_ids=ids)


# -- figures ------------------------------------------------------------------------------------


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
        raise io.write_failed(path, err) from None
    finally:
        _plt().close(fig)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def check_report_folder(out: str | Path) -> Path:
    """The report folder, created and writable, before any run is loaded or predicted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CellP2PError(f"--out {out}: is a file; give a folder for the report")
    io.check_output(out / "report.md", force=True)
    return out


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


# -- tables -------------------------------------------------------------------------------------


def _fmt(key: str, v: Any) -> str:
    """One table cell."""
    if v is None:
        return "-"
    if key == "parameters":
        return f"{v / 1e6:.2f} M" if v >= 1e5 else f"{v / 1e3:.1f} k"
    if key == "train_time_s":
        return f"{v:.0f} s" if v < 120 else f"{v / 60:.1f} min"
    if key == "images_per_s":
        return f"{v:.1f}"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isinf(v):
            return "inf"
        return f"{v:.2f}" if key in ("psnr", "mae") else f"{v:.4f}"
    return str(v)


def _best(rows: Sequence[dict], key: str) -> float | None:
    """The best value of a metric column (None when unranked or only one row)."""
    vals = [r.get(key) for r in rows if isinstance(r.get(key), int | float)]
    if key in NOT_RANKED or len(set(vals)) < 2:
        return None  # nothing to single out: one row, or every run scored the same
    return min(vals) if key in LOWER_BETTER else max(vals)


def group_table(
    group: dict, runs: dict[str, dict]
) -> tuple[list[str], list[list[str]], list[list[bool]]]:
    """Header, cells and 'best in column' flags of one task/direction group."""
    rows = [runs[n] for n in group["runs"]]
    metric_keys: list[str] = []
    for r in rows:
        metric_keys += [k for k in r["metrics"] if k not in metric_keys]
    seg_keys = (
        [f"seg_{k}" for k in SEG_SCORE_KEYS] if any(r.get("segmentability") for r in rows) else []
    )
    header = [label for _, label in RUN_COLUMNS] + metric_keys + seg_keys
    cells, bold = [], []
    values = [
        {
            **r,
            # An unfinished run (killed, or still training) shows how far it got.
            "steps_shown": r["steps"]
            if not r.get("total_steps") or (r["steps"] or 0) >= r["total_steps"]
            else f"{r['steps']} of {r['total_steps']}",
            **r["metrics"],
            **{f"seg_{k}": (r.get("segmentability") or {}).get(k) for k in SEG_SCORE_KEYS},
        }
        for r in rows
    ]
    best = {k: _best(values, k) for k in metric_keys + seg_keys}
    for v in values:
        cells.append(
            [_fmt(k, v.get(k)) for k, _ in RUN_COLUMNS]
            + [_fmt(k, v.get(k)) for k in metric_keys + seg_keys]
        )
        bold.append(
            [False] * len(RUN_COLUMNS)
            + [best[k] is not None and v.get(k) == best[k] for k in metric_keys + seg_keys]
        )
    return header, cells, bold


def _md_table(
    header: Sequence[str],
    cells: Sequence[Sequence[str]],
    bold: Sequence[Sequence[bool]] | None = None,
) -> str:
    """A GitHub-flavoured markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for i, row in enumerate(cells):
        shown = [f"**{c}**" if bold and bold[i][j] else c for j, c in enumerate(row)]
        lines.append("| " + " | ".join(shown) + " |")
    return "\n".join(lines)


def _html_table(
    header: Sequence[str],
    cells: Sequence[Sequence[str]],
    bold: Sequence[Sequence[bool]] | None = None,
) -> str:
    """An HTML table."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(cells):
        tds = "".join(
            f"<td><b>{html.escape(c)}</b></td>"
            if bold and bold[i][j]
            else f"<td>{html.escape(c)}</td>"
            for j, c in enumerate(row)
        )
        body.append(f"<tr>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _seg_table(seg: dict) -> tuple[list[str], list[list[str]]]:
    """Segmentability table: the segmenter on real images (ceiling), then on each run's images."""
    header = ["images", *SEG_SCORE_KEYS]
    rows = [["real (ceiling)", *(_fmt(k, seg["real"].get(k)) for k in SEG_SCORE_KEYS)]]
    for name, m in seg["runs"].items():
        rows.append([f"generated by {name}", *(_fmt(k, m.get(k)) for k in SEG_SCORE_KEYS)])
    return header, rows


GROUP_TITLES = {
    ("segment", "AtoB"): "Segmentation (volume → labels)",
    ("translate", "AtoB"): "Translation (volume → labels image)",
    ("translate", "BtoA"): "Translation (labels → volume)",
}

NOTES = [
    "Metrics are means over the held-out slices; the best value of each column is in bold.",
    "loss: the U-Net's supervised loss; for pix2pix λ_GAN·<gan mode> GAN or cGAN (cGAN: the "
    "discriminator also sees the input; λ_GAN written only when not 1) + λ_L1·L1.",
    "Segmentation: pixel_error at p > 0.5; dice/iou class 0 = membrane, 1 = cell interior; "
    "v_rand / v_info are the ISBI 2012 foreground-restricted scores, best over thresholds "
    "0.0-0.9 (split/merge parts at that threshold); ap_50 / ap_75 match cells at IoU 0.5 / 0.75. "
    "A pix2pix segmentation run's output (G+1)/2 is taken as the interior probability.",
    "Translation: MAE and PSNR in the target's units (data range = its dtype's range), SSIM "
    "with an 11-pixel gaussian window.",
    "train time: time spent in optimizer steps (from the images/s in metrics.jsonl; validation "
    "and checkpoint writing excluded); img/s: training crops per second.",
]


def render_markdown(report: dict) -> str:
    """report.md: settings, one table per task/direction, segmentability, figures."""
    lines = [f"# {report['title']}", ""]
    data = report["data"]
    src = f"manifest `{data['manifest']}`" if data.get("manifest") else f"`{data['volume']}`"
    lines += [
        f"Data: {src} (labels `{data['labels']}`); held-out slices "
        f"{_ranges(report['slices'])} ({report['slices_from']}); "
        f"checkpoint: {report['checkpoint']}.",
        "",
    ]
    for g in report["groups"]:
        header, cells, bold = group_table(g, report["runs"])
        lines += [f"## {g['title']}", "", _md_table(header, cells, bold), ""]
    for g in report["groups"]:
        seg = g.get("segmentability")
        if seg:
            header, cells = _seg_table(seg)
            lines += [
                f"## Segmentability of generated images: {g['title']}",
                "",
                f"The segmenter `{seg['segmenter']}` (trained on real images) segments each "
                "run's generated images; scores are against the labels the images were made "
                "from (the pix2pix paper's FCN-score). The real images give the ceiling.",
                "",
                _md_table(header, cells),
                "",
            ]
    lines += ["## Notes", ""] + [f"- {n}" for n in NOTES] + [""]
    lines += ["## Loss curves", "", f"![loss curves]({report['files']['loss_curves']})", ""]
    lines += ["## Slices", ""]
    for g in report["groups"]:
        lines.append(f"{g['title']}: {ERROR_LEGEND[g['task']]}.")
        lines.append("")
        for p in g["panels"]:
            lines += [f"![{Path(p).stem}]({p})", ""]
    return "\n".join(lines)


def _img_tag(path: Path, alt: str) -> str:
    """An <img> with the PNG inline as base64, so report.html is one self-contained file."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(report: dict, out: Path) -> str:
    """report.html: the markdown report's content with the figures inline."""
    data = report["data"]
    src = f"manifest {data['manifest']}" if data.get("manifest") else data["volume"]
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(report['title'])}</title><style>",
        "body{font-family:sans-serif;margin:1.5em;max-width:100%}"
        "table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}"
        "th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}"
        "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}"
        ".scroll{overflow-x:auto}img{max-width:100%;display:block;margin:0.5em 0}",
        "</style></head><body>",
        f"<h1>{html.escape(report['title'])}</h1>",
        f"<p>Data: {html.escape(src)} (labels {html.escape(data['labels'])}); held-out slices "
        f"{_ranges(report['slices'])} ({html.escape(report['slices_from'])}); checkpoint: "
        f"{html.escape(report['checkpoint'])}.</p>",
    ]
    for g in report["groups"]:
        header, cells, bold = group_table(g, report["runs"])
        parts += [
            f"<h2>{html.escape(g['title'])}</h2>",
            f"<div class='scroll'>{_html_table(header, cells, bold)}</div>",
        ]
    for g in report["groups"]:
        seg = g.get("segmentability")
        if seg:
            header, cells = _seg_table(seg)
            parts += [
                f"<h2>Segmentability of generated images: {html.escape(g['title'])}</h2>",
                f"<p>The segmenter {html.escape(seg['segmenter'])} (trained on real images) "
                "segments each run's generated images, scored against the labels they were made "
                "from (the pix2pix paper's FCN-score); the real images give the ceiling.</p>",
                _html_table(header, cells),
            ]
    parts.append(
        "<h2>Notes</h2><ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in NOTES) + "</ul>"
    )
    parts += ["<h2>Loss curves</h2>", _img_tag(out / report["files"]["loss_curves"], "loss curves")]
    parts.append("<h2>Slices</h2>")
    for g in report["groups"]:
        parts.append(f"<p>{html.escape(g['title'])}: {html.escape(ERROR_LEGEND[g['task']])}.</p>")
        parts += [_img_tag(out / p, Path(p).stem) for p in g["panels"]]
    parts.append("</body></html>")
    return "\n".join(parts)


def _ranges(ids: Sequence[int]) -> str:
    """[25, 26, 27, 29] -> '25-27, 29'."""
    out, ids = [], sorted(ids)
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ", ".join(out)


# -- compare ------------------------------------------------------------------------------------


def compare(
    runs: Sequence[str | Path],
    *,
    volume: str | Path | None = None,
    labels: str | Path | None = None,
    manifest: str | None = None,
    data_dir: str | Path | None = None,
    slices: str | Sequence[int] | None = None,
    out: str | Path,
    segmenter: str | Path | None = None,
    names: Sequence[str] | None = None,
    checkpoint: str = "last",
    title: str | None = None,
    device: str = "auto",
    echo: Echo | None = print,
) -> dict:
    """Score every run on the same held-out slices; write report.md/.json/.html, panels, curves.

    Each run is scored by its own task: segmentation runs (unet, or pix2pix with task segment)
    on the labels, translation runs on the target images (the volume for ``BtoA``). With
    ``segmenter`` (a segmentation run trained on real images) every ``BtoA`` translation run's
    generated images are segmented and scored against the labels they came from, next to the
    segmenter on the real images (the ceiling). ``checkpoint`` "last" (default) scores the final
    weights: best.pt is chosen on these very validation slices, which would flatter it.
    Returns the content of report.json.
    """
    from cellp2p.checkpoint import resolve_checkpoint
    from cellp2p.predict import load_predictor

    if not runs:
        raise CellP2PError("compare needs at least one run folder")
    if checkpoint not in ("last", "best"):
        raise CellP2PError(f"--checkpoint {checkpoint!r} unknown; use last or best")
    say = echo or (lambda _msg: None)
    out = check_report_folder(out)
    dirs = [run_folder(r) for r in runs]
    run_names = _unique_names(dirs, names)

    def checkpoint_of(run: str | Path, d: Path) -> Path:
        if Path(run).is_file():
            return Path(run)
        wanted = d / "checkpoints" / f"{checkpoint}.pt"
        return wanted if wanted.is_file() else resolve_checkpoint(d)

    predictors = [
        load_predictor(checkpoint_of(r, d), device) for r, d in zip(runs, dirs, strict=True)
    ]
    configs = [dict(p.train_config or {}) for p in predictors]
    vpath, lpath, man_val, data_info = resolve_data(
        volume, labels, manifest, data_dir, configs, say
    )
    from cellp2p import validate

    with io.open_stack(vpath) as vr, io.open_stack(lpath) as lr:
        n = len(vr)
        validate.check_pair(vr.shape, lr.shape, vpath, lpath)
        vshape, lshape = tuple(vr.shape), tuple(lr.shape)
    if len(lshape) != 3:
        raise CellP2PError(f"{lpath}: labels have {lshape[1]} channels; compare needs one")
    # Every run must take the images it will be given, before anything is predicted.
    for run, pred in zip(runs, predictors, strict=True):
        btoa = (pred.train_config or {}).get("direction") == "BtoA"
        src, shape = (lpath, lshape) if btoa else (vpath, vshape)
        nchan = 1 if len(shape) == 3 else shape[1]
        if nchan != pred.in_channels:
            raise CellP2PError(
                f"{src}: {nchan} channel(s) but {run} was trained on {pred.in_channels}; "
                "compare runs on the data they were trained on"
            )
    seg_predictor = _load_segmenter(segmenter, device) if segmenter is not None else None
    vchan = 1 if len(vshape) == 3 else vshape[1]
    if seg_predictor is not None and seg_predictor.in_channels != vchan:
        raise CellP2PError(
            f"{vpath}: {vchan} channel(s) but --segmenter {segmenter} was trained on "
            f"{seg_predictor.in_channels}; give a segmenter trained on these images"
        )
    ids, ids_from = held_out_slices(n, slices, man_val, configs, say)
    vol = io.read_stack(vpath, ids).data
    lab = io.read_stack(lpath, ids).data
    validate.check_finite(vol, vpath)
    validate.check_finite(lab, lpath)

    run_rows: dict[str, dict] = {}
    outputs: dict[str, np.ndarray] = {}
    for name, d, pred in zip(run_names, dirs, predictors, strict=True):
        row = describe_run(name, d, pred)
        inputs, target = (lab, vol) if row["direction"] == "BtoA" else (vol, lab)
        say(f"{name}: {row['mode']} {row['task']} {row['direction']}, predicting {len(ids)} slices")
        t0 = time.perf_counter()
        outputs[name] = run_outputs(pred, inputs)
        row["predict_s"] = time.perf_counter() - t0
        if row["task"] == "segment":
            res = _seg_metrics(outputs[name], target, ids)
        else:
            res = evaluate_arrays(outputs[name], target, "translate", slice_ids=ids)
        row["metrics"], row["per_slice"] = res["mean"], res["per_slice"]
        run_rows[name] = row

    # Groups: one table (and one panel set) per task and direction, in the runs' order.
    groups: list[dict] = []
    for name in run_names:
        key = (run_rows[name]["task"], run_rows[name]["direction"])
        g = next((g for g in groups if (g["task"], g["direction"]) == key), None)
        if g is None:
            g = {
                "task": key[0],
                "direction": key[1],
                "title": GROUP_TITLES.get(key, f"{key[0]} ({key[1]})"),
                "runs": [],
            }
            groups.append(g)
        g["runs"].append(name)

    seg_probs: dict[str, Any] = {}
    if segmenter is not None:
        seg_probs = _segmentability(
            seg_predictor, segmenter, groups, run_rows, outputs, vol, lab, ids, say
        )
    elif any(g["task"] == "translate" and g["direction"] == "BtoA" for g in groups):
        say("note: pass --segmenter RUN to score how segmentable the generated images are")

    panel_dir = out / "panels"
    if panel_dir.is_dir():
        for old in panel_dir.glob("*.png"):
            old.unlink()  # panels of an earlier compare (other slices) would mislead
    for gi, g in enumerate(groups):
        g["panels"] = []
        tag = f"{gi + 1}_{g['task']}_{g['direction']}"
        for z, sid in enumerate(ids):
            inp, tgt = (lab[z], vol[z]) if g["direction"] == "BtoA" else (vol[z], lab[z])
            seg_row = None
            if g.get("segmentability"):
                seg_row = {
                    "real": seg_probs["real"][z],
                    "target": lab[z],
                    "runs": [seg_probs[n][z] if n in seg_probs else None for n in g["runs"]],
                }
            p = save_slice_panel(
                panel_dir / f"{tag}_slice_{sid:04d}.png",
                f"{g['title']}: slice {sid}",
                inp,
                tgt,
                g["runs"],
                [outputs[n][z] for n in g["runs"]],
                g["task"],
                seg_row,
            )
            g["panels"].append(str(p.relative_to(out)))
    curves = plot_loss_curves(out / "loss_curves.png", run_names, [read_records(d) for d in dirs])

    report = {
        "title": title or f"cellp2p compare: {len(run_names)} runs",
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "data": data_info,
        "slices": ids,
        "slices_from": ids_from,
        "checkpoint": checkpoint,
        "groups": groups,
        "runs": run_rows,
        "files": {"loss_curves": str(curves.relative_to(out))},
    }
    write_text_atomic(out / "report.md", render_markdown(report))
    write_text_atomic(out / "report.html", render_html(report, out))
    write_json(out / "report.json", report)
    say(f"wrote {out / 'report.md'}, report.html and report.json")
    return to_json(report)


def _load_segmenter(segmenter: str | Path, device: str) -> Any:
    """The --segmenter run, which must segment real images (task segment, direction AtoB)."""
    from cellp2p.predict import load_predictor

    seg = load_predictor(segmenter, device)
    seg_cfg = seg.train_config or {}
    if seg.task != "segment" or seg_cfg.get("direction", "AtoB") != "AtoB":
        raise CellP2PError(
            f"{segmenter}: --segmenter must be a segmentation run trained on real images "
            "(task segment, direction AtoB)"
        )
    return seg


def _segmentability(
    seg: Any,
    segmenter: str | Path,
    groups: list[dict],
    run_rows: dict[str, dict],
    outputs: dict[str, np.ndarray],
    vol: np.ndarray,
    lab: np.ndarray,
    ids: list[int],
    say: Echo,
) -> dict[str, np.ndarray]:
    """FCN-score: the segmenter on real and on generated images; fills the groups and rows."""
    targets = [g for g in groups if g["task"] == "translate" and g["direction"] == "BtoA"]
    if not targets:
        say("note: --segmenter only scores runs that make images from labels (--direction BtoA)")
        return {}
    n_runs = sum(len(g["runs"]) for g in targets)
    say(f"segmentability: {segmenter} on the real images and on {n_runs} runs' images")
    probs = {"real": np.stack([foreground(seg, seg.predict_slice(x)) for x in vol])}
    real = _seg_metrics(probs["real"], lab, ids)["mean"]
    for g in targets:
        g["segmentability"] = {"segmenter": str(segmenter), "real": real, "runs": {}}
        for name in g["runs"]:
            imgs = (
                outputs[name].astype(vol.dtype)
                if np.issubdtype(vol.dtype, np.integer)
                else outputs[name]
            )
            probs[name] = np.stack([foreground(seg, seg.predict_slice(x)) for x in imgs])
            scores = _seg_metrics(probs[name], lab, ids)["mean"]
            g["segmentability"]["runs"][name] = scores
            run_rows[name]["segmentability"] = scores
    return probs
