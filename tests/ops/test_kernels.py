"""The Triton epilogues (under the interpreter on CPU) against the PyTorch epilogues they must equal."""
import pytest
import torch

from are_fast import kernels
from are_fast.ops import torch_epilogues
from _helpers import assert_rel_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("vocab", [1, 7, 4096, 4099])  # one lane, one partial tile, one full tile, two tiles
@pytest.mark.parametrize("with_grad", [False, True], ids=["values", "grad"])
def test_logprob_epilogue(vocab, with_grad):
    rows = 5
    logits = torch.randn(rows, vocab, device=DEVICE) * 4
    targets = torch.randint(0, vocab, (rows,), device=DEVICE)
    targets[1] = -100
    scale = torch.randn(rows, device=DEVICE) if with_grad else None
    ours, theirs = logits.clone(), logits.clone()
    out = kernels.logprob_epilogue(ours, targets, -100, scale)
    ref = torch_epilogues.logprob_epilogue(theirs, targets, -100, scale)
    assert_rel_close(out, ref, torch.float32, "log-probs")
    assert out[1] == 0
    assert_rel_close(ours, theirs, torch.float32, "in-place gradient" if with_grad else "untouched logits")


@pytest.mark.parametrize("vocab", [1, 7, 4099])
@pytest.mark.parametrize("with_grad", [False, True], ids=["values", "grad"])
def test_kl_epilogue(vocab, with_grad):
    rows = 4
    a, b = torch.randn(rows, vocab, device=DEVICE) * 3, torch.randn(rows, vocab, device=DEVICE) * 3
    valid = torch.tensor([True, False, True, True], device=DEVICE)
    scale = torch.randn(rows, device=DEVICE) if with_grad else None
    ours = [a.clone(), b.clone()]
    theirs = [a.clone(), b.clone()]
    out = kernels.kl_epilogue(*ours, valid, scale)
    ref = torch_epilogues.kl_epilogue(*theirs, valid, scale)
    assert_rel_close(out, ref, torch.float32, "KL")
    assert out[1] == 0 and (out[valid] >= -1e-6).all()
    if with_grad:
        assert_rel_close(ours[0], theirs[0], torch.float32, "d/da")
        assert_rel_close(ours[1], theirs[1], torch.float32, "d/db")


def test_launchers_reject_what_the_kernels_cannot_read():
    with pytest.raises(TypeError, match="logits: the Triton epilogue takes float32"):
        kernels.logprob_epilogue(torch.randn(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long), -100, None)
    with pytest.raises(ValueError, match="logits: rows must be contiguous"):
        kernels.logprob_epilogue(torch.randn(3, 2).T, torch.zeros(2, dtype=torch.long), -100, None)
    with pytest.raises(ValueError, match=r"logits_q: expected shape \(2, 3\)"):
        kernels.kl_epilogue(torch.randn(2, 3), torch.randn(2, 4), torch.ones(2, dtype=torch.bool), None)
