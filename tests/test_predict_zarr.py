"""``predict`` into and out of OME-Zarr stores: equal to TIFF, label images, resume, torchrun.

The networks come from the session's trained runs (conftest.py); the stores are tiny.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cellp2p.cli import main
from cellp2p.io import read_stack, write_stack
from cellp2p.ngff import DONE_DIR, INCOMPLETE
from cellp2p.predictor import Predictor
from cellp2p.stores import StoreReader, StoreWriter
from cellp2p.synth import make_em

HOOK = """\
import os, time
from cellp2p.predictor import Predictor
_orig = Predictor.predict_slices
def _slow(self, planes, *args, **kw):
    time.sleep(float(os.environ.get("CELLP2P_TEST_SLOW", "0")))
    if os.environ.get("CELLP2P_TEST_LOG"):
        with open(os.environ["CELLP2P_TEST_LOG"], "a") as f:
            print(os.environ.get("RANK", "0"), len(planes), file=f)
    return _orig(self, planes, *args, **kw)
Predictor.predict_slices = _slow
"""


def _predict(*args: object) -> object:
    result = CliRunner().invoke(
        main, ["predict", *map(str, args), "--quiet", "--device", "cpu"], catch_exceptions=False
    )
    return result


def _ok(*args: object) -> None:
    result = _predict(*args)
    assert result.exit_code == 0, result.output


def _store(path: Path, data: np.ndarray, **kw) -> Path:
    kw.setdefault("spacing", (0.05, 0.004, 0.004))
    with StoreWriter(path, shape=data.shape, dtype=data.dtype, **kw) as w:
        for z, plane in enumerate(data):
            w.write_slice(z, plane)
    return path


@pytest.fixture
def volume() -> np.ndarray:
    return make_em(6, (64, 64), seed=5)[0]


def test_tiff_and_zarr_inputs_into_zarr_equal_the_tiff_output(
    tmp_path: Path, seg_run, volume, single_thread
) -> None:
    tif = write_stack(tmp_path / "v.tif", volume, spacing=(0.05, 0.004, 0.004))
    zin = _store(tmp_path / "v.zarr", volume)
    _ok(tif, "--model", seg_run.out, "-o", tmp_path / "ref.tif")
    _ok(tif, "--model", seg_run.out, "-o", tmp_path / "from_tif.zarr")
    _ok(zin, "--model", seg_run.out)  # default output: v_pred.zarr beside the store
    ref = read_stack(tmp_path / "ref.tif")
    for out in ("from_tif.zarr", "v_pred.zarr"):
        got = read_stack(tmp_path / out)
        assert got.data.dtype == ref.data.dtype == np.float32
        np.testing.assert_array_equal(got.data, ref.data)
        np.testing.assert_allclose(got.spacing, (0.05, 0.004, 0.004))
        assert not (tmp_path / out / INCOMPLETE).exists()


def test_hdf5_input_into_its_default_store(tmp_path: Path, seg_run, volume, single_thread):
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["raw"] = volume
    tif = write_stack(tmp_path / "v.tif", volume)
    _ok(tif, "--model", seg_run.out, "--output", "mask", "-o", tmp_path / "ref.tif")
    _ok(f"{tmp_path / 'd.h5'}:/raw", "--model", seg_run.out, "--output", "mask")
    got = read_stack(tmp_path / "d_raw_pred.zarr").data
    np.testing.assert_array_equal(got, read_stack(tmp_path / "ref.tif").data)


def test_masks_written_as_label_image(tmp_path: Path, seg_run, volume, single_thread) -> None:
    zin = _store(tmp_path / "v.zarr", volume)
    _ok(zin, "--model", seg_run.out, "--output", "mask", "-o", tmp_path / "ref.tif")
    _ok(zin, "--model", seg_run.out, "--output", "mask", "-o", tmp_path / "pred.zarr")
    _ok(zin, "--model", seg_run.out, "--output", "labels", "-o", tmp_path / "inst.zarr")
    meta = json.loads((tmp_path / "pred.zarr" / "labels" / "zarr.json").read_text())
    assert meta["attributes"]["ome"]["labels"] == ["pred"]
    label = json.loads((tmp_path / "pred.zarr" / "labels" / "pred" / "zarr.json").read_text())
    assert "image-label" in label["attributes"]["ome"]
    with StoreReader(tmp_path / "pred.zarr") as r:
        assert "label image" in r.format and r.dtype == np.uint8
        np.testing.assert_array_equal(r.read(), read_stack(tmp_path / "ref.tif").data)
    with StoreReader(tmp_path / "inst.zarr/labels/inst") as r:
        assert r.dtype == np.uint16 and r.read().max() > 0


def test_level_reads_another_pyramid_level(tmp_path: Path, seg_run, volume, check_cli_error):
    zin = _store(tmp_path / "v.zarr", volume, levels=2)
    with StoreReader(zin, level=1) as r:
        half = r.read()
    tif = write_stack(tmp_path / "half.tif", half)
    _ok(tif, "--model", seg_run.out, "-o", tmp_path / "ref.tif")
    _ok(zin, "--model", seg_run.out, "--level", "1", "-o", tmp_path / "half.zarr")
    got = read_stack(tmp_path / "half.zarr")
    assert got.data.shape == (6, 32, 32)
    np.testing.assert_array_equal(got.data, read_stack(tmp_path / "ref.tif").data)
    np.testing.assert_allclose(got.spacing, (0.05, 0.008, 0.008))
    result = _predict(zin, "--model", seg_run.out, "--level", "5", "-o", tmp_path / "x.zarr")
    check_cli_error(result, zin, "level 5")
    result = _predict(tif, "--model", seg_run.out, "--level", "1", "-o", tmp_path / "x.zarr")
    check_cli_error(result, "--level 1")
    assert not (tmp_path / "x.zarr").exists()


def _hooked_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An environment whose Python processes run HOOK at start-up (slow or logged slices)."""
    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    env = {**os.environ, "PYTHONPATH": str(hook), **extra}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return env


def _interrupted(tmp_path: Path, zin: Path, out: Path, *args: object) -> None:
    """Start ``python -m cellp2p predict`` with slow slices; SIGKILL it after its first chunk."""
    env = _hooked_env(tmp_path, CELLP2P_TEST_SLOW="0.5")
    cmd = [sys.executable, "-m", "cellp2p", "predict", str(zin), *map(str, args)]
    cmd += ["-o", str(out), "--device", "cpu", "--quiet"]
    with subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + 120
        while not any((out / DONE_DIR).glob("*")):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no chunk written in 120 s"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_interrupted_prediction_refused_then_resumed(
    tmp_path: Path, seg_run, volume, check_cli_error, monkeypatch, single_thread
) -> None:
    zin, out = _store(tmp_path / "v.zarr", volume), tmp_path / "pred.zarr"
    args = ["--model", seg_run.out, "--batch-size", "1", "--output", "mask"]
    _interrupted(tmp_path, zin, out, *args)
    assert (out / INCOMPLETE).is_file()
    done = len(list((out / DONE_DIR).iterdir()))
    assert 1 <= done < len(volume)
    with pytest.raises(Exception, match="interrupted"):
        read_stack(out)  # an interrupted store never looks finished
    check_cli_error(_predict(zin, *args, "-o", out), out, "--resume")
    check_cli_error(_predict(zin, *args, "-o", out, "--resume", "--force"), "--resume")
    calls: list[int] = []
    orig = Predictor.predict_slices

    def counting(self, planes, *a, **kw):
        calls.append(len(planes))
        return orig(self, planes, *a, **kw)

    monkeypatch.setattr(Predictor, "predict_slices", counting)
    _ok(zin, *args, "-o", out, "--resume")
    assert sum(calls) == len(volume) - done  # only the missing chunks were computed
    _ok(zin, *args, "-o", tmp_path / "whole.zarr")
    np.testing.assert_array_equal(read_stack(out).data, read_stack(tmp_path / "whole.zarr").data)
    result = _predict(zin, *args, "-o", out, "--resume")  # finished: one line, nothing done
    assert result.exit_code == 0 and "already finished" in result.output
    assert len(result.output.strip().splitlines()) == 1
    check_cli_error(_predict(zin, *args, "-o", out), out, "--force")
    _ok(zin, *args, "-o", out, "--force")
    np.testing.assert_array_equal(read_stack(out).data, read_stack(tmp_path / "whole.zarr").data)


def test_bad_store_inputs_one_line_each(tmp_path: Path, seg_run, volume, check_cli_error):
    missing = tmp_path / "missing.zarr"
    check_cli_error(_predict(missing, "--model", seg_run.out), missing)
    tif = write_stack(tmp_path / "v.tif", volume)
    line = check_cli_error(_predict(tif, "--model", seg_run.out, "--resume"), "--resume")
    assert ".zarr" in line
    (tmp_path / "notastore.zarr").mkdir()
    (tmp_path / "notastore.zarr" / "x.txt").write_text("mine")
    result = _predict(tif, "--model", seg_run.out, "-o", tmp_path / "notastore.zarr")
    check_cli_error(result, "notastore.zarr")
    assert (tmp_path / "notastore.zarr" / "x.txt").read_text() == "mine"


def test_info_describes_stores(tmp_path: Path, volume) -> None:
    zin = _store(tmp_path / "v.zarr", volume)
    result = CliRunner().invoke(main, ["info", str(zin)])
    assert result.exit_code == 0, result.output
    assert "OME-Zarr 0.5" in result.output and "6 x 64 x 64" in result.output
    assert "range" in result.output and "0.05 x 0.004 x 0.004 um" in result.output
    h5py = pytest.importorskip("h5py")
    with h5py.File(tmp_path / "d.h5", "w") as f:
        f["raw"] = volume
    result = CliRunner().invoke(main, ["info", f"{tmp_path / 'd.h5'}:/raw"])
    assert result.exit_code == 0 and "HDF5" in result.output, result.output


def test_torchrun_two_processes_one_volume_equal_one(tmp_path: Path, seg_run, single_thread):
    zin = _store(tmp_path / "v.zarr", make_em(7, (64, 64), seed=6)[0])  # 7: uneven shares
    args = [str(zin), "--model", str(seg_run.out), "--batch-size", "1", "--device", "cpu"]
    _ok(*args, "-o", tmp_path / "one.zarr")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "cellp2p", "predict", *args, "-o", str(tmp_path / "two.zarr"), "--quiet"]
    log = tmp_path / "slices.log"
    env = _hooked_env(tmp_path, CELLP2P_TEST_LOG=str(log))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("wrote") == 1  # rank 0 reports the one store
    per_rank = {"0": 0, "1": 0}
    for line in log.read_text().splitlines():
        rank, n = line.split()
        per_rank[rank] += int(n)
    assert per_rank == {"0": 3, "1": 4}  # slice_range: chunks 0-2 and 3-6, each slice once
    two, one = read_stack(tmp_path / "two.zarr"), read_stack(tmp_path / "one.zarr")
    np.testing.assert_array_equal(two.data, one.data)
    assert not (tmp_path / "two.zarr" / INCOMPLETE).exists()


def test_torchrun_resumes_an_interrupted_store(tmp_path: Path, seg_run, single_thread) -> None:
    zin = _store(tmp_path / "v.zarr", make_em(8, (64, 64), seed=7)[0])
    out = tmp_path / "pred.zarr"
    args = [str(zin), "--model", str(seg_run.out), "--batch-size", "1", "--device", "cpu"]
    _interrupted(tmp_path, zin, out, *args[1:])
    left = 8 - len(list((out / DONE_DIR).iterdir()))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "cellp2p", "predict", *args, "-o", str(out), "--quiet", "--resume"]
    log = tmp_path / "slices.log"
    env = _hooked_env(tmp_path, CELLP2P_TEST_LOG=str(log))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [line.split()[0] for line in log.read_text().splitlines()]
    assert len(ranks) == left  # only the missing chunks, shared out between both ranks
    assert abs(ranks.count("0") - ranks.count("1")) <= 1
    _ok(*args, "-o", tmp_path / "whole.zarr")
    np.testing.assert_array_equal(read_stack(out).data, read_stack(tmp_path / "whole.zarr").data)


def test_train_from_ome_zarr_volume_and_labels(tmp_path: Path, em_arrays, single_thread):
    from cellp2p.checkpoint import load_checkpoint
    from cellp2p.config import TrainConfig
    from cellp2p.train import train

    volume, labels = em_arrays
    vz = _store(tmp_path / "volume.zarr", volume)
    lz = _store(tmp_path / "labels.zarr", labels, kind="labels", name="labels")
    tv = write_stack(tmp_path / "volume.tif", volume, spacing=(0.05, 0.004, 0.004))
    tl = write_stack(tmp_path / "labels.tif", labels, spacing=(0.05, 0.004, 0.004))
    opts = dict(crop=32, batch_size=2, max_steps=2, eval_every=2, device="cpu", quiet=True)
    opts["model_overrides"] = {"depth": 2, "base": 4}
    train(TrainConfig(volume=str(vz), labels=str(lz), **opts), tmp_path / "zarr_run")
    train(TrainConfig(volume=str(tv), labels=str(tl), **opts), tmp_path / "tif_run")
    a = load_checkpoint(tmp_path / "zarr_run" / "checkpoints" / "last.pt")["models"]
    b = load_checkpoint(tmp_path / "tif_run" / "checkpoints" / "last.pt")["models"]
    for name, entry in a.items():
        for key, value in entry["state"].items():
            np.testing.assert_array_equal(value.numpy(), b[name]["state"][key].numpy())


def test_default_and_folder_outputs_of_stores(tmp_path: Path) -> None:
    from cellp2p.predict import default_output, output_paths

    assert default_output(tmp_path / "v.zarr") == tmp_path / "v_pred.zarr"
    assert default_output(tmp_path / "v.zarr" / "2") == tmp_path / "v_pred.zarr"
    assert default_output(f"{tmp_path / 'd.h5'}:/vol/raw") == tmp_path / "d_vol_raw_pred.zarr"
    assert default_output(tmp_path / "v.tif") == tmp_path / "v_pred.tif"
    ins = [tmp_path / "a.zarr", tmp_path / "b.tif"]
    assert output_paths(ins, tmp_path / "out") == [
        tmp_path / "out" / "a_pred.zarr",
        tmp_path / "out" / "b_pred.tif",
    ]
    with pytest.raises(Exception, match="need an output folder"):
        output_paths(ins, tmp_path / "one.zarr")


def test_labels_widen_to_uint32_in_a_store(tmp_path: Path, seg_run, monkeypatch) -> None:
    import torch

    from cellp2p.predict import predict_stack

    checker = (np.indices((512, 512)).sum(0) % 2).astype(np.float32)  # 131072 objects a slice
    fake = torch.from_numpy(checker)
    monkeypatch.setattr(Predictor, "forward", lambda self, x: fake.expand(len(x), 1, 512, 512))
    zin = _store(tmp_path / "c.zarr", np.zeros((2, 512, 512), np.uint8))
    out = predict_stack([zin], seg_run.out, output="labels", quiet=True, device="cpu")[0]
    assert out == tmp_path / "c_pred.zarr" and not (out / INCOMPLETE).exists()
    with StoreReader(out) as r:
        assert r.dtype == np.uint32 and int(r[1].max()) == 131072
