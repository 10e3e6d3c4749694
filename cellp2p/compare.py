"""``cellp2p compare``: several trained runs scored on the same held-out slices.

load (runs, predictors, data, slices, checks) → score (one :func:`cellp2p.scoring.evaluate_arrays`
per run, through :func:`cellp2p.scoring.score_prediction`) → group (one table per task and
direction) → render (panels and curves from :mod:`cellp2p.figures`, the report from
:mod:`cellp2p.report`). The steps share one :class:`Comparison`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cellp2p import checks, io
from cellp2p.errors import CellP2PError
from cellp2p.figures import plot_loss_curves, save_ab_panel, save_slice_panel
from cellp2p.fsutil import check_claim, claim_folder, folder_kind, to_json
from cellp2p.outputs import foreground_prob
from cellp2p.report import GROUP_TITLES, write_report
from cellp2p.rundir import read_records, run_folder
from cellp2p.scoring import score_prediction, score_probabilities
from cellp2p.slices import default_holdout, parse_slices
from cellp2p.sources import Sources, recorded_sources, recorded_val_slices, resolve_sources

Echo = Callable[[str], Any]
CHECKPOINTS = ("last", "best")  # which weights of a run compare scores (last: not chosen on val)
# What compare writes into its folder; in a folder of other files (--force) none may exist.
REPORT_OUTPUTS = ("report.md", "report.html", "report.json", "loss_curves.png", "panels")
PANEL_NAME = re.compile(r"\d+_(segment|translate)_(AtoB|BtoA)_slice_\d{4}\.png")
NO_DATA = (
    "no data to compare on: give --volume V.tif --labels L.tif, or --manifest NAME (e.g. isbi2012)"
)


@dataclass
class Comparison:
    """What the steps of :func:`compare` share: runs, held-out data, and what they found."""

    out: Path
    names: list[str]
    dirs: list[Path]
    predictors: list[Any]
    data: dict[str, str]
    ids: list[int]
    ids_from: str
    volume: np.ndarray  # the held-out slices only
    labels: np.ndarray
    checkpoint: str
    say: Echo
    segmenter: Any = None
    segmenter_path: str | None = None
    force: bool = False  # --force: the report may go into a folder of other files
    images: list[str] | None = None  # AB images (--ab): their names, in ``ids`` order
    rows: dict[str, dict] = field(default_factory=dict)
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    groups: list[dict] = field(default_factory=list)
    seg_probs: dict[str, np.ndarray] = field(default_factory=dict)

    def pair(self, direction: str) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, targets) of a direction: labels → volume for ``BtoA``, else the reverse."""
        return (self.labels, self.volume) if direction == "BtoA" else (self.volume, self.labels)


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
    ab: str | Path | None = None,
    force: bool = False,
    echo: Echo | None = print,
) -> dict:
    """Score every run on the same held-out slices; write report.md/.json/.html, panels, curves.

    Each run is scored by its own task: segmentation runs (unet, or pix2pix with task segment)
    on the labels, translation runs on the target images (the volume for ``BtoA``). With
    ``segmenter`` (a segmentation run trained on real images) every ``BtoA`` translation run's
    generated images are segmented and scored against the labels they came from, next to the
    segmenter on the real images (the ceiling). ``checkpoint`` "last" (default) scores the final
    weights: best.pt is chosen on these very validation slices, which would flatter it.
    ``ab``: a folder of pix2pix AB images instead of the stacks (translation runs; panels
    A | B | each run's image). ``out`` must be new, empty or an earlier report (``force``:
    a folder holding other files, written beside them). Returns the content of report.json.
    """
    if not runs:
        raise CellP2PError("compare needs at least one run folder")
    if checkpoint not in CHECKPOINTS:
        raise CellP2PError(f"--checkpoint {checkpoint!r} unknown; use {' or '.join(CHECKPOINTS)}")
    say = echo or (lambda _msg: None)
    out = check_report_folder(out, force)
    dirs = [run_folder(r) for r in runs]
    run_names = _unique_names(dirs, names)
    predictors = load_predictors(runs, dirs, checkpoint, device)
    configs = [dict(p.train_config or {}) for p in predictors]
    if ab is not None or any(cfg.get("ab") for cfg in configs):
        stacks = (volume, labels, manifest, segmenter)
        c = _ab_comparison(ab, slices, runs, predictors, configs, checkpoint, say, stacks)
        c.out, c.names, c.dirs, c.force = out, run_names, dirs, force
        return _finish(c, title)
    sources = data_sources(volume, labels, manifest, data_dir, configs, say)
    n = check_data(sources, runs, predictors)
    seg = load_segmenter(segmenter, device, sources) if segmenter is not None else None
    ids, ids_from = held_out_slices(n, slices, sources, configs, say)
    vol, lab = read_held_out(sources, ids)
    c = Comparison(
        out=out,
        names=run_names,
        dirs=dirs,
        predictors=predictors,
        data=sources.describe(),
        ids=ids,
        ids_from=ids_from,
        volume=vol,
        labels=lab,
        checkpoint=checkpoint,
        say=say,
        segmenter=seg,
        segmenter_path=None if segmenter is None else str(segmenter),
        force=force,
    )
    return _finish(c, title)


def _finish(c: Comparison, title: str | None) -> dict:
    """Score, group, render: the steps every comparison shares."""
    score_runs(c)
    c.groups = group_runs(c.names, c.rows)
    if c.images is not None:
        for g in c.groups:
            g["title"] = (
                "Translation (B → A)" if g["direction"] == "BtoA" else "Translation (A → B)"
            )
    else:
        score_segmentability(c)
    return render(c, title)


def _ab_comparison(
    ab: str | Path | None,
    slices: str | Sequence[int] | None,
    runs: Sequence[str | Path],
    predictors: list[Any],
    configs: Sequence[dict],
    checkpoint: str,
    say: Echo,
    stacks: Sequence[Any] = (),
) -> Comparison:
    """The AB images to score (``ab``, else the first run's --ab-val or --ab), as a Comparison."""
    from cellp2p import ab as abmod

    if any(stacks):
        raise CellP2PError(
            "compare --ab scores AB images: drop --volume/--labels/--manifest/--segmenter"
        )
    if ab is None:
        ab = configs[0].get("ab_val") or configs[0].get("ab")
        if not ab:
            raise CellP2PError("compare --ab DIR: give the folder of AB images to score on")
        say(f"data: none given, using the first run's AB images ({ab})")
    files, images, ids, ids_from = abmod.compare_images(ab, slices, configs)
    abmod.check_runs(runs, predictors, images.shape[1])
    a, b = abmod.split_ab(images[ids], "AtoB")
    return Comparison(
        out=Path(),
        names=[],
        dirs=[],
        predictors=predictors,
        data={"ab": str(ab)},
        ids=list(ids),
        ids_from=ids_from,
        volume=a,
        labels=b,
        checkpoint=checkpoint,
        say=say,
        images=[files[i].name for i in ids],
    )


# -- load --------------------------------------------------------------------------------------


def check_report_folder(out: str | Path, force: bool = False) -> Path:
    """The report folder may be written (new, empty, an earlier report, or ``force``) — checked
    before any run is loaded or predicted; nothing is created until the report is written."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CellP2PError(f"--out {out}: is a file; give a folder for the report")
    check_claim(out, "report", force, REPORT_OUTPUTS)
    return out


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


def load_predictors(
    runs: Sequence[str | Path], dirs: Sequence[Path], checkpoint: str, device: str
) -> list[Any]:
    """Each run's predictor (``checkpoint``: last or best of its folder; a .pt file as given)."""
    from cellp2p.checkpoint import resolve_checkpoint
    from cellp2p.predictor import load_predictor

    predictors = []
    for run, d in zip(runs, dirs, strict=True):
        wanted = d / "checkpoints" / f"{checkpoint}.pt"
        path = Path(run) if Path(run).is_file() else wanted
        predictors.append(load_predictor(path if path.is_file() else resolve_checkpoint(d), device))
    return predictors


def data_sources(
    volume: str | Path | None,
    labels: str | Path | None,
    manifest: str | None,
    data_dir: str | Path | None,
    configs: Sequence[dict],
    say: Echo,
) -> Sources:
    """The data given, or else the data recorded in the first run's config."""
    if manifest or volume or labels or not configs:
        return resolve_sources(volume, labels, manifest, data_dir, missing=NO_DATA)
    cfg = configs[0]
    recorded = cfg.get("manifest") or cfg.get("volume")
    if recorded:
        say(f"data: none given, using the first run's training data ({recorded})")
    return recorded_sources(cfg, missing=NO_DATA)


def _channels(shape: Sequence[int]) -> int:
    return 1 if len(shape) == 3 else int(shape[1])


def check_data(sources: Sources, runs: Sequence[str | Path], predictors: Sequence[Any]) -> int:
    """The number of slices, once the pair and every run's input channels are checked."""
    vpath, lpath = sources.volume, sources.labels
    level = sources.level
    with io.open_stack(vpath, level) as vr, io.open_stack(lpath, level) as lr:
        n = len(vr)
        checks.check_pair(vr.shape, lr.shape, vpath, lpath)
        vshape, lshape = tuple(vr.shape), tuple(lr.shape)
    if len(lshape) != 3:
        raise CellP2PError(f"{lpath}: labels have {lshape[1]} channels; compare needs one")
    # Every run must take the images it will be given, before anything is predicted.
    for run, pred in zip(runs, predictors, strict=True):
        btoa = (pred.train_config or {}).get("direction") == "BtoA"
        src, shape = (lpath, lshape) if btoa else (vpath, vshape)
        if _channels(shape) != pred.in_channels:
            raise CellP2PError(
                f"{src}: {_channels(shape)} channel(s) but {run} was trained on "
                f"{pred.in_channels}; compare runs on the data they were trained on"
            )
    return n


def load_segmenter(segmenter: str | Path, device: str, sources: Sources) -> Any:
    """The --segmenter run, which must segment real images (task segment, direction AtoB)."""
    from cellp2p.predictor import load_predictor

    seg = load_predictor(segmenter, device)
    if seg.task != "segment" or (seg.train_config or {}).get("direction", "AtoB") != "AtoB":
        raise CellP2PError(
            f"{segmenter}: --segmenter must be a segmentation run trained on real images "
            "(task segment, direction AtoB)"
        )
    with io.open_stack(sources.volume, sources.level) as reader:
        nchan = _channels(reader.shape)
    if seg.in_channels != nchan:
        raise CellP2PError(
            f"{sources.volume}: {nchan} channel(s) but --segmenter {segmenter} was trained on "
            f"{seg.in_channels}; give a segmenter trained on these images"
        )
    return seg


def held_out_slices(
    n: int,
    slices: str | Sequence[int] | None,
    sources: Sources,
    configs: Sequence[dict],
    say: Echo,
) -> tuple[list[int], str]:
    """Slices to score on and where the choice came from.

    Order: ``slices``, the data's manifest val split, the slices the runs validated on (by
    :func:`cellp2p.sources.recorded_val_slices`), else :func:`cellp2p.slices.default_holdout`
    (the last fifth, as ``cellp2p train`` holds out by default).
    """
    chosen = parse_slices(slices, n)  # None when not given (or empty)
    if chosen is not None:
        return chosen, "--slices"
    val = sources.split.val
    if val:
        bad = [i for i in val if not 0 <= i < n]
        if bad:
            raise CellP2PError(f"manifest val slice {bad[0]} is out of range for {n} slices")
        return list(val), "the manifest's val split"
    recorded = [tuple(v) for cfg in configs if (v := recorded_val_slices(cfg, n)) is not None]
    if recorded:
        if len(set(recorded)) > 1:
            say("warning: the runs were validated on different slices; scoring all on the first's")
        return list(recorded[0]), "the runs' validation slices"
    return default_holdout(n)[1], "the last fifth of the stack"


def read_held_out(sources: Sources, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The held-out slices of volume and labels, checked finite."""
    vol = io.read_stack(sources.volume, list(ids), sources.level).data
    lab = io.read_stack(sources.labels, list(ids), sources.level).data
    checks.check_finite(vol, sources.volume)
    checks.check_finite(lab, sources.labels)
    return vol, lab


# -- score -------------------------------------------------------------------------------------


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


def run_outputs(predictor: Any, inputs: np.ndarray) -> np.ndarray:
    """(Z, Y, X) outputs: interior probability (segment) or the image in the target's units."""
    outs = []
    for x in inputs:
        prob = predictor.predict_slice(x)
        if predictor.task == "segment":
            outs.append(foreground_prob(prob, predictor.target_kind).astype(np.float32))
            continue
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


def score_runs(c: Comparison) -> None:
    """Predict the held-out slices with every run and score them: fills ``rows``, ``outputs``."""
    for name, d, pred in zip(c.names, c.dirs, c.predictors, strict=True):
        row = describe_run(name, d, pred)
        inputs, target = c.pair(row["direction"])
        what = f"{row['mode']} {row['task']} {row['direction']}"
        c.say(f"{name}: {what}, predicting {len(c.ids)} {'images' if c.images else 'slices'}")
        t0 = time.perf_counter()
        if c.images is not None:  # AB images: every channel kept and scored
            from cellp2p.ab import match_channels, run_images, score_images

            c.outputs[name] = run_images(pred, inputs)
            target = match_channels(target, c.outputs[name].shape[1], "compare --ab")
            res = score_images(c.outputs[name], target, c.images)
            res["per_slice"] = res.pop("per_image")
        else:
            c.outputs[name] = run_outputs(pred, inputs)
            res = score_prediction(c.outputs[name], target, row["task"], c.ids)
        row["predict_s"] = time.perf_counter() - t0
        row["metrics"], row["per_slice"] = res["mean"], res["per_slice"]
        c.rows[name] = row


def _segment(seg: Any, images: np.ndarray) -> np.ndarray:
    """The segmenter's foreground probabilities (Z, Y, X) of a stack of images."""
    return np.stack([foreground_prob(seg.predict_slice(x), seg.target_kind) for x in images])


def score_segmentability(c: Comparison) -> None:
    """FCN-score: the segmenter on the real and on each ``BtoA`` run's generated images."""
    targets = [g for g in c.groups if g["task"] == "translate" and g["direction"] == "BtoA"]
    if c.segmenter is None:
        if targets:
            c.say("note: pass --segmenter RUN to score how segmentable the generated images are")
        return
    if not targets:
        c.say("note: --segmenter only scores runs that make images from labels (--direction BtoA)")
        return
    n_runs = sum(len(g["runs"]) for g in targets)
    c.say(f"segmentability: {c.segmenter_path} on the real images and on {n_runs} runs' images")
    c.seg_probs["real"] = _segment(c.segmenter, c.volume)
    real = score_probabilities(c.seg_probs["real"], c.labels, c.ids)["mean"]
    integer = np.issubdtype(c.volume.dtype, np.integer)
    for g in targets:
        g["segmentability"] = {"segmenter": c.segmenter_path, "real": real, "runs": {}}
        for name in g["runs"]:
            images = c.outputs[name].astype(c.volume.dtype) if integer else c.outputs[name]
            c.seg_probs[name] = _segment(c.segmenter, images)
            scores = score_probabilities(c.seg_probs[name], c.labels, c.ids)["mean"]
            g["segmentability"]["runs"][name] = scores
            c.rows[name]["segmentability"] = scores


# -- group -------------------------------------------------------------------------------------


def group_runs(names: Sequence[str], rows: dict[str, dict]) -> list[dict]:
    """One group (a table, a panel set) per task and direction, in the runs' order."""
    groups: dict[tuple[str, str], dict] = {}
    for name in names:
        key = (rows[name]["task"], rows[name]["direction"])
        if key not in groups:
            title = GROUP_TITLES.get(key, f"{key[0]} ({key[1]})")
            groups[key] = {"task": key[0], "direction": key[1], "title": title, "runs": []}
        groups[key]["runs"].append(name)
    return list(groups.values())


# -- render ------------------------------------------------------------------------------------


def render(c: Comparison, title: str | None) -> dict:
    """Panels, loss curves and report.md/.html/.json; returns the report's content."""
    claim_folder(c.out, "report", c.force, REPORT_OUTPUTS)
    write_panels(c)
    curves = plot_loss_curves(c.out / "loss_curves.png", c.names, [read_records(d) for d in c.dirs])
    report = {
        "title": title or f"cellp2p compare: {len(c.names)} runs",
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "data": c.data,
        "slices": c.ids,
        "slices_from": c.ids_from,
        **({"images": c.images} if c.images is not None else {}),
        "checkpoint": c.checkpoint,
        "groups": c.groups,
        "runs": c.rows,
        "files": {"loss_curves": str(curves.relative_to(c.out))},
    }
    write_report(report, c.out)
    c.say(f"wrote {c.out / 'report.md'}, report.html and report.json")
    return to_json(report)


def write_panels(c: Comparison) -> None:
    """One panel per held-out slice and group; fills each group's ``panels`` (relative paths)."""
    panel_dir = c.out / "panels"
    if panel_dir.is_dir() and folder_kind(c.out) == "report":
        for old in panel_dir.glob("*.png"):
            if PANEL_NAME.fullmatch(old.name):  # an earlier compare's panels (other slices)
                old.unlink()
    for gi, g in enumerate(c.groups):
        tag = f"{gi + 1}_{g['task']}_{g['direction']}"
        g["panels"] = [
            str(_slice_panel(c, g, panel_dir / f"{tag}_slice_{sid:04d}.png", z).relative_to(c.out))
            for z, sid in enumerate(c.ids)
        ]


def _slice_panel(c: Comparison, g: dict, path: Path, z: int) -> Path:
    """The panel of held-out slice ``z`` of group ``g``."""
    if c.images is not None:  # A | B | each run's generated image
        btoa = g["direction"] == "BtoA"
        labels = ("A (target)", "B (input)") if btoa else ("A (input)", "B (target)")
        return save_ab_panel(
            path,
            f"{g['title']}: {c.images[z]}",
            c.volume[z],
            c.labels[z],
            g["runs"],
            [c.outputs[n][z] for n in g["runs"]],
            labels,
        )
    inputs, targets = c.pair(g["direction"])
    seg_row = None
    if g.get("segmentability"):
        seg_row = {
            "real": c.seg_probs["real"][z],
            "target": c.labels[z],
            "runs": [c.seg_probs[n][z] if n in c.seg_probs else None for n in g["runs"]],
        }
    return save_slice_panel(
        path,
        f"{g['title']}: slice {c.ids[z]}",
        inputs[z],
        targets[z],
        g["runs"],
        [c.outputs[n][z] for n in g["runs"]],
        g["task"],
        seg_row,
    )
