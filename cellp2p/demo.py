"""``cellp2p demo``: the whole tool end to end on a built-in default, in a few minutes on a CPU.

The demo folder holds ``data/`` (the synthetic pair), ``unet/`` and ``pix2pix/`` (the runs),
``predictions/`` and ``report/`` (the comparison). It writes only into a new or empty folder,
an earlier demo folder (``--force`` replaces that demo's results, nothing else), or with
``--force`` a folder holding other files, beside them and never over them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from cellp2p.errors import CellP2PError

DEFAULT_STEPS = 200  # training steps per model: about a minute each on 2 CPU cores
BATCH = 4
# The synthetic data set and the crop the runs train on (module constants: tests shrink them).
SYNTH_SLICES = 8
SYNTH_SIZE = 256
CROP = 128
# Everything the demo writes directly in its folder.
OUTPUTS = ("data", "unet", "pix2pix", "predictions", "report")


def run_demo(
    out: Path,
    *,
    manifest: str | None = None,
    steps: int = DEFAULT_STEPS,
    force: bool = False,
    echo: Callable[[str], None] = print,
) -> Path:
    """Synthesise (or locate) data, train both modes, and leave every result under ``out``.

    Every option, and the folder, is checked before anything is written.
    """
    from cellp2p.compare import compare
    from cellp2p.config import MODES
    from cellp2p.fsutil import claim_folder

    out = Path(out)
    data = _demo_options(out, manifest)
    configs = _demo_configs(data, steps)
    again = _check_folder(out, force)
    claim_folder(out, "demo", force, OUTPUTS)
    if not manifest:
        _demo_data(out, again, echo)
    runs = {}
    for i, mode in enumerate(MODES, start=2):
        echo(f"[{i}/5] training {mode} for {steps} steps -> {out / mode}")
        runs[mode] = _train_run(configs[mode], out / mode, again)
    echo("\nvalidation after training:")
    for mode, rec in runs.items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in rec.items() if k.startswith("val_"))
        echo(f"  {mode:8s} {shown}")
    if not manifest:
        _demo_prediction(out, again, echo)
    report = out / "report"
    echo(f"[5/5] comparing U-Net and pix2pix on the held-out slices -> {report / 'report.md'}")
    compare([out / MODES[0], out / MODES[1]], out=report, echo=None)
    text = (report / "report.md").read_text()
    echo(text.split("## Details", 1)[0].strip())  # the headline table
    echo(f"\nreport: {report / 'report.html'} (and report.md, report.json)")
    for panel in sorted((report / "panels").glob("*.png")):
        echo(f"panel:  {panel}")
    return out


def _demo_options(out: Path, manifest: str | None) -> dict[str, Any]:
    """The data options of both runs: the manifest's (its files must be there), or the
    synthetic pair the demo will write into OUT/data."""
    if manifest:
        from cellp2p.manifests import load_manifest, resolve_files

        resolve_files(load_manifest(manifest), None, roles=("volume", "labels"))
        return {"manifest": manifest, "crop": 256}
    n_train = max(1, SYNTH_SLICES - 2)
    return {
        "volume": str(out / "data" / "volume.tif"),
        "labels": str(out / "data" / "labels.tif"),
        "train_slices": f"0-{n_train - 1}",
        "val_slices": f"{n_train}-{SYNTH_SLICES - 1}",
        "crop": CROP,
    }


def _demo_configs(data: dict[str, Any], steps: int) -> dict[str, Any]:
    """The validated TrainConfig of each mode; ``--steps`` is checked (and named) first."""
    from cellp2p.config import MODES, TrainConfig

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise CellP2PError(f"--steps {steps}: give a positive number of training steps per model")
    configs = {}
    for mode in MODES:
        budget = {"max_steps": steps, "eval_every": max(1, steps // 2), "batch_size": BATCH}
        # resize + conv in the generator's decoder: no checkerboard dots in pix2pix's output
        style = {"upsample": "resize"} if mode == "pix2pix" else {}
        cfg = TrainConfig(mode=mode, quiet=True, **budget, **style, **data)
        cfg.validate()
        configs[mode] = cfg
    return configs


def _check_folder(out: Path, force: bool) -> bool:
    """Whether ``out`` is an earlier demo to redo (which needs ``force``); other folders are
    judged by :func:`cellp2p.fsutil.claim_folder`."""
    from cellp2p.fsutil import folder_kind

    if not (out.is_dir() and folder_kind(out) == "demo"):
        return False
    if any(p.name != ".cellp2p.json" for p in out.iterdir()) and not force:
        raise CellP2PError(
            f"{out}: holds an earlier demo; pass --force to replace its results (nothing "
            "else there is touched) or choose another --out"
        )
    return True


def _demo_data(out: Path, again: bool, echo: Callable[[str], None]) -> None:
    """The synthetic EM stack, written to OUT/data (replacing an earlier demo's)."""
    from cellp2p.synth import synth

    size = f"{SYNTH_SLICES} slices of {SYNTH_SIZE}x{SYNTH_SIZE}"
    echo(f"[1/5] data: synthetic EM stack ({size}) -> {out / 'data'}")
    synth("em", out / "data", SYNTH_SLICES, (SYNTH_SIZE, SYNTH_SIZE), seed=0, force=again)


def _train_run(cfg: Any, run_dir: Path, again: bool) -> dict[str, Any]:
    """Train one mode into its run folder (an earlier demo's run there is trained again)."""
    from cellp2p.rundir import remove_run_outputs
    from cellp2p.train import train

    if again:
        remove_run_outputs(run_dir)  # that run's own files only
    return train(cfg, run_dir)


def _demo_prediction(out: Path, again: bool, echo: Callable[[str], None]) -> None:
    """The U-Net's prediction of the whole synthetic stack."""
    from cellp2p.predict import predict_stack

    echo(f"[4/5] predicting the whole synthetic stack with the U-Net -> {out / 'predictions'}")
    predict_stack(
        [out / "data" / "volume.tif"],
        out / "unet",
        out=out / "predictions" / "volume_prob.tif",
        quiet=True,
        force=again,
    )
