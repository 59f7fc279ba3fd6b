"""The native epilogues of csrc/ (are_fast.ops.native): against the float64 PyTorch epilogues and the float64
reference ops, their input checks, the fallback when they cannot be built, the ahead-of-time build, and a
compile-only check of the CUDA sources. The first test run builds the library (10-30 s) unless it is cached.

The epilogue tests run the C++ CPU epilogues always and the CUDA ones (csrc/epilogues_cuda.cu) when the run's
device is cuda (``--device``); the ops tests run on the run's device."""
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import are_fast
from _helpers import OPS, TOLERANCE, assert_rel_close, assert_rows_close, check_masked_kl, cornered, make_inputs, rel_error, run_op
from are_fast.ops import native, torch_epilogues
from are_fast.ops.backends import resolve_backend

REPO = Path(__file__).resolve().parents[2]
IGNORE = -100
VOCABS = [1, 7, 1000, 1024, 1025, 3001]  # one element, under a vector, around the 1024-element tile, ragged


@pytest.fixture(scope="module")
def ops():
    """The native epilogues. A library that cannot be built fails these tests: CI must build it."""
    if not native.library.load(build=True):
        pytest.fail(f"the native library is unavailable: {native.library.reason}")
    return native.epilogues()


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


def assert_matches(out, ref, dtype, what):
    """Same NaN positions, and the rest within the dtype's tolerance."""
    out = out.cpu()
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan), f"{what}: NaN at {torch.isnan(out).nonzero().flatten().tolist()}"
    assert_rel_close(out[~nan], ref[~nan], dtype, what)


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
def test_kl_epilogue_matches_float64(ops, dtype, vocab, magnitude, kernels_on):
    rows = 37
    p = (torch.randn(rows, vocab, dtype=torch.float64) * magnitude).to(dtype).double()
    q = (p + torch.randn(rows, vocab, dtype=torch.float64) * magnitude / 3).to(dtype).double()
    valid = torch.rand(rows) > 0.25
    scale = torch.randn(rows).double()
    ref_p, ref_q = p.clone(), q.clone()
    ref = torch_epilogues.kl_epilogue(ref_p, ref_q, valid, scale)
    values = ops.kl(p.to(kernels_on, dtype, copy=True), q.to(kernels_on, dtype, copy=True), valid.to(kernels_on), None)
    assert_matches(values, ref, dtype, "values, no gradient")
    grad_p, grad_q = p.to(kernels_on, dtype, copy=True), q.to(kernels_on, dtype, copy=True)
    out = ops.kl(grad_p, grad_q, valid.to(kernels_on), scale.to(kernels_on))
    assert_matches(out, ref, dtype, "values")
    assert_rel_close(grad_q.cpu(), ref_q, dtype, "d/dlogits_q")
    if magnitude < 1e3:
        assert_rel_close(grad_p.cpu(), ref_p, dtype, "d/dlogits_p")
    else:  # p is one-hot to the last bit: the exact d/dlogits_p underflows and any formula returns rounding noise
        assert torch.isfinite(grad_p).all()
    assert (grad_p.cpu()[~valid] == 0).all() and (grad_q.cpu()[~valid] == 0).all()


TRANSFORMS = {"softcap": dict(softcap=2.0), "logit_scale": dict(logit_scale=0.7), "both": dict(softcap=3.0, logit_scale=2.0)}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("vocab", [7, 1025, 3001])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_epilogues_with_logit_transforms(ops, dtype, vocab, transform, kernels_on):
    """Both epilogues with the transforms (logit_transform.h: the CPU and the CUDA code share it) against the
    float64 PyTorch ones; a third of the rows run far beyond the cap (tanh saturated); the logits stay
    untouched without a gradient."""
    kw = TRANSFORMS[transform]
    logits, targets, scale = logprob_case(37, vocab, 3.0)
    logits[::3] *= 10
    logits = logits.to(dtype).double()
    ref_grad = logits.clone()
    ref = torch_epilogues.logprob_epilogue(ref_grad, targets, IGNORE, scale, **kw)
    values_only = logits.to(kernels_on, dtype, copy=True)
    assert_matches(ops.logprob(values_only, targets.to(kernels_on), IGNORE, None, **kw), ref, dtype, "values only")
    assert torch.equal(values_only.cpu().double(), logits), "logits changed without grad_scale"
    grad = logits.to(kernels_on, dtype, copy=True)
    assert_matches(ops.logprob(grad, targets.to(kernels_on), IGNORE, scale.to(kernels_on), **kw), ref, dtype, "values")
    assert_rel_close(grad.cpu(), ref_grad, dtype, "gradient")
    q = (logits + torch.randn_like(logits) * 2).to(dtype).double()
    valid = torch.rand(len(targets)) > 0.25
    ref_p, ref_q = logits.clone(), q.clone()
    ref = torch_epilogues.kl_epilogue(ref_p, ref_q, valid, scale, **kw)
    grad_p, grad_q = logits.to(kernels_on, dtype, copy=True), q.to(kernels_on, dtype, copy=True)
    values = ops.kl(grad_p.clone(), grad_q.clone(), valid.to(kernels_on), None, **kw)
    assert_matches(values, ref, dtype, "KL, no gradient")
    assert_matches(ops.kl(grad_p, grad_q, valid.to(kernels_on), scale.to(kernels_on), **kw), ref, dtype, "KL")
    assert_rel_close(grad_p.cpu(), ref_p, dtype, "d/dlogits_p")
    assert_rel_close(grad_q.cpu(), ref_q, dtype, "d/dlogits_q")


@pytest.mark.parametrize("name", ["softcap", "logit_scale"])
@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_native_ops_refuse_bad_transforms(ops, name, value):
    logits, targets = torch.randn(2, 5), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=f"{name}: expected None or a positive finite float"):
        torch.ops.are_fast.logprob_epilogue(logits, targets, IGNORE, None, **{name: value})
    with pytest.raises(ValueError, match=f"{name}: expected None or a positive finite float"):
        torch.ops.are_fast.kl_epilogue(logits, logits.clone(), torch.ones(2, dtype=torch.bool), None, **{name: value})


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
    q = cornered(torch.randn_like(base) * 3 + base / 2, peaks[::-1], offset)
    valid = torch.tensor([True, True, False, True, True, True])
    ref_p, ref_q = logits.clone(), q.clone()
    ref = torch_epilogues.kl_epilogue(ref_p, ref_q, valid, scale)
    grad_p, grad_q = logits.to(kernels_on, torch.float32), q.to(kernels_on, torch.float32)
    assert_rows_close(ops.kl(grad_p, grad_q, valid.to(kernels_on), scale.to(kernels_on)), ref, "KL")
    assert_rows_close(grad_p, ref_p, "d/dlogits_p")
    assert_rows_close(grad_q, ref_q, "d/dlogits_q")


@pytest.mark.parametrize("scale", [1.0, 10.0, 100.0])
def test_kl_error_tracks_the_pytorch_epilogue(ops, scale, kernels_on):
    """No cancellation in the native KL: float32 error within 1e-5 and a small multiple of PyTorch's."""
    a = torch.randn(6, 4099, dtype=torch.float64) * scale
    b = a + torch.randn(6, 4099, dtype=torch.float64) * scale / 2
    a[3:] += 1e4
    b[3:] += 1e4
    a, b = a.float().double(), b.float().double()
    valid = torch.ones(6, dtype=torch.bool)
    ref = torch_epilogues.kl_epilogue(a.clone(), b.clone(), valid, None)
    pytorch_error = rel_error(torch_epilogues.kl_epilogue(a.float(), b.float(), valid, None), ref)
    error = rel_error(ops.kl(a.to(kernels_on, torch.float32), b.to(kernels_on, torch.float32),
                             valid.to(kernels_on), None), ref)
    assert error <= 1e-5 and error <= 4 * pytorch_error + 1e-7, f"native {error:.1e}, PyTorch {pytorch_error:.1e}"


def test_kl_epilogue_with_minus_inf_logits(ops, kernels_on):
    """A masked vocabulary (-inf logits in p, in both streams, over a whole first tile): p = 0 there adds nothing
    (no 0 * -inf = NaN), in the C++ loop and in the CUDA kernel, which share that arithmetic (csrc/kl_terms.h)."""
    check_masked_kl(ops.kl, torch.device(kernels_on))


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
    assert ops.kl(empty, empty.clone(), torch.empty(0, dtype=torch.bool, device=kernels_on), None).shape == (0,)


def test_epilogues_propagate_nan(ops, kernels_on):
    logits = torch.randn(3, 2000, device=kernels_on)
    logits[0, 1500] = float("nan")
    targets = torch.tensor([4, 5, 6], device=kernels_on)
    assert torch.isnan(ops.logprob(logits.clone(), targets, IGNORE, None)).tolist() == [True, False, False]
    kl = ops.kl(logits.clone(), torch.randn(3, 2000, device=kernels_on), torch.ones(3, dtype=torch.bool,
                device=kernels_on), None)
    assert torch.isnan(kl).tolist() == [True, False, False]


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
    ]
    for call, error, message in bad:
        with pytest.raises(error, match=message):
            call()


def test_meta_kernels_give_shapes(ops):
    logits = torch.empty(5, 11, device="meta")
    assert ops.logprob(logits, torch.empty(5, dtype=torch.int64, device="meta"), IGNORE, None).shape == (5,)
    assert ops.kl(logits, logits, torch.empty(5, dtype=torch.bool, device="meta"), None).shape == (5,)


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


@pytest.fixture
def unbuildable(monkeypatch, tmp_path):
    """A fresh loader, swapped in for the real one, whose build cannot work: no C++ compiler, empty cache."""
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("ARE_FAST_NATIVE_DIR", str(tmp_path / "cache"))
    library = native.NativeLibrary()
    monkeypatch.setattr(native, "library", library)
    return library


def test_unbuildable_library_reports_why_and_logs_once(unbuildable, caplog):
    with caplog.at_level(logging.WARNING, logger="are_fast.ops.native"):
        assert not unbuildable.load(build=True)
        assert not unbuildable.load(build=True)
    assert "no C++ compiler" in unbuildable.reason and "no-such-compiler" in unbuildable.reason
    assert len([r for r in caplog.records if "unavailable" in r.getMessage()]) == 1


def test_missing_ninja_and_failing_compiler_are_reported(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    monkeypatch.setenv("ARE_FAST_NATIVE_DIR", str(tmp_path))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    library = native.NativeLibrary()
    assert not library.load() and "ninja is not installed" in library.reason
    monkeypatch.undo()
    monkeypatch.setenv("ARE_FAST_NATIVE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", shutil.which("false"))  # a "compiler" that always fails
    library = native.NativeLibrary()
    assert not library.load() and "failed" in library.reason and library.path is None


def test_missing_sources_are_reported(monkeypatch):
    monkeypatch.setattr(native, "_sources_dir", lambda: None)
    library = native.NativeLibrary()
    assert not library.load() and "csrc/epilogues.cpp" in library.reason


def test_fallback_to_pytorch_epilogues(unbuildable, monkeypatch):
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="backend='native' is unavailable: no C.. compiler"):
        resolve_backend("native", cpu)
    monkeypatch.setenv("ARE_FAST_BACKEND", "native")
    masters = make_inputs()
    with pytest.raises(ValueError, match="unavailable"):
        are_fast.compression_loss(masters["hidden"].float(), masters["weight"].float(), masters["labels"])
    monkeypatch.delenv("ARE_FAST_BACKEND")
    for mode in ("auto", "1", "0"):
        monkeypatch.setenv("ARE_FAST_NATIVE", mode)
        assert resolve_backend(None, cpu) == "online"
    monkeypatch.setenv("ARE_FAST_NATIVE", "1")
    ref, upstream, ref_grads = run_op("conditional_kl-sum", masters, torch.float64, "reference", True)
    out, _, grads = run_op("conditional_kl-sum", masters, torch.float32, None, True, upstream=upstream)
    assert_rel_close(out, ref, torch.float32, "value through the fallback")
    assert_rel_close(grads["hidden"], ref_grads["hidden"], torch.float32, "d/dhidden through the fallback")


def test_default_backend_follows_are_fast_native(ops, monkeypatch):
    """With no backend named: ARE_FAST_NATIVE=1 takes the native epilogues, 0 never, auto only from an
    ahead-of-time build; an explicit backend always wins."""
    cpu = torch.device("cpu")
    monkeypatch.setenv("ARE_FAST_NATIVE", "1")
    assert resolve_backend(None, cpu) == "native"
    assert resolve_backend("chunked", cpu) == "chunked"  # the PyTorch epilogues stay reachable
    monkeypatch.setenv("ARE_FAST_NATIVE", "0")
    assert resolve_backend(None, cpu) == "online"
    monkeypatch.setenv("ARE_FAST_NATIVE", "auto")  # an installed ahead-of-time build, not what this process loaded
    assert resolve_backend(None, cpu) == ("native" if native.ahead_of_time_builds() else "online")
    monkeypatch.setenv("ARE_FAST_NATIVE", "yes")
    with pytest.raises(ValueError, match="ARE_FAST_NATIVE: expected one of auto, 0, 1, got 'yes'"):
        resolve_backend(None, cpu)


def run_python(args, env_extra, cwd=REPO, timeout=300):
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_check_command(ops, tmp_path):
    built = run_python(["-m", "are_fast.ops.native", "--check"], {})
    assert built.returncode == 0, built.stdout + built.stderr
    assert "available" in built.stdout and "are_fast::logprob_epilogue(Tensor(a!) logits" in built.stdout
    assert "are_fast::kl_epilogue(Tensor(a!) logits_p, Tensor(b!) logits_q" in built.stdout
    assert "RuntimeWarning" not in built.stderr
    broken = {"CXX": str(tmp_path / "no-such-compiler"), "ARE_FAST_NATIVE_DIR": str(tmp_path / "cache")}
    missing = run_python(["-m", "are_fast.ops.native", "--check"], broken)
    assert missing.returncode == 1 and "NOT available: no C++ compiler" in missing.stdout, missing.stdout
    imported = run_python(["-c", "import are_fast.ops.native as n; print(n.library.path, n.library.reason)"], broken)
    assert imported.returncode == 0 and imported.stdout.split() == ["None", "None"], imported.stderr


def test_plan_command_builds_nothing(tmp_path):
    """--plan (what the GPU check logs before its native build step) names the sources and an empty cache."""
    planned = run_python(["-m", "are_fast.ops.native", "--plan"], {"ARE_FAST_NATIVE_DIR": str(tmp_path)})
    assert planned.returncode == 0, planned.stderr
    assert "are_fast native build: epilogues.cpp" in planned.stdout and "C++ compiler:" in planned.stdout
    assert f"cache: {tmp_path}" in planned.stdout and "empty: the first use builds it" in planned.stdout
    assert not any(tmp_path.rglob("*.so"))


def test_setup_py_imports_torch_only_for_the_native_build():
    plain = run_python(["-X", "importtime", "setup.py", "--version"], {"ARE_FAST_BUILD_NATIVE": "0"})
    assert plain.returncode == 0 and plain.stdout.strip() == are_fast.__version__, plain.stderr
    assert " torch" not in plain.stderr  # -X importtime lists every imported module on stderr


def test_ahead_of_time_build_is_loaded_first(tmp_path):
    """ARE_FAST_BUILD_NATIVE=1 builds are_fast/_native*.so (one more compile, 15-40 s), which the loader prefers
    and the default backend then picks, with no compiler in sight."""
    skip = shutil.ignore_patterns("__pycache__", "*.so")
    for name in ("setup.py", "README.md", "are_fast", "kernels", "csrc"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, tmp_path / name, ignore=skip)
        else:
            shutil.copy(REPO / name, tmp_path / name)
    build = run_python(["setup.py", "-q", "build_ext", "--inplace"], {"ARE_FAST_BUILD_NATIVE": "1"}, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    assert list((tmp_path / "are_fast").glob("_native*.so"))
    probe = (
        "import torch, are_fast.ops.native as n; from are_fast.ops.backends import resolve_backend; "
        "print(resolve_backend(None, torch.device('cpu')), n.library.origin)"
    )
    env = {"PYTHONPATH": str(tmp_path), "CXX": str(tmp_path / "no-such-compiler")}
    loaded = run_python(["-c", probe], env, cwd=tmp_path)
    assert loaded.stdout.split() == ["native", "ahead-of-time"], loaded.stdout + loaded.stderr


def test_cuda_sources_compile(tmp_path):
    """Compile only (no GPU needed): csrc/epilogues_cuda.cu with torch's headers for sm_90."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: the CUDA sources cannot be compiled here")
    from torch.utils.cpp_extension import include_paths

    torch_include = Path(include_paths()[0])
    defines = []
    if not (torch_include / "c10/cuda/impl/cuda_cmake_macros.h").is_file():
        defines = ["-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE"]  # a CPU-only torch ships no generated CUDA macros header
    command = [nvcc, "-c", str(REPO / "csrc/epilogues_cuda.cu"), "-o", str(tmp_path / "epilogues_cuda.o"),
               "-std=c++17", "-O3", "-arch=sm_90", "-Xcompiler", "-fPIC", *defines,
               *[f"-I{path}" for path in include_paths()]]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    assert (tmp_path / "epilogues_cuda.o").stat().st_size > 0
