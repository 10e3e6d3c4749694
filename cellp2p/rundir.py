"""The run folder: its lock, config.json, and the metrics.jsonl log (one record per evaluation)."""

from __future__ import annotations

import json
from pathlib import Path

from cellp2p.errors import CellP2PError


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


def _read_records(path: Path, upto: int) -> list[dict]:
    """Keep the records up to the checkpoint (later ones belong to steps being redone)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if r["step"] <= upto]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def run_folder(run: str | Path) -> Path:
    """The run folder of a run folder or of a checkpoint file inside it."""
    path = Path(run)
    if path.is_file():
        return path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if not path.is_dir():
        raise CellP2PError(f"{path}: no such run folder; give folders written by 'cellp2p train'")
    return path


def read_records(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records (one per evaluation), oldest first."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill: the others still describe the run
    return records
