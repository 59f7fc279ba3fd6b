"""The logit transforms ``softcap`` (z -> c tanh(z / c)) and ``logit_scale`` (z -> s z): every public op x fused
backend x transform x head (frozen, frozen with a bias, trainable with a bias) x dtype against the float64
reference, value and every gradient, on inputs where some rows' raw logits lie far beyond the cap (tanh
saturated); the module wrappers; gradcheck; the argument checks."""
import pytest
import torch

import are_fast
from _helpers import FUSED_BACKENDS, OPS, assert_rel_close, make_inputs, representable, run_op
from are_fast.ops import logit_transforms, sweep_precision

# A small cap: most logits (std ~3) lie beyond it, and the amplified rows below lie far beyond it.
TRANSFORMS = {
    "none": {},
    "softcap": dict(softcap=1.0),
    "logit_scale": dict(logit_scale=0.4),
    "both": dict(softcap=1.5, logit_scale=2.5),
}
HEADS = {"frozen": (False, False), "frozen-bias": (False, True), "trainable": (True, False)}


def saturating_inputs():
    """make_inputs, with some rows of both streams amplified 8x: raw logits around +-25, tanh saturated."""
    masters = make_inputs()
    masters["hidden"][0, 3:] *= 8
    masters["hidden_q"][1, 2:] *= 8
    return masters


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", list(OPS))
def test_transformed_op_matches_float64_reference(op, backend, transform, dtype, head, device):
    masters = representable(saturating_inputs(), dtype)
    trainable, frozen_bias = HEADS[head]
    kw = dict(frozen_bias=frozen_bias, **TRANSFORMS[transform])
    ref, upstream, ref_grads = run_op(op, masters, torch.float64, "reference", trainable, **kw)
    # The bf16 sweep rounds each logit to bf16 (as naive bf16 code does): at the amplified rows' uncapped |z| ~ 25
    # that is 0.06 per logit, and the KL's hidden gradient (a difference of two streams' logits) ends 2.3e-2 off.
    # Those cases run the chunk driver's float32 logits; the sweep's transforms: test_online_low_precision.py.
    uncapped_kl = dtype == torch.bfloat16 and op.startswith("conditional_kl") and "softcap" not in kw
    with sweep_precision.use_path("chunk" if uncapped_kl else None):
        out, _, grads = run_op(op, masters, dtype, backend, trainable, upstream=upstream, device=device, chunk_rows=4,
                               **kw)
    assert out.dtype == torch.float32
    assert_rel_close(out, ref, dtype, f"{op} value")
    expected = {name for name, grad in ref_grads.items() if grad is not None}
    assert {name for name, grad in grads.items() if grad is not None} == expected, f"{op}: gradients"
    for name in expected:
        assert_rel_close(grads[name], ref_grads[name], dtype, f"{op} d/d{name}")


def test_module_wrappers_pass_the_transforms(device):
    """CompressionLoss, SequenceLogprobs and ConditionalKL built with softcap / logit_scale give the ops' values."""
    masters = {n: v.to(device, torch.float32) if v.dtype.is_floating_point else v.to(device)
               for n, v in saturating_inputs().items()}
    h, q, w, labels, b = (masters[n] for n in ("hidden", "hidden_q", "weight", "labels", "bias"))
    kw = TRANSFORMS["both"]
    pairs = [
        (are_fast.CompressionLoss(**kw)(h, w, labels, b), are_fast.compression_loss(h, w, labels, b, **kw)),
        (are_fast.SequenceLogprobs(average=True, **kw)(h, w, labels, b),
         are_fast.sequence_logprobs(h, w, labels, b, average=True, **kw)),
        (are_fast.ConditionalKL(reduction="none", **kw)(h, q, w, labels, b),
         are_fast.conditional_kl(h, q, w, labels, b, reduction="none", **kw)),
    ]
    plain = are_fast.compression_loss(h, w, labels, b)
    assert not torch.allclose(pairs[0][0], plain), "the transform changed nothing: the check below proves nothing"
    for module_value, op_value in pairs:
        assert torch.equal(module_value, op_value)


@pytest.mark.parametrize("backend", ["chunked", "online"])
def test_gradcheck_float64_with_transforms(backend, device):
    """Finite differences of every op with both transforms, trainable and frozen head, in float64."""
    masters = {n: v.to(device) for n, v in make_inputs(batch=2, length=5, hidden=6, vocab=11, logit_scale=6.0).items()}
    labels = masters["labels"]
    leaves = [masters[n].clone().requires_grad_() for n in ("hidden", "hidden_q", "weight", "bias")]
    kw = dict(backend=backend, chunk_rows=3, softcap=1.5, logit_scale=2.5)

    def all_ops(hidden, hidden_q, weight, bias):
        return (
            are_fast.token_logprobs(hidden, weight, labels, bias, **kw),
            are_fast.sequence_logprobs(hidden, weight, labels, bias, average=True, **kw),
            are_fast.compression_loss(hidden, weight, labels, bias, **kw),
            are_fast.conditional_kl(hidden, hidden_q, weight, labels, bias, reduction="none", **kw),
        )

    with are_fast.ops.autograd.allow_retain_graph():  # gradcheck runs many backwards per forward
        assert torch.autograd.gradcheck(all_ops, leaves)
        frozen = [leaves[0], leaves[1]]
        assert torch.autograd.gradcheck(lambda h, q: all_ops(h, q, masters["weight"], masters["bias"]), frozen)


def test_derivative_keeps_its_precision_in_saturation():
    """float32 transform and dz'/dz against float64, arguments of tanh from -40 to 40: 1 / cosh^2 keeps its
    relative precision where 1 - tanh^2 would give 0 (float32's tanh rounds to 1 beyond ~9; float64's beyond
    ~19, so the exact derivative is written as s * 4e / (1 + e)^2, e = exp(-2|arg|))."""
    softcap, logit_scale = 1.5, 2.5
    raw = torch.linspace(-24.0, 24.0, 1001, dtype=torch.float64).float()
    capped = raw.clone()
    derivative = logit_transforms.apply_with_derivative_(capped, softcap, logit_scale)
    argument = raw.double() * logit_scale / softcap
    e = torch.exp(-2 * argument.abs())
    exact = logit_scale * 4 * e / (1 + e) ** 2
    assert torch.allclose(capped.double(), softcap * torch.tanh(argument), rtol=1e-6, atol=0)
    relative = ((derivative.double() - exact) / exact).abs().max()
    assert relative < 1e-5, f"relative error {relative:.1e}"
