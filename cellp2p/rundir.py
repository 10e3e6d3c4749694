"""The run folder: its layout, its lock, config.json, and the metrics.jsonl log.

A run folder holds ``config.json`` (the options, versions and data of the run),
``metrics.jsonl`` (one JSON record per evaluation, appended), ``checkpoints/last.pt``
(everything to resume) and ``best.pt`` (an inference checkpoint),
``samples/step_NNNNNNN.png`` and ``loss_curve.png``. Every reader of the log goes through
:func:`read_records`, which tolerates what a kill can leave: a cut last line.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from cellp2p.errors import CellP2PError
from cellp2p.fsutil import claim_folder, folder_kind, write_failed, write_json, write_text_atomic

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CURVE = "loss_curve.png"
# Every name a run writes in its folder: in a folder that is not a run, an entry of one of
# these names is the user's, and training refuses it even with --force.
RUN_OUTPUTS = (CONFIG, METRICS, CURVE, "checkpoints", "samples")


def last_checkpoint(run_dir: Path) -> Path:
    """The checkpoint written at every evaluation: everything ``--resume`` continues from."""
    return run_dir / "checkpoints" / "last.pt"


def best_checkpoint(run_dir: Path) -> Path:
    """The inference checkpoint of the best evaluation so far (what ``predict`` uses by
    default): the predicting network and its records, no optimizer state."""
    return run_dir / "checkpoints" / "best.pt"


def sample_path(run_dir: Path, step: int) -> Path:
    """The validation sample panel of one evaluation."""
    return run_dir / "samples" / f"step_{step:07d}.png"


class RunLock:
    """An exclusive lock file in the run folder: two runs on one --out would corrupt each other."""

    def __init__(self, out: Path):
        self.path = out / ".lock"

    def __enter__(self) -> RunLock:
        import fcntl

        self._fh = open(self.path, "a+")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            raise CellP2PError(
                f"{self.path.parent}: another training run is using this folder; "
                "wait for it to finish or choose another --out"
            ) from None
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


def run_folder(run: str | Path) -> Path:
    """The run folder of a run folder or of a checkpoint file inside it."""
    path = Path(run)
    if path.is_file():
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if not path.is_dir():
        raise CellP2PError(f"{path}: no such run folder; give folders written by 'cellp2p train'")
    return path


def write_config(run_dir: Path, meta: dict[str, Any]) -> Path:
    """Write ``config.json`` atomically (a kill never leaves half of it)."""
    return write_json(run_dir / CONFIG, meta)


def _parse_record(line: str) -> dict | None:
    """One log line as a record; None for a blank, cut or foreign line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None  # a line cut short by a kill: the others still describe the run
    return record if isinstance(record, dict) and _step(record) is not None else None


def _step(record: dict) -> int | None:
    """The record's step, None unless it is an integer."""
    step = record.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def read_records(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (one per evaluation), oldest first.

    Lines that are not JSON objects with an integer ``step`` (a line cut by a kill during the
    append, anything foreign) are skipped.
    """
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return [r for r in map(_parse_record, lines) if r is not None]


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one record as a line of metrics.jsonl (on a new line after a cut last line).

    A failed append (a full disk) is undone, so the log keeps only whole records.
    """
    path = Path(run_dir) / METRICS
    line = ("\n" if _ends_cut(path) else "") + json.dumps(record) + "\n"
    size = path.stat().st_size if path.is_file() else 0
    try:
        with open(path, "a") as fh:
            fh.write(line)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.truncate(path, size)
        raise write_failed(path, err) from None


def _ends_cut(path: Path) -> bool:
    """Whether the file's last line has no newline (a write cut short)."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) != b"\n"


def truncate_records(run_dir: Path, upto: int) -> list[dict]:
    """Keep the records up to step ``upto`` (later ones belong to steps being redone).

    The log is rewritten atomically with the kept records only, so cut or foreign lines go too.
    """
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = [r for r in read_records(run_dir) if _step(r) <= upto]
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


def remove_run_outputs(run_dir: Path) -> None:
    """Delete what a run wrote in ``run_dir`` (a run folder), to train it again from scratch.

    Only the run's own names go (config, log, curve, checkpoints, sample panels); any
    other file there, and the folder itself, stay. A folder that is not a run is left alone.
    """
    run_dir = Path(run_dir)
    if folder_kind(run_dir) != "run":
        return
    claim_folder(run_dir, "run")  # a run from before markers: keep it recognisable
    owned = [run_dir / CONFIG, run_dir / METRICS, run_dir / CURVE]
    owned += [last_checkpoint(run_dir), best_checkpoint(run_dir)]
    with RunLock(run_dir):  # never under a run that is training there now
        owned += sorted((run_dir / "samples").glob("step_*.png"))
        for path in owned:
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        for sub in ("checkpoints", "samples"):
            with contextlib.suppress(OSError):
                (run_dir / sub).rmdir()  # only when nothing else is in it
