"""``cellp2p compare``: several trained runs on the same held-out slices, as one report.

Writes ``report.md``, ``report.json`` and ``report.html`` (images inline) into ``out``, with
``panels/*.png`` (input | target | each run | each run's error map, one PNG per slice and
task/direction) and ``loss_curves.png`` (every run's losses and validation metrics overlaid).
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cellp2p.figures import ERROR_LEGEND
from cellp2p.scoring import NOT_RANKED, lower_is_better
from cellp2p.slices import format_ranges

Echo = Callable[[str], Any]

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


# -- runs ---------------------------------------------------------------------------------------


# -- data ---------------------------------------------------------------------------------------


# -- prediction and scoring ---------------------------------------------------------------------


# -- figures ------------------------------------------------------------------------------------


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
    return min(vals) if lower_is_better(key) else max(vals)


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
        f"{format_ranges(report['slices'])} ({report['slices_from']}); "
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
        f"{format_ranges(report['slices'])} ({html.escape(report['slices_from'])}); checkpoint: "
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


# -- compare ------------------------------------------------------------------------------------
