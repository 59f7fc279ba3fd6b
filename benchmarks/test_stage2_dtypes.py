"""benchmarks.stage2_dtypes runs end to end on the tiny model: a line per round, both summaries, and each summary's
ratio is the ratio of its printed medians."""
import re

from benchmarks import stage2_dtypes

SUMMARY = r"float32 median ([\d.]+) s, bf16 median ([\d.]+) s, bf16 / float32 ([\d.]+)"


def test_alternating_dtypes_report(capsys):
    assert stage2_dtypes.main(["--rounds", "2", "--negatives", "1", "--config", "smoke", "--full-rate", "0"]) == 0
    out = capsys.readouterr().out
    rounds = re.findall(r"^float32 [\d.]+ s, bf16 [\d.]+ s, ratio [\d.]+; bf16 GFLOP/s around: \[", out, re.M)
    assert len(rounds) == 2
    for name in ("full-rate rounds (2)", "all rounds (2)"):
        line = next(line for line in out.splitlines() if line.startswith(name))
        fp32, bf16, ratio = (float(x) for x in re.search(SUMMARY, line).groups())
        rounding = ratio * (5e-4 / fp32 + 5e-4 / bf16) + 5e-4  # the medians and the ratio are printed to 1e-3
        assert abs(bf16 / fp32 - ratio) <= rounding
