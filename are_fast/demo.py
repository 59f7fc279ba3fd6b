"""The ops demo: each fused op on random data, time and peak extra memory against the reference backend.

Shapes default to a small LM head that runs in seconds on 2 CPU cores. Forward+backward, frozen head.
"""
from __future__ import annotations

import time

import torch

from .ops import functional as F
from .ops.backends import resolve_backend
from .memory import peak_extra_memory


def _cases(hidden_size: int, vocab: int, batch: int, length: int, negatives: int, device, dtype):
    """Closures (name, fn(backend) -> loss) over random inputs shared by every backend."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    weight = rand(vocab, hidden_size) * hidden_size**-0.5
    labels = torch.randint(0, vocab, (batch, length), generator=gen).to(device)
    streams = [rand(batch, length, hidden_size).requires_grad_() for _ in range(2 + negatives)]
    neg_labels = torch.randint(0, vocab, (batch * negatives, length), generator=gen).to(device)
    ref_p, ref_n = rand(batch), rand(batch, negatives)

    def alignment(backend):
        q_pos, pos_pos, *negs = streams
        lp_qp = F.sequence_logprobs(q_pos, weight, labels, backend=backend)
        lp_pp = F.sequence_logprobs(pos_pos, weight, labels, backend=backend)
        lp_qn = F.sequence_logprobs(torch.cat(negs), weight, neg_labels, backend=backend).view(negatives, batch).T
        return F.alignment_loss(lp_qp, lp_pp, lp_qn, ref_p, ref_n)

    return [
        ("token_logprobs", lambda b: F.token_logprobs(streams[0], weight, labels, backend=b).sum()),
        ("sequence_logprobs", lambda b: F.sequence_logprobs(streams[0], weight, labels, backend=b).sum()),
        ("compression_loss", lambda b: F.compression_loss(streams[0], weight, labels, backend=b)),
        ("conditional_kl", lambda b: F.conditional_kl(streams[0], streams[1], weight, labels, backend=b).sum()),
        ("alignment_loss", alignment),
    ], streams


def run_demo(
    hidden_size=512, vocab=32000, batch=4, length=256, negatives=2, device=None, dtype="float32", repeats=2
) -> list[dict]:
    """Print and return, per op, the best-of-``repeats`` time and the peak extra memory of fused vs reference."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, dtype)
    fused = resolve_backend(None, device)
    cases, streams = _cases(hidden_size, vocab, batch, length, negatives, device, dtype)
    print(f"are_fast demo: H={hidden_size} V={vocab} tokens/stream={batch * length} {dtype} on {device}; "
          f"forward+backward, frozen head; fused backend = {fused}")
    print(f"{'op':<18} {'reference':>22} {fused:>22} {'speed-up':>9} {'memory':>8}")
    rows = []
    for name, loss_fn in cases:
        stats = {}
        for backend in ("reference", fused):
            def step():
                for s in streams:
                    s.grad = None
                loss_fn(backend).backward()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
            _, peak = peak_extra_memory(step, device)
            stats[backend] = (min(times), peak)
        (t_ref, m_ref), (t_fused, m_fused) = stats["reference"], stats[fused]
        rows.append(dict(op=name, reference_s=t_ref, fused_s=t_fused, reference_bytes=m_ref, fused_bytes=m_fused))
        print(f"{name:<18} {t_ref * 1e3:>9.1f} ms {m_ref / 2**20:>7.1f} MiB {t_fused * 1e3:>9.1f} ms "
              f"{m_fused / 2**20:>7.1f} MiB {t_ref / t_fused:>8.2f}x {m_fused / max(m_ref, 1):>7.1%}")
    return rows
