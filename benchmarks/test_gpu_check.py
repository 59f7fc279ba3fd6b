"""benchmarks/gpu_check.sh --preflight: what it checks here before any device time is spent (the step budgets
against the 6-minute wall, the wheels the offline machine needs). The full script runs in CI as a dry run."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEELS = ("liger_kernel-0.8.5-py3-none-any.whl", "cut_cross_entropy-25.1.1-py3-none-any.whl",
          "pytest_timeout-2.4.0-py3-none-any.whl")


def preflight(wheels: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "benchmarks/gpu_check.sh", "--preflight"], cwd=REPO, capture_output=True, text=True,
                          env={**os.environ, "ARE_FAST_WHEELS": str(wheels), **env}, timeout=60)


def test_preflight_passes_with_the_wheels_and_budgets_within_six_minutes(tmp_path):
    for name in WHEELS:
        (tmp_path / name).write_bytes(b"")
    done = preflight(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    budgets = [int(s) + int(g) for s, g in re.findall(r"budget \S+ +(\d+)s \(\+(\d+)s kill grace\)", done.stdout)]
    assert len(budgets) == 9 and sum(budgets) <= 360
    assert f"budgets with kill graces: {sum(budgets)}s of at most 360s" in done.stdout
    assert re.fullmatch(r"[0-9a-f]{12}( \(dirty\))?\n", (tmp_path / "commit.txt").read_text())


def test_preflight_names_missing_or_doubled_wheels(tmp_path):
    (tmp_path / WHEELS[0]).write_bytes(b"")
    (tmp_path / "pytest_timeout-2.3.1-py3-none-any.whl").write_bytes(b"")
    (tmp_path / WHEELS[2]).write_bytes(b"")
    done = preflight(tmp_path)
    assert done.returncode == 1
    assert "wheel missing: cut_cross_entropy" in done.stdout and "wheel doubled:" in done.stdout


def test_budgets_over_six_minutes_are_refused(tmp_path):
    for name in WHEELS:
        (tmp_path / name).write_bytes(b"")
    done = preflight(tmp_path, ARE_FAST_GPU_OTHER_S="100")
    assert done.returncode == 1 and re.search(r"budget other +100s", done.stdout)
    assert "the budgets exceed 360s" in done.stdout
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh"], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "ARE_FAST_GPU_OTHER_S": "100", "OUT": str(tmp_path / "out")})
    assert run.returncode == 2 and "the budgets exceed 360s" in run.stdout  # before any step runs
    assert "step wheels" not in run.stdout
