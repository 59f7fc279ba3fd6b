"""The native epilogues of csrc/ (are_fast.ops.native): against the float64 PyTorch epilogues and the float64
reference ops, and their input checks (building and loading them: test_native_build.py). The first test run
builds the library (10-30 s) unless it is cached.

The epilogue tests run the C++ CPU epilogues always and the CUDA ones (csrc/epilogues_cuda.cu) when the run's
device is cuda (``--device``); the ops tests run on the run's device."""
import functools
import itertools
from types import SimpleNamespace

import pytest
import torch

from _helpers import (OPS, TOLERANCE, assert_rel_close, assert_rows_close, check_masked_kl, cornered, make_inputs,
                      masked_kl_rows, rel_error, run_op)
from are_fast.ops import native, registry, torch_epilogues

IGNORE = -100
VOCABS = [1, 7, 1000, 1024, 1025, 3001]  # one element, under a vector, around the 1024-element tile, ragged
CPU_TILE = 1024  # the C++ epilogues' tile (kTile in csrc/epilogues.cpp)
PARAM_VALUES = {"beta": (0.1, 0.5, 0.9)}  # the values each float parameter of a kind is tested at


def _pair_cases() -> dict:
    """id -> (kind, its parameters) for every two-stream kind with a native epilogue, once per parameter value."""
    cases = {}
    for name, spec in registry.KINDS.items():
        if spec.streams == 2 and "native" in spec.implementations:
            for values in itertools.product(*(PARAM_VALUES[p] for p in spec.params)):
                params = dict(zip(spec.params, values))
                cases["-".join([name, *(f"{p}{v}" for p, v in params.items())])] = (name, params)
    return cases


PAIR_CASES = _pair_cases()


@pytest.fixture(params=["cpu", "cuda"])
def kernels_on(request, ops, device):
    """Where the epilogues under test run: the C++ ones on "cpu", the CUDA ones on "cuda" (only in a --device
    cuda run, where a library without its CUDA kernels fails)."""
    if request.param == "cuda":
        if device.type != "cuda":
            pytest.skip("the CUDA epilogues (csrc/epilogues_cuda.cu) run only with --device cuda; this run is on cpu")
        if not native.library.cuda:
            pytest.fail(f"the native library at {native.library.path} was built without its CUDA kernels")
    return request.param


@pytest.fixture(params=list(PAIR_CASES))
def pair(request, ops):
    """A two-stream kind: its native epilogue and its PyTorch one (the oracle, run in float64), parameters bound."""
    name, params = PAIR_CASES[request.param]
    return SimpleNamespace(name=name, native=functools.partial(getattr(ops, name), **params),
                           torch=functools.partial(registry.load(registry.kind(name).implementations["torch"]), **params))


def assert_matches(out, ref, dtype, what):
    """Same NaN positions, and the rest within the dtype's tolerance."""
    out = out.cpu()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan), f"{what}: NaN at {torch.isnan(out).nonzero().flatten().tolist()}"
    assert_rel_close(out[~nan], ref[~nan], dtype, what)


def assert_pair_values(out, ref, dtype, what, vocab):
    """assert_matches; with one vocabulary entry P = Q, the exact KL and JSD are 0 and their rounding (the JSD's
    H(beta) - beta sum p s - ...) only has an absolute size: then within the tolerance absolutely."""
    if vocab > 1:
        assert_matches(out, ref, dtype, what)
    else:
        torch.testing.assert_close(out.cpu().double(), ref, rtol=0, atol=TOLERANCE[dtype], msg=what)


def logprob_case(rows, vocab, magnitude):
    """float64 logits, targets with ignored rows and two out-of-range ones, signed scales (one zero)."""
    logits = torch.randn(rows, vocab, dtype=torch.float64) * magnitude
    targets = torch.randint(0, vocab, (rows,))
    targets[::5] = IGNORE
    targets[1], targets[2] = vocab, -1  # outside [0, V) and not ignore_index: NaN
    scale = torch.randn(rows).double()  # float32 values, so passing the scale as float32 loses nothing
    scale[3] = 0.0
    return logits, targets, scale


@pytest.mark.parametrize("magnitude", [3.0, 1e4], ids=["logits3", "logits1e4"])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_logprob_epilogue_matches_float64(ops, dtype, vocab, magnitude, kernels_on):
    logits, targets, scale = logprob_case(37, vocab, magnitude)
    logits = logits.to(dtype).double()  # the oracle sees exactly the values the kernel sees
    ref_grad = logits.clone()
    ref = torch_epilogues.logprob_epilogue(ref_grad, targets, IGNORE, scale)
    values_only = logits.to(kernels_on, dtype, copy=True)
    assert_matches(ops.logprob(values_only, targets.to(kernels_on), IGNORE, None), ref, dtype, "values, no gradient")
    assert torch.equal(values_only.cpu().double(), logits), "logits changed without grad_scale"
    grad = logits.to(kernels_on, dtype, copy=True)
    out = ops.logprob(grad, targets.to(kernels_on), IGNORE, scale.to(kernels_on, torch.float32))
    assert out.dtype == dtype
    assert_matches(out, ref, dtype, "values")
    assert_rel_close(grad.cpu(), ref_grad, dtype, "gradient")  # at 1e4 too: x - lse is formed as (x - max) - log sum
    assert (grad.cpu()[targets == IGNORE] == 0).all() and (grad[1:3] == 0).all()


@pytest.mark.parametrize("magnitude", [3.0, 1e4], ids=["logits3", "logits1e4"])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_pair_epilogue_matches_float64(pair, dtype, vocab, magnitude, kernels_on):
    rows = 37
    p = (torch.randn(rows, vocab, dtype=torch.float64) * magnitude).to(dtype).double()
    q = (p + torch.randn(rows, vocab, dtype=torch.float64) * magnitude / 3).to(dtype).double()
    valid = torch.rand(rows) > 0.25
    scale = torch.randn(rows).double()
    ref_p, ref_q = p.clone(), q.clone()
    ref = pair.torch(ref_p, ref_q, valid, scale)
    values_p, values_q = p.to(kernels_on, dtype, copy=True), q.to(kernels_on, dtype, copy=True)
    assert_pair_values(pair.native(values_p, values_q, valid.to(kernels_on), None), ref, dtype, "values only", vocab)
    assert torch.equal(values_p.cpu().double(), p) and torch.equal(values_q.cpu().double(), q), "logits changed"
    grad_p, grad_q = p.to(kernels_on, dtype, copy=True), q.to(kernels_on, dtype, copy=True)
    out = pair.native(grad_p, grad_q, valid.to(kernels_on), scale.to(kernels_on))
    assert out.dtype == dtype
    assert_pair_values(out, ref, dtype, "values", vocab)
    for name, ours, expected in (("d/dlogits_p", grad_p, ref_p), ("d/dlogits_q", grad_q, ref_q)):
        if magnitude < 1e3 or expected.abs().max() > 1e-6:
            assert_rel_close(ours.cpu(), expected, dtype, name)
        else:  # one-hot streams (logits 1e4): the exact gradient vanishes and any formula returns rounding noise
            assert torch.isfinite(ours).all(), name
    assert (grad_p.cpu()[~valid] == 0).all() and (grad_q.cpu()[~valid] == 0).all()


TRANSFORMS = {"softcap": dict(softcap=2.0), "logit_scale": dict(logit_scale=0.7), "both": dict(softcap=3.0, logit_scale=2.0)}


def transformed_case(vocab, dtype):
    """logprob_case's rows at magnitude 3, a third of them 10x larger (beyond the caps), as dtype values."""
    logits, targets, scale = logprob_case(37, vocab, 3.0)
    logits[::3] *= 10
    return logits.to(dtype).double(), targets, scale


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("vocab", [7, 1025, 3001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_logprob_epilogue_with_logit_transforms(ops, dtype, vocab, transform, kernels_on):
    """The transforms (logit_transform.h: the CPU and the CUDA code share it) against the float64 PyTorch
    epilogue; a third of the rows run far beyond the cap (tanh saturated); the logits stay untouched without a
    gradient."""
    kw = TRANSFORMS[transform]
    logits, targets, scale = transformed_case(vocab, dtype)
    ref_grad = logits.clone()
    ref = torch_epilogues.logprob_epilogue(ref_grad, targets, IGNORE, scale, **kw)
    values_only = logits.to(kernels_on, dtype, copy=True)
    assert_matches(ops.logprob(values_only, targets.to(kernels_on), IGNORE, None, **kw), ref, dtype, "values only")
    assert torch.equal(values_only.cpu().double(), logits), "logits changed without grad_scale"
    grad = logits.to(kernels_on, dtype, copy=True)
    assert_matches(ops.logprob(grad, targets.to(kernels_on), IGNORE, scale.to(kernels_on), **kw), ref, dtype, "values")
    assert_rel_close(grad.cpu(), ref_grad, dtype, "gradient")


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("vocab", [7, 1025, 3001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_pair_epilogue_with_logit_transforms(pair, dtype, vocab, transform, kernels_on):
    """As above for the two-stream epilogues: both streams transformed, the gradients chained through dz'/dz."""
    kw = TRANSFORMS[transform]
    logits, targets, scale = transformed_case(vocab, dtype)
    q = (logits + torch.randn_like(logits) * 2).to(dtype).double()
    valid = torch.rand(len(targets)) > 0.25
    ref_p, ref_q = logits.clone(), q.clone()
    ref = pair.torch(ref_p, ref_q, valid, scale, **kw)
    grad_p, grad_q = logits.to(kernels_on, dtype, copy=True), q.to(kernels_on, dtype, copy=True)
    values_p, values_q = grad_p.clone(), grad_q.clone()
    assert_matches(pair.native(values_p, values_q, valid.to(kernels_on), None, **kw), ref, dtype, "no gradient")
    assert torch.equal(values_p, grad_p) and torch.equal(values_q, grad_q), "logits changed without grad_scale"
    assert_matches(pair.native(grad_p, grad_q, valid.to(kernels_on), scale.to(kernels_on), **kw), ref, dtype, "values")
    assert_rel_close(grad_p.cpu(), ref_p, dtype, "d/dlogits_p")
    assert_rel_close(grad_q.cpu(), ref_q, dtype, "d/dlogits_q")


@pytest.mark.parametrize("name", ["softcap", "logit_scale"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_native_ops_refuse_bad_transforms(ops, name, value):
    logits, targets = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=f"{name}: expected None or a positive finite float"):
        torch.ops.are_fast.logprob_epilogue(logits, targets, IGNORE, None, **{name: value})
    for kind, params in PAIR_CASES.values():
        with pytest.raises(ValueError, match=f"{name}: expected None or a positive finite float"):
            getattr(ops, kind)(logits, logits.clone(), torch.ones(2, dtype=torch.bool), None, **params, **{name: value})


@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["offset0", "offset1e4"])
def test_epilogues_corner_the_online_logsumexp(ops, offset, kernels_on):
    """float32 rows of 3 CPU tiles and a ragged tail (V = 3077) with the max in the first, a middle, the last
    full and the tail tile, or rising / falling; p's and q's maxima in different tiles; a common offset."""
    peaks = [3, 1500, 2100, 3076]
    base = torch.randn(len(peaks) + 2, 3077, dtype=torch.float64) * 3
    logits = cornered(base, peaks, offset)
    targets = torch.tensor([3, 3076, 0, 3075, IGNORE, 2048])
    scale = torch.randn(len(targets)).double()
    ref_grad = logits.clone()
    ref = torch_epilogues.logprob_epilogue(ref_grad, targets, IGNORE, scale)
    grad = logits.to(kernels_on, torch.float32)
    assert_rows_close(ops.logprob(grad, targets.to(kernels_on), IGNORE, scale.to(kernels_on)), ref, "log-probs")
    assert_rows_close(grad, ref_grad, "log-prob gradient")


@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["offset0", "offset1e4"])
def test_pair_epilogues_corner_the_online_logsumexp(pair, offset, kernels_on):
    """As above for both streams of the two-stream epilogues, p's and q's maxima in different tiles."""
    peaks = [3, 1500, 2100, 3076]
    base = torch.randn(len(peaks) + 2, 3077, dtype=torch.float64) * 3
    p = cornered(base, peaks, offset)
    q = cornered(torch.randn_like(base) * 3 + base / 2, peaks[::-1], offset)
    valid = torch.tensor([True, True, False, True, True, True])
    scale = torch.randn(len(valid)).double()
    ref_p, ref_q = p.clone(), q.clone()
    ref = pair.torch(ref_p, ref_q, valid, scale)
    grad_p, grad_q = p.to(kernels_on, torch.float32), q.to(kernels_on, torch.float32)
    assert_rows_close(pair.native(grad_p, grad_q, valid.to(kernels_on), scale.to(kernels_on)), ref, pair.name)
    assert_rows_close(grad_p, ref_p, "d/dlogits_p")
    assert_rows_close(grad_q, ref_q, "d/dlogits_q")


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_pair_error_tracks_the_pytorch_epilogue(pair, scale, kernels_on):
    """No cancellation in the native KL or JSD: float32 error within 1e-5 and a small multiple of PyTorch's."""
    a = torch.randn(6, 4099, dtype=torch.float64) * scale
    b = a + torch.randn(6, 4099, dtype=torch.float64) * scale / 2
    a[3:] += 1e4
    b[3:] += 1e4
    a, b = a.float().double(), b.float().double()
    valid = torch.ones(6, dtype=torch.bool)
    ref = pair.torch(a.clone(), b.clone(), valid, None)
    pytorch_error = rel_error(pair.torch(a.float(), b.float(), valid, None), ref)
    error = rel_error(pair.native(a.to(kernels_on, torch.float32), b.to(kernels_on, torch.float32),
                                  valid.to(kernels_on), None), ref)
    assert error <= 1e-5 and error <= 4 * pytorch_error + 1e-7, f"native {error:.1e}, PyTorch {pytorch_error:.1e}"


def test_kl_epilogue_with_minus_inf_logits(ops, kernels_on):
    """A masked vocabulary (-inf logits in p, in both streams, over a whole first tile): p = 0 there adds nothing
    (no 0 * -inf = NaN), in the C++ loop and in the CUDA kernel, which share that arithmetic (csrc/kl_terms.h)."""
    check_masked_kl(ops.kl, torch.device(kernels_on))


@pytest.mark.parametrize("tile", [16, CPU_TILE])
@pytest.mark.parametrize("beta", PARAM_VALUES["beta"])
def test_jsd_epilogue_with_minus_inf_logits(ops, beta, tile, kernels_on):
    """A masked vocabulary in the JSD (csrc/jsd_terms.h, shared by the C++ loop and the CUDA kernel): p = 0, q = 0 or
    both at scattered columns and over whole tiles (the C++ tile, too), every row also with p and q swapped (q
    masked alone). Values and both gradients equal the float64 limit of logits of -1e4, exact zeros where a
    stream is masked, and no NaN or inf (s = +inf where p = 0, NaN where both are, must be masked)."""
    (a, b), (limit_a, limit_b) = masked_kl_rows(vocab=5 * tile + 3, tile=tile)
    a, b, limit_a, limit_b = torch.cat([a, b]), torch.cat([b, a]), torch.cat([limit_a, limit_b]), torch.cat([limit_b, limit_a])
    valid, scale = torch.ones(len(a), dtype=torch.bool), torch.randn(len(a)).double()
    ref_a, ref_b = limit_a.clone(), limit_b.clone()
    ref = torch_epilogues.jsd_epilogue(ref_a, ref_b, valid, scale, beta=beta)
    ours_a, ours_b = a.to(kernels_on, torch.float32), b.to(kernels_on, torch.float32)
    assert_rows_close(ops.jsd(ours_a.clone(), ours_b.clone(), valid.to(kernels_on), None, beta=beta), ref, "values only")
    assert_rows_close(ops.jsd(ours_a, ours_b, valid.to(kernels_on), scale.to(kernels_on), beta=beta), ref, "JSD")
    assert_rows_close(ours_a, ref_a, "d/dlogits_p")
    assert_rows_close(ours_b, ref_b, "d/dlogits_q")
    assert (ours_a.cpu()[a == float("-inf")] == 0).all() and (ours_b.cpu()[b == float("-inf")] == 0).all()


def test_epilogues_on_strided_rows_and_empty_chunks(ops, kernels_on):
    """Rows may be a view with a row stride above V (columns past V untouched); C = 0 returns []."""
    logits, targets, scale = logprob_case(9, 50, 3.0)
    wide = torch.full((9, 64), 7.0, dtype=torch.float64)
    wide[:, :50] = logits
    wide = wide.to(kernels_on, torch.float32)
    ref_grad = logits.float().double()
    ref = torch_epilogues.logprob_epilogue(ref_grad, targets, IGNORE, scale)
    out = ops.logprob(wide[:, :50], targets.to(kernels_on), IGNORE, scale.to(kernels_on))
    assert_matches(out, ref, torch.float32, "values")
    assert_rel_close(wide[:, :50].cpu(), ref_grad, torch.float32, "gradient")
    assert (wide[:, 50:] == 7.0).all()
    empty = torch.empty(0, 50, device=kernels_on)
    assert ops.logprob(empty, torch.empty(0, dtype=torch.int64, device=kernels_on), IGNORE, None).shape == (0,)
    for kind, params in PAIR_CASES.values():
        no_rows = torch.empty(0, dtype=torch.bool, device=kernels_on)
        assert getattr(ops, kind)(empty, empty.clone(), no_rows, None, **params).shape == (0,)
        p, q = torch.full_like(wide, 7.0), torch.full_like(wide, 7.0)
        p[:, :50], q[:, :50] = (torch.randn(2, 9, 50) * 3).to(kernels_on)
        valid = torch.rand(9) > 0.25
        ref_p, ref_q = p[:, :50].double().cpu(), q[:, :50].double().cpu()
        ref = registry.load(registry.kind(kind).implementations["torch"])(ref_p, ref_q, valid, scale, **params)
        out = getattr(ops, kind)(p[:, :50], q[:, :50], valid.to(kernels_on), scale.to(kernels_on), **params)
        assert_matches(out, ref, torch.float32, f"{kind} values")
        assert_rel_close(p[:, :50].cpu(), ref_p, torch.float32, f"{kind} d/dlogits_p")
        assert_rel_close(q[:, :50].cpu(), ref_q, torch.float32, f"{kind} d/dlogits_q")
        assert (p[:, 50:] == 7.0).all() and (q[:, 50:] == 7.0).all()


def test_epilogues_propagate_nan(ops, kernels_on):
    logits = torch.randn(3, 2000, device=kernels_on)
    logits[0, 1500] = float("nan")
    targets = torch.tensor([4, 5, 6], device=kernels_on)
    assert torch.isnan(ops.logprob(logits.clone(), targets, IGNORE, None)).tolist() == [True, False, False]
    other = torch.randn(3, 2000, device=kernels_on)
    valid = torch.ones(3, dtype=torch.bool, device=kernels_on)
    for kind, params in PAIR_CASES.values():
        epilogue = functools.partial(getattr(ops, kind), **params)
        for p, q in ((logits, other), (other, logits)):  # a NaN in either stream
            assert torch.isnan(epilogue(p.clone(), q.clone(), valid, None)).tolist() == [True, False, False], kind
            grad_p, grad_q = p.clone(), q.clone()
            values = epilogue(grad_p, grad_q, valid, torch.ones(3, device=kernels_on))
            assert torch.isnan(values).tolist() == [True, False, False], kind
            assert torch.isnan(grad_p[0]).any() and torch.isfinite(grad_p[1:]).all(), kind


def test_epilogue_checks_name_the_argument(ops):
    logits, targets = torch.randn(4, 10), torch.randint(0, 10, (4,))
    valid = torch.ones(4, dtype=torch.bool)
    bad = [
        (lambda: ops.logprob(logits.half(), targets, IGNORE, None), TypeError, "logits: expected float32 or float64"),
        (lambda: ops.logprob(logits[0], targets, IGNORE, None), ValueError, "logits: expected a 2-D"),
        (lambda: ops.logprob(logits.T, targets, IGNORE, None), ValueError, "logits: rows must be contiguous"),
        (lambda: ops.logprob(logits, targets.int(), IGNORE, None), TypeError, "targets: expected Long"),
        (lambda: ops.logprob(logits, targets[:3], IGNORE, None), ValueError, r"targets: expected shape \[4\]"),
        (lambda: ops.logprob(logits, targets, IGNORE, torch.ones(5)), ValueError, r"grad_scale: expected shape \[4\]"),
        (lambda: ops.logprob(logits, targets, IGNORE, targets), TypeError, "grad_scale: expected a floating"),
        (lambda: ops.kl(logits, logits[:, :9].contiguous(), valid, None), ValueError, "logits_q: expected the shape"),
        (lambda: ops.kl(logits, logits.double(), valid, None), TypeError, "logits_q: expected the dtype"),
        (lambda: ops.kl(logits, logits.clone(), valid.int(), None), TypeError, "valid: expected Bool"),
        (lambda: ops.kl(torch.randn(4, 0), torch.randn(4, 0), valid, None), ValueError, "V must be at least 1"),
        (lambda: ops.jsd(logits, logits.double(), valid, None, beta=0.5), TypeError, "logits_q: expected the dtype"),
        (lambda: ops.jsd(logits, logits.clone(), valid[:3], None, beta=0.5), ValueError, r"valid: expected shape \[4\]"),
        (lambda: ops.jsd(logits.half(), logits.half(), valid, None, beta=0.5), TypeError, "logits_p: expected float32"),
        (lambda: ops.jsd(logits, logits.clone(), valid, torch.ones(3), beta=0.5), ValueError, "grad_scale: expected"),
        *[(lambda beta=beta: ops.jsd(logits, logits.clone(), valid, None, beta=beta), ValueError,
           r"beta: expected a real number in \(0, 1\), got ") for beta in (0.0, 1.0, -0.5, 1.5, float("nan"))],
    ]
    for call, error, message in bad:
        with pytest.raises(error, match=message):
            call()


def test_meta_kernels_give_shapes(ops):
    logits = torch.empty(5, 11, device="meta")
    assert ops.logprob(logits, torch.empty(5, dtype=torch.int64, device="meta"), IGNORE, None).shape == (5,)
    assert ops.kl(logits, logits, torch.empty(5, dtype=torch.bool, device="meta"), None).shape == (5,)
    assert ops.jsd(logits, logits, torch.empty(5, dtype=torch.bool, device="meta"), None, beta=0.3).shape == (5,)


@pytest.mark.parametrize("head", ["frozen", "trainable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", list(OPS))
def test_native_ops_match_float64_reference(ops, op, dtype, head, device):
    """Every op, value and every gradient (hidden states, weight and bias when trainable), V = 1031 > one tile."""
    masters = make_inputs(batch=2, length=13, hidden=24, vocab=1031)
    trainable = head == "trainable"
    ref, upstream, ref_grads = run_op(op, masters, torch.float64, "reference", trainable)
    out, _, grads = run_op(op, masters, dtype, "native", trainable, upstream=upstream, device=device, chunk_rows=5)
    assert_rel_close(out, ref, dtype, f"{op} value")
    for name, ref_grad in ref_grads.items():  # hidden_q gets no gradient from the single-stream ops
        assert (grads[name] is None) == (ref_grad is None), f"{op} d/d{name}"
        if ref_grad is not None:
            assert_rel_close(grads[name], ref_grad, dtype, f"{op} d/d{name}")


@pytest.mark.parametrize("op", ["token_logprobs-3d", "compression_loss", "conditional_kl-none"])
def test_native_ops_with_logits_of_magnitude_1e4(ops, op, device):
    """fp32 logits of magnitude 1e4: the value within 1e-5; gradients no worse than twice the error of PyTorch's
    own fp32 reference (whose fp32 matmul already moves such logits by ~1e-3)."""
    masters = make_inputs(batch=2, length=11, hidden=24, vocab=1031, logit_scale=1e4 / 3)
    ref, upstream, ref_grads = run_op(op, masters, torch.float64, "reference", True)
    assert ref.abs().max() > 1e3
    eager, _, eager_grads = run_op(op, masters, torch.float32, "reference", True, upstream=upstream, device=device)
    out, _, grads = run_op(op, masters, torch.float32, "native", True, upstream=upstream, device=device, chunk_rows=5)
    assert_rel_close(out, ref, torch.float32, f"{op} value")
    for name, ref_grad in ref_grads.items():
        if ref_grad is not None:
            bound = max(TOLERANCE[torch.float32], 2 * rel_error(eager_grads[name], ref_grad))
            assert rel_error(grads[name], ref_grad) <= bound, f"{op} d/d{name}"
