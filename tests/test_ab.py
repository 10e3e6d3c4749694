"""pix2pix AB folders: train both directions, predict to PNGs, evaluate, compare; bad folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from cellp2p import ab
from cellp2p.cli import main
from cellp2p.config import TrainConfig
from cellp2p.dataset import StepBatches, load_data
from cellp2p.errors import CellP2PError
from cellp2p.train import train

TINY = {"max_steps": 2, "eval_every": 2, "crop": 32, "batch_size": 2, "quiet": True}


def write_ab(folder: Path, n: int = 4, size: tuple[int, int] = (32, 64), **kw: object) -> Path:
    """``n`` AB images: A random, B its negative (RGB JPEGs unless ``suffix``/``grey`` say)."""
    suffix, grey = str(kw.get("suffix", ".jpg")), bool(kw.get("grey", False))
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    h, w = size
    for i in range(n):
        shape = (h, w // 2) if grey else (h, w // 2, 3)
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        Image.fromarray(np.concatenate([a, 255 - a], axis=1)).save(folder / f"{i + 1}{suffix}")
    return folder


@pytest.fixture(scope="module")
def rgb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # natural order: 2 before 10; the last fifth (one image, "10.jpg") is held out
    d = write_ab(tmp_path_factory.mktemp("ab") / "train", n=4)
    (d / "4.jpg").rename(d / "10.jpg")
    return d


@pytest.fixture(scope="module")
def runs(rgb: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("runs")
    out = {}
    for name, extra in {
        "p2p": {"mode": "pix2pix", "jitter": True},
        "unet_btoa": {"mode": "unet", "direction": "BtoA"},
    }.items():
        train(TrainConfig(ab=str(rgb), **TINY, **extra), d / name)
        out[name] = d / name
    return out


def test_listing_is_natural_and_hold_out_is_named(rgb, capsys):
    assert [p.name for p in ab.list_ab(rgb)] == ["1.jpg", "2.jpg", "3.jpg", "10.jpg"]
    cfg = TrainConfig(ab=str(rgb), crop=32)
    cfg.validate()
    assert cfg.task == "translate"  # AB halves are images
    data = load_data(cfg)
    assert "10.jpg" in capsys.readouterr().err
    assert data.train_x.shape == (3, 3, 32, 32) and data.val_x.shape == (1, 3, 32, 32)
    assert (data.in_channels, data.out_channels, data.target_kind) == (3, 3, "image")
    # the paper's 286/256 jitter on RGB crops
    batch_x, batch_y = StepBatches(data, TrainConfig(ab=str(rgb), crop=32, jitter=True))[0]
    assert batch_x.shape == batch_y.shape == (4, 3, 32, 32)


def test_rgb_end_to_end_both_directions(rgb, runs, tmp_path):
    ckpt = torch.load(runs["p2p"] / "checkpoints" / "last.pt", weights_only=False)
    gen, disc = ckpt["models"]["generator"]["config"], ckpt["models"]["discriminator"]["config"]
    assert (gen["in_channels"], gen["out_channels"], disc["in_channels"]) == (3, 3, 6)
    cli = CliRunner()
    for name, direction in (("p2p", "AtoB"), ("unet_btoa", "BtoA")):
        out = tmp_path / name
        args = ["predict", str(rgb), "--ab", "-m", str(runs[name]), "-o", str(out), "--quiet"]
        res = cli.invoke(main, args)
        assert res.exit_code == 0, res.output
        assert sorted(p.name for p in out.iterdir()) == ["1.png", "10.png", "2.png", "3.png"]
        with Image.open(out / "1.png") as im:
            assert im.mode == "RGB" and im.size == (32, 32)
        args = ["evaluate", str(out), "--ab", str(rgb), "--direction", direction]
        res = cli.invoke(main, [*args, "--json", str(tmp_path / f"{name}.json")])
        assert res.exit_code == 0, res.output
        assert "mean" in res.output and "PSNR" in res.output
        result = json.loads((tmp_path / f"{name}.json").read_text())
        assert [r["image"] for r in result["per_image"]] == ["1.jpg", "2.jpg", "3.jpg", "10.jpg"]
        assert set(result["mean"]) == {"mae", "psnr", "ssim"}
        assert 0 <= result["mean"]["mae"] <= 255
    # A generated image equal to the target half scores perfectly.
    perfect = tmp_path / "perfect"
    _, images = ab.read_ab_folder(rgb)
    for p, b in zip(ab.list_ab(rgb), ab.split_ab(images, "AtoB")[1], strict=True):
        ab.write_png(perfect / f"{p.stem}.png", b)
    result = ab.evaluate_ab(perfect, rgb, echo=None)
    assert result["mean"]["mae"] == 0 and result["mean"]["ssim"] == pytest.approx(1.0)
    # One AB image to one PNG.
    one = tmp_path / "one.png"
    ab.predict_ab([rgb / "2.jpg"], runs["p2p"], out=one, quiet=True)
    assert one.is_file()


def test_grey_ab_pngs(tmp_path):
    d = write_ab(tmp_path / "grey", n=3, suffix=".png", grey=True)
    train(TrainConfig(ab=str(d), mode="unet", **{**TINY, "max_steps": 1}), tmp_path / "run")
    out = ab.predict_ab([d], tmp_path / "run", out=tmp_path / "gen", quiet=True)
    with Image.open(out[0]) as im:
        assert im.mode == "L" and im.size == (32, 32)
    assert ab.evaluate_ab(tmp_path / "gen", d, echo=None)["mean"]["mae"] >= 0


def _odd(d: Path) -> None:
    write_ab(d, n=2)
    Image.fromarray(np.zeros((32, 63, 3), np.uint8)).save(d / "3.jpg")


def _mixed(d: Path) -> None:
    write_ab(d, n=2)
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(d / "9.jpg")


def _text(d: Path) -> None:
    write_ab(d, n=2)
    (d / "notes.txt").write_text("not an image")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_odd, "even width"),
        (_mixed, "share one size"),
        (lambda d: d.mkdir(), "no JPEG/PNG/TIFF images"),
        (_text, "notes.txt is not a JPEG/PNG/TIFF image"),
    ],
    ids=["odd-width", "mixed-sizes", "empty", "non-image"],
)
def test_bad_folders_are_one_clear_error(tmp_path, make, message):
    d = tmp_path / "bad"
    make(d)
    with pytest.raises(CellP2PError, match=message):
        ab.read_ab_folder(d)
    res = CliRunner().invoke(main, ["train", "--ab", str(d), "--crop", "16", "--out", "r"])
    assert res.exit_code == 1 and res.output.startswith("Error:"), res.output
    assert message in res.output and len(res.output.strip().splitlines()) == 1


def test_ab_excludes_the_stack_options(tmp_path):
    with pytest.raises(CellP2PError, match=r"--ab .* or --volume"):
        TrainConfig(ab="x", volume="v.tif").validate()
    with pytest.raises(CellP2PError, match="give --ab DIR too"):
        TrainConfig(ab_val="x").validate()


def test_compare_ab_runs(rgb, runs, tmp_path):
    out = tmp_path / "cmp"
    args = ["compare", str(runs["p2p"]), str(runs["unet_btoa"]), "--ab", str(rgb)]
    res = CliRunner().invoke(main, [*args, "--out", str(out)])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "report.json").read_text())
    assert data["images"] == ["10.jpg"] and "held out" in data["slices_from"]
    assert [g["title"] for g in data["groups"]] == ["Translation (A → B)", "Translation (B → A)"]
    assert set(data["runs"]["p2p"]["metrics"]) == {"mae", "psnr", "ssim"}
    assert len(list((out / "panels").glob("*.png"))) == 2  # A | B | generated, per group
    md = (out / "report.md").read_text()
    summary = md.split("## Summary")[1].split("## Details")[0]
    assert "| MAE | PSNR | SSIM |" in summary
    assert max(len(line) for line in summary.splitlines() if line.startswith("|")) <= 100


def test_tiff_ab_images_and_8_bit_output(tmp_path):
    import tifffile

    d = tmp_path / "tif"
    d.mkdir()
    for i in range(2):  # 16-bit grey and planar RGB TIFFs
        tifffile.imwrite(d / f"g{i}.tif", np.full((8, 16), 1000 * (i + 1), np.uint16))
    files, images = ab.read_ab_folder(d)
    assert [p.name for p in files] == ["g0.tif", "g1.tif"] and images.shape == (2, 1, 8, 16)
    a, b = ab.split_ab(images, "BtoA")
    assert a.shape == b.shape == (2, 1, 8, 8)
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(
        rgb, np.zeros((3, 8, 16), np.uint8), photometric="rgb", planarconfig="separate"
    )
    assert ab.read_image(rgb).shape == (3, 8, 16)
    assert ab.to_uint8(np.array([[[65535, 0]]], np.uint16)).tolist() == [[[255, 0]]]
    assert ab.to_uint8(np.array([[[1.0, 0.5]]], np.float32)).tolist() == [[[255, 128]]]
