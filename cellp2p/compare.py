"""``cellp2p compare``: several trained runs scored on the same held-out slices.

Load (runs, data, slices) → score (one :func:`cellp2p.scoring.evaluate_arrays` per run) →
group (one table per task and direction) → render (:mod:`cellp2p.report`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cellp2p import io
from cellp2p.errors import CellP2PError
from cellp2p.figures import plot_loss_curves, save_slice_panel
from cellp2p.fsutil import check_output, to_json, write_json, write_text_atomic
from cellp2p.report import GROUP_TITLES, render_html, render_markdown
from cellp2p.rundir import read_records, run_folder
from cellp2p.scoring import evaluate_arrays
from cellp2p.slices import parse_slices

Echo = Callable[[str], Any]


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
        from cellp2p.manifests import load_manifest, resolve_files

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
            from cellp2p.manifests import load_manifest

            val = (load_manifest(cfg["manifest"]).split or {}).get("val")
            if val and all(0 <= i < n for i in val):
                recorded.append(tuple(val))
    if recorded:
        if echo and len(set(recorded)) > 1:
            echo("warning: the runs were validated on different slices; scoring all on the first's")
        return list(recorded[0]), "the runs' validation slices"
    n_val = max(1, n // 5) if n > 1 else 1
    return list(range(n - n_val, n)), "the last fifth of the stack"


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


def check_report_folder(out: str | Path) -> Path:
    """The report folder, created and writable, before any run is loaded or predicted."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CellP2PError(f"--out {out}: is a file; give a folder for the report")
    check_output(out / "report.md", force=True)
    return out


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
    from cellp2p.predictor import load_predictor

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
    from cellp2p import checks

    with io.open_stack(vpath) as vr, io.open_stack(lpath) as lr:
        n = len(vr)
        checks.check_pair(vr.shape, lr.shape, vpath, lpath)
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
    checks.check_finite(vol, vpath)
    checks.check_finite(lab, lpath)

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
    from cellp2p.predictor import load_predictor

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
