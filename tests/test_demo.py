"""The demo prints one clean table under a legend: no profiler chatter, aligned columns, every op."""
import os

from are_fast.ops import registry
from are_fast.tools.demo import profiler_chatter_filtered, run_demo

OPS = (*registry.OPS, "alignment_loss")  # every op of the registry, then the stage-2 loss


def test_demo_prints_only_its_table(capfd, one_thread):
    rows = run_demo(hidden_size=16, vocab=50, batch=2, length=6, negatives=2, device="cpu", repeats=1)
    out, err = capfd.readouterr()  # file-descriptor level: what the C++ profiler writes is caught too
    assert err == ""
    lines = out.splitlines()
    assert lines[0].startswith("are_fast demo: H=16 V=50") and lines[1].startswith("columns: ms = best of 1 runs")
    assert "reference" in lines[2] and lines[3].split() == ["op", "ms", "MiB", "ms", "MiB", "speed-up", "memory"]
    assert [line.split()[0] for line in lines[4:]] == list(OPS) == [r["op"] for r in rows]
    assert all(len(line) == len(lines[3]) for line in lines[4:])  # right-aligned under their column names
    assert all(r["reference_bytes"] > 0 and r["fused_bytes"] > 0 for r in rows)  # memory was measured


def test_filter_keeps_other_messages(capfd):
    with profiler_chatter_filtered():
        os.write(2, b"USDT:2026 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"[W1129 CPUAllocator.cpp:245] Memory block of unknown size was allocated before the "
                    b"profiling started, profiler results will not include the deallocation event\n")
        os.write(2, b"a real warning\n")
    assert capfd.readouterr().err == "a real warning\n"
