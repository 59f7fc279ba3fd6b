"""conditional_jsd (generalized JSD, both gradients): the reference against the definition, every backend against
the float64 reference for beta 0.1 / 0.5 / 0.9 on close and far distributions, underflow (masked vocabulary),
the Triton kernel against the PyTorch epilogue over many tiles, the module, the argument checks, and the
registry's fallback for a backend without the kind (an implementation taken away). The dtype x head x transform matrix and
opcheck / fullgraph compile come from the registry-driven tests (test_functional, test_logit_transforms,
test_compile)."""
import dataclasses
import logging
import math

import pytest
import torch

import are_fast
from _helpers import FUSED_BACKENDS, assert_rel_close, leaf, make_inputs, representable, run_op
from are_fast.ops import autograd, reference, registry, torch_epilogues
from are_fast.ops.online_jsd import JSDSweep

BETAS = [0.1, 0.5, 0.9]
# close: stream q is stream p plus a perturbation of a quarter of its size (JSD ~1e-2, against ~0.3 for unrelated
# streams); far: unrelated streams, logits of spread ~30, so most of p and q underflow in float32 where the other is
# large. Closer streams lose accuracy in float32 whatever the formula, as the KL does: log p - log m carries an
# absolute error ~eps |z| from the float32 logits z, and the JSD is second order in their difference (a perturbation
# of 0.05 gives relative errors 2e-5 to 5e-5 here, the KL 1e-5 to 2e-5).
DISTRIBUTIONS = {"close": (0.25, 3.0), "far": (None, 30.0)}


def pair_inputs(distribution):
    perturbation, logit_scale = DISTRIBUTIONS[distribution]
    masters = make_inputs(logit_scale=logit_scale)
    if perturbation is not None:
        masters["hidden_q"] = masters["hidden"] + perturbation * masters["hidden_q"]
    return masters


def jsd_by_definition(logits_p, logits_q, beta):
    """[..., V] float64 logits -> [...]: beta KL(P || M) + (1 - beta) KL(Q || M) with M formed as the mixture of
    the probabilities (no logaddexp), the way the definition reads."""
    p, q = logits_p.softmax(-1), logits_q.softmax(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)


@pytest.mark.parametrize("beta", BETAS)
def test_reference_is_the_definition(beta):
    masters = pair_inputs("close")
    h, q, w, b, labels = (masters[n] for n in ("hidden", "hidden_q", "weight", "bias", "labels"))
    per_position = jsd_by_definition(reference.logits(h, w, b), reference.logits(q, w, b), beta)
    expected = torch.zeros_like(per_position)
    expected[:, 1:] = per_position[:, :-1] * (labels[:, 1:] != -100)
    out = reference.conditional_jsd(h, q, w, labels, beta, b, reduction="none")
    assert_rel_close(out, expected, torch.float64, "JSD")
    swapped = reference.conditional_jsd(q, h, w, labels, 1 - beta, b, reduction="none")
    assert_rel_close(swapped, out, torch.float64, "JSD_beta(P || Q) = JSD_(1-beta)(Q || P)")
    assert (out >= 0).all() and (out <= math.log(2) + 1e-12).all()  # bounded by log 2 for any beta


def spy_on_native_jsd(monkeypatch) -> list:
    """Builds the native library and wraps torch.ops.are_fast.jsd_epilogue: the returned list gets the beta of
    every call."""
    from are_fast.ops import native

    assert native.library.load(build=True), native.library.reason
    calls, op = [], torch.ops.are_fast.jsd_epilogue

    def spy(*args):
        calls.append(args[4])
        return op(*args)

    monkeypatch.setattr(torch.ops.are_fast, "jsd_epilogue", spy)
    return calls


@pytest.mark.parametrize("distribution", list(DISTRIBUTIONS))
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_jsd_matches_float64_reference(backend, beta, distribution, device, monkeypatch):
    """Value and the gradients of both streams, the head and the bias, with ignored positions, in fp32; native runs
    its own JSD op (csrc/), not the PyTorch epilogue."""
    masters = representable(pair_inputs(distribution), torch.float32)
    ref, upstream, ref_grads = run_op("conditional_jsd-none", masters, torch.float64, "reference", True, beta=beta)
    native_calls = spy_on_native_jsd(monkeypatch) if backend == "native" else None
    out, _, grads = run_op("conditional_jsd-none", masters, torch.float32, backend, True, upstream=upstream,
                           device=device, chunk_rows=4, beta=beta)
    if native_calls is not None:
        assert native_calls and all(beta_passed == beta for beta_passed in native_calls), native_calls
    assert_rel_close(out, ref, torch.float32, "JSD")
    assert set(grads) == {"hidden", "hidden_q", "weight", "bias"}
    for name, ref_grad in ref_grads.items():
        assert_rel_close(grads[name], ref_grad, torch.float32, f"d/d{name}")
    assert (out.cpu()[masters["labels"] == -100] == 0).all()  # ignored positions give 0


@pytest.mark.parametrize("backend", ["reference", *FUSED_BACKENDS])
def test_jsd_over_a_masked_vocabulary(backend, device):
    """p = q = 0 on masked entries (a bias of -inf), and far streams where one underflows: the JSD and its
    gradients equal the limit of a bias of -1e4 (float64), with no NaN from log 0 or 0 * -inf."""
    masters = representable(pair_inputs("far"), torch.float32)
    masked = [0, 5, 17, 60, *range(100, 140)]
    limit = dict(masters, bias=masters["bias"].index_fill(0, torch.tensor(masked), -1e4))
    masters["bias"] = masters["bias"].index_fill(0, torch.tensor(masked), float("-inf"))
    ref, upstream, ref_grads = run_op("conditional_jsd-none", limit, torch.float64, "reference", True, beta=0.3)
    dtype = torch.float64 if backend == "reference" else torch.float32
    out, _, grads = run_op("conditional_jsd-none", masters, dtype, backend, True, upstream=upstream, device=device,
                           chunk_rows=4, beta=0.3)
    assert_rel_close(out, ref, torch.float32, "JSD")
    for name, ref_grad in ref_grads.items():
        assert_rel_close(grads[name], ref_grad, torch.float32, f"d/d{name}")
    assert (grads["bias"].cpu()[masked] == 0).all()


SWEEP_BLOCK = 16
SWEEP_VOCAB = 5 * SWEEP_BLOCK + 3  # five full blocks, then a ragged tail of 3
SWEEP_MASKED = [*range(SWEEP_BLOCK), 40, 41, SWEEP_VOCAB - 2, SWEEP_VOCAB - 1]  # all of block 0, mid-row, the tail


@pytest.mark.parametrize("grads", ["both", "p", "q"])
@pytest.mark.parametrize("transform", [{}, dict(softcap=2.0, logit_scale=1.5)], ids=["plain", "softcap+scale"])
@pytest.mark.parametrize("beta", [0.2, 0.7])
def test_online_sweep_over_many_vocabulary_blocks(beta, transform, grads, monkeypatch):
    """A frozen head on the online backend runs the JSD's own sweep (spied; the chunk driver must not run) in
    blocks of 3 rows and 16 vocabulary entries, so every row spans six blocks with a ragged tail; -inf logits fill
    the first block and sit in the middle and the tail; close and far streams; the ignored positions are left out
    (compaction) and get 0. The value and the gradient of each stream that asks for one against float64."""
    monkeypatch.setenv("ARE_FAST_BLOCK_BYTES", str(4 * JSDSweep.block_slots("softcap" in transform) * 3 * SWEEP_BLOCK))
    sizes = []
    run = JSDSweep.run

    def spy(self, chunk, *args):
        sizes.append(chunk[0].shape[0])
        assert self.block_vocab == SWEEP_BLOCK
        return run(self, chunk, *args)

    monkeypatch.setattr(JSDSweep, "run", spy)
    monkeypatch.setattr(autograd, "fused_linear_pass", lambda *a, **k: pytest.fail("the chunk driver ran"))
    masters = make_inputs(batch=2, length=9, hidden=16, vocab=SWEEP_VOCAB)
    masters["hidden_q"][0] = masters["hidden"][0] + 0.25 * masters["hidden_q"][0]  # close streams
    masters["hidden_q"][1] *= 4  # far streams
    masters = representable(masters, torch.float32)
    masked = torch.tensor(SWEEP_MASKED)
    limit = dict(masters, bias=masters["bias"].index_fill(0, masked, -1e4))  # the reference's: p = 0 exactly
    masters["bias"] = masters["bias"].index_fill(0, masked, float("-inf"))
    upstream = torch.randn(2, 9, dtype=torch.float64)
    results = {}
    for backend, dtype, inputs in (("reference", torch.float64, limit), ("online", torch.float32, masters)):
        h, q = (leaf(inputs[n], dtype, grads in ("both", stream)) for n, stream in (("hidden", "p"), ("hidden_q", "q")))
        w, b = (leaf(inputs[n], dtype, False) for n in ("weight", "bias"))
        chunking = dict(chunk_rows=3) if backend == "online" else {}
        out = are_fast.conditional_jsd(h, q, w, inputs["labels"], beta, b, reduction="none", backend=backend,
                                       **chunking, **transform)
        (out.double() * upstream).sum().backward()
        results[backend] = (out, h.grad, q.grad)
    counted = masters["labels"][:, 1:] != -100
    assert sum(sizes) == counted.sum() and max(sizes) == 3, sizes  # only the counted rows, in blocks of 3
    (out, *ours), (ref, *theirs) = results["online"], results["reference"]
    assert_rel_close(out, ref, torch.float32, "JSD")
    assert (out[:, 1:][~counted] == 0).all() and (out[:, 0] == 0).all()  # values sit at the labels' positions
    for name, got, want in zip(("hidden", "hidden_q"), ours, theirs):
        assert (got is None) == (want is None), name
        if got is not None:
            assert_rel_close(got, want, torch.float32, f"d/d{name}")
            assert (got[:, :-1][~counted] == 0).all() and (got[:, -1] == 0).all(), f"d/d{name} of an ignored row"


def test_online_pass_without_compaction_zeroes_rows_that_are_not_valid(monkeypatch):
    """The sweep over every row (compaction off, as on CUDA): rows that are not valid give 0 and zero gradients,
    the others the float64 PyTorch epilogue's values and gradients; blocks of 16 entries and 3 rows."""
    monkeypatch.setenv("ARE_FAST_BLOCK_BYTES", str(4 * JSDSweep.block_slots(False) * 3 * SWEEP_BLOCK))
    generator = torch.Generator().manual_seed(0)
    h, q = (torch.randn(7, 8, generator=generator, dtype=torch.float64) for _ in range(2))
    weight = torch.randn(SWEEP_VOCAB, 8, generator=generator, dtype=torch.float64)
    valid = torch.tensor([True, False, True, True, False, True, True])
    scale = torch.randn(7, generator=generator, dtype=torch.float64)
    h, q, weight, scale = (x.float().double() for x in (h, q, weight, scale))  # what the float32 sweep sees
    result = are_fast.ops.online.online_pass("jsd", [h.float(), q.float()], weight.float(), None, valid, -100,
                                             scale.float(), (True, True), block_rows=3, params=dict(beta=0.3))
    logits = [h @ weight.T, q @ weight.T]
    expected = torch_epilogues.jsd_epilogue(*logits, valid, scale, beta=0.3)  # logits become their gradients
    assert_rel_close(result.values, expected, torch.float32, "JSD")
    for stream, (grad, grad_logits) in enumerate(zip(result.hidden_grads, logits)):
        assert_rel_close(grad, grad_logits @ weight, torch.float32, f"d/dhidden of stream {stream}")
        assert (grad[~valid] == 0).all()
    assert (result.values[~valid] == 0).all()


def test_gradcheck_float64():
    masters = make_inputs(batch=2, length=5, hidden=6, vocab=11)
    h, q, w, b = (leaf(masters[n], torch.float64, True) for n in ("hidden", "hidden_q", "weight", "bias"))
    with are_fast.ops.autograd.allow_retain_graph():
        assert torch.autograd.gradcheck(
            lambda *x: are_fast.conditional_jsd(*x[:3], masters["labels"], 0.3, x[3], backend="chunked", chunk_rows=3,
                                                softcap=2.0),
            (h, q, w, b),
        )


def test_module_matches_the_op(device):
    masters = {n: v.to(device, torch.float32) if v.dtype.is_floating_point else v.to(device)
               for n, v in make_inputs().items()}
    h, q, w, labels, b = (masters[n] for n in ("hidden", "hidden_q", "weight", "labels", "bias"))
    module = are_fast.ConditionalJSD(beta=0.2, reduction="mean", softcap=2.0, logit_scale=0.5)
    expected = are_fast.conditional_jsd(h, q, w, labels, 0.2, b, reduction="mean", softcap=2.0, logit_scale=0.5)
    assert torch.equal(module(h, q, w, labels, b), expected)


@pytest.mark.parametrize("beta, error", [(0, ValueError), (1.0, ValueError), (-0.5, ValueError),
                                         (float("nan"), TypeError), (True, TypeError), ("half", TypeError)])
def test_beta_outside_the_open_interval_is_refused(beta, error):
    masters = make_inputs()
    with pytest.raises(error, match="beta: expected a real number in \\(0, 1\\)"):
        are_fast.conditional_jsd(masters["hidden"], masters["hidden_q"], masters["weight"], masters["labels"], beta)
    with pytest.raises(error, match="beta"):
        are_fast.ConditionalJSD(beta=beta)


@pytest.mark.parametrize("with_grad", [False, True])
@pytest.mark.parametrize("transform", [{}, dict(softcap=1.5, logit_scale=2.0)], ids=["plain", "softcap+scale"])
def test_triton_kernel_matches_the_pytorch_epilogue_over_many_tiles(with_grad, transform, device):
    from are_fast.kernels.jsd_epilogue import jsd_epilogue

    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(6, 83, generator=generator, dtype=torch.float64) * 4 for _ in range(2))
    a[1, :40] = float("-inf")  # p = 0 over the first tiles
    b[2, 30:] = float("-inf")  # q = 0 over the last tiles
    valid = torch.tensor([True, True, True, False, True, True])
    scale = torch.randn(6, generator=generator, dtype=torch.float64) if with_grad else None
    ours = [a.to(device, torch.float32), b.to(device, torch.float32)]
    out = jsd_epilogue(*ours, valid.to(device), None if scale is None else scale.to(device, torch.float32),
                       beta=0.7, block_v=16, **transform)
    ref_logits = [a.clone(), b.clone()]
    ref = torch_epilogues.jsd_epilogue(*ref_logits, valid, scale, beta=0.7, **transform)
    assert_rel_close(out, ref, torch.float32, "JSD")
    if with_grad:
        assert_rel_close(ours[0], ref_logits[0], torch.float32, "gradient over logits_p")
        assert_rel_close(ours[1], ref_logits[1], torch.float32, "gradient over logits_q")


@pytest.mark.parametrize("epilogue", ["pytorch", "triton", "native"])
def test_gradients_of_nearly_disjoint_distributions_keep_their_precision(epilogue, device):
    """P splits its mass between entries A and B; Q sits on C, with ~1e-3 of it on A and ~e^-30 on B: the JSD is near
    its bound H(beta), and P's gradient on A is a small s_A = log(m_A / (beta p_A)) ~ 1e-3, which must keep full
    relative precision (log(1 + x) instead of log1p(x) would err by ~eps / 1e-3)."""
    if epilogue == "triton":
        from are_fast.kernels.jsd_epilogue import jsd_epilogue
    elif epilogue == "native":
        from are_fast.ops import native

        assert native.library.load(build=True), native.library.reason
        jsd_epilogue = native.jsd_epilogue
    else:
        jsd_epilogue = torch_epilogues.jsd_epilogue
    rows, vocab = 4, 37
    a = torch.zeros(rows, vocab, dtype=torch.float64)
    b = torch.zeros(rows, vocab, dtype=torch.float64)
    for row in range(rows):
        a[row, row] = a[row, row + 10] = 30.0  # A and B
        b[row, row + 20] = 30.0  # C
        b[row, row] = 23.0 - row  # q_A / p_A ~ 2e-3 .. 5e-5
    valid = torch.ones(rows, dtype=torch.bool)
    scale = torch.ones(rows, dtype=torch.float64)
    ref_logits = [a.clone(), b.clone()]
    ref = torch_epilogues.jsd_epilogue(*ref_logits, valid, scale, beta=0.3)
    ours = [a.to(device, torch.float32), b.to(device, torch.float32)]
    out = jsd_epilogue(*ours, valid.to(device), scale.to(device, torch.float32), beta=0.3)
    assert_rel_close(out, ref, torch.float32, "JSD")
    for stream in range(2):
        for row in range(rows):
            assert_rel_close(ours[stream][row], ref_logits[stream][row], torch.float32, f"gradient {stream}, row {row}")


@pytest.mark.parametrize("backend", ["native", "online"])
def test_a_backend_without_the_kind_says_so_once_and_runs_its_pytorch_epilogue(backend, monkeypatch, caplog):
    """Every backend has the JSD now; with its native epilogue or its online sweep taken away from the registry,
    the backend runs the JSD's PyTorch epilogue on the chunk driver (the chunked backend's
    numbers, bit for bit), and logs that once."""
    spec = registry.KINDS["jsd"]
    reduced = {name: path for name, path in spec.implementations.items() if name != backend}
    monkeypatch.setitem(registry.KINDS, "jsd", dataclasses.replace(spec, implementations=reduced, online=None))
    masters = make_inputs()
    args = [masters[n].float() for n in ("hidden", "hidden_q", "weight")]
    expected = are_fast.conditional_jsd(*args, masters["labels"], 0.4, backend="chunked", chunk_rows=4)
    registry._said.clear()
    with caplog.at_level(logging.WARNING, logger="are_fast"):
        for _ in range(2):
            out = are_fast.conditional_jsd(*args, masters["labels"], 0.4, backend=backend, chunk_rows=4)
            assert torch.equal(out, expected)
    said = [r.getMessage() for r in caplog.records if "'jsd'" in r.getMessage()]
    assert len(said) == 1 and ("PyTorch epilogue" in said[0] or "chunk driver" in said[0]), said


def test_a_kind_is_never_run_as_another(monkeypatch):
    """An unknown kind is refused by name everywhere, and a kind without an online sweep (the JSD's taken away
    here) is not run as the KL's."""
    with pytest.raises(ValueError, match="kind: expected one of logprob, kl, jsd, got 'bogus'"):
        registry.epilogue_for("bogus", "torch")
    monkeypatch.setitem(registry.KINDS, "jsd", dataclasses.replace(registry.KINDS["jsd"], online=None))
    h = torch.randn(4, 8)
    with pytest.raises(ValueError, match="'jsd' has no online sweep"):
        are_fast.ops.online.online_pass("jsd", [h, h], torch.randn(11, 8), None, torch.ones(4, dtype=torch.bool), -100)


def test_the_registry_is_complete():
    """Every op has its public function, reference and module; every kind a PyTorch epilogue; every declared
    implementation loads; stage 2's distances include the JSD."""
    for op in registry.OPS_TABLE.values():
        assert callable(getattr(are_fast, op.name)) and callable(getattr(reference, op.name))
        assert op.module is None or issubclass(getattr(are_fast, op.module), torch.nn.Module)
        assert op.kind in registry.KINDS
    for kind in registry.KINDS.values():
        assert "torch" in kind.implementations
        for family, path in kind.implementations.items():
            if family != "triton" or are_fast.ops.backends.REGISTRY["triton"].unavailable(torch.device("cpu")) is None:
                assert callable(registry.load(path)), path
    assert registry.DISTANCES == {"kl": "conditional_kl", "jsd": "conditional_jsd"}
