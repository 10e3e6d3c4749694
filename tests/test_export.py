"""cellp2p export: bioimage.io packages, TorchScript and ONNX files that give the run's results.

Three tiny runs (a same-padding U-Net, a same-padding pix2pix generator translating, a
valid-convolution course U-Net) are trained once per module and exported in all three formats;
the exports must pass bioimage.io's own test offline and predict like the run (≤ 1e-4).
"""

from __future__ import annotations

import gc
import json
import socket
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("bioimageio.core")

from cellp2p.config import TrainConfig
from cellp2p.errors import CellP2PError
from cellp2p.export import SUFFIXES, export_model
from cellp2p.exported import is_exported, load_exported
from cellp2p.io import read_stack, write_stack
from cellp2p.predictor import load_predictor
from cellp2p.synth import make_em
from cellp2p.train import train

FORMATS = ("torchscript", "onnx", "bioimageio")
RUNS = {
    "unet": dict(mode="unet"),
    "pix2pix": dict(mode="pix2pix", task="translate"),
    "course": dict(mode="unet", preset="course", crop=140, model_overrides={"base": 8}),
}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """4 x 64² EM slices for the same-padding runs, 2 x 176² for the valid-convolution one."""
    root = tmp_path_factory.mktemp("export_data")
    out = {}
    for name, shape, n in (("small", (64, 64), 4), ("large", (176, 176), 2)):
        volume, labels = make_em(n, shape, seed=1)
        out[name] = (
            write_stack(root / f"{name}_volume.tif", volume),
            write_stack(root / f"{name}_labels.tif", labels),
        )
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, data: dict) -> Callable[[str], Path]:
    """A function training (once) and returning the run folder of one of RUNS."""
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            volume, labels = data["large" if name == "course" else "small"]
            options = dict(max_steps=2, batch_size=1, crop=64, eval_every=2, preset="small")
            options.update(RUNS[name])
            cfg = TrainConfig(volume=str(volume), labels=str(labels), quiet=True, **options)
            out = tmp_path_factory.mktemp(f"run_{name}")
            train(cfg, out)
            made[name] = out
        return made[name]

    return get


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, runs: Callable) -> Callable:
    """A function exporting (once) a run in a format and returning the file."""
    made: dict[tuple[str, str], Path] = {}

    def get(name: str, fmt: str) -> Path:
        if (name, fmt) not in made:
            out = tmp_path_factory.mktemp(f"export_{name}") / f"{name}{SUFFIXES[fmt]}"
            made[(name, fmt)] = export_model(runs(name), fmt, out, authors=["Test Author"])
        return made[(name, fmt)]

    return get


def _slices(name: str, data: dict) -> list[np.ndarray]:
    volume = read_stack(data["large" if name == "course" else "small"][0]).data
    return [volume[-1], volume[0]]


@pytest.fixture(scope="module")
def reference(runs: Callable, data: dict) -> Callable[[str], np.ndarray]:
    """A function returning (once) the run's own whole-slice predictions of two slices."""
    made: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in made:
            run = load_predictor(runs(name), "cpu", precision="fp32")  # exports compute fp32
            made[name] = run.predict_slices(_slices(name, data))
        return made[name]

    return get


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No network: every connection attempt fails as it would on an air-gapped machine."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise OSError("network access is disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    # bioimageio.core collects garbage after each model it unloads: ~0.4 s a time in a test
    # process holding torch and pydantic; the test needs none of it.
    monkeypatch.setattr(gc, "collect", lambda *args, **kwargs: 0)


# -- the exports predict like the run ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(RUNS))
def test_export_predicts_like_the_run(name: str, fmt: str, runs, exports, data, reference) -> None:
    path = exports(name, fmt)
    assert path.is_file() and is_exported(path)
    slices = _slices(name, data)
    want = reference(name)
    exported = load_exported(path, "cpu")
    got = exported.predict_slices(slices)
    assert got.shape == want.shape == (2, 1, *slices[0].shape)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    assert exported.valid_convolution == (name == "course")
    assert exported.target_kind == ("image" if name == "pix2pix" else "binary")
    if name == "pix2pix":  # the target's dtype and range travel too
        image = exported.to_output(got[0], "image")
        run = load_predictor(runs(name), "cpu", precision="fp32")
        assert image.dtype == run.to_output(want[0], "image").dtype
        np.testing.assert_array_equal(image, run.to_output(want[0], "image"))


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_tiled_predictions_match(fmt: str, runs, exports, data) -> None:
    slices = _slices("unet", data)
    want = load_predictor(runs("unet"), "cpu").predict_slices(slices, tile=32)
    got = load_exported(exports("unet", fmt), "cpu").predict_slices(slices, tile=32)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.slow
def test_tta_predictions_match(runs, exports, data) -> None:
    slices = _slices("pix2pix", data)[:1]
    want = load_predictor(runs("pix2pix"), "cpu", tta=True).predict_slices(slices)
    got = load_exported(exports("pix2pix", "onnx"), "cpu", tta=True).predict_slices(slices)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.slow
def test_valid_convolution_tiles_match(runs, exports, data) -> None:
    slices = _slices("course", data)[:1]
    want = load_predictor(runs("course"), "cpu").predict_slices(slices, tile=160)
    got = load_exported(exports("course", "onnx"), "cpu").predict_slices(slices, tile=160)
    np.testing.assert_allclose(got, want, atol=1e-4)


# -- bioimage.io ---------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_package_passes_bioimageio_tests_offline(name: str, exports, offline) -> None:
    from bioimageio.core import test_description

    with torch.jit.optimized_execution(False):  # no re-profiling for each test size
        summary = test_description(exports(name, "bioimageio"), devices=["cpu"])
    failed = [(d.name, [e.msg[:200] for e in d.errors]) for d in summary.details if d.errors]
    assert summary.status == "passed", failed
    assert not failed
    names = {d.name: d.status for d in summary.details}
    for fmt in ("pytorch_state_dict", "torchscript", "onnx"):  # every format was tested
        assert names.get(f"Reproduce test outputs from test inputs ({fmt})") == "passed"
        runs_of_fmt = [n for n in names if n.startswith(f"Run {fmt} inference")]
        assert len(runs_of_fmt) == 6 and all(names[n] == "passed" for n in runs_of_fmt)


def test_package_contents(runs, exports, tmp_path: Path) -> None:
    from bioimageio.spec import load_model_description

    path = exports("course", "bioimageio")
    with zipfile.ZipFile(path) as archive:
        names = set(archive.namelist())
        readme = archive.read("README.md").decode()
    assert {"rdf.yaml", "README.md", "cover.png", "cellp2p_network.py"} <= names
    assert {"weights.onnx", "weights_torchscript.pt", "weights_state_dict.pt"} <= names
    assert "## Validation" in readme and "pixel_error" in readme
    descr = load_model_description(path, perform_io_checks=False)
    assert descr.license == "MIT" and descr.authors[0].name == "Test Author"
    assert {c.doi for c in descr.cite} >= {"10.1007/978-3-319-24574-4_28"}
    y = descr.inputs[0].axes[2]
    meta = descr.config.model_extra["cellp2p"]
    assert (y.size.min, y.size.step) == (meta["geometry"]["min"], 16)
    assert descr.outputs[0].axes[2].size.offset == meta["geometry"]["offset"] < 0
    pre = descr.inputs[0].preprocessing[1]
    norm = load_predictor(runs("course"), "cpu").input_norm
    assert pre.id == "scale_linear"
    assert pre.kwargs.gain == pytest.approx(1 / (norm.vmax - norm.vmin))
    assert pre.kwargs.offset == pytest.approx(-norm.vmin / (norm.vmax - norm.vmin))
    folder = tmp_path / "unpacked"  # an unpacked package predicts as the zip does
    with zipfile.ZipFile(path) as archive:
        archive.extractall(folder)
    assert is_exported(folder)
    assert load_exported(folder, "cpu").valid_convolution


def test_metadata_travels_in_every_file(runs, exports) -> None:
    import onnx

    run = load_predictor(runs("pix2pix"), "cpu")
    files = {"cellp2p.json": ""}
    torch.jit.load(str(exports("pix2pix", "torchscript")), _extra_files=files)
    model = onnx.load(str(exports("pix2pix", "onnx")))
    props = {p.key: p.value for p in model.metadata_props}
    for meta in (json.loads(files["cellp2p.json"]), json.loads(props["cellp2p"])):
        assert meta["input_norm"] == run.input_norm.to_dict()
        assert meta["target_norm"] == run.target_norm.to_dict()
        assert meta["target_kind"] == "image" and meta["mode"] == "pix2pix"
        assert meta["geometry"] == {"valid_convolution": False, "grid": 64, "min": 64, "step": 64}


# -- refusals ------------------------------------------------------------------------------


def test_failed_check_writes_nothing(runs, tmp_path: Path, monkeypatch) -> None:
    import cellp2p.export

    monkeypatch.setattr(cellp2p.export, "TOLERANCE", -1.0)  # every comparison now fails
    out = tmp_path / "out" / "model.onnx"
    out.parent.mkdir()
    with pytest.raises(CellP2PError, match="nothing was written"):
        export_model(runs("unet"), "onnx", out)
    assert list(out.parent.iterdir()) == []


def test_refusals(runs, exports, tmp_path: Path) -> None:
    run = runs("unet")
    with pytest.raises(CellP2PError, match="--format"):
        export_model(run, "keras", tmp_path / "m.h5")
    with pytest.raises(CellP2PError, match="--checkpoint"):
        export_model(run, "onnx", tmp_path / "m.onnx", checkpoint="first")
    with pytest.raises(CellP2PError, match=r"\.onnx file"):
        export_model(run, "onnx", tmp_path / "m.pt")
    with pytest.raises(CellP2PError, match="--license"):
        export_model(run, "bioimageio", tmp_path / "m.zip", license="not-a-licence")
    with pytest.raises(CellP2PError, match="--authors"):
        export_model(run, "bioimageio", tmp_path / "m.zip", authors=[" "])
    existing = exports("unet", "onnx")
    before = existing.read_bytes()
    with pytest.raises(CellP2PError, match="already exists"):
        export_model(run, "onnx", existing)
    assert existing.read_bytes() == before
    with pytest.raises(CellP2PError, match="no such checkpoint"):
        export_model(tmp_path / "missing", "onnx", tmp_path / "m.onnx")


def test_into_a_folder_and_last_checkpoint(runs, tmp_path: Path) -> None:
    path = export_model(runs("unet"), "torchscript", tmp_path, checkpoint="last")
    assert path.parent == tmp_path and path.name.endswith("_torchscript.pt")
    files = {"cellp2p.json": ""}
    torch.jit.load(str(path), _extra_files=files)
    assert json.loads(files["cellp2p.json"])["checkpoint"] == "last.pt"


def test_is_exported_and_foreign_files(runs, tmp_path: Path) -> None:
    run = runs("unet")
    assert not is_exported(run) and not is_exported(run / "checkpoints" / "best.pt")
    assert not is_exported(tmp_path / "missing.onnx")
    foreign = tmp_path / "foreign.pt"
    torch.jit.save(torch.jit.script(torch.nn.Identity()), str(foreign))
    assert is_exported(foreign)
    with pytest.raises(CellP2PError, match="no cellp2p metadata"):
        load_exported(foreign, "cpu")
    with pytest.raises(CellP2PError, match="test-time-dropout"):
        load_exported(foreign, "cpu", test_time_dropout=True)


# -- the command line and predict --model (where they are wired up) ------------------------


def test_predict_stack_with_an_export(runs, exports, data, tmp_path: Path) -> None:
    from cellp2p.predict import predict_stack

    path = exports("unet", "bioimageio")
    try:
        load_predictor(path, "cpu")
    except CellP2PError:
        pytest.skip("load_predictor does not dispatch exported models yet")
    stack = data["small"][0]
    (want,) = predict_stack([stack], runs("unet"), out=tmp_path / "run.tif", quiet=True)
    (got,) = predict_stack([stack], path, out=tmp_path / "export.tif", quiet=True)
    np.testing.assert_allclose(read_stack(got).data, read_stack(want).data, atol=1e-4)


def test_cli_export(runs, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cellp2p.cli import main

    if "export" not in main.commands:
        pytest.skip("the export command is not wired into the CLI yet")
    out = tmp_path / "m.pt"
    result = CliRunner().invoke(
        main, ["export", str(runs("unet")), "--format", "torchscript", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert is_exported(out)
    again = CliRunner().invoke(
        main, ["export", str(runs("unet")), "--format", "torchscript", "-o", str(out)]
    )
    assert again.exit_code == 1 and "already exists" in again.output
