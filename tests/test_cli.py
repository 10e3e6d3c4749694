"""The command line: help for every command, and each input problem as one ``Error:`` line.

Every failure must exit 1 with exactly one line ``Error: <file>: <what> <fix>``, no traceback,
and must write nothing. The same problems on the library directly are in test_io.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from cellp2p.cli import main
from cellp2p.io import write_stack

REPO = Path(__file__).resolve().parents[1]
TRAIN_FAST = ["--max-steps", "1", "--crop", "32", "--batch-size", "1", "--quiet"]


# -- help --------------------------------------------------------------------------------------


def test_help(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0, result.output
    for name in main.commands:
        assert name in result.output


@pytest.mark.parametrize("command", sorted(main.commands))
def test_command_help(runner, command):
    result = runner.invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert command in result.output


def test_version(runner):
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.output.startswith("cellp2p, version ")


def test_unknown_command(runner):
    result = runner.invoke(main, ["segmentify"])
    assert result.exit_code == 2
    assert "Traceback" not in result.output


def test_python_dash_m_help():
    proc = subprocess.run(
        [sys.executable, "-m", "cellp2p", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Usage:" in proc.stdout
    assert "train" in proc.stdout


def test_python_dash_m_error_is_one_line_on_stderr(tmp_path):
    missing = tmp_path / "missing.tif"
    proc = subprocess.run(
        [sys.executable, "-m", "cellp2p", "info", str(missing)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"Error: {missing}")


# -- info --------------------------------------------------------------------------------------


def test_info_on_a_stack(runner, em_pair):
    result = runner.invoke(main, ["info", str(em_pair.volume_path)])
    assert result.exit_code == 0, result.output
    assert "4 x 64 x 64" in result.output
    assert "uint8" in result.output


def test_info_isbi_train_volume(runner, isbi_dir):
    result = runner.invoke(main, ["info", str(isbi_dir / "train-volume.tif")])
    assert result.exit_code == 0, result.output
    assert "30 x 512 x 512" in result.output
    assert "uint8" in result.output


def _truncated(d: Path) -> Path:
    full = d / "full.tif"
    tifffile.imwrite(full, np.zeros((5, 24, 32), np.uint8))
    raw = full.read_bytes()
    (d / "cut.tif").write_bytes(raw[: len(raw) // 2])
    return d / "cut.tif"


def _empty(d: Path) -> Path:
    (d / "empty.tif").write_bytes(b"")
    return d / "empty.tif"


def _text(d: Path) -> Path:
    (d / "notes.tif").write_text("these are my notes, not an image\n" * 10)
    return d / "notes.tif"


def _zero_slices(d: Path) -> Path:
    with pytest.warns(UserWarning, match="zero-size"):
        tifffile.imwrite(d / "zero.tif", np.zeros((0, 24, 32), np.uint8))
    return d / "zero.tif"


def _tzcyx(d: Path) -> Path:
    data = np.zeros((2, 3, 2, 8, 8), np.uint8)
    tifffile.imwrite(d / "tzcyx.tif", data, imagej=True, metadata={"axes": "TZCYX"})
    return d / "tzcyx.tif"


BAD_FILES = {
    "missing": lambda d: d / "missing.tif",
    "empty": _empty,
    "truncated": _truncated,
    "not-an-image": _text,
    "zero-slices": _zero_slices,
    "tzcyx": _tzcyx,
}


@pytest.mark.parametrize("make", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_info_bad_file(runner, check_cli_error, tmp_path, make):
    bad = make(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    check_cli_error(runner.invoke(main, ["info", str(bad)]), bad)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# -- train: reading and pair checks ------------------------------------------------------------


def _train(runner, volume: Path, labels: Path, out: Path, *extra: str):
    args = ["train", "--volume", str(volume), "--labels", str(labels), "--out", str(out)]
    return runner.invoke(main, [*args, *TRAIN_FAST, *extra])


def _assert_no_run(out: Path) -> None:
    assert not (out / "checkpoints").exists()
    assert not any(out.rglob("*.pt"))


@pytest.mark.parametrize("make", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_train_bad_volume(runner, check_cli_error, em_pair, tmp_path, make):
    bad = make(tmp_path)
    out = tmp_path / "run"
    check_cli_error(_train(runner, bad, em_pair.labels_path, out), bad)
    _assert_no_run(out)


def test_train_bad_labels(runner, check_cli_error, em_pair, tmp_path):
    bad = _truncated(tmp_path)
    out = tmp_path / "run"
    check_cli_error(_train(runner, em_pair.volume_path, bad, out), bad)
    _assert_no_run(out)


def test_train_nan_volume(runner, check_cli_error, em_pair, tmp_path):
    volume = em_pair.volume.astype(np.float32)
    volume[2, 10, 10] = np.nan
    volume[3, 0, 0] = np.inf
    vpath = write_stack(tmp_path / "nan.tif", volume)
    out = tmp_path / "run"
    line = check_cli_error(_train(runner, vpath, em_pair.labels_path, out), vpath)
    assert "2 NaN/inf values (first in slice 2)" in line
    _assert_no_run(out)


@pytest.mark.parametrize(
    ("labels", "words"),
    [
        (lambda lab: np.concatenate([lab, lab[:1]]), "has 5 slices but"),
        (lambda lab: lab[:3], "has 3 slices but"),
        (lambda lab: lab[:, :60], "slices are (60, 64) but"),
        (lambda lab: lab[:, :, :48], "slices are (64, 48) but"),
    ],
    ids=["more-slices", "fewer-slices", "shorter", "narrower"],
)
def test_train_mismatched_pair(runner, check_cli_error, em_pair, tmp_path, labels, words):
    lpath = write_stack(tmp_path / "labels.tif", labels(em_pair.labels))
    out = tmp_path / "run"
    line = check_cli_error(_train(runner, em_pair.volume_path, lpath, out), lpath)
    assert em_pair.volume_path.name in line  # names both files
    assert words in line
    _assert_no_run(out)


def test_train_non_binary_labels(runner, check_cli_error, em_pair, tmp_path):
    labels = em_pair.labels.copy()
    labels[:, :4] = 128
    lpath = write_stack(tmp_path / "labels3.tif", labels)
    out = tmp_path / "run"
    result = _train(runner, em_pair.volume_path, lpath, out, "--labels-mode", "binary")
    line = check_cli_error(result, lpath)
    assert "0, 128, 255" in line
    assert "--labels-mode nonzero" in line
    _assert_no_run(out)


def test_train_missing_labels_names_the_file(runner, check_cli_error, em_pair, tmp_path):
    missing = tmp_path / "nolabels.tif"
    out = tmp_path / "run"
    check_cli_error(_train(runner, em_pair.volume_path, missing, out), missing)
    _assert_no_run(out)


def test_train_without_data(runner, check_cli_error, tmp_path):
    out = tmp_path / "run"
    line = check_cli_error(runner.invoke(main, ["train", "--out", str(out), *TRAIN_FAST]))
    assert "--volume" in line
    _assert_no_run(out)


# -- existing outputs --------------------------------------------------------------------------


def test_synth_refuses_existing_output(runner, check_cli_error, em_pair):
    folder = em_pair.volume_path.parent
    before = {p: p.read_bytes() for p in (em_pair.volume_path, em_pair.labels_path)}
    result = runner.invoke(main, ["synth", "--out", str(folder), "--slices", "2", "--size", "32"])
    line = check_cli_error(result, em_pair.volume_path)
    assert "--force" in line
    for path, raw in before.items():
        assert path.read_bytes() == raw
    assert not [p for p in folder.iterdir() if p.name.endswith(".part")]


def test_synth_then_info(runner, tmp_path):
    out = tmp_path / "syn"
    args = ["synth", "--out", str(out), "--slices", "2", "--size", "32x48"]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    info = runner.invoke(main, ["info", str(out / "volume.tif")])
    assert info.exit_code == 0, info.output
    assert "2 x 32 x 48" in info.output
    again = runner.invoke(main, [*args, "--force"])
    assert again.exit_code == 0, again.output
