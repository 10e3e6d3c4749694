"""``cellp2p ablate``: the pix2pix paper's loss ablation (Table 1) plus the U-Net baseline.

Trains every variant on one data set with the same budget (steps, batch, crop) and seed into
``OUT/runs/<variant>``, then compares them into ``OUT`` (report.md with one row per variant).
Re-running the same command skips finished variants and resumes an interrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cellp2p.errors import CellP2PError

DEFAULT_STEPS = 1000
# The TrainConfig options `cellp2p ablate` shares with `train` (generated from the same table),
# with ablate's own default and help where they differ: a step budget for every variant, an
# evaluation interval that follows it, and a task that follows the direction.
OPTIONS: dict[str, dict[str, Any]] = {
    "volume": {},
    "labels": {},
    "manifest": {},
    "data_dir": {},
    "ab": {},
    "ab_val": {},
    "max_steps": {"default": DEFAULT_STEPS, "help": "Steps per run."},
    "preset": {},
    "crop": {},
    "batch_size": {},
    "seed": {},
    "eval_every": {"default": None, "help": "Validate every N steps [max-steps / 10]."},
    "direction": {},
    "task": {"default": None, "help": "[segment; translate for BtoA]"},
    "gan_mode": {},
    "upsample": {},
    "device": {},
    "quiet": {},
}

# variant -> (table label, TrainConfig changes); Isola et al. 2017, Table 1, after the baseline.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "unet": ("U-Net", {"mode": "unet"}),
    "l1": ("L1", {"mode": "pix2pix", "lambda_gan": 0.0}),
    "gan": ("GAN", {"mode": "pix2pix", "unconditional": True, "lambda_l1": 0.0}),
    "cgan": ("cGAN", {"mode": "pix2pix", "unconditional": False, "lambda_l1": 0.0}),
    "l1_gan": ("L1+GAN", {"mode": "pix2pix", "unconditional": True}),
    "l1_cgan": ("L1+cGAN", {"mode": "pix2pix", "unconditional": False}),
}
# What compare writes into the ablation's folder.
ABLATION_OUTPUTS = ("runs", "report.md", "report.html", "report.json", "loss_curves.png", "panels")
# Options that may differ between an existing run folder and this ablation's request without
# making the run a different experiment (where it runs, how it logs, and the planned length).
_RUNTIME_KEYS = {"device", "quiet", "num_workers", "precision", "max_steps", "eval_every"}


def base_config(base: Any = None, **options: Any) -> dict[str, Any]:
    """Every TrainConfig field the variants share: ``base`` (a TrainConfig or a dict of some
    fields) with ``options`` over it; unset ``max_steps``, ``eval_every``, ``task`` and
    ``augment`` (full, for every variant) get ablate's defaults, the rest TrainConfig's."""
    from cellp2p.config import TrainConfig

    values = asdict(base) if isinstance(base, TrainConfig) else dict(base or {})
    values.update(options)
    values = {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}
    if values.get("max_steps") is None:
        values["max_steps"] = DEFAULT_STEPS
    if values.get("eval_every") is None and isinstance(values["max_steps"], int):
        values["eval_every"] = max(1, values["max_steps"] // 10)
    if values.get("task") is None:
        translate = values.get("direction") == "BtoA" or values.get("ab")
        values["task"] = "translate" if translate else "segment"
    if values.get("augment") is None:  # one recipe for every variant: only the losses differ
        values["augment"] = "full"
    return asdict(TrainConfig.from_dict(values, "ablate"))  # every field, each of its type


def variant_configs(
    base: Mapping[str, Any], variants: Sequence[str] | None = None
) -> dict[str, Any]:
    """Validated TrainConfig of each requested variant: the shared settings plus its changes.

    All are checked before the first one trains, so a bad option does not surface hours later.
    """
    from cellp2p.config import TrainConfig

    names = list(variants) if variants else list(VARIANTS)
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise CellP2PError(
            f"--variants: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}"
        )
    configs = {}
    for name in names:
        changes = VARIANTS[name][1]
        if changes["mode"] == "pix2pix":  # a base --loss is the U-Net baseline's
            changes = {**changes, "loss": None}
        cfg = TrainConfig.from_dict({**base, **changes}, "ablate")
        cfg.validate()
        configs[name] = cfg
    return configs


def run_state(run_dir: Path, cfg: Any) -> str:
    """'new', 'partial' (resume it) or 'complete' (skip it) for ``cfg`` in ``run_dir``.

    A folder trained with other settings (data, loss, crop, seed, ...) is an error rather than
    silently reused or overwritten.
    """
    from cellp2p.checkpoint import load_checkpoint

    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        return "new"
    ckpt = load_checkpoint(last, mmap=True)  # options and step only: no weights read
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
    base: Any = None,
    *,
    out: str | Path,
    variants: Sequence[str] | None = None,
    segmenter: str | Path | None = None,
    force: bool = False,
    echo: Callable[[str], Any] | None = print,
    **options: Any,
) -> dict:
    """Train the loss variants (same budget and seed) into OUT/runs/<variant>, then compare them.

    ``base`` is a TrainConfig or a dict of its fields, and ``options`` are more of them (e.g.
    ``volume=..., max_steps=500``); :func:`base_config` fills the rest. ``task`` defaults to
    ``translate`` for ``direction="BtoA"`` (labels -> images) and to ``segment`` otherwise.
    Finished variants are skipped and an interrupted one is resumed, so the same call continues
    an ablation; a larger ``max_steps`` extends every run. Returns
    ``{"runs": {variant: folder}, "report": <compare's report>}``. OUT must be new, empty or
    an earlier ablation (``force``: a folder holding other files, which are left as they are);
    every variant's folder is checked before the first one trains.
    """
    from cellp2p.compare import compare

    shared = base_config(base, **options)
    configs = variant_configs(shared, variants)
    check_ablation(Path(out), configs, force)
    runs = {
        name: _train_variant(i, len(configs), name, cfg, Path(out), echo)
        for i, (name, cfg) in enumerate(configs.items(), start=1)
    }
    claim_ablation(Path(out), force)
    title = (
        f"cellp2p ablation: {shared['task']} {shared['direction']}, {shared['max_steps']} steps "
        f"x batch {shared['batch_size']} x crop {shared['crop']}, preset {shared['preset']}, "
        f"seed {shared['seed']}"
    )
    data = {k: shared.get(k) for k in ("volume", "labels", "manifest", "data_dir", "device")}
    report = compare(
        list(runs.values()),
        **data,
        out=out,
        segmenter=segmenter,
        names=[VARIANTS[v][0] for v in runs],
        title=title,
        echo=echo,
    )
    return {"runs": {k: str(v) for k, v in runs.items()}, "report": report}


def check_ablation(out: Path, configs: Mapping[str, Any], force: bool) -> None:
    """Refuse (one line, nothing written) an OUT that is not new, empty or an ablation's, and
    any variant folder trained with other settings; the runs create their folders only once
    their data has been read."""
    from cellp2p.fsutil import check_claim

    earlier = _earlier_ablation(out)
    check_claim(out, "report", force or earlier, () if earlier else ABLATION_OUTPUTS)
    for name, cfg in configs.items():
        run_state(out / "runs" / name, cfg)  # refuses a run trained with other settings


def claim_ablation(out: Path, force: bool) -> None:
    """Mark OUT as the ablation's (a report folder holding ``runs/``) once its runs exist."""
    from cellp2p.fsutil import claim_folder

    earlier = _earlier_ablation(out)
    claim_folder(out, "report", force or earlier, () if earlier else ABLATION_OUTPUTS)


def _earlier_ablation(out: Path) -> bool:
    """Whether OUT holds an ablation without its marker (one from before markers, or one whose
    runs are training): only cellp2p runs of variants under runs/."""
    from cellp2p.fsutil import folder_kind

    runs = out / "runs"
    if not runs.is_dir() or folder_kind(out) is not None:
        return False
    subs = list(runs.iterdir())
    return bool(subs) and all(p.name in VARIANTS and folder_kind(p) == "run" for p in subs)


def _train_variant(
    i: int, n: int, name: str, cfg: Any, out: Path, echo: Callable[[str], Any] | None
) -> Path:
    """Train (or resume, or skip when complete) variant ``name`` into OUT/runs/<name>."""
    from cellp2p.train import train

    say = echo or (lambda _msg: None)
    run_dir = out / "runs" / name
    state = run_state(run_dir, cfg)
    head = f"[{i}/{n}] {name} ({VARIANTS[name][0]})"
    if state == "complete":
        say(f"{head}: complete in {run_dir}, skipped")
    elif state == "partial":
        say(f"{head}: resuming {run_dir}")
        keep = {"max_steps": cfg.max_steps, "quiet": cfg.quiet, "device": cfg.device}
        train(cfg, run_dir, resume=True, resume_overrides=keep)
    else:
        say(f"{head}: training {cfg.max_steps} steps -> {run_dir}")
        train(cfg, run_dir)
    return run_dir
