"""Turn pytest-benchmark JSON into a Markdown table, the target verdicts and a PNG bar chart.

    pytest benchmarks/ --benchmark-json=bench.json
    python -m benchmarks.report bench.json [more.json ...] [--out report.md] [--png chart.png]

Times are the median of the timed rounds. For each op case: its time against the reference backend, each
peer and the bare-matmul floor of the same shape (lower is better for the row: 0.50 means twice as fast),
and its peak extra memory against the reference's. On a GPU run of bf16 heads on a card that
``benchmarks.gpu_model.rates_for`` knows (H100 SXM, H200), the fused backends and the floor also get, side by
side: the model's time at that card's rates, the model's time at the matmul rate the run's own floor reached,
and measured / model. A fused backend measured with ARE_FAST_CHUNK_BYTES set is listed as its own row
("triton @1024MiB"). Results of other suites are listed with time and memory.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

from . import gpu_model

FUSED_GPU_BACKENDS = ("triton", "native")  # what the GPU target is about
CPU_TARGET = {"head": "cpu-target", "tokens": 4096, "dtype": "float32", "mode": "frozen"}
GPU_TARGET = {"head": "llama3-8b", "tokens": 16384, "dtype": "bfloat16", "mode": "frozen"}
ISSUE2_CASE = {"op": "token_logprobs", "head": "issue2", "tokens": 4096, "dtype": "float32", "mode": "frozen"}
GPU_FLOOR_RATIO, GPU_MEMORY_RATIO, CPU_MEMORY_RATIO = 1.15, 0.02, 0.1
_ORDER = ("reference", "chunked", "triton", "native", "torch-chunked", "liger", "cce", "cce-exact", "cce-compile")


def load(paths) -> tuple[list, dict, dict, str | None]:
    """Benchmarks of all files, with the machine_info, commit_info and datetime of the first."""
    results, machine, commit, when = [], {}, {}, None
    for path in paths:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        results += data.get("benchmarks", [])
        if when is None:
            machine, commit, when = data.get("machine_info", {}), data.get("commit_info", {}), data.get("datetime")
    return results, machine, commit, when


def _row(result: dict) -> dict:
    info = result.get("extra_info", {})
    label = info.get("impl")
    if info.get("chunk_bytes") and info.get("kind") == "backend" and label != "reference":
        label = f"{label} @{int(info['chunk_bytes']) >> 20}MiB"  # beside the same backend at the default budget
    return dict(info, name=result["name"], seconds=result["stats"]["median"], peak=info.get("peak_extra_bytes"),
                rss=info.get("peak_rss_bytes"), label=label)


def _impl_key(label: str) -> tuple:
    impl = label.split(" @")[0]
    return (_ORDER.index(impl) if impl in _ORDER else len(_ORDER), label)


def _index(results: list) -> tuple[dict, dict, list]:
    """(op, shape) -> {impl: row}; shape -> floor row; rows of other suites."""
    groups, floors, others = defaultdict(dict), {}, []
    for row in map(_row, results):
        if row.get("suite") != "ops":
            others.append(row)
        elif row.get("kind") == "floor":
            floors[row["shape"]] = row
        else:
            groups[(row["op"], row["shape"])][row["label"]] = row
    return groups, floors, others


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _mib(nbytes) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:.1f}"


def _ratio(a, b) -> str:
    return "" if a is None or not b else f"{a / b:.2f}"


def predicted_seconds(row: dict, rates: gpu_model.Rates, flops_rate: float | None = None) -> float | None:
    """The model's time for a CUDA bf16 row of a fused backend (its own path, its own chunk rows) or of the
    floor, at ``rates`` (its matmul rate replaced by ``flops_rate`` when given)."""
    if not str(row.get("device", "")).startswith("cuda") or row.get("dtype") != "bfloat16":
        return None
    impl = "floor" if row.get("kind") == "floor" else row.get("impl")
    if impl not in ("floor", *FUSED_GPU_BACKENDS) or not all(row.get(k) for k in ("tokens", "hidden", "vocab")):
        return None
    prediction = gpu_model.predict(
        row["tokens"], row["hidden"], row["vocab"], row.get("mode") == "trainable", row.get("chunk_rows"),
        path=impl if impl != "floor" else "triton", flops_rate=flops_rate or rates.flops, bandwidth=rates.bandwidth,
    )
    return prediction.floor_seconds if impl == "floor" else prediction.seconds


def floor_rate(floor: dict | None) -> float | None:
    """The matmul rate (FLOP/s) the measured floor row reached, or None."""
    if not floor or not all(floor.get(k) for k in ("tokens", "hidden", "vocab")):
        return None
    trainable = floor.get("mode") == "trainable"
    return gpu_model.achieved_flops(floor["tokens"], floor["hidden"], floor["vocab"], trainable, floor["seconds"])


def _header(machine: dict, commit: dict, when: str | None) -> list[str]:
    env = machine.get("are_fast", {})
    hardware = env.get("gpu") or f"{env.get('cpu_model', '?')}, {env.get('cpu_cores', '?')} cores"
    threads = f", {env['torch_threads']} torch threads" if "torch_threads" in env else ""
    peers = ", ".join(f"{k.replace('_', '-')} {env[k]}" for k in ("liger_kernel", "cut_cross_entropy") if env.get(k))
    commit_id = commit.get("id", "?")[:12] + (" (dirty)" if commit.get("dirty") else "")
    lines = [
        f"- date: {when or '?'}; machine: {hardware}{threads}",
        f"- torch {env.get('torch', '?')}, triton {env.get('triton') or 'not installed'}; peers: {peers or 'none'}",
        f"- commit: {commit_id}" + ("; SMOKE MODE (tiny shapes, 1 round: not a measurement)" * bool(env.get("smoke"))),
    ]
    return lines if (machine or commit or when) else []


def ops_table(groups: dict, floors: dict, rates: gpu_model.Rates | None = None) -> list[str]:
    peers = sorted({i for g in groups.values() for i, r in g.items() if r.get("kind") == "peer"}, key=_impl_key)
    head = ["op", "shape", "impl", "median ms", "x ref"] + [f"x {p}" for p in peers]
    head += ["x floor", "peak extra MiB", "mem x ref", "peak extra RSS MiB", "note"]
    rows = [r for g in groups.values() for r in g.values()] + list(floors.values())
    modelled = rates is not None and any(predicted_seconds(r, rates) for r in rows)
    if modelled:
        head += [f"{rates.name} model ms", "x model", "model at floor's rate ms"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (op, shape), impls in groups.items():
        reference = impls.get("reference")
        floor = floors.get(shape)
        for name in sorted(impls, key=_impl_key):
            row = impls[name]
            cells = [op, shape, name, _ms(row["seconds"]), _ratio(row["seconds"], reference and reference["seconds"])]
            cells += [_ratio(row["seconds"], impls[p]["seconds"] if p in impls else None) for p in peers]
            cells += [_ratio(row["seconds"], floor and floor["seconds"]), _mib(row["peak"])]
            cells += [_ratio(row["peak"], reference and reference["peak"]), _mib(row.get("rss")), row.get("note") or ""]
            if modelled:
                cells += _model_cells(row, rates, floor)
            lines.append("| " + " | ".join(cells) + " |")
    if floors:
        lines += ["", "Floor (bare matmuls: h @ W.T, G @ W, and G.T @ h for a trainable head):", ""]
        if modelled:
            lines += [f"| shape | median ms | {rates.name} model ms | x model | achieved TFLOP/s |",
                      "|---|---|---|---|---|"]
        else:
            lines += ["| shape | median ms |", "|---|---|"]
        for shape, row in floors.items():
            cells = [shape, _ms(row["seconds"])]
            if modelled:
                achieved = floor_rate(row)
                cells += _model_cells(row, rates, None)[:2] + [f"{achieved / 1e12:.0f}" if achieved else ""]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _model_cells(row: dict, rates: gpu_model.Rates, floor: dict | None) -> list[str]:
    """model ms, measured / model, and the model at the floor's measured matmul rate ("" where none applies)."""
    predicted = predicted_seconds(row, rates)
    if predicted is None:
        return ["", "", ""]
    achieved = floor_rate(floor)
    at_floor = predicted_seconds(row, rates, achieved) if achieved else None
    return [_ms(predicted), _ratio(row["seconds"], predicted), _ms(at_floor) if at_floor else ""]


def _matches(row: dict, spec: dict) -> bool:
    return all(row.get(k) == v for k, v in spec.items())


def _find(groups: dict, spec: dict) -> dict:
    """op -> {impl: row} for the groups whose rows match ``spec``."""
    return {op: impls for (op, _), impls in groups.items() if _matches(next(iter(impls.values())), spec)}


def _verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def target_lines(groups: dict, floors: dict) -> list[str]:
    """The issue's targets, each with its numbers and 'met' or '**MISSED**'."""
    lines = [
        f"CPU target ({CPU_TARGET['head']}: H=1024, V=32000, N=4096, fp32, frozen head): chunked fwd+bwd no "
        f"slower than reference; peak extra memory at most {CPU_MEMORY_RATIO:g} of reference's.",
    ]
    found = _find(groups, CPU_TARGET)
    for op, impls in found.items():
        ref, ours = impls.get("reference"), impls.get("chunked")
        if not (ref and ours):
            lines.append(f"- {op}: chunked or reference not measured")
            continue
        t, m = ours["seconds"] / ref["seconds"], ours["peak"] / ref["peak"]
        slower = f" ({(t - 1) * 100:.0f}% slower)" if t > 1 else ""
        lines.append(
            f"- {op}: time {_ms(ours['seconds'])} ms vs {_ms(ref['seconds'])} ms = {t:.2f}x -> "
            f"{_verdict(t <= 1)}{slower}; "
            f"memory {_mib(ours['peak'])} vs {_mib(ref['peak'])} MiB = {m:.3f}x -> {_verdict(m <= CPU_MEMORY_RATIO)}"
        )
    if not found:
        lines.append("- not measured in this run")
    lines += [
        "",
        f"GPU target ({GPU_TARGET['head']}, N=16384, bf16, frozen head): within {GPU_FLOOR_RATIO}x of the floor, "
        f"faster than Liger-Kernel and CCE, peak extra memory at most {GPU_MEMORY_RATIO:.0%} of reference's.",
    ]
    found = _find(groups, GPU_TARGET)
    floor = floors.get(next((r["shape"] for g in found.values() for r in g.values()), None))
    for op, impls in found.items():
        for name in (n for n in FUSED_GPU_BACKENDS if n in impls):
            row = impls[name]
            parts = []
            if floor:
                f = row["seconds"] / floor["seconds"]
                parts.append(f"{f:.2f}x floor -> {_verdict(f <= GPU_FLOOR_RATIO)}")
            for peer in (p for p in ("liger", "cce", "cce-exact") if p in impls):
                r = row["seconds"] / impls[peer]["seconds"]
                parts.append(f"{r:.2f}x {peer} -> {_verdict(r < 1)}")
            if "reference" in impls:
                m = row["peak"] / impls["reference"]["peak"]
                parts.append(f"memory {m:.4f}x reference -> {_verdict(m <= GPU_MEMORY_RATIO)}")
            missing = [p for p in ("reference", "liger", "cce") if p not in impls] + ([] if floor else ["floor"])
            if missing:
                parts.append("not measured: " + ", ".join(missing))
            lines.append(f"- {op} / {name} ({_ms(row['seconds'])} ms): " + "; ".join(parts))
    if not found:
        lines.append("- not measured in this run")
    lines += ["", "Issue-2 case (token_logprobs fwd+bwd, N=4096, H=512, V=32000, fp32, CPU):"]
    impls = next(iter(_find(groups, {k: v for k, v in ISSUE2_CASE.items() if k != "op"}).values()), {})
    ref, ours = impls.get("reference"), impls.get("chunked")
    if ref and ours:
        lines.append(
            f"- chunked {_ms(ours['seconds'])} ms, {_mib(ours['peak'])} MiB; reference {_ms(ref['seconds'])} ms, "
            f"{_mib(ref['peak'])} MiB: time {ours['seconds'] / ref['seconds']:.2f}x, "
            f"memory {ours['peak'] / ref['peak']:.3f}x"
        )
    else:
        lines.append("- not measured in this run")
    return lines


def model_lines(machine: dict) -> tuple[gpu_model.Rates | None, list[str]]:
    """The model's rates for this run's GPU, and a line saying which (or why there are none)."""
    gpu = machine.get("are_fast", {}).get("gpu")
    if not gpu:
        return None, []
    rates = gpu_model.rates_for(gpu)
    if rates is None:
        return None, [f"- model: no rates for {gpu} (benchmarks.gpu_model knows H100 SXM and H200): no model columns"]
    return rates, [
        f"- model: benchmarks.gpu_model at {rates.name} rates ({rates.flops / 1e12:.0f} TFLOP/s bf16, "
        f"{rates.bandwidth / 1e12:.1f} TB/s), and at the matmul rate each shape's measured floor reached"
    ]


def markdown(results: list, machine: dict, commit: dict, when: str | None) -> str:
    groups, floors, others = _index(results)
    rates, model = model_lines(machine)
    lines = _header(machine, commit, when) + model
    if groups or floors:
        lines += ["", *ops_table(groups, floors, rates), "", "### Targets", "", *target_lines(groups, floors)]
    if others:
        lines += ["", "| benchmark | median ms | peak extra MiB |", "|---|---|---|"]
        lines += [f"| {r['name']} | {_ms(r['seconds'])} | {_mib(r['peak'])} |" for r in others]
    return "\n".join(lines) + "\n"


def chart(results: list, path) -> None:
    """Bar chart: per (op, shape), each implementation's time as a multiple of the floor, and its memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, floors, _ = _index(results)
    labels = [f"{op}\n{shape}" for op, shape in groups]
    impls = sorted({i for g in groups.values() for i in g}, key=_impl_key)
    width = 0.8 / max(len(impls), 1)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(14, 1.0 + 0.9 * max(len(groups), 1)), sharey=True)
    for k, name in enumerate(impls):
        ys, times, mems = [], [], []
        for y, (key, rows) in enumerate(groups.items()):
            row, floor = rows.get(name), floors.get(key[1])
            if row is not None:
                ys.append(y + k * width)
                times.append(row["seconds"] / floor["seconds"] if floor else float("nan"))
                mems.append(max(row["peak"] or 0, 1) / 2**20)
        ax_t.barh(ys, times, height=width, label=name)
        ax_m.barh(ys, mems, height=width, label=name)
    ax_t.set_yticks([y + 0.4 - width / 2 for y in range(len(labels))], labels, fontsize=7)
    ax_t.invert_yaxis()
    ax_t.axvline(1.0, color="black", linewidth=0.8)
    ax_t.set_xlabel("fwd+bwd time / bare-matmul floor (lower is better)")
    ax_m.set_xscale("log")
    ax_m.set_xlabel("peak extra memory, MiB (log)")
    fig.legend(*ax_t.get_legend_handles_labels(), loc="upper center", ncol=len(impls), fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--out", help="write the Markdown here (default: stdout)")
    parser.add_argument("--png", help="write the bar chart here")
    args = parser.parse_args(argv)
    results, machine, commit, when = load(args.json)
    text = markdown(results, machine, commit, when)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        print(text, end="")
    if args.png:
        chart(results, args.png)


if __name__ == "__main__":
    main()
