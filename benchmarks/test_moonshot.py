"""The moonshot measurement's two pieces: the entropy bisection and the tile-skipping report."""
import torch

from .moonshot import logits_with_entropy, skip_report


def test_logits_reach_the_requested_entropy():
    prior = -1.1 * torch.log1p(torch.arange(500, dtype=torch.float64))
    noise = torch.randn(8, 500, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for entropy in (1.0, 3.0):
        p = torch.softmax(logits_with_entropy(prior, noise, entropy), 1)
        assert abs(-(p * p.log()).sum(1).mean().item() - entropy) < 1e-6


def test_skip_report_counts_the_small_tiles_and_their_error():
    """Rows whose mass lies in the first 4 entries: every tile past them is below 2^-12 and skipped, and the
    error is that of dropping exactly those probabilities."""
    logits = torch.full((4, 16), -30.0, dtype=torch.float64)
    logits[:, :4] = 0.0
    targets = torch.tensor([0, 1, 2, 3])
    weight = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (report,) = skip_report(logits, targets, weight, tiles=((2, 4), (8, 4)))  # (8, 4) does not fit: left out
    assert report["tile"] == "2x4" and report["skipped"] == 0.75
    p = torch.softmax(logits, 1)
    exact = weight[targets] - p @ weight
    kept = p.clone()
    kept[:, 4:] = 0
    expected = ((weight[targets] - kept @ weight) - exact).norm() / exact.norm()
    assert abs(report["error"] - expected.item()) < 1e-12 and report["error"] > 0
