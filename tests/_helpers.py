"""Shared test helpers: tolerances, the float64 oracle, and the backends runnable here."""
import torch

import are_fast

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float64: 1e-10}
FUSED_BACKENDS = [b for b in are_fast.BACKENDS if b != "reference"]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error ||out - ref|| / ||ref||, in float64 on CPU (either may live on any device); NaN
    anywhere gives inf."""
    out, ref = out.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if not torch.isfinite(out).all() or not torch.isfinite(ref).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def assert_rel_close(out, ref, dtype, what=""):
    err = rel_error(out, ref)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e}"


def leaf(tensor: torch.Tensor, dtype, requires_grad: bool, device="cpu") -> torch.Tensor:
    """A fresh leaf: tensor as dtype on device."""
    return tensor.detach().to(device, dtype, copy=True).requires_grad_(requires_grad)
