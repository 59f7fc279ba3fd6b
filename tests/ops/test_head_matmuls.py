"""HeadMatmuls' modes, every branch on any device: the low-precision-operand / float32-output mode ("fp32_out",
CUDA's) runs on CPU through its emulation, with bias, trainable head, out= buffers, gradient outputs in the
operand dtype and the fallbacks; autocast's dtype is followed. Checked against the float64 reference. The
online backend's sweep would take the frozen low-precision heads (tests/ops/test_online_low_precision.py):
here they are sent to the chunk driver (ARE_FAST_LOWP_SWEEP=chunk)."""
import os
from types import SimpleNamespace

import pytest
import torch

import are_fast
from _helpers import FUSED_BACKENDS, assert_rel_close, leaf, rel_error
from are_fast.kernels.kl_epilogue import kl_epilogue
from are_fast.kernels.logprob_epilogue import logprob_epilogue
from are_fast.ops import functional, head_matmuls, torch_epilogues
from are_fast.ops.head_matmuls import HeadMatmuls, use_mode

N, H, V = 22, 24, 301  # 22 rows in chunks of 4: five full chunks and a remainder
IGNORE = -100


@pytest.fixture(autouse=True)
def chunk_driver(monkeypatch):
    monkeypatch.setenv("ARE_FAST_LOWP_SWEEP", "chunk")


@pytest.fixture
def device(request):
    """The device under test: the suite's --device option where it has one, else CUDA when present."""
    name = request.config.getoption("--device", default=None) or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _masters():
    targets = torch.randint(0, V, (N,))
    targets[torch.rand(N) < 0.2] = IGNORE
    return dict(
        hidden=torch.randn(N, H, dtype=torch.float64),
        hidden_q=torch.randn(N, H, dtype=torch.float64),
        weight=torch.randn(V, H, dtype=torch.float64) * 3 / H**0.5,
        bias=torch.randn(V, dtype=torch.float64),
        targets=targets,
    )


def _run(op, masters, dtype, device, trainable, backend, upstream=None, **kwargs):
    """op on dtype copies of the (dtype-representable) masters -> (output, upstream, {name: grad})."""
    args = {n: leaf(v.to(device), dtype, n.startswith("hidden") or trainable) for n, v in masters.items() if n != "targets"}
    targets = masters["targets"].to(device)
    if op == "token_logprobs":
        out = are_fast.token_logprobs(args["hidden"], args["weight"], targets, args["bias"], backend=backend, **kwargs)
    else:  # conditional_kl over [1, N, H] sequences; every position but the last is a target
        labels = torch.zeros(1, N, dtype=torch.long, device=device)
        hp, hq = args["hidden"].unsqueeze(0), args["hidden_q"].unsqueeze(0)
        out = are_fast.conditional_kl(hp, hq, args["weight"], labels, args["bias"], reduction="none", backend=backend, **kwargs)
    if upstream is None:
        upstream = torch.randn(out.shape, dtype=torch.float64)
    (out.double() * upstream.to(device)).sum().backward()
    grads = {n: t.grad for n, t in args.items() if t.requires_grad and (op != "token_logprobs" or n != "hidden_q")}
    return out, upstream, grads


def _representable(masters, dtype):
    return {n: v.to(dtype).double() if v.dtype.is_floating_point else v for n, v in masters.items()}


def _check_against_reference(op, backend, device, trainable, dtype=torch.bfloat16, forced="fp32_out", **transform):
    masters = _representable(_masters(), dtype)
    ref, upstream, ref_grads = _run(op, masters, torch.float64, "cpu", trainable, "reference", **transform)
    with use_mode(forced) as made:
        out, _, grads = _run(op, masters, dtype, device, trainable, backend, upstream, chunk_rows=4, **transform)
    assert out.dtype == torch.float32
    assert_rel_close(out.cpu(), ref, dtype, f"{op} value")
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert grad.dtype == dtype, f"{name} gradient dtype"
        assert_rel_close(grad.cpu(), ref_grads[name], dtype, f"{op} d{name}")
    return made


TRANSFORMS = {"plain": {}, "softcap+scale": dict(softcap=1.5, logit_scale=2.5)}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("head", ["frozen", "trainable"])
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", ["token_logprobs", "conditional_kl"])
def test_fp32_out_mode_matches_float64(op, backend, head, transform, device):
    """bf16 head with bias in fp32_out mode (emulated where the device has no float32-output matmul), with and
    without the logit transforms."""
    made = _check_against_reference(op, backend, device, head == "trainable", **TRANSFORMS[transform])
    has_it = head_matmuls.fp32_out_support(device, torch.bfloat16)["mm"]
    assert made and all(m.mode == "fp32_out" and m.emulated == (not has_it) for m in made)
    assert all(m.grad_dtype == torch.bfloat16 for m in made)


@pytest.mark.parametrize("missing", ["mm_out", "addmm_inplace"])
def test_fp32_out_fallbacks(missing, monkeypatch):
    """Where PyTorch's float32-output matmul takes no out= (a fresh product per chunk) or its addmm takes no
    float32 accumulator (one scratch per pass), the results are the same."""
    monkeypatch.setitem(head_matmuls.EMULATED_SUPPORT, missing, False)
    made = _check_against_reference("token_logprobs", "chunked", torch.device("cpu"), trainable=True)
    assert all(m.emulated and not m._support[missing] for m in made)


@pytest.mark.parametrize("forced", [None, "upcast"])
def test_other_modes_of_a_bf16_head(forced):
    made = _check_against_reference("token_logprobs", "chunked", torch.device("cpu"), True, forced=forced)
    automatic = "fp32_out" if head_matmuls.fp32_out_support(torch.device("cpu"), torch.bfloat16)["mm"] else "upcast"
    assert [m.mode for m in made] == [forced or automatic] * len(made)
    assert not any(m.emulated for m in made)


def test_full_precision_heads_ignore_the_forced_mode():
    with use_mode("fp32_out") as made:
        HeadMatmuls(torch.randn(5, 3), None)
        HeadMatmuls(torch.randn(5, 3, dtype=torch.float64), None)
    assert [(m.mode, m.compute_dtype) for m in made] == [("same", torch.float32), ("same", torch.float64)]


def test_bad_modes_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="mode: expected None or one of fp32_out, upcast"):
        with use_mode("fast"):
            pass
    monkeypatch.setenv("ARE_FAST_HEAD_MATMULS", "bf16")
    with pytest.raises(ValueError, match="ARE_FAST_HEAD_MATMULS: expected auto or one of fp32_out, upcast"):
        HeadMatmuls(torch.randn(5, 3).bfloat16(), None)
    monkeypatch.setenv("ARE_FAST_HEAD_MATMULS", "upcast")
    assert HeadMatmuls(torch.randn(5, 3).bfloat16(), None).mode == "upcast"
    with pytest.raises(ValueError, match="operand_dtype: a torch.bfloat16 head cannot run its matmuls in torch.float16"):
        HeadMatmuls(torch.randn(5, 3).bfloat16(), None, torch.float16)


@pytest.mark.parametrize("mode", ["fp32_out", "upcast"])
def test_logits_land_in_the_chunk_buffer(mode, device):
    """One buffer per stream: the logits are written into ``out`` (bias included), and the gradient view of
    fp32_out aliases the same bytes."""
    weight, bias = torch.randn(V, H, device=device).bfloat16(), torch.randn(V, device=device).bfloat16()
    hidden = torch.randn(N, H, device=device).bfloat16()
    with use_mode(mode):
        matmuls = HeadMatmuls(weight, bias)
    buffer = torch.empty(N + 3, V, device=device)
    logits = matmuls.logits(hidden, buffer[:N])
    assert logits.data_ptr() == buffer.data_ptr() and logits.shape == (N, V)
    expected = hidden.double() @ weight.double().T + bias.double()
    assert rel_error(logits, expected) <= 1e-6
    grad = matmuls.gradient_out(logits)
    if mode == "upcast":
        assert grad is None
    else:
        assert grad.dtype == torch.bfloat16 and grad.shape == (N, V) and grad.stride() == (2 * V, 1)
        assert grad.data_ptr() == buffer.data_ptr()


def _bf16_rounding_of(view: torch.Tensor, gradient: torch.Tensor) -> bool:
    return view.dtype == torch.bfloat16 and torch.allclose(view.float(), gradient, rtol=2**-7, atol=0)


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("vocab", [301, 9000])  # one tile; several 4096-wide tiles (the aliasing hazard)
@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_epilogues_write_the_gradient_into_an_aliasing_bf16_view(impl, vocab, transform, device):
    """Each epilogue, given HeadMatmuls.gradient_out's bf16 view of its own logits rows, writes there the
    gradient it would write in place in float32, rounded to bf16; the values are unchanged. With the logit
    transforms the derivative is formed from each logit before its bytes are overwritten."""
    kw = TRANSFORMS[transform]
    if impl == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton kernels run on CUDA or under TRITON_INTERPRET=1")
    epilogues = SimpleNamespace(logprob_epilogue=logprob_epilogue, kl_epilogue=kl_epilogue) if impl == "triton" else torch_epilogues
    rows = 5
    if device.type == "cuda":  # llama3-size rows, and many: where a missing barrier would show as a race
        rows, vocab = 257, vocab * 15
    logits_p, logits_q = (3 * torch.randn(rows, vocab, device=device) for _ in range(2))
    targets = torch.randint(0, vocab, (rows,), device=device)
    valid = torch.rand(rows, device=device) < 0.8
    scale = torch.randn(rows, device=device)
    with use_mode("fp32_out"):
        matmuls = HeadMatmuls(torch.zeros(1, 1, dtype=torch.bfloat16, device=device), None)

    # Reference: the same epilogue writing its float32 gradient in place; the view must hold that, rounded to
    # bf16 (within one bf16 step: Triton's interpreter truncates where the GPU rounds to nearest), and the
    # values must not change.
    ref = logits_p.clone()
    ref_value = epilogues.logprob_epilogue(ref, targets, IGNORE, scale, **kw)
    ours = logits_p.clone()
    value = epilogues.logprob_epilogue(ours, targets, IGNORE, scale, matmuls.gradient_out(ours), **kw)
    assert torch.equal(value, ref_value)
    assert _bf16_rounding_of(matmuls.gradient_out(ours), ref)

    ref_p, ref_q = logits_p.clone(), logits_q.clone()
    ref_kl = epilogues.kl_epilogue(ref_p, ref_q, valid, scale, **kw)
    ours_p, ours_q = logits_p.clone(), logits_q.clone()
    views = [matmuls.gradient_out(t) for t in (ours_p, ours_q)]
    kl = epilogues.kl_epilogue(ours_p, ours_q, valid, scale, *views, **kw)
    assert torch.equal(kl, ref_kl)
    for view, expected in zip(views, (ref_p, ref_q)):
        assert _bf16_rounding_of(view, expected)


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_native_epilogues_fill_a_gradient_output(transform):
    from are_fast.ops import native

    if not native.library.load(build=True):
        pytest.skip(f"the native library is unavailable here: {native.library.reason}")
    logits = 3 * torch.randn(4, 301)
    targets, scale = torch.randint(0, 301, (4,)), torch.randn(4)
    ref = logits.clone()
    torch_epilogues.logprob_epilogue(ref, targets, IGNORE, scale, **TRANSFORMS[transform])
    grad_out = logits.view(torch.bfloat16)[:, :301]
    native.epilogues().logprob(logits, targets, IGNORE, scale, grad_out, **TRANSFORMS[transform])
    assert _bf16_rounding_of(grad_out, ref)


@pytest.mark.parametrize(
    ("op", "head", "forced", "no_out"),
    [(op, head, None, False) for op in ("token_logprobs", "conditional_kl") for head in ("frozen", "trainable")]
    + [("token_logprobs", head, "fp32_out", no_out) for head in ("frozen", "trainable") for no_out in (False, True)]
    + [("conditional_kl", "trainable", "fp32_out", no_out) for no_out in (False, True)],
)
def test_autocast_runs_the_head_in_its_dtype(op, head, forced, no_out, device, monkeypatch):
    """A float32 head under bf16 autocast: bf16 operands, float32 accumulation and statistics; the gradients
    come back in float32. Within bf16 tolerance of float64, and recorded as such. Forced fp32_out runs the
    float32-output products into float32 hidden gradients (no_out: where they take no out=)."""
    if no_out:
        monkeypatch.setitem(head_matmuls.EMULATED_SUPPORT, "mm_out", False)
    masters = _masters()  # not bf16-representable: autocast's rounding is part of what is checked
    trainable = head == "trainable"
    ref, upstream, ref_grads = _run(op, masters, torch.float64, "cpu", trainable, "reference")
    with use_mode(forced) as made, torch.autocast(device.type, dtype=torch.bfloat16):
        out, _, grads = _run(op, masters, torch.float32, device, trainable, None, upstream, chunk_rows=4)
    assert made and all(m.operand_dtype == torch.bfloat16 and m.mode == (forced or m.mode) != "same" for m in made)
    assert out.dtype == torch.float32
    assert_rel_close(out.cpu(), ref, torch.bfloat16, "value")
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        assert_rel_close(grad.cpu(), ref_grads[name], torch.bfloat16, f"d{name}")
    # Without autocast the same float32 call runs float32 matmuls.
    with use_mode() as made:
        out32, _, _ = _run(op, masters, torch.float32, device, trainable, None, upstream, chunk_rows=4)
    assert [m.mode for m in made] == ["same"] * len(made)
    assert_rel_close(out32.cpu(), ref, torch.float32, "value without autocast")


def test_triton_launchers_reject_gradient_outputs_they_cannot_write():
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("the Triton kernels run on CUDA or under TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits, targets = torch.randn(4, 10, device=device), torch.zeros(4, dtype=torch.long, device=device)
    scale, valid = torch.ones(4, device=device), torch.ones(4, dtype=torch.bool, device=device)
    with pytest.raises(TypeError, match="grad_out: expected a float gradient output, got torch.int32"):
        logprob_epilogue(logits, targets, IGNORE, scale, torch.zeros(4, 10, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"grad_out: expected shape \(4, 10\) with contiguous rows"):
        logprob_epilogue(logits, targets, IGNORE, scale, torch.zeros(10, 4, device=device).T)
    with pytest.raises(ValueError, match=r"grad_out_q: expected shape \(4, 10\)"):
        kl_epilogue(logits, logits.clone(), valid, scale, None, torch.zeros(4, 9, device=device))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("op", ["conditional_kl", "conditional_jsd"])
@pytest.mark.parametrize("apart", [0.3, 0.01])
@pytest.mark.parametrize("compact", [False, True], ids=["all-rows", "compacted"])
@pytest.mark.parametrize("streams", ["both", "p", "q"], ids=lambda s: f"grad-{s}")
def test_pair_weight_gradient_of_close_streams(streams, compact, apart, op, backend, device, monkeypatch):
    """A trainable head's weight gradient over two streams, sum_s g_s^T h_s, nearly cancels when the streams
    agree (g_q ~ -g_p, h_q ~ h_p: each term O(d), the sum O(d^2) for streams d apart). In fp32_out mode the
    gradients over the logits are bf16: rounded one by one, each term's rounding (2^-9 of O(d)) would swamp
    the sum (0.11 relative error at d = 0.01), so the driver forms it as s^T h_q + g_p^T (h_p - h_q), s = g_p + g_q
    summed in float32. Within bf16 tolerance of float64 on bf16-rounded inputs, also at 1% apart; with ignored
    rows left out of the matmuls (compaction, the CPU default) and with every row in them (CUDA's without label
    checks); with the hidden gradients of both streams, or of one (the other detached, as a teacher's)."""
    monkeypatch.setattr(functional, "_compact", lambda device: compact)
    generator = torch.Generator().manual_seed(0)
    n, h, v = 24, 16, 301
    hidden_p = torch.randn(1, n, h, generator=generator).bfloat16().double()
    hidden_q = (hidden_p + apart * torch.randn(1, n, h, generator=generator)).bfloat16().double()
    weight = (3 * torch.randn(v, h, generator=generator) / h**0.5).bfloat16().double()
    labels = torch.zeros(1, n, dtype=torch.long)
    labels[0, -3:] = IGNORE
    upstream = torch.randn(1, n, dtype=torch.float64, generator=generator)

    def gradients(dtype, backend, dev, **kw):
        p, q = (leaf(t.to(dev), dtype, streams in ("both", name)) for t, name in ((hidden_p, "p"), (hidden_q, "q")))
        w = leaf(weight.to(dev), dtype, True)
        out = getattr(are_fast, op)(p, q, w, labels.to(dev), reduction="none", backend=backend, **kw)
        (out.double() * upstream.to(dev)).sum().backward()
        return {name: t.grad for name, t in (("hidden_p", p), ("hidden_q", q), ("weight", w)) if t.requires_grad}

    ref = gradients(torch.float64, "reference", "cpu")
    with use_mode("fp32_out") as made:
        ours = gradients(torch.bfloat16, backend, device, chunk_rows=8)
    assert made and all(m.mode == "fp32_out" for m in made)
    assert set(ours) == set(ref) == {"weight"} | {f"hidden_{s}" for s in "pq" if streams in ("both", s)}
    for name, grad in ours.items():
        assert_rel_close(grad.cpu(), ref[name], torch.bfloat16, f"{op} d{name}, streams {apart} apart")
