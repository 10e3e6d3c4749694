"""``cellp2p demo``: the whole tool end to end on a built-in default, in a few minutes on a CPU."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from cellp2p.errors import CellP2PError


def run_demo(
    out: Path,
    *,
    manifest: str | None = None,
    steps: int = 60,
    force: bool = False,
    echo: Callable[[str], None] = print,
) -> Path:
    """Synthesise (or locate) data, train both modes, and leave every result under ``out``."""
    from cellp2p.compare import compare
    from cellp2p.predict import predict_stack
    from cellp2p.synth import synth
    from cellp2p.train import TrainConfig, train

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise CellP2PError(
                f"{out}: demo folder exists; pass --force to replace it or use --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if manifest:
        data = {"manifest": manifest}
        crop = 256
        echo(f"[1/5] data: manifest {manifest}")
    else:
        echo("[1/5] data: synthetic EM stack (12 slices of 256x256) -> " + str(out / "data"))
        vol, lab = synth("em", out / "data", 12, (256, 256), seed=0)
        data = {
            "volume": str(vol),
            "labels": str(lab),
            "train_slices": "0-9",
            "val_slices": "10-11",
        }
        crop = 128
    runs = {}
    for i, mode in enumerate(("unet", "pix2pix"), start=2):
        echo(f"[{i}/5] training {mode} for {steps} steps -> {out / mode}")
        cfg = TrainConfig(
            mode=mode,
            max_steps=steps,
            eval_every=max(1, steps // 3),
            crop=crop,
            batch_size=2,
            quiet=True,
            **data,
        )
        runs[mode] = train(cfg, out / mode)
    echo("\nvalidation after training:")
    for mode, rec in runs.items():
        shown = ", ".join(f"{k} {v:.3f}" for k, v in rec.items() if k.startswith("val_"))
        echo(f"  {mode:8s} {shown}")
    if not manifest:
        echo(f"[4/5] predicting the whole synthetic stack with the U-Net -> {out / 'predictions'}")
        predict_stack(
            [out / "data" / "volume.tif"],
            out / "unet",
            out=out / "predictions" / "volume_prob.tif",
            quiet=True,
        )
    echo(f"[5/5] comparing U-Net and pix2pix on the held-out slices -> {out / 'report.md'}")
    compare([out / "unet", out / "pix2pix"], out=out, echo=None)
    report = (out / "report.md").read_text()
    echo(report.split("## Notes", 1)[0].strip())  # the comparison table(s)
    return out
