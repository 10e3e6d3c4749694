"""One training loop for both modes: the U-Net baseline and the pix2pix cGAN.

:func:`train` sets a run up into a :class:`TrainState` (a fresh one, or one restored from
``checkpoints/last.pt``) and runs the loop; each mode (:mod:`cellp2p.modes`) supplies its step.
At every evaluation rank 0 validates, then records, checkpoints and draws, in that order.
Randomness is derived from ``(seed, step)``, so a resumed run draws exactly the batches and
dropout masks the uninterrupted run would have, and the global generators are restored too.

Under torchrun (``WORLD_SIZE`` > 1) the same loop runs in every process with the trained
networks wrapped in DistributedDataParallel: step s's global batch of ``W × --batch-size``
crops is still a pure function of (seed, s) and rank r trains on its r-th slice of it, dropout
masks are seeded per (seed, step, rank), and rank 0 alone validates and writes the run folder
while the others wait (see :mod:`cellp2p.distributed`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from cellp2p import distributed
from cellp2p.checkpoint import (
    PREDICTS,
    build_from_entry,
    check_resumable,
    load_checkpoint,
    restore,
    update_checkpoint,
    versions,
    write_checkpoints,
)
from cellp2p.config import TrainConfig, resumed_config
from cellp2p.dataset import (
    PairedData,
    StepBatches,
    check_resumed_data,
    load_data,
    steps_per_epoch,
    total_steps,
)
from cellp2p.errors import CellP2PError
from cellp2p.figures import plot_curves, save_panel
from cellp2p.fsutil import check_claim, claim_folder, mark_folder
from cellp2p.instances import tune_run, tunes
from cellp2p.models.blocks import center_crop
from cellp2p.modes import Mode, lr_factor, make_mode, make_schedulers, model_overrides
from cellp2p.rundir import (
    CURVE,
    RUN_OUTPUTS,
    RunLock,
    append_record,
    best_checkpoint,
    last_checkpoint,
    sample_path,
    truncate_records,
    write_config,
)
from cellp2p.runtime import check_batch_memory, resolve_precision, seed_everything
from cellp2p.scoring import is_improvement, is_object_score, score_outputs
from cellp2p.tiling import dihedral_mean, forward_full

__all__ = ["TrainConfig", "TrainState", "lr_factor", "make_loader", "train", "train_step"]

T = TypeVar("T")


@dataclass
class TrainState:
    """What the loop reads and changes; :mod:`cellp2p.checkpoint` saves and restores it."""

    cfg: TrainConfig
    out: Path
    mode: Mode
    data: PairedData
    total: int  # steps of the whole run (the schedule's length)
    world: distributed.World = field(default_factory=distributed.World)
    step: int = 0  # steps done
    best: dict[str, Any] | None = None  # {"metric", "value", "step"} of the best evaluation
    records: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl so far (rank 0)
    postprocessing: dict[str, Any] | None = None  # the tuned watershed of --output labels
    best_outputs: np.ndarray | None = None  # best.pt's validation outputs (this process's best)
    best_metric: str = field(init=False)  # --best-metric, or the task's default
    scheds: dict[str, torch.optim.lr_scheduler.LambdaLR] = field(init=False)

    def __post_init__(self) -> None:
        self.best_metric = self.cfg.best_metric_name()
        self.scheds = make_schedulers(
            self.mode.optims, self.total, self.cfg.lr_decay_start, self.step
        )

    @property
    def device(self) -> torch.device:
        """The device this process trains on."""
        return self.world.device


# -- set-up ------------------------------------------------------------------------------------


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    resume_overrides: dict[str, Any] | None = None,
    stop_after: int | None = None,
    progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Train a run into ``out``; returns the final metrics record.

    ``out`` must be new, empty or a run folder; ``force`` writes the run into a folder holding
    other files (never over them: an entry named like a run output is refused). ``resume``
    continues the run in ``out`` with its saved config, changed only by ``resume_overrides``
    (e.g. a larger ``max_steps``; ones that change the networks or their data are refused).
    ``stop_after`` ends the run early at that step (as an interruption would), keeping the
    schedule of the full run. ``progress`` is called with each record (rank 0).
    """
    out = Path(out)
    ckpt = _resume_checkpoint(out) if resume else None
    if ckpt is not None:
        cfg = resumed_config(ckpt["train_config"], resume_overrides or {}, ckpt["path"])
    cfg.validate()
    if ckpt is None:  # a resumed folder is a run: its checkpoint says so
        check_claim(out, "run", force, RUN_OUTPUTS)
    if not resume and last_checkpoint(out).exists():
        raise CellP2PError(
            f"{out}: already holds a run; pass --resume to continue it or choose another --out"
        )
    world = distributed.setup(cfg.device)  # under torchrun: joins the group (kept until exit)
    with contextlib.ExitStack() as stack:  # holds the run folder's lock until the end
        # A failure in one process must stop them all, not leave them waiting for it.
        state = _agreed(world, "set-up", lambda: _set_up(cfg, out, ckpt, world, stack, force))
        if world.size > 1:
            _wrap_for_ddp(state.mode, world, cfg)
        return run(state, stop_after=stop_after, progress=progress)


def _resume_checkpoint(out: Path) -> dict[str, Any]:
    """The run's last checkpoint, which ``--resume`` needs."""
    path = last_checkpoint(out)
    if not path.is_file():
        raise CellP2PError(
            f"{out}: --resume needs {path}, which does not exist; "
            "start without --resume or point --out at an earlier run"
        )
    ckpt = load_checkpoint(path)
    check_resumable(ckpt)  # before the data are read: a best.pt put in its place
    if not isinstance(ckpt.get("train_config"), dict):
        raise CellP2PError(f"{path}: holds no training options; it cannot be resumed")
    return ckpt


def _set_up(
    cfg: TrainConfig,
    out: Path,
    ckpt: dict[str, Any] | None,
    world: distributed.World,
    stack: contextlib.ExitStack,
    force: bool = False,
) -> TrainState:
    """Data, mode and state (restored from ``ckpt`` if given); rank 0 opens the run folder.

    Everything is read and checked before the folder is created or anything is written in it.
    """
    precision = resolve_precision(cfg.precision, world.device)
    if cfg.sync_bn and world.size > 1 and world.device.type != "cuda":
        raise CellP2PError(
            "--sync-bn: torch's SyncBatchNorm runs on CUDA GPUs only; on the CPU leave "
            "it off (each process then normalises with the statistics of its own crops)"
        )
    seed_everything(cfg.seed, cfg.deterministic)
    data = load_data(cfg, ckpt["normalization"] if ckpt else None)
    if ckpt is not None:
        check_resumed_data(ckpt, data, cfg)
    channels = data.in_channels + data.out_channels
    check_batch_memory(cfg.batch_size, cfg.crop, channels, _first_features(cfg), world.device)
    mode = make_mode(cfg, data, world.device, precision)
    state = TrainState(cfg, out, mode, data, total_steps(cfg, data, world.size), world)
    if ckpt is not None:
        restore(state, ckpt)
    for net in mode.nets.values():
        net.train()
    if world.is_main:  # rank 0 alone writes the run folder
        _open_run_folder(out, force, ckpt is not None, stack)
        # A fresh run in its own folder (one whose start failed) drops the old log's lines.
        state.records = truncate_records(out, state.step if ckpt is not None else 0)
        if ckpt is not None:
            _note_world_change(ckpt, world.size, cfg)
        write_config(out, _run_config(state))
    return state


def _open_run_folder(out: Path, force: bool, resumed: bool, stack: contextlib.ExitStack) -> None:
    """Create and lock the run folder, then mark it a run (a second run on it, refused by the
    lock, writes nothing there)."""
    if not resumed:
        check_claim(out, "run", force, RUN_OUTPUTS)  # again: the folder may have changed
    out.mkdir(parents=True, exist_ok=True)
    stack.enter_context(RunLock(out))
    if resumed:
        mark_folder(out, "run")
    else:
        claim_folder(out, "run", force, RUN_OUTPUTS)


def _first_features(cfg: TrainConfig) -> int:
    """Feature maps of the trained network's first layer (its ``base``)."""
    from cellp2p.models.config import PRESETS

    kind = "unet" if cfg.mode == "unet" else "generator"
    base = model_overrides(cfg).get("base", PRESETS[kind][cfg.preset].get("base", 1))
    return base if isinstance(base, int) and base > 0 else 1


def _run_config(state: TrainState) -> dict[str, Any]:
    """config.json: the options, the derived run facts, the versions and the data."""
    cfg, data, world = state.cfg, state.data, state.world
    return {
        **asdict(cfg),
        "total_steps": state.total,
        "best_metric": state.best_metric,
        "versions": versions(state.device),
        "precision": state.mode.precision,
        "world_size": world.size,
        "global_batch_size": cfg.batch_size * world.size,
        "data": {**data.sources, "target_kind": data.target_kind, "classes": data.classes},
    }


def _agreed(world: distributed.World, what: str, work: Callable[[], T]) -> T:
    """``work()``, then a barrier at which every process learns whether all of them succeeded."""
    try:
        result = work()
    except Exception:
        world.agree(False, what)
        raise
    world.agree(True, what)
    return result


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
    """Warn when a run is resumed by another number of processes (another global batch)."""
    before = int(ckpt.get("world_size") or 1)
    if before != size:
        print(
            f"note: resuming a run trained by {before} process(es) with {size}: the global "
            f"batch changes from {before * cfg.batch_size} to {size * cfg.batch_size} crops, "
            "so this is not an exact continuation",
            file=sys.stderr,
        )


# -- the loop ----------------------------------------------------------------------------------


def make_loader(
    state: TrainState, end: int, num_workers: int | None = None
) -> torch.utils.data.DataLoader:
    """The batches of steps ``state.step + 1`` … ``end``, each a pure function of (seed, step).

    The loader draws its worker seeds from a generator of its own, not from torch's global
    one, so creating it leaves the restored generator states untouched.
    """
    cfg, world = state.cfg, state.world
    return torch.utils.data.DataLoader(
        StepBatches(state.data, cfg, world.rank, world.size),
        batch_size=None,
        sampler=range(state.step + 1, end + 1),
        num_workers=cfg.num_workers if num_workers is None else num_workers,
        pin_memory=state.device.type == "cuda",
        persistent_workers=False,
        generator=torch.Generator().manual_seed(cfg.seed),
    )


def train_step(state: TrainState, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The next step: seeded by (seed, step, rank), the mode's step, then the LR schedules."""
    step = state.step + 1
    # Dropout masks and D's interpolates depend on (seed, step, rank): resume is exact.
    torch.manual_seed(distributed.step_seed(state.cfg.seed, step, state.world.rank))
    x = x.to(state.device, non_blocking=True)
    y = y.to(state.device, non_blocking=True)
    logs = state.mode.step(x, y)
    for sched in state.scheds.values():
        sched.step()
    state.step = step
    return logs


def run(
    state: TrainState,
    *,
    stop_after: int | None = None,
    progress: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Train from ``state.step`` to the end of the run (or ``stop_after``), evaluating every
    ``--eval-every`` steps and at the end; every process returns rank 0's final record."""
    cfg, world = state.cfg, state.world
    end = min(state.total, stop_after) if stop_after else state.total
    record = state.records[-1] if state.records else {}
    window, interrupted = _Window(), False
    with _progress_bar(state, end) as bar, _SigintFlag() as sigint:
        for x, y in make_loader(state, end):
            window.add(train_step(state, x, y))
            bar.update(1)
            interrupted = world.any(sigint.seen)  # one process interrupted: all stop here
            ending = state.step == end or interrupted
            if state.step % cfg.eval_every == 0 or ending:
                record = _evaluation(state, window, bar, progress, ending)
                window = _Window()
            if interrupted:
                if world.is_main:
                    print(
                        f"interrupted at step {state.step}: checkpoint written to "
                        f"{last_checkpoint(state.out)}",
                        file=sys.stderr,
                    )
                break
    if interrupted:
        raise KeyboardInterrupt
    return world.broadcast(record)


class _Window:
    """Loss sums and the time since the last evaluation."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, logs: dict[str, torch.Tensor]) -> None:
        """Add one step's losses (kept on the device: no host sync per step)."""
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0) + v
        self.steps += 1

    def means(self) -> dict[str, float]:
        """The mean of each loss over the window's steps."""
        return {k: float(v) / self.steps for k, v in self.sums.items()}


class _SigintFlag:
    """Ctrl-C during the loop sets ``seen``: the step finishes, then a checkpoint is written."""

    def __init__(self) -> None:
        self.seen = False
        self._main = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> _SigintFlag:
        if self._main:  # signal handlers can only be set from the main thread
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum: int, frame: Any) -> None:
        """The handler: only note it (the loop checks after each step)."""
        self.seen = True

    def __exit__(self, *exc: object) -> None:
        if self._main:
            signal.signal(signal.SIGINT, self._previous)


@contextlib.contextmanager
def _progress_bar(state: TrainState, end: int) -> Iterator[Any]:
    """A tqdm bar on stderr (rank 0, not with --quiet), closed however the loop ends."""
    from tqdm import tqdm

    bar = tqdm(
        total=end,
        initial=state.step,
        disable=state.cfg.quiet or not state.world.is_main,
        dynamic_ncols=True,
        desc=state.cfg.mode,
        file=sys.stderr,
    )
    try:
        yield bar
    finally:
        bar.close()


# -- an evaluation: validate → record → checkpoint → figures -------------------------------------


def _evaluation(
    state: TrainState,
    window: _Window,
    bar: Any,
    progress: Callable[..., Any] | None,
    ending: bool = False,
) -> dict[str, Any]:
    """Rank 0 evaluates and logs while the others wait; the record (empty on other ranks)."""
    world = state.world
    elapsed = time.perf_counter() - window.t0
    losses = world.mean(window.means())
    ips = window.steps * state.cfg.batch_size * world.size / max(elapsed, 1e-9)

    def work() -> dict[str, Any]:
        """Rank 0's part: evaluate, then the bar, the --quiet line and ``progress``."""
        if not world.is_main:
            return {}
        record = evaluate(state, losses, ips, ending)
        bar.set_postfix({k: f"{v:.3g}" for k, v in losses.items()})
        if state.cfg.quiet:
            print(_log_line(record), file=sys.stderr, flush=True)
        if progress:
            progress(record)
        return record

    return _agreed(world, f"validation and checkpointing at step {state.step}", work)


def evaluate(
    state: TrainState, losses: dict[str, float], images_per_s: float, ending: bool = False
) -> dict[str, Any]:
    """Validate, then write the record, the checkpoints and the figures (rank 0).

    The object scores (:data:`cellp2p.scoring.OBJECT_SCORES`) are computed at the evaluations
    that use them: one that improves (best.pt carries them), the last, and every one when
    ``--best-metric`` is such a score. The watershed of ``--output labels`` is tuned once, at
    the evaluation that ends the run (its last step, an interruption, ``stop_after``), on the
    validation outputs of each checkpoint it goes into (:func:`_tune_best`).
    """
    final = state.step == state.total
    full = final or is_object_score(state.best_metric)
    val, pred = validate_run(state.mode, state.data, state.device, full)
    improved = _update_best(state, val)
    if improved and not full:
        val = score_validation(pred, state.data, full=True)
    if improved:
        state.best_outputs = pred
    record = make_record(state, losses, val, images_per_s)
    if ending:  # issue 15: --output labels, tuned on validation
        state.postprocessing = _tuned(state, pred)
    write_checkpoints(state, record, improved)
    if ending and not improved:
        _tune_best(state)
    append_record(state.out, record)  # after the checkpoint: a logged step is always saved
    state.records.append(record)
    save_figures(state, pred)
    return record


def _tune_best(state: TrainState) -> None:
    """best.pt's watershed, tuned on its own validation outputs and written into it (the run's
    last evaluation did not improve; a best from before a ``--resume`` is run again here)."""
    path = best_checkpoint(state.out)
    if state.best is None or not path.is_file() or not tunes(state.data):
        return  # (nothing to tune: best.pt keeps no post-processing)
    entry = load_checkpoint(path, mmap=True)["models"][PREDICTS[state.cfg.mode]]
    net = build_from_entry(entry, path).to(state.device)
    pred = state.best_outputs
    if pred is None:
        pred = validation_outputs(state.mode, state.data, state.device, net)
    update_checkpoint(path, postprocessing=_tuned(state, pred, net))


def _tuned(state: TrainState, pred: np.ndarray, net: torch.nn.Module | None = None) -> Any:
    """:func:`tune_run` on the validation outputs ``pred`` of ``net`` (None: the mode's) and on
    their test-time augmented ones (kept where they score better)."""
    if not tunes(state.data):
        return None
    tta = validation_outputs(state.mode, state.data, state.device, net, tta=True)
    return tune_run(pred, state.data, tta)


def validate_run(
    mode: Mode,
    data: PairedData,
    device: torch.device,
    full: bool = True,
    net: torch.nn.Module | None = None,
) -> tuple[dict, np.ndarray]:
    """Metrics on whole held-out slices (not crops), and the predictions in [0, 1]; ``net``:
    another network in place of the mode's (best.pt's, of the same kind)."""
    pred = validation_outputs(mode, data, device, net)
    return score_validation(pred, data, full), pred


def validation_outputs(
    mode: Mode,
    data: PairedData,
    device: torch.device,
    net: torch.nn.Module | None = None,
    tta: bool = False,
) -> np.ndarray:
    """The outputs in [0, 1] of the mode's network (or ``net``) on the whole held-out slices;
    ``tta``: averaged over the 8 flips/rotations (:func:`cellp2p.tiling.dihedral_mean`)."""
    preds = []
    main = mode.main if net is None else net
    was_training = mode.main.training
    for m in [*mode.nets.values(), main]:
        m.eval()

    def whole(t: torch.Tensor) -> torch.Tensor:
        return forward_full(lambda u: mode.predict(u, main), main, t)

    with torch.inference_mode():
        for x in data.val_x:
            xt = torch.from_numpy(x[None]).to(device)
            out = dihedral_mean(whole, xt) if tta else whole(xt)
            preds.append(out[0].cpu().numpy())
    if was_training:
        for m in mode.nets.values():
            m.train()
    return np.stack(preds)


def score_validation(pred: np.ndarray, data: PairedData, full: bool = True) -> dict[str, float]:
    """The validation scores of ``pred``; ``full`` False: without the object scores."""
    objects = data.val_instances if data.instances else None
    return score_outputs(pred, data.val_y, data.target_kind, data.classes, objects, full)


def make_record(
    state: TrainState, losses: dict[str, float], val: dict[str, float], images_per_s: float
) -> dict[str, Any]:
    """One metrics.jsonl line: step, epoch, mean losses, val_* metrics, speed, LR, time."""
    return {
        "step": state.step,
        "epoch": state.step / steps_per_epoch(state.cfg, state.data, state.world.size),
        **losses,
        **{f"val_{k}": v for k, v in val.items()},
        "images_per_s": images_per_s,
        "lr": next(iter(state.scheds.values())).get_last_lr()[0],
        "time": time.time(),
    }


def _update_best(state: TrainState, val: dict[str, float]) -> bool:
    """Whether this evaluation beats the best on ``best_metric`` (then it becomes the best)."""
    value = val.get(state.best_metric)
    if value is None:
        raise CellP2PError(
            f"--best-metric {state.best_metric}: not computed; choose one of {sorted(val)}"
        )
    if not is_improvement(state.best_metric, value, state.best and state.best["value"]):
        return False
    state.best = {"metric": state.best_metric, "value": float(value), "step": state.step}
    return True


def save_figures(state: TrainState, pred: np.ndarray) -> None:
    """The first validation slice (input | target | prediction) and the loss curves."""
    data = state.data
    shown = pred[0][1:2] if data.target_kind == "binary" and pred.shape[1] > 1 else pred[0]
    if data.target_kind == "multiclass":
        shown = pred[0].argmax(0)[None].astype(np.float32)
    target = center_crop(data.val_y[0], *shown.shape[-2:])
    save_panel(sample_path(state.out, state.step), [data.val_x[0], target, shown])
    cfg = state.cfg
    plot_curves(state.out / CURVE, state.records, f"{cfg.mode} ({cfg.task}, {cfg.preset})")


def _log_line(record: dict) -> str:
    """A --quiet log line: the step and the record's numbers."""
    parts = [f"step {record['step']}"]
    # "time" is the wall-clock stamp kept in metrics.jsonl; as a log field it only says 1.8e+09.
    parts += [f"{k} {v:.4g}" for k, v in record.items() if isinstance(v, float) and k != "time"]
    return " | ".join(parts)
