"""One training loop for both modes: the U-Net baseline and the pix2pix cGAN.

Each mode supplies a step function returning a dict of floats; the loop owns data, logging,
validation, checkpoints and resume. Randomness is derived from ``(seed, step)``, so a resumed
run draws exactly the batches and dropout masks the uninterrupted run would have.

Under torchrun (``WORLD_SIZE`` > 1) the same loop runs in every process with the trained
networks wrapped in DistributedDataParallel: step s's global batch of ``W × --batch-size``
crops is still a pure function of (seed, s) and rank r trains on its r-th slice of it, dropout
masks are seeded per (seed, step, rank), and rank 0 alone validates and writes the run folder
while the others wait (see :mod:`cellp2p.distributed`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cellp2p
from cellp2p import distributed
from cellp2p.checkpoint import (
    build_from_entry,
    copy_checkpoint,
    load_checkpoint,
    model_entry,
    save_checkpoint,
)
from cellp2p.config import TrainConfig, check_config, default_best_metric
from cellp2p.dataset import PairedData, StepBatches, load_data, steps_per_epoch, total_steps
from cellp2p.errors import CellP2PError
from cellp2p.figures import plot_curves, save_panel
from cellp2p.fsutil import check_folder_writable
from cellp2p.models.blocks import center_crop
from cellp2p.modes import Mode, make_mode
from cellp2p.rundir import RunLock, _read_records
from cellp2p.runtime import resolve_precision, seed_everything
from cellp2p.scoring import is_improvement, score_outputs
from cellp2p.tiling import forward_full

# -- data ------------------------------------------------------------------------------------


# -- the two modes -----------------------------------------------------------------------------


# -- validation, records -----------------------------------------------------------------------


def validate_run(mode: Mode, data: PairedData, device: torch.device) -> tuple[dict, np.ndarray]:
    """Metrics on whole held-out slices (not crops), and the predictions in [0, 1]."""
    preds = []
    net = mode.main
    was_training = net.training
    for m in mode.nets.values():
        m.eval()
    with torch.inference_mode():
        for x in data.val_x:
            xt = torch.from_numpy(x[None]).to(device)
            preds.append(forward_full(mode.predict, net, xt)[0].cpu().numpy())
    if was_training:
        for m in mode.nets.values():
            m.train()
    pred = np.stack(preds)
    return score_outputs(pred, data.val_y, data.target_kind, data.classes), pred


def versions(device: torch.device) -> dict[str, str]:
    import monai

    return {
        "cellp2p": cellp2p.__version__,
        "torch": str(torch.__version__),
        "monai": str(monai.__version__),
        "numpy": str(np.__version__),
        "python": sys.version.split()[0],
        "device": str(device),
    }


# -- the loop ----------------------------------------------------------------------------------


def lr_factor(step: int, total: int, decay_start: float) -> float:
    """Constant, then linear decay to 0 over the last ``1 - decay_start`` of the steps."""
    start = int(total * decay_start)
    if step < start or total <= start:
        return 1.0
    return max(0.0, 1.0 - (step - start) / (total - start))


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    resume_overrides: dict[str, Any] | None = None,
    stop_after: int | None = None,
    progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Train a run into ``out``; returns the final metrics record.

    ``resume`` continues the run in ``out`` with its saved config, changed only by
    ``resume_overrides`` (e.g. a larger ``max_steps``). ``stop_after`` ends the run early at
    that step (as an interruption would), keeping the schedule of the full run.
    """
    out = Path(out)
    ckpt_dir = out / "checkpoints"
    ckpt = None
    if resume:
        if not (ckpt_dir / "last.pt").is_file():
            raise CellP2PError(
                f"{out}: --resume needs {ckpt_dir / 'last.pt'}, which does not exist; "
                "start without --resume or point --out at an earlier run"
            )
        ckpt = load_checkpoint(ckpt_dir / "last.pt")
        saved = TrainConfig.from_dict(ckpt["train_config"], str(ckpt_dir / "last.pt"))
        cfg = TrainConfig.from_dict({**asdict(saved), **(resume_overrides or {})}, "--resume")
    check_config(cfg)
    check_folder_writable(out)
    if not resume and ckpt_dir.joinpath("last.pt").exists():
        raise CellP2PError(
            f"{out}: already holds a run; pass --resume to continue it or choose another --out"
        )
    world = distributed.setup(cfg.device)  # under torchrun: joins the group (kept until exit)
    return _train(cfg, out, ckpt, world, stop_after, progress)


def _train(
    cfg: TrainConfig,
    out: Path,
    ckpt: dict[str, Any] | None,
    world: distributed.World,
    stop_after: int | None,
    progress: Callable[..., Any] | None,
) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        try:  # a failure in one process must stop them all, not leave them waiting for it
            device = world.device
            precision = resolve_precision(cfg.precision, device)
            if cfg.sync_bn and world.size > 1 and device.type != "cuda":
                raise CellP2PError(
                    "--sync-bn: torch's SyncBatchNorm runs on CUDA GPUs only; on the CPU leave "
                    "it off (each process then normalises with the statistics of its own crops)"
                )
            seed_everything(cfg.seed, cfg.deterministic)
            data = load_data(cfg, ckpt["normalization"] if ckpt else None)
            mode = make_mode(cfg, data, device, precision)
            steps = total_steps(cfg, data, world.size)
            best_metric = cfg.best_metric or default_best_metric(cfg, data.target_kind)
            start, best, records = 0, None, []
            if ckpt:
                for name, net in mode.nets.items():
                    entry = ckpt["models"][name]
                    net.load_state_dict(build_from_entry(entry, ckpt["path"]).state_dict())
                for name, opt in mode.optims.items():
                    opt.load_state_dict(ckpt["optimizers"][name])
                start, best = int(ckpt["step"]), ckpt.get("best")
                random.setstate(_tuple_state(ckpt["rng"]["python"]))
            scheds = {
                k: torch.optim.lr_scheduler.LambdaLR(
                    o, lambda s: lr_factor(s, steps, cfg.lr_decay_start), last_epoch=start - 1
                )
                for k, o in mode.optims.items()
            }
            if ckpt:
                for k, s in scheds.items():
                    s.load_state_dict(ckpt["schedulers"][k])
            for net in mode.nets.values():
                net.train()
            if world.is_main:  # rank 0 alone writes the run folder
                out.mkdir(parents=True, exist_ok=True)
                stack.enter_context(RunLock(out))
                if ckpt:
                    records = _read_records(out / "metrics.jsonl", start)
                    _note_world_change(ckpt, world.size, cfg)
                meta = {**asdict(cfg), "total_steps": steps, "best_metric": best_metric}
                meta.update(versions=versions(device), precision=precision)
                meta.update(world_size=world.size, global_batch_size=cfg.batch_size * world.size)
                meta.update(
                    data={**data.sources, "target_kind": data.target_kind, "classes": data.classes}
                )
                _write_json(out / "config.json", meta)
        except Exception:
            world.agree(False, "set-up")
            raise
        world.agree(True, "set-up")
        if world.size > 1:
            _wrap_for_ddp(mode, world, cfg)
        return _loop(
            cfg,
            out,
            mode,
            data,
            scheds,
            steps,
            start,
            best,
            best_metric,
            records,
            device,
            stop_after,
            progress,
            world,
        )


def _wrap_for_ddp(mode: Mode, world: distributed.World, cfg: TrainConfig) -> None:
    """DistributedDataParallel around each trained network (with SyncBatchNorm if asked).

    ``mode.nets`` stay the plain networks (same parameters), so checkpoints hold the unwrapped
    state dicts that a single process loads unchanged.
    """
    wrapped = {}
    for name, net in mode.nets.items():
        if name not in mode.optims:  # e.g. D in the L1-only ablation: never stepped
            wrapped[name] = net
            continue
        if cfg.sync_bn:  # same parameter and buffer objects: optimizers are unaffected
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
            mode.nets[name] = net
        wrapped[name] = world.wrap(net)
    mode.train_nets = wrapped


def _note_world_change(ckpt: dict[str, Any], size: int, cfg: TrainConfig) -> None:
    before = int(ckpt.get("world_size") or 1)
    if before != size:
        print(
            f"note: resuming a run trained by {before} process(es) with {size}: the global "
            f"batch changes from {before * cfg.batch_size} to {size * cfg.batch_size} crops, "
            "so this is not an exact continuation",
            file=sys.stderr,
        )


def _tuple_state(state: Any) -> Any:
    return tuple(_tuple_state(s) for s in state) if isinstance(state, list) else state


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _loop(
    cfg,
    out,
    mode,
    data,
    scheds,
    steps,
    start,
    best,
    best_metric,
    records,
    device,
    stop_after,
    progress,
    world=None,
) -> dict[str, Any]:
    from tqdm import tqdm

    world = world or distributed.World(device=device)
    loader = torch.utils.data.DataLoader(
        StepBatches(data, cfg, world.rank, world.size),
        batch_size=None,
        sampler=range(start + 1, steps + 1),
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
    )
    end = min(steps, stop_after) if stop_after else steps
    bar = tqdm(
        total=end,
        initial=start,
        disable=cfg.quiet or not world.is_main,
        dynamic_ncols=True,
        desc=cfg.mode,
        file=sys.stderr,
    )
    sums: dict[str, torch.Tensor] = {}
    n_since, t_since = 0, time.perf_counter()
    interrupted = False
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:  # finish the step, then checkpoint
        nonlocal interrupted
        interrupted = True

    if threading_is_main():
        signal.signal(signal.SIGINT, on_sigint)
    record: dict[str, Any] = records[-1] if records else {}
    step = start
    try:
        for step, (x, y) in zip(range(start + 1, end + 1), loader, strict=False):
            # Dropout masks and D's interpolates depend on (seed, step, rank): resume is exact.
            torch.manual_seed(distributed.step_seed(cfg.seed, step, world.rank))
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            logs = mode.step(x, y)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0) + v
            n_since += 1
            for s in scheds.values():
                s.step()
            bar.update(1)
            if world.size > 1:  # an interrupt seen by one process stops all at the same step
                interrupted = world.any(interrupted)
            if step % cfg.eval_every == 0 or step == end or interrupted:
                elapsed = time.perf_counter() - t_since
                losses = world.mean({k: float(v) / n_since for k, v in sums.items()})
                if world.is_main:  # the others wait at world.agree below
                    try:
                        record, best = _evaluate(
                            cfg,
                            out,
                            mode,
                            data,
                            scheds,
                            step,
                            steps,
                            losses,
                            n_since * cfg.batch_size * world.size / max(elapsed, 1e-9),
                            best,
                            best_metric,
                            records,
                            device,
                            world.size,
                        )
                    except Exception:
                        world.agree(False, f"validation and checkpointing at step {step}")
                        raise
                    bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()})
                    if cfg.quiet:
                        print(_log_line(record), file=sys.stderr, flush=True)
                    if progress:
                        progress(record)
                world.agree(True, f"validation and checkpointing at step {step}")
                sums, n_since, t_since = {}, 0, time.perf_counter()
            if interrupted:
                if world.is_main:
                    print(
                        f"interrupted at step {step}: checkpoint written to "
                        f"{out}/checkpoints/last.pt",
                        file=sys.stderr,
                    )
                break
    finally:
        bar.close()
        if threading_is_main():
            signal.signal(signal.SIGINT, previous)
    if interrupted:
        raise KeyboardInterrupt
    return world.broadcast(record)  # every process returns rank 0's final record


def threading_is_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _log_line(record: dict) -> str:
    parts = [f"step {record['step']}"]
    # "time" is the wall-clock stamp kept in metrics.jsonl; as a log field it only says 1.8e+09.
    parts += [f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "time"]
    return " | ".join(parts)


def _evaluate(
    cfg,
    out,
    mode,
    data,
    scheds,
    step,
    steps,
    losses,
    ips,
    best,
    best_metric,
    records,
    device,
    world_size=1,
) -> tuple[dict, dict | None]:
    """Validate, write the record, the sample panel, the curve and the checkpoints (rank 0)."""
    val, pred = validate_run(mode, data, device)
    per_epoch = steps_per_epoch(cfg, data, world_size)
    record = {
        "step": step,
        "epoch": step / per_epoch,
        **losses,
        **{f"val_{k}": v for k, v in val.items()},
        "images_per_s": ips,
        "lr": scheds[next(iter(scheds))].get_last_lr()[0],
        "time": time.time(),
    }
    value = val.get(best_metric)
    if value is None:
        raise CellP2PError(
            f"--best-metric {best_metric}: not computed; choose one of {sorted(val)}"
        )
    improved = is_improvement(best_metric, value, best and best["value"])
    if improved:
        best = {"metric": best_metric, "value": float(value), "step": step}
    payload = {
        "mode": cfg.mode,
        "task": cfg.task,
        "train_config": asdict(cfg),
        "models": {name: model_entry(net) for name, net in mode.nets.items()},
        "optimizers": {k: o.state_dict() for k, o in mode.optims.items()},
        "schedulers": {k: s.state_dict() for k, s in scheds.items()},
        "scaler": None,
        "normalization": {
            "input": data.input_norm.to_dict(),
            "target": data.target_norm.to_dict() if data.target_norm else None,
        },
        "data": {
            "in_channels": data.in_channels,
            "out_channels": data.out_channels,
            "target_kind": data.target_kind,
            "classes": data.classes,
            "spacing": list(data.spacing) if data.spacing else None,
            "crop": cfg.crop,
        },
        "step": step,
        "total_steps": steps,
        "world_size": world_size,
        "best": best,
        "rng": {
            "python": _listify(random.getstate()),
            "numpy": _listify(np.random.get_state()),
            "torch": torch.get_rng_state(),
        },
        "versions": versions(device),
        "record": record,
    }
    last = save_checkpoint(out / "checkpoints" / "last.pt", payload)
    if improved:
        copy_checkpoint(last, out / "checkpoints" / "best.pt", payload)
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")
    records.append(record)
    x0 = data.val_x[0]
    target = data.val_y[0]
    shown = pred[0][1:2] if data.target_kind == "binary" and pred.shape[1] > 1 else pred[0]
    if data.target_kind == "multiclass":
        shown = pred[0].argmax(0)[None].astype(np.float32)
    save_panel(
        out / "samples" / f"step_{step:07d}.png",
        [x0, center_crop(target, *shown.shape[-2:]), shown],
    )
    plot_curves(out / "loss_curve.png", records, f"{cfg.mode} ({cfg.task}, {cfg.preset})")
    return record, best


def _listify(state: Any) -> Any:
    if isinstance(state, tuple | list):
        return [_listify(s) for s in state]
    if isinstance(state, np.ndarray):
        return state.tolist()
    return state
