"""Every public op x fused backend x dtype x head mode against the float64 reference, value and every gradient.

The ops run on the device under test (``--device``, see tests/conftest.py); the float64 oracle runs on CPU on the
same (rounded) inputs, and results are compared on CPU."""
import pytest
import torch

import are_fast
from _helpers import (
    FUSED_BACKENDS, IGNORE_INDEX, OPS, PAIR_OPS, assert_rel_close, leaf, make_inputs, representable, run_op,
)

@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
def test_conditional_kl_over_a_masked_vocabulary(backend, device):
    """A bias of -inf masks vocabulary entries in both streams (some scattered, one run of 40): p = 0 there adds
    nothing, so the KL and every gradient equal the limit of a bias of -1e4 (float64 reference), not NaN from
    0 * (-inf - -inf)."""
    masters = representable(make_inputs(), torch.float32)
    masked = [0, 5, 17, len(masters["bias"]) - 1, *range(100, 140)]
    limit = dict(masters, bias=masters["bias"].index_fill(0, torch.tensor(masked), -1e4))
    masters["bias"] = masters["bias"].index_fill(0, torch.tensor(masked), float("-inf"))
    ref, upstream, ref_grads = run_op("conditional_kl-none", limit, torch.float64, "reference", True)
    dtype = torch.float64 if backend == "reference" else torch.float32
    out, _, grads = run_op("conditional_kl-none", masters, dtype, backend, True, upstream=upstream,
                           device=device, chunk_rows=4)
    assert_rel_close(out, ref, torch.float32, "KL")
    for name, ref_grad in ref_grads.items():
        assert_rel_close(grads[name], ref_grad, torch.float32, f"d/d{name}")
    assert (grads["bias"].cpu()[masked] == 0).all()


@pytest.mark.parametrize("head", ["frozen", "trainable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_op_matches_float64_reference(op, backend, dtype, head, device):
    masters = representable(make_inputs(), dtype)
    trainable = head == "trainable"
    ref, upstream, ref_grads = run_op(op, masters, torch.float64, "reference", trainable)
    out, _, grads = run_op(op, masters, dtype, backend, trainable, upstream=upstream, device=device, chunk_rows=4)
    assert out.device.type == device.type
    assert out.dtype == torch.float32
    assert_rel_close(out, ref, dtype, f"{op} value")
    used = {"hidden", "weight"} | ({"bias"} if trainable else set()) | ({"hidden_q"} if op in PAIR_OPS else set())
    for name in used & ref_grads.keys():
        assert grads[name] is not None, f"{op}: no gradient for {name}"
        assert_rel_close(grads[name], ref_grads[name], dtype, f"{op} d/d{name}")
    if not trainable:
        assert "weight" not in grads  # a frozen head gets no gradient and no weight-gradient work


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_default_chunking_matches_reference(backend, device):
    masters = make_inputs(batch=2, length=40, vocab=1000)
    ref, upstream, ref_grads = run_op("sequence_logprobs-sum", masters, torch.float64, "reference", False)
    out, _, grads = run_op("sequence_logprobs-sum", masters, torch.float32, backend, False, upstream=upstream,
                           device=device)
    assert_rel_close(out, ref, torch.float32, "value")
    assert_rel_close(grads["hidden"], ref_grads["hidden"], torch.float32, "d/dhidden")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_forward_only_under_inference_mode(backend, device):
    """Detached streams (reference scores) run forward only and still match."""
    masters = make_inputs()
    ref = are_fast.sequence_logprobs(masters["hidden"], masters["weight"], masters["labels"], backend="reference")
    with torch.inference_mode():
        out = are_fast.sequence_logprobs(
            masters["hidden"].to(device, torch.float32), masters["weight"].to(device, torch.float32),
            masters["labels"].to(device), backend=backend
        )
    assert not out.requires_grad
    assert_rel_close(out, ref, torch.float32, "value")


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_extreme_logits_fp32(backend, device):
    """Logits of magnitude ~1e4 in fp32: finite and exact (no overflow in exp, no cancellation in lse)."""
    masters = make_inputs(logit_scale=1e4 / 3)
    for op in ("sequence_logprobs-sum", "conditional_kl-sum"):
        ref, upstream, ref_grads = run_op(op, masters, torch.float64, "reference", False)
        assert ref.abs().max() > 1e3
        out, _, grads = run_op(op, masters, torch.float32, backend, False, upstream=upstream, device=device,
                               chunk_rows=4)
        assert_rel_close(out, ref, torch.float32, f"{op} value")
        assert torch.isfinite(grads["hidden"]).all()


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
def test_sequences_without_targets_give_zero(backend, device):
    masters = make_inputs()
    masters["labels"][1] = IGNORE_INDEX
    for op in ("sequence_logprobs-sum", "sequence_logprobs-mean", "conditional_kl-sum", "conditional_kl-mean"):
        out, _, grads = run_op(op, masters, torch.float32, backend, True, device=device)
        assert torch.isfinite(out).all() and out[1] == 0, op
        assert torch.isfinite(grads["hidden"]).all() and (grads["hidden"][1] == 0).all(), op
        assert torch.isfinite(grads["weight"]).all(), op
    masters["labels"][:] = IGNORE_INDEX
    loss, _, grads = run_op("compression_loss", masters, torch.float32, backend, True, device=device)
    assert loss.item() == 0 and (grads["hidden"] == 0).all()


@pytest.mark.parametrize("backend", FUSED_BACKENDS + ["reference"])
def test_single_row_and_empty_batch(backend, device):
    masters = make_inputs()
    hidden = masters["hidden"][0, :1].float()  # N = 1
    target = masters["labels"][0, -1:].clamp(min=0)
    ref = are_fast.token_logprobs(hidden.double(), masters["weight"], target, backend="reference")
    out = are_fast.token_logprobs(leaf(hidden, torch.float32, True, device),
                                  masters["weight"].to(device, torch.float32), target.to(device), backend=backend)
    assert_rel_close(out, ref, torch.float32, "N=1")
    empty = make_inputs(batch=0)
    for op in OPS:
        out, _, grads = run_op(op, empty, torch.float32, backend, True, device=device)
        assert torch.isfinite(out).all() and out.numel() in (0, 1), op
        if out.numel() == 1:
            assert out.item() == 0, op
        assert grads["hidden"].shape == empty["hidden"].shape, op


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_non_contiguous_inputs(backend, device):
    masters = make_inputs()
    ref, upstream, ref_grads = run_op("conditional_kl-none", masters, torch.float64, "reference", True)
    on_device = {n: v.to(device, torch.float32 if v.dtype.is_floating_point else v.dtype) for n, v in masters.items()}
    args = {
        # Same values, transposed storage.
        "hidden": on_device["hidden"].transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(),
        "hidden_q": on_device["hidden_q"].transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(),
        "weight": on_device["weight"].T.contiguous().T.requires_grad_(),
        "bias": on_device["bias"].requires_grad_(),
        "labels": on_device["labels"].T.contiguous().T,
    }
    assert not args["hidden"].is_contiguous() and not args["weight"].is_contiguous()
    out = OPS["conditional_kl-none"](args, backend=backend, chunk_rows=4)
    (out.double() * upstream.to(device)).sum().backward()
    assert_rel_close(out, ref, torch.float32, "value")
    for name in ("hidden", "hidden_q", "weight", "bias"):
        assert_rel_close(args[name].grad, ref_grads[name], torch.float32, f"d/d{name}")


def test_chunked_gradcheck_float64(device):
    masters = {n: v.to(device) for n, v in make_inputs(batch=2, length=5, hidden=6, vocab=11).items()}
    labels = masters["labels"]
    leaves = [masters[n].clone().requires_grad_() for n in ("hidden", "hidden_q", "weight", "bias")]

    def all_ops(hidden, hidden_q, weight, bias):
        return (
            are_fast.token_logprobs(hidden, weight, labels, bias, backend="chunked", chunk_rows=3),
            are_fast.sequence_logprobs(hidden, weight, labels, bias, average=True, backend="chunked", chunk_rows=3),
            are_fast.compression_loss(hidden, weight, labels, bias, backend="chunked", chunk_rows=3),
            are_fast.conditional_kl(hidden, hidden_q, weight, labels, bias, reduction="none", backend="chunked", chunk_rows=3),
        )

    with are_fast.ops.autograd.allow_retain_graph():  # gradcheck runs many backwards per forward
        assert torch.autograd.gradcheck(all_ops, leaves)
        frozen = [leaves[0], leaves[1]]  # the frozen-head path computes the hidden gradient in the forward
        assert torch.autograd.gradcheck(lambda h, q: all_ops(h, q, masters["weight"], masters["bias"]), frozen)


def test_allocations_are_poisoned_on_the_device(device):
    """The conftest's NaN poisoning reaches the device under test: an output element an op forgets fails."""
    assert torch.isnan(torch.empty(3, device=device)).all()
    assert torch.isnan(torch.empty_like(torch.zeros(2, 2, device=device))).all()


def test_alignment_loss_matches_formula_transcription(device):
    b, n = 4, 3
    inputs = [torch.randn(b, dtype=torch.float64) * 20, torch.randn(b, dtype=torch.float64) * 20,
              torch.randn(b, n, dtype=torch.float64) * 20, torch.randn(b, dtype=torch.float64) * 20,
              torch.randn(b, n, dtype=torch.float64) * 20, torch.rand(b, dtype=torch.float64)]
    for ref_sign in (1.0, -1.0):
        for use_distance in (False, True):
            leaves = [x.to(device, copy=True).requires_grad_() for x in inputs]
            distance = leaves[5] if use_distance else None
            kwargs = dict(beta=0.3, tau=0.07, ref_sign=ref_sign, distance=distance)
            ours = are_fast.alignment_loss(*leaves[:5], **kwargs)
            ours.backward()
            ours_grads = [x.grad for x in leaves]
            leaves_ref = [x.clone().requires_grad_() for x in inputs]
            kwargs["distance"] = leaves_ref[5] if use_distance else None
            ref = are_fast.ops.reference.alignment_loss(*leaves_ref[:5], **kwargs)
            ref.backward()
            assert_rel_close(ours, ref, torch.float64, "loss")
            for g, r in zip(ours_grads, (x.grad for x in leaves_ref)):
                if r is None:
                    assert g is None
                else:
                    assert_rel_close(g, r, torch.float64, "grad")
    # The softplus form is finite where the exp form overflows (s / tau with tiny tau).
    loud = are_fast.alignment_loss(*[x.to(device) for x in inputs[:5]], tau=1e-4)
    assert torch.isfinite(loud)


def test_alignment_loss_empty_batch_is_zero(device):
    one, two = torch.zeros(0, device=device), torch.zeros(0, 2, device=device)
    loss = are_fast.alignment_loss(one, one, two, one, two)
    assert loss.item() == 0


def test_no_host_sync_in_fused_path():
    """With label checks off the chunked path runs on meta tensors, which refuse any read of their values."""
    are_fast.set_label_checks(False)
    try:
        hidden = torch.empty(2, 5, 8, device="meta", requires_grad=True)
        hidden_q = torch.empty(2, 5, 8, device="meta", requires_grad=True)
        weight = torch.empty(13, 8, device="meta")
        labels = torch.empty(2, 5, dtype=torch.long, device="meta")
        loss = are_fast.compression_loss(hidden, weight, labels, backend="chunked")
        loss = loss + are_fast.conditional_kl(hidden, hidden_q, weight, labels, backend="chunked").sum()
        loss.backward()
        assert hidden.grad.shape == hidden.shape
    finally:
        are_fast.set_label_checks(True)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_out_of_range_label_gives_nan_when_checks_are_off(backend, device):
    masters = make_inputs()
    masters["labels"][0, 4] = masters["weight"].shape[0] + 7
    are_fast.set_label_checks(False)
    try:
        out = are_fast.sequence_logprobs(masters["hidden"].to(device, torch.float32),
                                         masters["weight"].to(device, torch.float32), masters["labels"].to(device),
                                         backend=backend)
    finally:
        are_fast.set_label_checks(True)
    assert torch.isnan(out[0]) and torch.isfinite(out[1:]).all()


def test_works_inside_torch_compile(device):
    masters = make_inputs()
    hidden = leaf(masters["hidden"], torch.float32, True, device)
    weight = masters["weight"].to(device, torch.float32)
    labels = masters["labels"].to(device)

    @torch.compile(backend="eager")
    def step(h):
        return are_fast.compression_loss(h * 2, weight, labels) + 1

    loss = step(hidden)
    loss.backward()
    ref = are_fast.compression_loss(masters["hidden"].float().double() * 2, masters["weight"].float().double(),
                                    masters["labels"], backend="reference") + 1
    assert_rel_close(loss, ref, torch.float32, "compiled loss")
    assert torch.isfinite(hidden.grad).all()
