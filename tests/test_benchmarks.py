"""The GPU readiness check stays runnable: its dry run takes the same code path on the CPU."""

from __future__ import annotations

import os
import subprocess
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
