"""The Triton epilogues on the device under test (compiled on CUDA, the interpreter on CPU) against the PyTorch
epilogues in float64 on CPU, on the same float32-rounded logits.

The cornering cases use a small tile (the launchers' ``block_v``) so that a short row spans many tiles, and put
each row's maximum in the first, a middle, the last full and the ragged tail tile, or let it rise gently or fall
steeply with every tile, with and without a common offset of 1e4: an online log-sum-exp that forgets a rescale
or lets its running max fall (exp overflows), or a tail mask that lets padding in, fails them. They compare row
by row, so that a row with small values is not hidden behind one with large values.
"""
import importlib
import os
from functools import partial

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from are_fast.kernels.kl_epilogue import kl_epilogue
from are_fast.kernels.logprob_epilogue import logprob_epilogue
from are_fast.ops import registry, torch_epilogues
from _helpers import MASKED, TILE, VOCAB, assert_rows_close, check_masked_kl, cornered, rel_error, rounded

IGNORE = -100
PEAKS = {"first": 3, "middle": 2 * TILE + 5, "last-full": 4 * TILE + 7, "tail": VOCAB - 1}


def check_logprob(logits64, targets, scale, device, block_v=None, ignore_index=IGNORE, **transform):
    """Values and in-place gradient of the Triton logprob epilogue against the float64 PyTorch one
    (transform: the logit transforms' keywords)."""
    ref_grad = logits64.clone()
    ref = torch_epilogues.logprob_epilogue(ref_grad, targets, ignore_index, scale, **transform)
    ours = logits64.to(device, torch.float32)
    out = logprob_epilogue(ours, targets.to(device), ignore_index,
                                   None if scale is None else scale.to(device), block_v=block_v, **transform)
    assert out.device.type == device.type and out.dtype == torch.float32
    assert_rows_close(out, ref, "log-probs")
    assert (out.cpu()[targets == ignore_index] == 0).all()
    if scale is None:
        assert torch.equal(ours.cpu().double(), logits64), "logits changed without grad_scale"
    else:
        assert_rows_close(ours, ref_grad, "in-place gradient")
        assert (ours.cpu()[targets == ignore_index] == 0).all()


def check_kl(a64, b64, valid, scale, device, block_v=None, **transform):
    """Values and both in-place gradients of the Triton KL epilogue against the float64 PyTorch one."""
    ref_a, ref_b = a64.clone(), b64.clone()
    ref = torch_epilogues.kl_epilogue(ref_a, ref_b, valid, scale, **transform)
    ours_a, ours_b = a64.to(device, torch.float32), b64.to(device, torch.float32)
    out = kl_epilogue(ours_a, ours_b, valid.to(device), None if scale is None else scale.to(device),
                              block_v=block_v, **transform)
    assert out.device.type == device.type and out.dtype == torch.float32
    assert_rows_close(out, ref, "KL")
    assert (out.cpu()[~valid] == 0).all() and (out.cpu()[valid] >= -1e-6).all()
    if scale is None:
        assert torch.equal(ours_a.cpu().double(), a64) and torch.equal(ours_b.cpu().double(), b64)
    else:  # where p ~ q, q - p and log p/q - KL cancel: float32 PyTorch is the bar on such rows
        peer_a, peer_b = a64.float(), b64.float()
        torch_epilogues.kl_epilogue(peer_a, peer_b, valid, scale.float(), **transform)
        assert_rows_close(ours_a, ref_a, "d/dlogits_p", peer_a)
        assert_rows_close(ours_b, ref_b, "d/dlogits_q", peer_b)
        assert (ours_a.cpu()[~valid] == 0).all() and (ours_b.cpu()[~valid] == 0).all()


@pytest.mark.parametrize("vocab", [1, 7, 4096, 4099])  # one lane, one partial tile, one full tile, two tiles
@pytest.mark.parametrize("with_grad", [False, True], ids=["values", "grad"])
def test_logprob_epilogue_default_tile(vocab, with_grad, device):
    rows = 5
    logits = torch.randn(rows, vocab, dtype=torch.float64) * 4
    targets = torch.randint(0, vocab, (rows,))
    targets[1] = IGNORE
    logits[2, -1] = logits[2].max() + 4  # the max in the last tile (the 3-wide tail of 4099)
    targets[3] = vocab - 1
    check_logprob(rounded(logits), targets, torch.randn(rows).double() if with_grad else None, device)


@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["offset0", "offset1e4"])
@pytest.mark.parametrize("with_grad", [False, True], ids=["values", "grad"])
def test_logprob_epilogue_many_tiles(with_grad, offset, device):
    """Row max in each kind of tile, rising and falling rows; targets at the max, in the tail and ignored."""
    logits = cornered(torch.randn(len(PEAKS) + 2, VOCAB, dtype=torch.float64) * 3, list(PEAKS.values()), offset)
    targets = torch.tensor([PEAKS["first"], VOCAB - 2, 0, VOCAB - 1, IGNORE, VOCAB - 3])
    check_logprob(logits, targets, torch.randn(len(targets)).double() if with_grad else None, device, TILE)


TRANSFORMS = {"softcap": dict(softcap=2.0), "logit_scale": dict(logit_scale=0.7), "both": dict(softcap=3.0, logit_scale=2.0)}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("with_grad", [False, True], ids=["values", "grad"])
def test_epilogues_with_logit_transforms_many_tiles(with_grad, transform, device):
    """The cornered rows through both kernels with a softcap (the rising and falling rows run far beyond it)
    and/or a logit scale; the tile's padding must stay out after the transform (it maps -inf to -softcap)."""
    peaks = list(PEAKS.values())
    logits = cornered(torch.randn(len(PEAKS) + 2, VOCAB, dtype=torch.float64) * 3, peaks, 0.0)
    other = cornered(torch.randn(len(PEAKS) + 2, VOCAB, dtype=torch.float64) * 3, peaks[::-1], 0.0)
    targets = torch.tensor([PEAKS["first"], VOCAB - 2, 0, VOCAB - 1, IGNORE, VOCAB - 3])
    scale = torch.randn(len(targets)).double() if with_grad else None
    check_logprob(logits, targets, scale, device, TILE, **TRANSFORMS[transform])
    valid = torch.tensor([True, True, False, True, True, True])
    check_kl(logits, other, valid, scale, device, TILE, **TRANSFORMS[transform])


def test_logprob_epilogue_ignore_index_inside_the_vocabulary(device):
    """ignore_index may be a real column: rows whose target is it give 0 and no gradient; others use it."""
    logits = cornered(torch.randn(len(PEAKS) + 2, VOCAB, dtype=torch.float64) * 3, list(PEAKS.values()), 0.0)
    targets = torch.tensor([5, 7, 5, VOCAB - 1, 0, 5])
    logits[1, 5] = logits[1].max() + 1  # column 5 still enters every softmax
    check_logprob(rounded(logits), targets, torch.randn(len(targets)).double(), device, TILE, ignore_index=5)


def test_logprob_values_do_not_depend_on_the_in_place_gradient(device):
    """In place, the gradient sweep overwrites x[target]; the log-prob must come from the logit read before any
    store. On CUDA: many llama3-width rows with the target in the first tile, where a late read may meet another
    warp's store (a race shows only by chance; test_kernel_memory_order checks the order in the interpreter)."""
    rows, vocab = (2048, 128256) if device.type == "cuda" else (3, VOCAB)
    logits = 3 * torch.randn(rows, vocab, device=device)
    targets = torch.randint(0, min(vocab, 4096), (rows,), device=device)
    values = logprob_epilogue(logits.clone(), targets, IGNORE, None)
    with_gradient = logprob_epilogue(logits, targets, IGNORE, torch.ones(rows, device=device))
    assert torch.equal(with_gradient, values)


def test_logprob_epilogue_with_minus_inf_logits(device):
    """-inf logits (a masked vocabulary) over the whole first tile, a middle tile, scattered columns: the values
    and in-place gradients of the finite limit rows (-1e4 for -inf), exact zeros at the masked columns. A row that
    starts with a masked tile has a -inf running max after it: the kernel must not form exp(-inf - -inf)."""
    logits = rounded(torch.randn(4, VOCAB, dtype=torch.float64) * 3)
    masked_columns = [list(range(TILE)), list(range(TILE, 2 * TILE)), [0, 5, TILE + 1, VOCAB - 1], []]
    minus_inf = torch.zeros_like(logits, dtype=torch.bool)
    for row, columns in enumerate(masked_columns):
        minus_inf[row, columns] = True
    targets = torch.tensor([TILE + 2, 3, 7, VOCAB - 1])
    scale = torch.randn(4, dtype=torch.float64)
    ref_grad = logits.masked_fill(minus_inf, MASKED)
    ref = torch_epilogues.logprob_epilogue(ref_grad, targets, IGNORE, scale)
    ours = logits.masked_fill(minus_inf, float("-inf")).to(device, torch.float32)
    assert_rows_close(logprob_epilogue(ours.clone(), targets.to(device), IGNORE, None, block_v=TILE), ref, "values only")
    out = logprob_epilogue(ours, targets.to(device), IGNORE, scale.to(device, torch.float32), block_v=TILE)
    assert_rows_close(out, ref, "log-probs")
    assert_rows_close(ours, ref_grad, "in-place gradient")
    assert (ours.cpu()[minus_inf] == 0).all()


def test_kl_epilogue_with_minus_inf_logits(device):
    check_masked_kl(partial(kl_epilogue, block_v=TILE), device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_pytorch_kl_epilogue_with_minus_inf_logits(dtype, device):
    def pytorch(a, b, valid, scale):
        a64, b64 = a.to(dtype), b.to(dtype)
        out = torch_epilogues.kl_epilogue(a64, b64, valid, None if scale is None else scale.to(dtype))
        a.copy_(a64), b.copy_(b64)
        return out.float()

    check_masked_kl(pytorch, device)


@pytest.mark.parametrize("vocab", [1, 7, 4099])
@pytest.mark.parametrize("with_grad", [False, True], ids=["values", "grad"])
def test_kl_epilogue_default_tile(vocab, with_grad, device):
    rows = 4
    a = torch.randn(rows, vocab, dtype=torch.float64) * 3
    b = torch.randn(rows, vocab, dtype=torch.float64) * 3
    a[2, -1] = a[2].max() + 4  # p's max in the last tile, q's in the first
    b[2, 0] = b[2].max() + 4
    valid = torch.tensor([True, False, True, True])
    check_kl(rounded(a), rounded(b), valid, torch.randn(rows).double() if with_grad else None, device)


@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["offset0", "offset1e4"])
@pytest.mark.parametrize("with_grad", [False, True], ids=["values", "grad"])
def test_kl_epilogue_many_tiles(with_grad, offset, device):
    """The maxima of p and of q in different tiles (every pair of tile kinds); both rising, both falling."""
    pairs = [(p, q) for p in PEAKS.values() for q in PEAKS.values() if p != q]
    base_a = torch.randn(len(pairs) + 2, VOCAB, dtype=torch.float64) * 3
    base_b = torch.randn(len(pairs) + 2, VOCAB, dtype=torch.float64) * 3 + base_a / 2  # a moderate KL
    a = cornered(base_a, [p for p, _ in pairs], offset)
    b = cornered(base_b, [q for _, q in pairs], offset)
    valid = torch.ones(len(a), dtype=torch.bool)
    valid[1] = False
    check_kl(a, b, valid, torch.randn(len(a)).double() if with_grad else None, device, TILE)


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_kl_epilogue_error_tracks_the_chunked_backend(scale, device):
    """No cancellation: at logit scales 1, 10, 100 (and with a common offset of 1e4) the float32 KL is within
    1e-5 and within a small multiple of the PyTorch epilogue's own float32 error."""
    rows, vocab = 6, 4099
    a = torch.randn(rows, vocab, dtype=torch.float64) * scale
    b = a + torch.randn(rows, vocab, dtype=torch.float64) * scale / 2
    a[rows // 2:] += 1e4
    b[rows // 2:] += 1e4
    a, b = rounded(a), rounded(b)
    valid = torch.ones(rows, dtype=torch.bool)
    ref = torch_epilogues.kl_epilogue(a.clone(), b.clone(), valid, None)
    chunked = torch_epilogues.kl_epilogue(a.float(), b.float(), valid, None)
    ours = kl_epilogue(a.to(device, torch.float32), b.to(device, torch.float32), valid.to(device), None)
    chunked_error, error = rel_error(chunked, ref), rel_error(ours, ref)
    assert error <= 1e-5 and error <= 4 * chunked_error + 1e-7, f"Triton {error:.1e}, chunked {chunked_error:.1e}"


def test_kernels_are_compiled_on_cuda_and_interpreted_on_cpu(device):
    """The conftest sets TRITON_INTERPRET for a CPU run only, so a CUDA run tests the compiled kernels."""
    assert (os.environ.get("TRITON_INTERPRET") == "1") == (device.type == "cpu")
    modules = {kind.implementations["triton"].split(":")[0] for kind in registry.KINDS.values()
               if "triton" in kind.implementations}
    assert len(modules) >= 3
    for module in modules:
        kernel = f"_{module.rsplit('.', 1)[1]}_kernel"
        jitted = getattr(importlib.import_module(module), kernel)
        assert isinstance(jitted, InterpretedFunction) == (device.type == "cpu"), kernel


def test_launchers_reject_what_the_kernels_cannot_read():
    with pytest.raises(TypeError, match="logits: the Triton epilogue takes float32"):
        logprob_epilogue(torch.randn(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long), -100, None)
    with pytest.raises(ValueError, match="logits: rows must be contiguous"):
        logprob_epilogue(torch.randn(3, 2).T, torch.zeros(2, dtype=torch.long), -100, None)
    with pytest.raises(ValueError, match=r"logits_q: expected shape \(2, 3\)"):
        kl_epilogue(torch.randn(2, 3), torch.randn(2, 4), torch.ones(2, dtype=torch.bool), None)
    with pytest.raises(ValueError, match="block_v: expected a power of two, got 12"):
        logprob_epilogue(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), -100, None, block_v=12)
    with pytest.raises(ValueError, match="block_v: expected a power of two, got 0"):
        kl_epilogue(torch.randn(2, 3), torch.randn(2, 3), torch.ones(2, dtype=torch.bool), None, block_v=0)
