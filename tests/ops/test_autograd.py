"""The custom op's backward (are_fast.ops.autograd): with the gradients computed in the forward it only scales
them in place, so it allocates nothing of a gradient's size (autograd's zero-filled gradients for the op's
gradient outputs, one more [N, H] per stream and [V, H], were the largest part of the peak RSS)."""
import pytest
import torch

import are_fast
from _helpers import FUSED_BACKENDS

N, H, V = 256, 64, 300


def _largest_backward_allocation(loss: torch.Tensor) -> int:
    with torch.profiler.profile(profile_memory=True) as prof:
        loss.backward()
    return max([event.cpu_memory_usage for event in prof.events()] + [0])


@pytest.mark.parametrize("backend", [b for b in FUSED_BACKENDS if b != "triton"])
@pytest.mark.parametrize("case", ["frozen-per-row", "trainable-scalar"])
def test_backward_allocates_nothing_gradient_sized(backend, case):
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=case.startswith("trainable"))
    labels = torch.randint(0, V, (2, N // 2))
    if case == "frozen-per-row":
        loss = (are_fast.token_logprobs(hidden, weight, labels.reshape(-1), backend=backend) * torch.randn(N)).sum()
    else:
        loss = are_fast.compression_loss(hidden.reshape(2, N // 2, H), weight, labels, backend=backend)
    largest = _largest_backward_allocation(loss)
    assert largest < N * H * 4 // 4, f"the backward allocated {largest} bytes at once ([N, H] = {N * H * 4})"
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()
    if weight.requires_grad:
        assert weight.grad is not None and torch.isfinite(weight.grad).all()


def test_an_unused_output_gets_no_gradient():
    """Only the log-probs of one op reach the loss: the other op's backward receives None and returns none."""
    hidden = torch.randn(N, H, requires_grad=True)
    weight = torch.randn(V, H)
    labels = torch.randint(0, V, (N,))
    used = are_fast.token_logprobs(hidden, weight, labels)
    are_fast.token_logprobs(hidden * 2, weight, labels)  # never used
    used.sum().backward()
    expected = torch.autograd.functional.vjp(
        lambda h: torch.log_softmax(h @ weight.T, 1).gather(1, labels[:, None]).sum(), hidden.detach())[1]
    assert torch.allclose(hidden.grad, expected, atol=1e-5)
