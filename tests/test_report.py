"""``compare`` and ``ablate`` on tiny runs: the report files, its rows, groups and skips."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cellp2p.ablate import ablate
from cellp2p.cli import main
from cellp2p.compare import compare, training_speed
from cellp2p.config import TrainConfig
from cellp2p.errors import CellP2PError
from cellp2p.io import write_stack
from cellp2p.report import Image, Table, build_sections, render_html, render_markdown
from cellp2p.synth import make_em
from cellp2p.train import train

TINY = {"max_steps": 2, "eval_every": 2, "crop": 32, "batch_size": 2, "quiet": True}


@pytest.fixture(scope="module")
def em(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("em")
    vol, lab = make_em(6, (64, 64), seed=0)
    return write_stack(d / "volume.tif", vol), write_stack(d / "labels.tif", lab)


@pytest.fixture(scope="module")
def runs(em: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("runs")
    vol, lab = (str(p) for p in em)
    common = {"volume": vol, "labels": lab, "val_slices": "4-5", **TINY}
    out = {}
    for name, extra in {
        "unet": {"mode": "unet"},
        "p2p": {"mode": "pix2pix"},
        "p2p_btoa": {"mode": "pix2pix", "task": "translate", "direction": "BtoA"},
    }.items():
        train(TrainConfig(**common, **extra), d / name)
        out[name] = d / name
    return out


def _table_rows(md: str, first_cells: list[str]) -> list[str]:
    """Markdown table rows whose first cell is one of ``first_cells``."""
    return [
        line
        for line in md.splitlines()
        if line.split("|")[1:2] in [[f" {c} "] for c in first_cells]
    ]


def test_compare_writes_the_full_report(em, runs, tmp_path):
    vol, lab = em
    out = tmp_path / "cmp"
    report = compare([runs["unet"], runs["p2p"]], volume=vol, labels=lab, out=out, echo=None)
    # Held-out slices come from the runs' recorded --val-slices.
    assert report["slices"] == [4, 5] and "validation" in report["slices_from"]
    for name in ("report.md", "report.json", "report.html", "loss_curves.png"):
        assert (out / name).stat().st_size > 0, name
    panels = sorted((out / "panels").glob("*.png"))
    assert len(panels) == 2  # one per held-out slice (both runs segment: one group)
    md = (out / "report.md").read_text()
    assert len(_table_rows(md, ["unet", "p2p"])) == 6  # headline, details: runs and scores
    assert "v_rand" in md and "ap_50" in md and "![loss curves](loss_curves.png)" in md
    data = json.loads((out / "report.json").read_text())
    assert list(data["runs"]) == ["unet", "p2p"] and len(data["groups"]) == 1
    for row in data["runs"].values():
        assert row["steps"] == 2 and row["parameters"] > 0
        assert row["train_time_s"] > 0 and row["images_per_s"] > 0
        assert {"pixel_error", "dice_1", "v_rand", "v_info_merge", "ap_75"} <= set(row["metrics"])
        assert len(row["per_slice"]) == 2
    assert data["runs"]["unet"]["loss"] == "bcedice"
    assert data["runs"]["p2p"]["loss"] == "vanilla cGAN + 100·L1"
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(panels) + 1  # panels + loss curves


def test_compare_cli_groups_by_task_and_scores_segmentability(em, runs, tmp_path):
    vol, lab = em
    out = tmp_path / "cmp"
    args = ["compare", str(runs["unet"]), str(runs["p2p_btoa"]), "--volume", str(vol)]
    args += ["--labels", str(lab), "--slices", "5", "--out", str(out)]
    res = CliRunner().invoke(main, [*args, "--segmenter", str(runs["unet"])])
    assert res.exit_code == 0, res.output
    data = json.loads((out / "report.json").read_text())
    assert [(g["task"], g["direction"]) for g in data["groups"]] == [
        ("segment", "AtoB"),
        ("translate", "BtoA"),
    ]
    assert data["slices"] == [5] and len(list((out / "panels").glob("*.png"))) == 2
    btoa = data["runs"]["p2p_btoa"]
    assert {"mae", "psnr", "ssim"} == set(btoa["metrics"])
    seg = data["groups"][1]["segmentability"]
    assert set(seg["runs"]) == {"p2p_btoa"} and 0 <= seg["real"]["dice_1"] <= 1
    assert btoa["segmentability"]["v_rand"] == seg["runs"]["p2p_btoa"]["v_rand"]
    md = (out / "report.md").read_text()
    assert "Segmentability" in md and "real (ceiling)" in md
    # No data given at all and no run recorded any: one Error line.
    res = CliRunner().invoke(main, ["compare", str(tmp_path / "nope"), "--out", str(out)])
    assert res.exit_code == 1 and res.output.startswith("Error:") and "nope" in res.output


def test_training_speed_from_records():
    records = [{"step": 10, "images_per_s": 20.0}, {"step": 30, "images_per_s": 10.0}]
    seconds, ips = training_speed(records, batch_size=2)
    assert seconds == pytest.approx(10 * 2 / 20 + 20 * 2 / 10)  # 1 s + 4 s
    assert ips == pytest.approx(60 / 5)


def test_ablate_trains_six_variants_then_skips_them(em, tmp_path):
    vol, lab = em
    out = tmp_path / "abl"
    kw = {"volume": vol, "labels": lab, "out": out, "max_steps": 1, "crop": 32, "batch_size": 1}
    result = ablate(**kw, quiet=True, echo=None)
    assert list(result["runs"]) == ["unet", "l1", "gan", "cgan", "l1_gan", "l1_cgan"]
    md = (out / "report.md").read_text()
    labels = ["U-Net", "L1", "GAN", "cGAN", "L1+GAN", "L1+cGAN"]
    assert len(_table_rows(md, labels)) == 18  # headline, details: runs and scores
    data = json.loads((out / "report.json").read_text())
    losses = {n: r["loss"] for n, r in data["runs"].items()}
    assert losses == {
        "U-Net": "bcedice",
        "L1": "100·L1",
        "GAN": "vanilla GAN",
        "cGAN": "vanilla cGAN",
        "L1+GAN": "vanilla GAN + 100·L1",
        "L1+cGAN": "vanilla cGAN + 100·L1",
    }
    # Same budget and seed everywhere.
    assert {(r["steps"], r["batch_size"], r["crop"], r["seed"]) for r in data["runs"].values()} == {
        (1, 1, 32, 0)
    }
    # Running it again finds the variants complete: nothing is retrained (two of them here,
    # to keep the test short; the report is then rewritten with those two rows).
    said: list[str] = []
    mtimes = [p.stat().st_mtime_ns for p in sorted(out.glob("runs/*/checkpoints/last.pt"))]
    ablate(**kw, variants=["unet", "l1_cgan"], quiet=True, echo=said.append)
    assert sum("skipped" in s for s in said) == 2
    assert [p.stat().st_mtime_ns for p in sorted(out.glob("runs/*/checkpoints/last.pt"))] == mtimes
    assert len(_table_rows((out / "report.md").read_text(), labels)) == 6
    # A larger budget resumes a finished run from its checkpoint instead of starting over.
    said.clear()
    ablate(**{**kw, "max_steps": 2}, variants=["unet"], quiet=True, echo=said.append)
    assert any("resuming" in s for s in said)
    steps = [json.loads(x)["step"] for x in (out / "runs/unet/metrics.jsonl").open()]
    assert steps == [1, 2]
    # Other settings on the same folder are a different experiment: refused, not overwritten.
    with pytest.raises(CellP2PError, match="seed"):
        ablate(**kw, seed=1, quiet=True, echo=None)
    assert np.isfinite(data["runs"]["L1+cGAN"]["metrics"]["pixel_error"])


def _fake_report(out: Path) -> dict:
    """A report.json content with one segmentation group, a segmentability group and PNGs."""
    from PIL import Image as PILImage

    (out / "panels").mkdir(parents=True)
    for name in ("loss_curves.png", "panels/1_slice_0004.png", "panels/2_slice_0004.png"):
        PILImage.new("L", (2, 2)).save(out / name)
    row = {"mode": "unet", "loss": "bcedice", "preset": "small", "parameters": 123456}
    row |= {"steps": 2, "total_steps": 4, "train_time_s": 1.5, "images_per_s": 8.0}
    return {
        "title": "two <runs>",
        "data": {"volume": "v.tif", "labels": "l.tif"},
        "slices": [4, 5, 6],
        "slices_from": "--slices",
        "checkpoint": "last",
        "groups": [
            {
                "task": "segment",
                "direction": "AtoB",
                "title": "Seg",
                "runs": ["a", "b"],
                "panels": ["panels/1_slice_0004.png"],
            },
            {
                "task": "translate",
                "direction": "BtoA",
                "title": "Gen",
                "runs": ["c"],
                "panels": ["panels/2_slice_0004.png"],
                "segmentability": {
                    "segmenter": "a",
                    "real": {"dice_1": 0.9},
                    "runs": {"c": {"dice_1": 0.7}},
                },
            },
        ],
        "runs": {
            "a": {**row, "run": "a", "metrics": {"pixel_error": 0.1, "dice_1": 0.8}},
            "b": {**row, "run": "b", "metrics": {"pixel_error": 0.2, "dice_1": 0.9}},
            "c": {**row, "run": "c", "metrics": {"mae": 3.0}, "segmentability": {"dice_1": 0.7}},
        },
        "files": {"loss_curves": "loss_curves.png"},
    }


def test_markdown_and_html_render_the_same_sections(tmp_path):
    report = _fake_report(tmp_path)
    sections = build_sections(report)
    titles = [s.title for s in sections]
    assert titles == [
        "two <runs>",
        "Summary",
        "Details: Seg",
        "Details: Gen",
        "Segmentability of generated images: Gen",
        "Notes",
        "Loss curves",
        "Slices",
    ]
    md, page = render_markdown(report), render_html(report, tmp_path)
    assert re.findall(r"^#+ (.*)$", md, re.M) == titles
    html_titles = re.findall(r"<h[12]>(.*?)</h[12]>", page)
    assert [t.replace("&lt;", "<").replace("&gt;", ">") for t in html_titles] == titles
    tables = [b for s in sections for b in s.blocks if isinstance(b, Table)]
    assert (
        len(tables) == 7  # two headline tables, two (runs, scores) details, segmentability
        and len(re.findall(r"^\|(?:---\|)+$", md, re.M)) == 7
        and page.count("<table>") == 7
    )
    for table in tables:  # every cell in both renderings
        for cell in (c for row in table.rows for c in row):
            assert f" {cell} " in md or f"**{cell}**" in md
            assert f">{cell}<" in page
    # The best of each metric column is bold in both; "2 of 4" shows an unfinished run.
    assert "**0.1000**" in md and "<b>0.1000</b>" in page and "**0.9000**" in md
    assert "| 2 of 4 |" in md and ">2 of 4<" in page
    images = [b for s in sections for b in s.blocks if isinstance(b, Image)]
    assert len(images) == 3 == md.count("![") == page.count("data:image/png;base64,")
    assert "`v.tif`" in md and "<code>v.tif</code>" in page


def test_headline_table_fits_100_columns(tmp_path):
    report = _fake_report(tmp_path)
    long = "a_run_with_a_very_long_descriptive_folder_name_from_a_sweep"
    report["groups"][0]["runs"] = ["a", long]
    report["runs"][long] = {
        **report["runs"]["b"],
        "run": long,
        "loss": "0.5·wgangp cGAN + 100·L1",
        "metrics": {"pixel_error": 0.05, "dice_1": 0.95, "v_rand": 0.9, "ap_50": 0.5},
    }
    report["runs"]["a"]["metrics"] |= {"v_rand": 0.8, "ap_50": 0.4}
    md = render_markdown(report)
    summary = md.split("## Summary")[1].split("## Details")[0]
    lines = [line for line in summary.splitlines() if line.startswith("|")]
    assert lines[0] == "| run | loss | steps | pixel error | Dice | V_rand | AP@0.5 |"
    assert max(len(line) for line in lines) <= 100
    assert "**0.0500**" in summary and "…" in summary  # best in bold, the long name cut
    # the translation group: its own main scores, segmentability included
    assert "| run | loss | steps | MAE | seg. Dice |" in summary
