"""The run folder: the tolerant metrics.jsonl reader, the appender, truncation, config.json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cellp2p.config import TrainConfig
from cellp2p.errors import CellP2PError
from cellp2p.io import write_stack
from cellp2p.rundir import (
    METRICS,
    RunLock,
    append_record,
    read_records,
    run_folder,
    truncate_records,
    write_config,
)
from cellp2p.train import train


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, em_arrays) -> Path:
    """A run folder ``train`` wrote: records at steps 2 and 4."""
    root = tmp_path_factory.mktemp("rundir")
    volume, labels = em_arrays
    cfg = TrainConfig(
        volume=str(write_stack(root / "volume.tif", volume)),
        labels=str(write_stack(root / "labels.tif", labels)),
        crop=32,
        batch_size=1,
        max_steps=4,
        eval_every=2,
        device="cpu",
        quiet=True,
        model_overrides={"depth": 2, "base": 4},
    )
    train(cfg, root / "run")
    return root / "run"


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained run folder, free to damage."""
    return Path(shutil.copytree(trained, tmp_path / "run"))


def _lines(run: Path) -> list[str]:
    return (run / METRICS).read_text().splitlines()


def test_reads_the_records_train_wrote(run):
    records = read_records(run)
    assert [r["step"] for r in records] == [2, 4]
    assert records == [json.loads(line) for line in _lines(run)]
    assert all("val_pixel_error" in r and "lr" in r for r in records)


def test_skips_a_cut_last_line_and_lines_that_are_not_records(run):
    first, second = _lines(run)
    foreign = ["[1, 2]", "42", '"text"', "null", '{"no": "step"}', '{"step": "4"}', "", "  "]
    text = "\n".join([first, *foreign, second, second[: len(second) // 2]])  # cut, no newline
    (run / METRICS).write_text(text)
    assert [r["step"] for r in read_records(run)] == [2, 4]
    assert read_records(run)[1] == json.loads(second)


def test_undecodable_bytes_are_skipped_not_raised(run):
    with open(run / METRICS, "ab") as fh:
        fh.write(b"\xff\xfe garbage\n")
    assert [r["step"] for r in read_records(run)] == [2, 4]


def test_no_log_is_no_records(tmp_path):
    assert read_records(tmp_path) == []
    assert truncate_records(tmp_path, 10) == []
    assert not (tmp_path / METRICS).exists()


def test_append_after_a_cut_line_starts_a_new_line(run):
    cut = _lines(run)[1][:20]
    (run / METRICS).write_text(_lines(run)[0] + "\n" + cut)  # a kill during the append
    append_record(run, {"step": 6, "loss": 0.5})
    lines = _lines(run)
    assert lines[1] == cut and json.loads(lines[2]) == {"step": 6, "loss": 0.5}
    assert [r["step"] for r in read_records(run)] == [2, 6]


def test_append_to_a_whole_log_and_to_none(run, tmp_path):
    append_record(run, {"step": 6, "loss": float("nan")})  # NaN as JSON readers accept it
    assert [r["step"] for r in read_records(run)] == [2, 4, 6]
    assert np.isnan(read_records(run)[-1]["loss"])
    append_record(tmp_path, {"step": 1})
    assert (tmp_path / METRICS).read_text() == '{"step": 1}\n'


def test_truncation_keeps_records_up_to_the_checkpoint_and_drops_damage(run):
    first, second = _lines(run)
    (run / METRICS).write_text(f"{first}\n42\n{second}\n{second[:10]}")
    kept = truncate_records(run, 2)
    assert [r["step"] for r in kept] == [2]
    assert _lines(run) == [first]  # rewritten: the later record and the damage are gone
    assert not [p for p in run.iterdir() if p.name.endswith(".part")]
    assert truncate_records(run, 100) == kept


def test_config_json_is_written_atomically_and_strict(run, monkeypatch):
    before = (run / "config.json").read_text()
    assert json.loads(before)["max_steps"] == 4  # what train wrote
    write_config(run, {"max_steps": 8, "best": float("inf")})
    assert json.loads((run / "config.json").read_text()) == {"max_steps": 8, "best": None}

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.replace", fail)
    with pytest.raises(CellP2PError, match=r"config\.json"):
        write_config(run, {"max_steps": 16})
    assert json.loads((run / "config.json").read_text())["max_steps"] == 8
    assert not [p for p in run.iterdir() if p.name.endswith(".part")]


def test_run_lock_is_exclusive(run):
    with RunLock(run), pytest.raises(CellP2PError, match="another training run"), RunLock(run):
        pass
    with RunLock(run):  # released
        pass


def test_run_folder_of_a_folder_or_a_checkpoint(run, tmp_path):
    assert run_folder(run) == run
    assert run_folder(run / "checkpoints" / "last.pt") == run
    with pytest.raises(CellP2PError, match="no such run folder"):
        run_folder(tmp_path / "missing")
