"""Instance segmentation (issue 15): watershed ``--output labels`` beside connected components.

Usage: ``python benchmarks/bench_instances.py [--case nuclei|isbi] [--out DIR] [--reuse]
[--steps N] [--set KEY=VALUE ...] [--threads N] [--json FILE]``

``nuclei``: ``make_nuclei(8, (256, 256))``, train 0-5, val 6-7, ``small``, 600 steps x 4 x 128²,
trained straight from the instance labels; AP@0.5 / AP@0.75 / DSB mean AP on slices 6-7.
``isbi``: ISBI 2012 (``../shared/data/isbi2012/``), train 0-24, val 25-29, ``small``,
1200 steps x 4 x 256²; dense Rand error and pixel error on 25-29. Each figure for
``predict --output labels`` (the checkpoint's tuned watershed, on the test-time augmented map
where the tuning chose it) and for the 4-connected components of the probability map at 0.5
(``--output prob``, before issue 15); the pixel error is that of ``--output mask``.
``--reuse`` scores a run already in ``--out`` (a checkpoint without tuned parameters is tuned
here, as training does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from cellp2p import io
from cellp2p.config import TrainConfig
from cellp2p.instances import (
    average_precision,
    mean_average_precision,
    objects_from_binary,
    postprocessing_record,
    tune_postprocessing,
    tuning_maps,
)
from cellp2p.metrics import pixel_error, rand_info_scores
from cellp2p.outputs import foreground
from cellp2p.predictor import load_predictor
from cellp2p.train import train

ISBI = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012"
CASES: dict[str, dict[str, Any]] = {
    "nuclei": {"steps": 600, "crop": 128, "train": "0-5", "val": "6-7"},
    "isbi": {"steps": 1200, "crop": 256, "train": "0-24", "val": "25-29"},
}


def _data(case: str, out: Path) -> tuple[Path, Path]:
    """The volume and label stacks of ``case`` (nuclei written to ``out``)."""
    if case == "isbi":
        vol = next(p for p in sorted(ISBI.iterdir()) if "volume" in p.name and "train" in p.name)
        lab = next(p for p in sorted(ISBI.iterdir()) if "label" in p.name and "train" in p.name)
        return vol, lab
    from cellp2p.synth import make_nuclei

    out.mkdir(parents=True, exist_ok=True)
    vol, lab = out / "nuclei_volume.tif", out / "nuclei_labels.tif"
    if not vol.exists():
        v, labels = make_nuclei(8, (256, 256))
        io.write_stack(vol, v, force=True)
        io.write_stack(lab, labels, force=True)
    return vol, lab


def _train(case: str, vol: Path, lab: Path, run: Path, steps: int, options: dict) -> float:
    """Train the ``small`` U-Net of ``case`` into ``run`` (``options``: more TrainConfig
    fields, as ``--set``); the wall time in seconds."""
    c = CASES[case]
    base = dict(
        mode="unet",
        preset="small",
        volume=str(vol),
        labels=str(lab),
        train_slices=c["train"],
        val_slices=c["val"],
        max_steps=steps,
        batch_size=4,
        crop=c["crop"],
        eval_every=max(steps // 4, 1),
        device="cpu",
        quiet=True,
    )
    cfg = TrainConfig.from_dict({**base, **options}, "--set")
    cfg.validate()
    t0 = time.perf_counter()
    train(cfg, run)
    return time.perf_counter() - t0


def _setting(text: str) -> tuple[str, Any]:
    """``--set KEY=VALUE``: a TrainConfig field and its value (JSON, else the text)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--set {text!r}: give KEY=VALUE, e.g. lr=0.003")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _val_ids(spec: str) -> list[int]:
    """``a-b`` → [a, ..., b]."""
    lo, hi = (int(v) for v in spec.split("-"))
    return list(range(lo, hi + 1))


def _dense_rand_error(pred: np.ndarray, gt_binary: np.ndarray) -> float:
    """1 − V_rand over the gt cell interiors (4-connected), the proposal as given (dense)."""
    return 1.0 - rand_info_scores(pred, objects_from_binary(gt_binary))["v_rand"]


def _components(prob: np.ndarray, kind: str, dense: bool) -> np.ndarray:
    """Before issue 15: 4-connected components at 0.5 (grown over the membranes if dense)."""
    return _grown(foreground(prob, kind), "isbi" if dense else "nuclei")


def _grown(mask: np.ndarray, case: str) -> np.ndarray:
    """4-connected components of ``mask``; for ISBI grown over the membranes (a partition)."""
    cc = objects_from_binary(mask)
    if case != "isbi" or not cc.any():
        return cc
    from skimage.segmentation import watershed

    return watershed(np.zeros(cc.shape, np.float32), cc.astype(np.int32), connectivity=1)


def score(case: str, vol: Path, lab: Path, run: Path) -> dict[str, Any]:
    """Both post-processings of the run's best.pt on the validation slices."""
    pred = load_predictor(run, device="cpu")
    ids = _val_ids(CASES[case]["val"])
    volume, labels = io.read_stack(vol).data, io.read_stack(lab).data
    t0 = time.perf_counter()
    prob = pred.predict_slices([volume[i] for i in ids])
    t_pred = time.perf_counter() - t0
    pp = pred.postprocessing
    tuned_here = pp is None
    if tuned_here:  # a run trained before tuning existed: tune as training does
        boundary = pred.target_kind == "multiclass" and pred.classes == [0, 1, 2]
        gt = np.stack([labels[i] for i in ids])
        dense = case == "isbi"
        tuned = tune_postprocessing(
            tuning_maps(prob, boundary), gt if case == "nuclei" else gt > 0, dense=dense
        )
        pp = postprocessing_record(tuned, dense=dense, boundary=boundary)
        pred.postprocessing = pp
    maps, t_labels = prob, t_pred  # the map --output labels uses: test-time augmented if tuned so
    if pred.uses_tta("labels"):
        t0 = time.perf_counter()
        maps = pred.predict_slices([volume[i] for i in ids], output="labels")
        t_labels = time.perf_counter() - t0
    t0 = time.perf_counter()
    inst = [pred.to_output(p, "labels") for p in maps]
    t_ws = (time.perf_counter() - t0) / len(ids)
    cc = [_components(p, pred.target_kind, case == "isbi") for p in prob]
    gts = [labels[i] for i in ids]
    fg = [foreground(p, pred.target_kind) for p in prob]
    return {
        "rows": {
            "labels (watershed)": _scores(case, inst, gts, fg),
            "connected components": _scores(case, cc, gts, fg),
        },
        "postprocessing": pp,
        "tuned_in_benchmark": tuned_here,
        "predict_s": t_pred,
        "predict_labels_s": t_labels,
        "watershed_s_per_slice": t_ws,
    }


def _scores(
    case: str, outs: list[np.ndarray], gts: list[np.ndarray], fg: list[np.ndarray]
) -> dict[str, Any]:
    """Nuclei: AP@0.5, AP@0.75, mean AP and object counts; ISBI: the dense Rand error of the
    labels and the pixel error of the foreground ``fg`` (a dense partition has no membrane)."""
    pairs = list(zip(outs, gts, strict=True))
    if case == "nuclei":
        return {
            "ap_50": _mean(average_precision(o, g, 0.5) for o, g in pairs),
            "ap_75": _mean(average_precision(o, g, 0.75) for o, g in pairs),
            "ap_mean": _mean(mean_average_precision(o, g) for o, g in pairs),
            "objects": int(sum(len(np.unique(o)) - 1 for o in outs)),
            "gt_objects": int(sum(len(np.unique(g)) - 1 for g in gts)),
        }
    return {
        "rand_error": _mean(_dense_rand_error(o, g > 0) for o, g in pairs),
        "pixel_error": _mean(pixel_error(f, g > 0) for f, g in zip(fg, gts, strict=True)),
    }


def basicunet(case: str, vol: Path, lab: Path, steps: int, features: tuple[int, ...]) -> dict:
    """The plain MONAI BasicUNet script at the same budget (bench_time_to_quality's loop: Adam
    1e-3, BCE-with-logits on label > 0, random crops with flips, the volume min-max scaled to
    [0, 1]), scored as connected components at 0.5 and, for ISBI, also at the single stack
    threshold that scores best on these slices (optimistic: chosen on the scored slices)."""
    import torch
    from bench_time_to_quality import PlainUNet, random_crops

    c = CASES[case]
    v = io.read_stack(vol).data.astype(np.float32)
    v = (v - v.min()) / max(float(v.max() - v.min()), 1e-6)
    labels = io.read_stack(lab).data
    model, rng = PlainUNet({"features": features}), np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        model.step(
            *random_crops(
                rng, v, (labels > 0).astype(np.float32), _val_ids(c["train"]), 4, c["crop"]
            )
        )
    wall = time.perf_counter() - t0
    model.net.eval()
    ids = _val_ids(c["val"])
    with torch.inference_mode():
        prob = [model.predict(torch.from_numpy(v[i])[None, None])[0].numpy() for i in ids]
    gts = [labels[i] for i in ids]
    rows = {}
    for t in (0.5,) if case == "nuclei" else (0.5, *np.round(np.arange(0.1, 1.0, 0.1), 1)):
        fg = [p[0] > t for p in prob]
        rows[f"BasicUNet, components at {t:g}"] = _scores(
            case, [_grown(f, case) for f in fg], gts, fg
        )
    if case == "isbi":  # keep 0.5 and the best other threshold
        best = min((k for k in rows if not k.endswith(" 0.5")), key=lambda k: rows[k]["rand_error"])
        rows = {k: r for k, r in rows.items() if k.endswith(" 0.5") or k == best}
    return {"rows": rows, "train_wall_s": wall, "features": list(features)}


def _mean(values: Any) -> float:
    """The mean of an iterable of numbers."""
    return float(np.mean(list(values)))


def _table(result: dict[str, Any]) -> str:
    """A plain-text table of the rows."""
    rows = result["rows"]
    keys = list(next(iter(rows.values())))
    lines = ["| post-processing | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name, r in rows.items():
        cells = [f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    """Train (unless ``--reuse``), score, print the table and optionally write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=sorted(CASES), default="nuclei")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_instances"))
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--reuse", action="store_true", help="score the run already in --out")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--set",
        type=_setting,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a TrainConfig field, e.g. --set instance_target=boundary --set border_weights=false",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument(
        "--basicunet",
        metavar="FEATURES",
        help="instead of cellp2p: the plain MONAI BasicUNet script, e.g. 8,16,32,64,128,8 "
        "(the size of cellp2p's small U-Net) or 32,32,64,128,256,32 (BasicUNet's default)",
    )
    args = ap.parse_args()
    if args.threads:
        __import__("torch").set_num_threads(args.threads)
    options = dict(args.set)
    out = args.out / "-".join(
        [args.case, *(f"{k}={v}".replace("/", "_") for k, v in sorted(options.items()))]
    )
    if args.basicunet:
        out = args.out / f"{args.case}-basicunet"
    vol, lab = _data(args.case, out)
    steps = args.steps or CASES[args.case]["steps"]
    if args.basicunet:
        features = tuple(int(f) for f in args.basicunet.split(","))
        result = basicunet(args.case, vol, lab, steps, features)
        result.update(case=args.case, steps=steps, machine=_machine())
        _report(result, args.json)
        return
    wall = None if args.reuse else _train(args.case, vol, lab, out / "run", steps, options)
    result = score(args.case, vol, lab, out / "run")
    result.update(
        case=args.case,
        options=options,
        steps=steps,
        train_wall_s=wall,
        machine=_machine(),
    )
    _report(result, args.json)


def _machine() -> str:
    """This machine and the torch threads in use."""
    threads = __import__("torch").get_num_threads()
    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch threads {threads}"


def _report(result: dict[str, Any], path: Path | None) -> None:
    """Print the table and the other facts; write all as JSON to ``path`` if given."""
    print(_table(result))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, default=str))
    if path:
        path.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
