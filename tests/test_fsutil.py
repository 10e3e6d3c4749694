"""Safe writing: atomic writes, exclusive claims, stale temp files, output folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from cellp2p.errors import CellP2PError
from cellp2p.fsutil import (
    MARKER,
    atomic_path,
    claim,
    claim_folder,
    folder_kind,
    temp_name,
    write_text_atomic,
)


def test_atomic_path_leaves_the_old_file_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]
    write_text_atomic(target, "new")
    assert target.read_text() == "new"


def test_claim_refuses_a_name_that_appeared_meanwhile(tmp_path: Path) -> None:
    first, second = tmp_path / ".o.1.part", tmp_path / ".o.2.part"
    first.write_text("first")
    second.write_text("second")
    out = tmp_path / "o.tif"
    claim(first, out, replace=False)
    with pytest.raises(CellP2PError, match="appeared while"):
        claim(second, out, replace=False)
    assert out.read_text() == "first" and not first.exists()
    claim(second, out, replace=True)  # --force replaces its own output
    assert out.read_text() == "second"


def test_stale_temp_files_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    target = tmp_path / "pred.tif"
    stale = tmp_path / f".pred.tif.{dead}.part"
    live = tmp_path / f".pred.tif.{os.getppid()}.part"  # a running process: kept
    other = tmp_path / f".other.tif.{dead}.part"  # another output's: not ours to judge
    for p in (stale, live, other):
        p.write_text("x")
    assert temp_name(target).name == f".pred.tif.{os.getpid()}.part"
    assert not stale.exists() and live.exists() and other.exists()


def test_claim_folder_rules(tmp_path: Path) -> None:
    new = claim_folder(tmp_path / "new" / "run", "run")
    assert folder_kind(new) == "run" and (new / MARKER).is_file()
    assert claim_folder(new, "run") == new  # its own kind again: fine
    with pytest.raises(CellP2PError, match="holds a cellp2p run, not a report"):
        claim_folder(new, "report", force=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_folder(empty, "report")
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text("mine")
    with pytest.raises(CellP2PError, match="--force"):
        claim_folder(user, "run")
    assert sorted(p.name for p in user.iterdir()) == ["config.json"]
    claim_folder(user, "run", force=True)
    assert (user / "config.json").read_text() == "mine"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CellP2PError, match="is a file"):
        claim_folder(blocker, "run")


def test_legacy_run_folders_are_recognised(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    (run / "metrics.jsonl").write_text("")
    assert folder_kind(run) == "run"
    claim_folder(run, "run")
