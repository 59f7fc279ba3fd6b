"""A roofline model of the fused LM-head ops on a GPU: the time each kernel needs at the chip's matmul rate
and memory bandwidth, summed over the kernels that run one after another, so a GPU run is read against a
prediction (``benchmarks.report`` prints it beside the measured times and the measured floor).

Each kernel takes max(flops / FLOPS, bytes / BANDWIDTH); the chunk driver runs its matmuls and epilogues in
series, so their times add. Rates by GPU (``rates_for``, from the name torch reports), achievable figures
rather than datasheet peaks:
- H200: 790 TFLOP/s dense bf16 and 4.3 TB/s, measured in this workplace (datasheet: 990 TFLOP/s, 4.8 TB/s);
- H100 SXM (HBM3): 790 TFLOP/s, what an 8192^3 bf16 product reached on this workplace's H100 (798; the
  datasheet's 989 is not reached by cuBLAS), and 3.0 TB/s, its measured device-to-device copy (datasheet
  3.35 TB/s).
The run's own bare matmuls (the floor) give a third reading: ``predict(..., flops_rate=achieved_rate(...))``
at the rate the floor reached on the run's card.

Shapes: N rows of hidden states [N, H], a bf16 head [V, H]; every op at a shape does the same head work (the
KL's two streams split the N rows). Every per-chunk matmul reads the whole head (2VH bytes) again: N / rows
chunks times two matmuls frozen (64 head reads at N=16384 in 512-row chunks, 67 GB), three trainable; those
bytes are in each launch's count (``Prediction.bytes``, ``head_reads``), though at 512 rows a chunk's matmul
does about 400 flops per byte and stays bound by arithmetic on both chips.

Paths (bf16 head on CUDA):
- ``triton``: the data path of ``are_fast.ops.head_matmuls`` today: float32 logits written into the chunk
  buffer, the epilogue reads them twice and writes the bf16 gradient over their first half, the
  hidden-gradient matmul reads it; a trainable head accumulates its weight gradient in place in float32.
- ``native``: the same with the native CUDA epilogue, which writes a float32 gradient and leaves one cast
  pass to bf16.
- ``before``: the path before the gradient-output change: float32 gradient, a cast pass, and for a trainable
  head a fresh float32 [V, H] product per chunk added to the accumulator.
- ``floor``: the bare bf16 matmuls h @ W.T, G @ W (and G.T @ h), as benchmarks.impls.floor_fn runs them.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Rates:
    name: str
    flops: float  # dense bf16 matmul, FLOP/s
    bandwidth: float  # HBM, bytes/s (read + written)


H200 = Rates("H200", 790e12, 4.3e12)
H100_SXM = Rates("H100 SXM", 790e12, 3.0e12)
FLOPS, BANDWIDTH = H200.flops, H200.bandwidth  # the defaults of predict()


def rates_for(gpu_name: str | None) -> Rates | None:
    """The rates of a GPU by the name torch.cuda.get_device_name gives ("NVIDIA H100 80GB HBM3", "NVIDIA
    H200"); None for any other card (an H100 PCIe or NVL has other rates), whose rows then get no model."""
    name = (gpu_name or "").upper()
    if "H200" in name:
        return H200
    if "H100" in name and ("HBM3" in name or "SXM" in name):
        return H100_SXM
    return None


BF16, FP32 = 2, 4  # bytes per element
PATHS = ("triton", "native", "before")


@dataclass(frozen=True)
class Kernel:
    name: str
    flops: float
    bytes: float
    count: int = 1  # launches of this kernel (one per chunk for per-chunk work)
    reads_head: bool = False  # each launch reads the whole head [V, H]

    def seconds(self, flops_rate: float = FLOPS, bandwidth: float = BANDWIDTH) -> float:
        return self.count * max(self.flops / flops_rate, self.bytes / bandwidth)


def epilogue_bytes_per_logit(path: str, with_grad: bool = True) -> int:
    """HBM bytes per logit of the passes between the matmuls (epilogue and cast), which nothing overlaps.

    Values only: one read of the float32 logits. With the gradient: two reads (statistics, then gradient),
    then triton writes the bf16 gradient (8 + 2 = 10); native and before write a float32 gradient and cast it
    (8 + 4, then 4 + 2: 18).
    """
    if path not in PATHS:
        raise ValueError(f"path: expected one of {', '.join(PATHS)}, got {path!r}")
    if not with_grad:
        return FP32
    return 2 * FP32 + (BF16 if path == "triton" else FP32 + FP32 + BF16)


def bytes_per_logit(path: str, trainable: bool) -> int:
    """All HBM bytes per logit of one op call (forward + backward), matmul outputs and inputs included:
    frozen: logits written (4), epilogue, gradient read by the hidden matmul (2); trainable adds the
    values-only forward (logits written and read: 8) and the gradient read by the weight matmul (2)."""
    per_pass = FP32 + epilogue_bytes_per_logit(path) + BF16
    return per_pass + (2 * FP32 + BF16 if trainable else 0)


def _gemm(name, m, n, k, a_bytes, b_bytes, out_bytes, count=1, extra_bytes=0.0) -> Kernel:
    """[m, k] @ [k, n] -> [m, n]: 2mnk flops; reads both operands once, writes the output once."""
    return Kernel(name, 2.0 * m * n * k, m * k * a_bytes + k * n * b_bytes + m * n * out_bytes + extra_bytes, count)


def floor_kernels(tokens: int, hidden: int, vocab: int, trainable: bool) -> list[Kernel]:
    """The bare bf16 matmuls every implementation needs (benchmarks.impls.floor_fn)."""
    kernels = [
        _gemm("h @ W.T", tokens, vocab, hidden, BF16, BF16, BF16),
        _gemm("G @ W", tokens, hidden, vocab, BF16, BF16, BF16),
    ]
    if trainable:
        kernels.append(_gemm("G.T @ h", vocab, hidden, tokens, BF16, BF16, BF16))
    return kernels


def head_kernels(tokens: int, hidden: int, vocab: int, trainable: bool, chunk_rows: int, path: str = "triton") -> list[Kernel]:
    """The kernels of one fused op call (forward + backward) on a bf16 head, ``chunk_rows`` rows per chunk.

    Frozen head: one pass computes values and hidden gradients (the backward only rescales [N, H]).
    Trainable head: a values-only forward pass, then a backward pass that recomputes the logits and adds the
    weight gradient chunk by chunk into a float32 [V, H] accumulator, cast to bf16 at the end.
    """
    chunks = -(-tokens // chunk_rows)
    rows = tokens / chunks  # the mean chunk: totals stay exact
    logits_gemm = _gemm("logits h @ W.T (fp32 out)", rows, vocab, hidden, BF16, BF16, FP32, chunks)
    logits_gemm = replace(logits_gemm, reads_head=True)
    epilogue = Kernel("epilogue", 0.0, tokens * vocab * epilogue_bytes_per_logit(path))
    hidden_gemm = replace(_gemm("hidden grad G @ W", rows, hidden, vocab, BF16, BF16, BF16, chunks), reads_head=True)
    if not trainable:
        rescale = Kernel("backward rescale of [N, H]", 0.0, tokens * hidden * 2 * BF16)
        return [logits_gemm, epilogue, hidden_gemm, rescale]
    forward_epilogue = Kernel("values-only epilogue", 0.0, tokens * vocab * epilogue_bytes_per_logit(path, False))
    accumulator = vocab * hidden * FP32
    kernels = [logits_gemm, forward_epilogue, logits_gemm, epilogue, hidden_gemm]
    if path == "before":  # a fresh float32 product per chunk, then acc += product (3 more passes)
        kernels.append(_gemm("weight grad G.T @ h (new fp32)", vocab, hidden, rows, BF16, BF16, FP32, chunks))
        kernels.append(Kernel("acc += product", 0.0, 3 * accumulator, chunks))
    else:  # addmm into the accumulator: read and written once per chunk
        kernels.append(_gemm("weight grad acc += G.T @ h", vocab, hidden, rows, BF16, BF16, FP32, chunks, accumulator))
    kernels.append(Kernel("accumulator to bf16", 0.0, vocab * hidden * (FP32 + BF16)))
    return kernels


@dataclass(frozen=True)
class Prediction:
    seconds: float
    floor_seconds: float
    bytes: float  # HBM bytes of the fused call, the head's re-reads by every per-chunk matmul included
    head_reads: int  # matmul launches that each read the whole head

    @property
    def floor_ratio(self) -> float:
        return self.seconds / self.floor_seconds


def predict(tokens: int, hidden: int, vocab: int, trainable: bool, chunk_rows: int | None = None,
            path: str = "triton", flops_rate: float = FLOPS, bandwidth: float = BANDWIDTH) -> Prediction:
    """Predicted time of one fused op call and of its floor. ``chunk_rows`` defaults to the chunk driver's
    choice on CUDA (are_fast.ops.chunked.chunk_rows_for, which reads ARE_FAST_CHUNK_BYTES)."""
    if chunk_rows is None:
        import torch

        from are_fast.ops.chunked import chunk_rows_for

        chunk_rows = chunk_rows_for(tokens, vocab, 1, torch.device("cuda"))
    kernels = head_kernels(tokens, hidden, vocab, trainable, chunk_rows, path)
    total = sum(k.seconds(flops_rate, bandwidth) for k in kernels)
    floor = sum(k.seconds(flops_rate, bandwidth) for k in floor_kernels(tokens, hidden, vocab, trainable))
    head_reads = sum(k.count for k in kernels if k.reads_head)
    return Prediction(total, floor, sum(k.count * k.bytes for k in kernels), head_reads)


def achieved_flops(tokens: int, hidden: int, vocab: int, trainable: bool, floor_seconds: float) -> float:
    """The matmul rate (FLOP/s) a measured floor reached: its flops over its time."""
    return sum(k.count * k.flops for k in floor_kernels(tokens, hidden, vocab, trainable)) / floor_seconds


def main() -> None:
    """Print the model's table for the llama3-8b head (H=4096, V=128256) at N=8192 and 16384, per GPU."""
    for rates in (H100_SXM, H200):
        print(f"{rates.name} model: {rates.flops / 1e12:.0f} TFLOP/s bf16, {rates.bandwidth / 1e12:.1f} TB/s; "
              "llama3-8b head, bf16, chunks of 256 MiB (512 rows)")
        print("| N | head | path | bytes/logit | head reads | GB moved | predicted ms | floor ms | x floor |")
        print("|---|---|---|---|---|---|---|---|---|")
        for tokens in (8192, 16384):
            for trainable in (False, True):
                for path in PATHS:
                    p = predict(tokens, 4096, 128256, trainable, 512, path, rates.flops, rates.bandwidth)
                    mode = "trainable" if trainable else "frozen"
                    print(f"| {tokens} | {mode} | {path} | {bytes_per_logit(path, trainable)} | {p.head_reads} | "
                          f"{p.bytes / 1e9:.0f} | {p.seconds * 1e3:.1f} | {p.floor_seconds * 1e3:.1f} | "
                          f"{p.floor_ratio:.2f} |")
        print()


if __name__ == "__main__":
    main()
