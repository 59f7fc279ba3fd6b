"""The logit transforms ``softcap`` (z -> c tanh(z / c)) and ``logit_scale`` (z -> s z): every public op x fused
backend x transform x head (frozen, frozen with a bias, trainable with a bias) x dtype against the float64
reference, value and every gradient, on inputs where some rows' raw logits lie far beyond the cap (tanh
saturated); the module wrappers; gradcheck; the argument checks."""
import pytest
import torch

import are_fast
from _helpers import FUSED_BACKENDS, OPS, assert_rel_close, make_inputs, representable, run_op
from are_fast.ops import logit_transforms

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
    out, _, grads = run_op(op, masters, dtype, backend, trainable, upstream=upstream, device=device, chunk_rows=4, **kw)
    assert out.dtype == torch.float32
    assert_rel_close(out, ref, dtype, f"{op} value")
    expected = {name for name, grad in ref_grads.items() if grad is not None}
    assert {name for name, grad in grads.items() if grad is not None} == expected, f"{op}: gradients"
    for name in expected:
        assert_rel_close(grads[name], ref_grads[name], dtype, f"{op} d/d{name}")
