"""The benchmarks stay runnable: the GPU check's dry run takes the same code path on the CPU, and
the time-to-quality benchmark's --quick smoke run trains both U-Net contestants a few steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_prints_its_table(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--dry-run"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in ("train pix2pix", "train unet", "predict", "torchrun 1 process"):
        assert row in proc.stdout
    assert (tmp_path / "gpu.json").is_file()


def test_time_to_quality_quick_runs_both_contestants(tmp_path: Path) -> None:
    # The U-Net case only: pix2pix runs the same two code paths (the CLI, the plain loop).
    out = tmp_path / "ttq.json"
    cmd = [sys.executable, "benchmarks/bench_time_to_quality.py", "--quick", "--case", "unet"]
    cmd += ["--threads", "1"]
    proc = subprocess.run(
        [*cmd, "--json", str(out)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    names = [r["contestant"] for r in rows]
    assert names == ["cellp2p unet small", "MONAI BasicUNet"]
    for r in rows:
        assert r["evals"] and r["steps"] > 0 and r["eval_s"] >= 0
        assert (r["seconds"] is not None) == r["reached"]
        assert r["contestant"] in proc.stdout


def test_instances_benchmark_scores_both_post_processings(tmp_path: Path) -> None:
    # The nuclei case at 4 steps: training, the end-of-training tuning (plain and test-time
    # augmented maps), predict --output labels and the scores, as the acceptance run does them.
    out = tmp_path / "inst.json"
    cmd = [sys.executable, "benchmarks/bench_instances.py", "--case", "nuclei", "--steps", "4"]
    cmd += ["--threads", "1", "--out", str(tmp_path / "runs"), "--json", str(out)]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["rows"]) == {"labels (watershed)", "connected components"}
    assert result["postprocessing"]["tuned"] and isinstance(result["postprocessing"]["tta"], bool)
    assert "labels (watershed)" in proc.stdout
