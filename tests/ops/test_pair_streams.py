"""A pair's second stream from the rows' difference (``are_fast.ops.pair_streams``), as the online sweep and the
chunk driver form it: the helpers against their formulas, and every fused backend's float32 gradients of close
streams against float64 (the bf16 sweep's: tests/ops/test_online_low_precision.py)."""
import pytest
import torch

import are_fast
from _helpers import FUSED_BACKENDS, TOLERANCE, leaf, rel_error
from are_fast.ops import pair_streams


@pytest.mark.parametrize("pattern", ["close", "far", "mixed"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_second_stream_from_the_difference(pattern, with_bias):
    """Close rows (|h_p - h_q| <= 0.5 |h_q|) multiply h_p - h_q and take b = a - x W; far rows multiply h_q and
    take x W + bias; either way b equals h_q W + bias (float64 here, so exactly up to rounding)."""
    rows, hidden, vocab = 6, 5, 7
    rows_p = torch.randn(rows, hidden, dtype=torch.float64)
    near = rows_p + 0.01 * torch.randn(rows, hidden, dtype=torch.float64)
    independent = torch.randn(rows, hidden, dtype=torch.float64) * 3
    is_close = {"close": [True] * rows, "far": [False] * rows, "mixed": [True, False] * (rows // 2)}[pattern]
    mask = torch.tensor(is_close)
    rows_q = torch.where(mask.unsqueeze(1), near, independent)
    weight = torch.randn(vocab, hidden, dtype=torch.float64)
    bias = torch.randn(vocab, dtype=torch.float64) if with_bias else None

    second, close = pair_streams.second_rows(rows_p, rows_q, torch.float64)
    assert torch.equal(close[0], mask) and close[1] == int(mask.sum())
    assert torch.equal(second, torch.where(mask.unsqueeze(1), rows_p - rows_q, rows_q))
    logits_a = rows_p @ weight.T + (0 if bias is None else bias)
    expected = rows_q @ weight.T + (0 if bias is None else bias)
    # count None: off the CPU the rows are not counted (no host synchronisation): the per-row selection always
    for counted in (close, (close[0], None)):
        b = pair_streams.second_logits_(logits_a, second @ weight.T, counted, bias)
        assert torch.allclose(b, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", ["conditional_kl", "conditional_jsd"])
def test_float32_gradients_of_close_streams(op, backend, device):
    """Streams 3% apart through a real head (64 rows, H=32, V=3000): the log-ratio a - b is ~3% of a logit, and
    from two float32 logits of their own it kept 2^-24 of a logit's size plus the dot products' rounding (hidden
    gradients 1.0e-5 to 1.2e-5 off, as naive float32 gives); with b = a - (h_p - h_q) W, 2e-6 to 6e-6. The
    value's own float32 floor (the two log-sum-exps' difference, ~3e-5 relative here) is README's."""
    generator = torch.Generator().manual_seed(0)
    hidden_p = torch.randn(1, 64, 32, dtype=torch.float64, generator=generator)
    hidden_q = hidden_p + 0.03 * torch.randn(1, 64, 32, dtype=torch.float64, generator=generator)
    weight = 3 * torch.randn(3000, 32, dtype=torch.float64, generator=generator) / 32**0.5
    hidden_p, hidden_q, weight = (t.float().double() for t in (hidden_p, hidden_q, weight))
    labels = torch.zeros(1, 64, dtype=torch.long)
    upstream = torch.randn(1, 64, dtype=torch.float64, generator=generator)

    def gradients(dtype, backend, dev, **kwargs):
        p, q = (leaf(t.to(dev), dtype, True) for t in (hidden_p, hidden_q))
        out = getattr(are_fast, op)(p, q, weight.to(dev, dtype), labels.to(dev), reduction="none", backend=backend,
                                    **kwargs)
        (out.double() * upstream.to(dev)).sum().backward()
        return p.grad, q.grad

    ours = gradients(torch.float32, backend, device, chunk_rows=16)
    for stream, got, want in zip("pq", ours, gradients(torch.float64, "reference", "cpu")):
        error = rel_error(got.cpu(), want)
        assert error <= TOLERANCE[torch.float32], f"{op} d/dhidden_{stream}: relative error {error:.2e}"
