"""Shared fixtures: a tiny synthetic EM pair on disk, runs that ``train`` made, a CLI runner and
a CLI error check."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner, Result

from cellp2p.io import write_stack
from cellp2p.synth import NUCLEI_SPACING, make_em, make_nuclei

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


def _write_pair(folder: Path, volume: np.ndarray, labels: np.ndarray, spacing) -> Pair:
    vpath = write_stack(folder / "volume.tif", volume, spacing=spacing)
    lpath = write_stack(folder / "labels.tif", labels, spacing=spacing)
    return Pair(vpath, lpath, volume, labels, spacing)


@pytest.fixture
def em_pair(tmp_path: Path, em_arrays: tuple[np.ndarray, np.ndarray]) -> Pair:
    """The synthetic EM pair as ImageJ TIFFs in tmp_path/data."""
    return _write_pair(tmp_path / "data", *em_arrays, EM_SPACING)


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


# -- runs that train made --------------------------------------------------------------------
#
# Tests that need a checkpoint take it from one of these runs, trained once per session by
# cellp2p.train.train on tiny synthetic stacks: the train -> predict contract is then the one
# users meet. Tests of damaged checkpoints load one of them and damage it. A few steps at a
# high learning rate give networks whose outputs really vary (what tiling tests need); all of
# them take some 5 s of CPU time.


@dataclass
class TrainedRun:
    """A run folder written by ``train``, the config it was trained with, its last record."""

    out: Path
    config: Any  # cellp2p.config.TrainConfig
    record: dict[str, Any]
    data: Pair

    @property
    def best(self) -> Path:
        return self.out / "checkpoints" / "best.pt"

    @property
    def last(self) -> Path:
        return self.out / "checkpoints" / "last.pt"


@pytest.fixture(scope="session")
def run_data(
    tmp_path_factory: pytest.TempPathFactory, em_arrays: tuple[np.ndarray, np.ndarray]
) -> dict[str, Pair]:
    """The training pairs of the session's runs, on disk.

    ``em``: the EM pair (binary 0/255 labels). ``em_rgb``: the EM volume as three different
    channels (ZCYX). ``nuclei_classes``: 8-bit fluorescent nuclei and 3 classes (0 background,
    128 nucleus border, 255 interior). ``nuclei_16bit``: the same 8-bit input, and the 16-bit
    image it was made from as the target to translate to.
    """
    from skimage.segmentation import find_boundaries

    root = tmp_path_factory.mktemp("run-data")
    volume, labels = em_arrays
    rgb = np.stack([volume, volume // 2, 255 - volume], axis=1)
    image16, nuclei = make_nuclei(4, (64, 64), seed=1)
    scale = float(np.percentile(image16, 99.9)) or 1.0
    image8 = np.clip(image16 / scale * 255, 0, 255).astype(np.uint8)
    classes = np.where(nuclei > 0, 255, 0).astype(np.uint8)
    rims = np.stack([find_boundaries(n, mode="inner") for n in nuclei])  # slices: own fields
    classes[rims & (nuclei > 0)] = 128
    return {
        "em": _write_pair(root / "em", volume, labels, EM_SPACING),
        "em_rgb": _write_pair(root / "em_rgb", rgb, labels, EM_SPACING),
        "nuclei_classes": _write_pair(root / "classes", image8, classes, NUCLEI_SPACING),
        "nuclei_16bit": _write_pair(root / "16bit", image8, image16, NUCLEI_SPACING),
    }


def _train(factory: pytest.TempPathFactory, pair: Pair, name: str, **options: Any) -> TrainedRun:
    from cellp2p.config import TrainConfig
    from cellp2p.train import train

    cfg = TrainConfig(
        volume=str(pair.volume_path),
        labels=str(pair.labels_path),
        quiet=True,
        device="cpu",
        **{"precision": "fp32", **options},  # exact comparisons (bf16: test_predict)
    )
    out = factory.mktemp("runs") / name
    with one_thread():
        record = train(cfg, out)
    return TrainedRun(out, cfg, record, pair)


@pytest.fixture
def single_thread() -> Iterator[None]:
    """The test runs torch with one intra-op thread (see one_thread)."""
    with one_thread():
        yield


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread for these tiny networks: as fast as two on a quiet machine, and on a
    loaded one (other test runs on the same 2 cores) OpenMP's spinning threads would slow them
    tenfold."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="session")
def seg_run(tmp_path_factory, run_data) -> TrainedRun:
    """Binary U-Net (small preset, same padding, depth 2: receptive field ~47 px)."""
    return _train(
        tmp_path_factory,
        run_data["em"],
        "seg",
        crop=32,
        batch_size=4,
        max_steps=60,
        eval_every=60,
        lr=1e-2,
        model_overrides={"depth": 2, "base": 8},
    )


@pytest.fixture(scope="session")
def rgb_run(tmp_path_factory, run_data) -> TrainedRun:
    """Binary U-Net trained on a 3-channel volume."""
    return _train(
        tmp_path_factory,
        run_data["em_rgb"],
        "rgb",
        crop=32,
        batch_size=1,
        max_steps=1,
        eval_every=1,
        model_overrides={"depth": 2, "base": 4},
    )


@pytest.fixture(scope="session")
def multiclass_run(tmp_path_factory, run_data) -> TrainedRun:
    """U-Net (small preset, depth 2) over 3 classes: 0, 128 and 255."""
    return _train(
        tmp_path_factory,
        run_data["nuclei_classes"],
        "multiclass",
        crop=32,
        batch_size=4,
        max_steps=60,
        eval_every=60,
        lr=1e-2,
        model_overrides={"depth": 2, "base": 8},
    )


@pytest.fixture(scope="session")
def translate_run(tmp_path_factory, run_data) -> TrainedRun:
    """pix2pix (small generator, depth 3, 2 dropout layers) from 8-bit to 16-bit images."""
    return _train(
        tmp_path_factory,
        run_data["nuclei_16bit"],
        "translate",
        mode="pix2pix",
        task="translate",
        crop=32,
        batch_size=2,
        max_steps=20,
        eval_every=20,
        lr=1e-2,
        model_overrides={"depth": 3, "base": 4, "n_dropout": 2},
    )


@pytest.fixture(scope="session", params=["paper", "course"])
def valid_run(request, tmp_path_factory, run_data) -> TrainedRun:
    """Valid-convolution U-Net (paper or course layout, depth 2, base 4).

    Without normalisation and with the pix2pix initialisation these do not learn the membranes
    in 20 steps (they call every pixel interior), but their outputs vary (std ~0.05 on a smooth
    image): enough for the tiling tests.
    """
    return _train(
        tmp_path_factory,
        run_data["em"],
        f"valid-{request.param}",
        preset=request.param,
        crop=48,
        batch_size=2,
        max_steps=20,
        eval_every=20,
        lr=1e-2,
        model_overrides={"depth": 2, "base": 4},
    )


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
