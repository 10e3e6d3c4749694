"""Shared fixtures: a tiny synthetic EM pair on disk, a CLI runner and a CLI error check."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

from cellp2p.io import write_stack
from cellp2p.synth import make_em

EM_SPACING = (0.05, 0.004, 0.004)  # z, y, x in um: ssTEM-like, as the ISBI 2012 stack
ISBI_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isbi2012"


@dataclass
class Pair:
    """A volume/labels pair written to disk, with the arrays that were written."""

    volume_path: Path
    labels_path: Path
    volume: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]


@pytest.fixture(scope="session")
def em_arrays() -> tuple[np.ndarray, np.ndarray]:
    """4 x 64 x 64 synthetic EM (uint8) and its binary 0/255 labels, made once per session."""
    volume, labels = make_em(4, (64, 64), seed=0)
    volume.setflags(write=False)
    labels.setflags(write=False)
    return volume, labels


@pytest.fixture
def em_pair(tmp_path: Path, em_arrays: tuple[np.ndarray, np.ndarray]) -> Pair:
    """The synthetic EM pair as ImageJ TIFFs in tmp_path/data."""
    volume, labels = em_arrays
    data = tmp_path / "data"
    vpath = write_stack(data / "volume.tif", volume, spacing=EM_SPACING)
    lpath = write_stack(data / "labels.tif", labels, spacing=EM_SPACING)
    return Pair(vpath, lpath, volume, labels, EM_SPACING)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def isbi_dir() -> Path:
    """The ISBI 2012 data next to the repository (shared/data/isbi2012), or skip."""
    if not (ISBI_DIR / "train-volume.tif").is_file():
        pytest.skip(f"ISBI 2012 data not found in {ISBI_DIR}")
    return ISBI_DIR


def _check_cli_error(result: Result, *names: str | Path) -> str:
    """A user error: exit 1, exactly one ``Error: ...`` line naming the files, no traceback."""
    out = result.output
    # An unhandled exception also exits 1 under CliRunner; a handled one is a SystemExit.
    assert isinstance(result.exception, SystemExit), f"unhandled {result.exception!r}\n{out}"
    assert result.exit_code == 1, out
    assert "Traceback" not in out
    lines = out.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got:\n{out}"
    assert lines[0].startswith("Error: "), out
    for name in names:
        assert str(name) in lines[0], f"{name} not named in: {lines[0]}"
    return lines[0]


@pytest.fixture
def check_cli_error():
    """``check_cli_error(result, *paths)`` asserts the one-line error contract, returns the line."""
    return _check_cli_error


# -- property-test tally -----------------------------------------------------------------------

# Filled by tests/test_reliability.py's property tests; reported once at the end of the run.
PROPERTY_STATS: dict[str, int] = {
    "tried": 0,
    "tracebacks": 0,
    "exit_0": 0,
    "exit_1": 0,
    "exit_2": 0,
}


@pytest.fixture(scope="session")
def property_stats() -> dict[str, int]:
    """The session's tally of malformed inputs tried by the property tests."""
    return PROPERTY_STATS


def pytest_terminal_summary(terminalreporter) -> None:
    """Say how many malformed inputs the property tests tried (visible without ``-s``)."""
    stats = PROPERTY_STATS
    if stats["tried"]:
        terminalreporter.write_line(
            f"property test: {stats['tried']} malformed inputs tried, "
            f"{stats['tracebacks']} tracebacks (exit 0: {stats['exit_0']}, "
            f"exit 1: {stats['exit_1']}, exit 2: {stats['exit_2']})"
        )
