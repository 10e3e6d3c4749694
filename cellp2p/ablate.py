"""``cellp2p ablate``: the pix2pix paper's loss ablation (Table 1) plus the U-Net baseline.

Trains every variant on one data set with the same budget (steps, batch, crop) and seed into
``OUT/runs/<variant>``, then compares them into ``OUT`` (report.md with one row per variant).
Re-running the same command skips finished variants and resumes an interrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cellp2p.errors import CellP2PError

# variant -> (table label, TrainConfig changes); Isola et al. 2017, Table 1, after the baseline.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "unet": ("U-Net", {"mode": "unet"}),
    "l1": ("L1", {"mode": "pix2pix", "lambda_gan": 0.0}),
    "gan": ("GAN", {"mode": "pix2pix", "unconditional": True, "lambda_l1": 0.0}),
    "cgan": ("cGAN", {"mode": "pix2pix", "unconditional": False, "lambda_l1": 0.0}),
    "l1_gan": ("L1+GAN", {"mode": "pix2pix", "unconditional": True}),
    "l1_cgan": ("L1+cGAN", {"mode": "pix2pix", "unconditional": False}),
}
# Options that may differ between an existing run folder and this ablation's request without
# making the run a different experiment (where it runs, how it logs, and the planned length).
_RUNTIME_KEYS = {"device", "quiet", "num_workers", "precision", "max_steps", "eval_every"}


def variant_configs(base: dict[str, Any], variants: Sequence[str] | None = None) -> dict[str, Any]:
    """TrainConfig of each requested variant: the shared settings plus the variant's changes."""
    from cellp2p.config import TrainConfig

    names = list(variants) if variants else list(VARIANTS)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise CellP2PError(
            f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}"
        )
    return {v: TrainConfig(**{**base, **VARIANTS[v][1]}) for v in names}


def run_state(run_dir: Path, cfg: Any) -> str:
    """'new', 'partial' (resume it) or 'complete' (skip it) for ``cfg`` in ``run_dir``.

    A folder trained with other settings (data, loss, crop, seed, ...) is an error rather than
    silently reused or overwritten.
    """
    from cellp2p.checkpoint import load_checkpoint

    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return "new"
    ckpt = load_checkpoint(last)
    saved, wanted = ckpt.get("train_config", {}), asdict(cfg)
    diff = [k for k in wanted if k not in _RUNTIME_KEYS and saved.get(k) != wanted[k]]
    if diff:
        k = diff[0]
        raise CellP2PError(
            f"{run_dir}: was trained with {k}={saved.get(k)!r}, this ablation asks for "
            f"{k}={wanted[k]!r}; use another --out or delete that run folder"
        )
    planned = saved.get("max_steps")
    if planned is not None and cfg.max_steps is not None and int(planned) > cfg.max_steps:
        raise CellP2PError(
            f"{run_dir}: was planned for {planned} steps, this ablation asks for "
            f"{cfg.max_steps}; use the same --max-steps (or more), or another --out"
        )
    step, total = int(ckpt.get("step", 0)), int(ckpt.get("total_steps", 0))
    return (
        "complete"
        if step >= total and (cfg.max_steps is None or step >= cfg.max_steps)
        else "partial"
    )


def ablate(
    *,
    volume: str | Path | None = None,
    labels: str | Path | None = None,
    manifest: str | None = None,
    data_dir: str | Path | None = None,
    out: str | Path,
    max_steps: int = 1000,
    preset: str = "small",
    crop: int = 256,
    batch_size: int = 4,
    seed: int = 0,
    eval_every: int | None = None,
    direction: str = "AtoB",
    task: str | None = None,
    gan_mode: str = "vanilla",
    upsample: str | None = None,
    variants: Sequence[str] | None = None,
    segmenter: str | Path | None = None,
    device: str = "auto",
    quiet: bool = False,
    echo: Callable[[str], Any] | None = print,
) -> dict:
    """Train the loss variants (same budget and seed) into OUT/runs/<variant>, then compare them.

    ``task`` defaults to ``translate`` for ``direction="BtoA"`` (labels -> images) and to
    ``segment`` otherwise. Finished variants are skipped and an interrupted one is resumed, so
    the same call continues an ablation; a larger ``max_steps`` extends every run. Returns
    ``{"runs": {variant: folder}, "report": <compare's report>}``.
    """
    from cellp2p.compare import compare
    from cellp2p.train import train

    say = echo or (lambda _msg: None)
    out = Path(out)
    task = task or ("translate" if direction == "BtoA" else "segment")
    base = {
        "task": task,
        "direction": direction,
        "preset": preset,
        "volume": str(volume) if volume else None,
        "labels": str(labels) if labels else None,
        "manifest": manifest,
        "data_dir": str(data_dir) if data_dir else None,
        "max_steps": max_steps,
        "batch_size": batch_size,
        "crop": crop,
        "seed": seed,
        "eval_every": eval_every or max(1, max_steps // 10),
        "gan_mode": gan_mode,
        "upsample": upsample,
        "device": device,
        "quiet": quiet,
    }
    configs = variant_configs(base, variants)
    runs: dict[str, Path] = {}
    for i, (name, cfg) in enumerate(configs.items(), start=1):
        run_dir = out / "runs" / name
        state = run_state(run_dir, cfg)
        head = f"[{i}/{len(configs)}] {name} ({VARIANTS[name][0]})"
        if state == "complete":
            say(f"{head}: complete in {run_dir}, skipped")
        elif state == "partial":
            say(f"{head}: resuming {run_dir}")
            keep = {"max_steps": cfg.max_steps, "quiet": quiet, "device": device}
            train(cfg, run_dir, resume=True, resume_overrides=keep)
        else:
            say(f"{head}: training {cfg.max_steps} steps -> {run_dir}")
            train(cfg, run_dir)
        runs[name] = run_dir
    title = (
        f"cellp2p ablation: {task} {direction}, {max_steps} steps x batch {batch_size} x crop "
        f"{crop}, preset {preset}, seed {seed}"
    )
    report = compare(
        list(runs.values()),
        volume=volume,
        labels=labels,
        manifest=manifest,
        data_dir=data_dir,
        out=out,
        segmenter=segmenter,
        names=[VARIANTS[v][0] for v in runs],
        title=title,
        device=device,
        echo=echo,
    )
    return {"runs": {k: str(v) for k, v in runs.items()}, "report": report}
