"""``cellp2p compare``'s report: one list of sections, rendered as Markdown and as HTML.

:func:`build_sections` turns report.json's content into sections (a title, then paragraphs,
tables, bullet lists and images); :func:`to_markdown` and :func:`to_html` render that one list,
so the two files cannot drift apart. :func:`write_report` writes ``report.md``, ``report.html``
(images inline) and ``report.json`` into the report folder, next to ``panels/*.png`` and
``loss_curves.png`` drawn by :mod:`cellp2p.figures`.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cellp2p.figures import ERROR_LEGEND
from cellp2p.fsutil import write_json, write_text_atomic
from cellp2p.scoring import NOT_RANKED, lower_is_better
from cellp2p.slices import format_ranges

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


# -- sections ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """A table of formatted cells; ``bold`` marks the best value of a column."""

    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    bold: Sequence[Sequence[bool]] | None = None


@dataclass(frozen=True)
class Image:
    """A PNG of the report folder (``path`` relative to it)."""

    path: str
    alt: str


@dataclass(frozen=True)
class Bullets:
    """A bullet list."""

    items: Sequence[str]


# A paragraph is a str; `backticks` mark file names and code in both renderings.
Block = str | Table | Image | Bullets


@dataclass(frozen=True)
class Section:
    """A heading (level 1 or 2) and the blocks under it, in order."""

    title: str
    blocks: Sequence[Block]
    level: int = 2


# -- tables ----------------------------------------------------------------------------------


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


def group_table(group: dict, runs: dict[str, dict]) -> Table:
    """The table of one task/direction group: run columns, metrics, best of each in bold."""
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
    return Table(header, cells, bold)


def split_columns(table: Table, n: int) -> tuple[Table, Table]:
    """Columns 0..n-1, and column 0 (the run) with columns n… : two narrower tables."""

    def part(cols: list[int]) -> Table:
        """The table of columns ``cols``."""
        bold = [[b[j] for j in cols] for b in table.bold] if table.bold else None
        return Table(
            [table.header[j] for j in cols], [[r[j] for j in cols] for r in table.rows], bold
        )

    width = len(table.header)
    return part(list(range(n))), part([0, *range(n, width)])


# The few scores that matter for a task (the headline table), and their short headers.
HEADLINE = {
    "segment": (
        ("pixel_error", "pixel error"),
        ("dice_1", "Dice"),
        ("v_rand", "V_rand"),
        ("ap_50", "AP@0.5"),
    ),
    "translate": (("mae", "MAE"), ("psnr", "PSNR"), ("ssim", "SSIM"), ("seg_dice_1", "seg. Dice")),
}
HEADLINE_WIDTH = 100  # characters of a Markdown headline table line, at most


def _row_values(r: dict) -> dict[str, Any]:
    """A run row flattened: its fields, its metrics, segmentability as seg_<metric>."""
    seg = r.get("segmentability") or {}
    return {**r, **r["metrics"], **{f"seg_{k}": seg.get(k) for k in SEG_SCORE_KEYS}}


def headline_table(group: dict, runs: dict[str, dict]) -> Table:
    """Run, objective, steps and the task's few main scores: fits 100 Markdown columns."""
    values = [_row_values(runs[n]) for n in group["runs"]]
    keys = [(k, h) for k, h in HEADLINE[group["task"]] if any(v.get(k) is not None for v in values)]
    best = {k: _best(values, k) for k, _ in keys}
    header = ["run", "loss", "steps", *(h for _, h in keys)]
    rows = [
        [str(v["run"]), str(v.get("loss") or "-"), _fmt("steps", v.get("steps"))]
        + [_fmt(k, v.get(k)) for k, _ in keys]
        for v in values
    ]
    bold = [
        [False] * 3 + [best[k] is not None and v.get(k) == best[k] for k, _ in keys] for v in values
    ]
    return _fit(Table(header, rows, bold), HEADLINE_WIDTH)


def _fit(table: Table, width: int) -> Table:
    """Shorten the text columns (run, loss) with "…" until every Markdown line fits ``width``."""
    rows = [list(r) for r in table.rows]
    for limit in range(40, 3, -1):
        fitted = Table(table.header, rows, table.bold)
        if max(len(line) for line in _md_table(fitted).splitlines()) <= width:
            return fitted
        rows = [[_clip(c, limit) if j < 2 else c for j, c in enumerate(r)] for r in rows]
    return Table(table.header, rows, table.bold)


def _clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, the cut marked with "…"."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _seg_table(seg: dict) -> Table:
    """Segmentability table: the segmenter on real images (ceiling), then on each run's images."""
    header = ["images", *SEG_SCORE_KEYS]
    rows = [["real (ceiling)", *(_fmt(k, seg["real"].get(k)) for k in SEG_SCORE_KEYS)]]
    for name, m in seg["runs"].items():
        rows.append([f"generated by {name}", *(_fmt(k, m.get(k)) for k in SEG_SCORE_KEYS)])
    return Table(header, rows)


GROUP_TITLES = {
    ("segment", "AtoB"): "Segmentation (volume → labels)",
    ("translate", "AtoB"): "Translation (volume → labels image)",
    ("translate", "BtoA"): "Translation (labels → volume)",
}

AB_LEGEND = "A | B | each run's generated image, shown as they are (no contrast stretch)"
SUMMARY_NOTE = (
    "The main scores of each run, the best of each column in bold (pixel error and MAE: lower "
    "is better; the others: higher). Every score and the run details follow."
)
SEG_NOTE = " seg. Dice: the segmenter's Dice on the generated images (segmentability)."

NOTES = [
    "Metrics are means over the held-out slices; the best value of each column is in bold.",
    "loss: the U-Net's supervised loss; for pix2pix λ_GAN·<gan mode> GAN or cGAN (cGAN: the "
    "discriminator also sees the input; λ_GAN written only when not 1) + λ_L1·L1.",
    "Segmentation: pixel_error at p > 0.5; dice/iou class 0 = membrane, 1 = cell interior; "
    "v_rand / v_info are the ISBI 2012 foreground-restricted scores, best over thresholds "
    "0.0-0.9 (split/merge parts at that threshold); ap_50 / ap_75 match cells at IoU 0.5 / 0.75. "
    "A pix2pix segmentation run's output in [0, 1] ((G+1)/2 for tanh generators, G for sigmoid "
    "ones) is taken as the interior probability.",
    "Translation: MAE and PSNR in the target's units (data range = its dtype's range), SSIM "
    "with an 11-pixel gaussian window.",
    "train time: time spent in optimizer steps (from the images/s in metrics.jsonl; validation "
    "and checkpoint writing excluded); img/s: training crops per second.",
]


def build_sections(report: dict) -> list[Section]:
    """The report as sections: settings, one table per group, segmentability, notes, figures."""
    sections = [Section(report["title"], [_intro(report)], level=1)]
    groups = report["groups"]
    summary: list[Block] = []
    for g in groups:
        summary += [f"{g['title']}:", headline_table(g, report["runs"])]
    has_seg = any(g.get("segmentability") for g in groups)
    summary.append(SUMMARY_NOTE + (SEG_NOTE if has_seg else ""))
    sections.append(Section("Summary", summary))
    for g in groups:  # the runs (objective, size, speed), then every score
        runs_part, scores = split_columns(group_table(g, report["runs"]), len(RUN_COLUMNS))
        sections.append(Section(f"Details: {g['title']}", [runs_part, scores]))
    sections += [_seg_section(g) for g in groups if g.get("segmentability")]
    sections.append(Section("Notes", [Bullets(NOTES)]))
    curves = report["files"]["loss_curves"]
    sections.append(Section("Loss curves", [Image(curves, "loss curves")]))
    slices: list[Block] = []
    for g in groups:
        legend = AB_LEGEND if report["data"].get("ab") else ERROR_LEGEND[g["task"]]
        slices.append(f"{g['title']}: {legend}.")
        slices += [Image(p, Path(p).stem) for p in g["panels"]]
    sections.append(Section("Images" if report["data"].get("ab") else "Slices", slices))
    return sections


def _intro(report: dict) -> str:
    """The report's first paragraph: data, what was scored, checkpoint."""
    data = report["data"]
    if data.get("ab"):
        names = report.get("images") or []
        shown = ", ".join(names[:6]) + (f" … ({len(names)} images)" if len(names) > 6 else "")
        return (
            f"Data: AB images `{data['ab']}`; scored on {shown} ({report['slices_from']}); "
            f"checkpoint: {report['checkpoint']}."
        )
    src = f"manifest `{data['manifest']}`" if data.get("manifest") else f"`{data['volume']}`"
    return (
        f"Data: {src} (labels `{data['labels']}`); held-out slices "
        f"{format_ranges(report['slices'])} ({report['slices_from']}); "
        f"checkpoint: {report['checkpoint']}."
    )


def _seg_section(group: dict) -> Section:
    """Segmentability of one group's generated images (the pix2pix paper's FCN-score)."""
    seg = group["segmentability"]
    text = (
        f"The segmenter `{seg['segmenter']}` (trained on real images) segments each run's "
        "generated images; scores are against the labels the images were made from (the "
        "pix2pix paper's FCN-score). The real images give the ceiling."
    )
    return Section(f"Segmentability of generated images: {group['title']}", [text, _seg_table(seg)])


# -- Markdown ----------------------------------------------------------------------------------


def to_markdown(sections: Sequence[Section]) -> str:
    """GitHub-flavoured Markdown of a section list."""
    lines: list[str] = []
    for sec in sections:
        lines += [f"{'#' * sec.level} {sec.title}", ""]
        for block in sec.blocks:
            lines += [_md_block(block), ""]
    return "\n".join(lines)


def _md_block(block: Block) -> str:
    """One block in Markdown."""
    if isinstance(block, Table):
        return _md_table(block)
    if isinstance(block, Image):
        return f"![{block.alt}]({block.path})"
    if isinstance(block, Bullets):
        return "\n".join(f"- {item}" for item in block.items)
    return block


def _md_table(table: Table) -> str:
    """A GitHub-flavoured Markdown table."""
    header = table.header
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for i, row in enumerate(table.rows):
        shown = [f"**{c}**" if table.bold and table.bold[i][j] else c for j, c in enumerate(row)]
        lines.append("| " + " | ".join(shown) + " |")
    return "\n".join(lines)


def render_markdown(report: dict) -> str:
    """report.md."""
    return to_markdown(build_sections(report))


# -- HTML --------------------------------------------------------------------------------------

STYLE = (
    "body{font-family:sans-serif;margin:1.5em;max-width:100%}"
    "table{border-collapse:collapse;font-size:13px;margin:0.5em 0 1.5em}"
    "th,td{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}"
    "th{background:#f3f3f3}td:first-child,th:first-child,td.t{text-align:left}"
    ".scroll{overflow-x:auto}img{max-width:100%;display:block;margin:0.5em 0}"
)
_CODE = re.compile(r"`([^`]*)`")


def to_html(sections: Sequence[Section], out: Path) -> str:
    """One self-contained HTML page of a section list (images of ``out`` inline)."""
    title = html.escape(sections[0].title if sections else "cellp2p report")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{title}</title><style>{STYLE}</style></head><body>",
    ]
    for sec in sections:
        parts.append(f"<h{sec.level}>{_inline(sec.title)}</h{sec.level}>")
        parts += [_html_block(block, out) for block in sec.blocks]
    parts.append("</body></html>")
    return "\n".join(parts)


def _inline(text: str) -> str:
    """Escaped text with `code` spans."""
    return _CODE.sub(r"<code>\1</code>", html.escape(text))


def _html_block(block: Block, out: Path) -> str:
    """One block in HTML."""
    if isinstance(block, Table):
        return f"<div class='scroll'>{_html_table(block)}</div>"
    if isinstance(block, Image):
        return _img_tag(out / block.path, block.alt)
    if isinstance(block, Bullets):
        return "<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in block.items) + "</ul>"
    return f"<p>{_inline(block)}</p>"


def _html_table(table: Table) -> str:
    """An HTML table."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = []
    for i, row in enumerate(table.rows):
        cells = [html.escape(c) for c in row]
        if table.bold:
            cells = [f"<b>{c}</b>" if table.bold[i][j] else c for j, c in enumerate(cells)]
        kinds = ["" if _numeric(raw) else _TEXT for raw in row]
        tds = [f"<td{k}>{c}</td>" for k, c in zip(kinds, cells, strict=True)]
        body.append("<tr>" + "".join(tds) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


_TEXT = " class='t'"  # a text cell (run, mode, loss, preset): left-aligned
_NUMBER = re.compile(r"^(-|inf|[-+]?\d[\d.]*(e[-+]?\d+)?( (M|k|s|min)| of \d+)?)$")


def _numeric(cell: str) -> bool:
    """Whether a cell holds a number (right-aligned) rather than text."""
    return bool(_NUMBER.match(cell))


def _img_tag(path: Path, alt: str) -> str:
    """An <img> with the PNG inline as base64, so report.html is one self-contained file."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def render_html(report: dict, out: Path) -> str:
    """report.html: the same sections as report.md, with the figures inline."""
    return to_html(build_sections(report), out)


def write_report(report: dict, out: Path) -> None:
    """report.md, report.html and report.json into ``out``, each written atomically."""
    write_text_atomic(out / "report.md", render_markdown(report))
    write_text_atomic(out / "report.html", render_html(report, out))
    write_json(out / "report.json", report)
