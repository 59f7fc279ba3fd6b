"""The online sweep (``are_fast.ops.online``, the ``online`` backend's path for frozen full-precision heads)
against the float64 reference, row by row, on logits cornered like the kernels' (tests/ops/test_kernels.py).

With an identity head (W = I, H = V) the hidden states are the logits, so each row's maximum can be put in the
first, a middle, the last full or the ragged tail vocabulary block, rise with every block or fall steeply, with
and without a common offset of 1e4. Blocks of 16 vocabulary entries (ARE_FAST_BLOCK_BYTES) and of 3 rows
(chunk_rows) make a short row span many blocks: a sweep that forgets a rescale, lets its running maximum fall,
mixes the target into the sums or lets a ragged block's padding in fails here; the KL and JSD sweeps (two
streams) run the same corners. Everything else (bias, ignored rows, compaction, every op, gradients,
NaN-poisoned outputs) runs through the ``online`` backend in the backend-parametrized tests of
test_functional.py, test_compaction.py and test_head_matmuls.py (the JSD's masked vocabulary, compaction and
single-stream gradients in test_jsd.py).
"""
import math

import pytest
import torch

import are_fast
from are_fast.ops import online, registry
from are_fast.ops.head_matmuls import use_mode
from are_fast.ops.sweep_matmuls import SweepMatmuls
from _helpers import TOLERANCE, leaf, rel_error

IGNORE = -100
BLOCK = 16
VOCAB = 5 * BLOCK + 3  # four full blocks after the first, then a ragged tail of 3
PEAKS = {"first": 3, "middle": 2 * BLOCK + 5, "last-full": 4 * BLOCK + 7, "tail": VOCAB - 1}


def cornered(base: torch.Tensor, peaks: list, offset: float) -> torch.Tensor:
    """base [len(peaks) + 3, V] float64 logits: row i has its maximum 4 above the rest at peaks[i]; then a row
    rising by 12 over its length, one falling by 200 (exp(first max - block max) overflows float32) and one
    whose target (column 40) is 14 above the rest (p_t = 1 - 1e-5: the gradient's target term must not be
    formed as 1 - p_t). All shifted by ``offset`` and rounded to float32."""
    rows = base.clone()
    for row, column in enumerate(peaks):
        rows[row, column] = rows[row].max() + 4
    rows[-3] += torch.linspace(0, 12, rows.shape[1], dtype=torch.float64)
    rows[-2] += torch.linspace(0, -200, rows.shape[1], dtype=torch.float64)
    rows[-1, 40] = rows[-1].max() + 14
    return (rows + offset).float().double()


def assert_rows_close(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Each row within the float32 tolerance of its own float64 reference (a row with small values is not
    hidden behind one with large values)."""
    assert out.shape == ref.shape, what
    for row in range(len(ref)):
        error = rel_error(out[row], ref[row])
        assert error <= TOLERANCE[torch.float32], f"{what}, row {row}: relative error {error:.2e}"


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of BLOCK vocabulary entries for blocks of 3 rows (the KL holds three slots per block)."""
    def use(slots: int) -> None:
        monkeypatch.setenv("ARE_FAST_BLOCK_BYTES", str(4 * slots * 3 * BLOCK))
    return use


def _run(op, logits, targets_or_q, upstream, backend, dtype, device, **transform):
    """Values and hidden gradients of sum(upstream * values) with an identity head (logits = hidden); op
    "token_logprobs", or a pair op ("conditional_kl", "conditional_jsd"; transform may hold the JSD's beta)."""
    head = leaf(torch.eye(VOCAB, dtype=torch.float64), dtype, False, device)
    kwargs = dict(backend=backend, chunk_rows=3) if backend != "reference" else dict(backend=backend)
    kwargs.update(transform)
    if op == "token_logprobs":
        hidden = leaf(logits, dtype, True, device)
        values = are_fast.token_logprobs(hidden, head, targets_or_q.to(device), **kwargs)
        (values * upstream.to(device, dtype)).sum().backward()
        return values, [hidden.grad]
    hidden_p = leaf(logits.unsqueeze(0), dtype, True, device)
    hidden_q = leaf(targets_or_q.unsqueeze(0), dtype, True, device)
    labels = torch.zeros(1, logits.shape[0], dtype=torch.int64, device=device)
    labels[0, -1] = IGNORE  # the KL counts the rows whose label is a target: all but the last
    values = getattr(are_fast, op)(hidden_p, hidden_q, head, labels, reduction="none", **kwargs)
    (values * upstream.to(device, dtype).unsqueeze(0)).sum().backward()
    return values[0], [hidden_p.grad[0], hidden_q.grad[0]]


@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["offset0", "offset1e4"])
def test_logprobs_over_many_vocabulary_blocks(offset, small_blocks, device):
    small_blocks(1)
    logits = cornered(torch.randn(len(PEAKS) + 3, VOCAB, dtype=torch.float64) * 3, list(PEAKS.values()), offset)
    # targets: at a peak, beside one, in the first block, the ragged tail, ignored, and the confident row's peak
    targets = torch.tensor([3, 2 * BLOCK + 6, 0, VOCAB - 1, VOCAB - 2, IGNORE, 40])
    upstream = torch.randn(len(targets), dtype=torch.float64)
    ref, (ref_grad,) = _run("token_logprobs", logits, targets, upstream, "reference", torch.float64, "cpu")
    out, (grad,) = _run("token_logprobs", logits, targets, upstream, "online", torch.float32, device)
    assert_rows_close(out.cpu(), ref, "log-probs")
    assert_rows_close(grad.cpu(), ref_grad, "d/dhidden")
    assert out[5] == 0 and (grad[5] == 0).all(), "an ignored row has a value or a gradient"


@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["offset0", "offset1e4"])
def test_kl_over_many_vocabulary_blocks(offset, small_blocks, device):
    """p's and q's maxima in different blocks, rows that rise or fall, p close to q, and a common offset."""
    small_blocks(3)
    pairs = [(3, 4 * BLOCK + 7), (2 * BLOCK + 5, 1), (VOCAB - 1, 2 * BLOCK), (4 * BLOCK + 7, VOCAB - 2)]
    base_a = torch.randn(len(pairs) + 3, VOCAB, dtype=torch.float64) * 3
    base_b = base_a + 0.3 * torch.randn_like(base_a)  # close distributions: a small KL
    base_b[0] = torch.randn(VOCAB, dtype=torch.float64) * 3  # and one independent row
    a = cornered(base_a, [p for p, _ in pairs], offset)
    b = cornered(base_b, [q for _, q in pairs], offset)
    upstream = torch.randn(a.shape[0], dtype=torch.float64)
    ref, ref_grads = _run("conditional_kl", a, b, upstream, "reference", torch.float64, "cpu")
    out, grads = _run("conditional_kl", a, b, upstream, "online", torch.float32, device)
    # float32's own floor for these sums of terms of either sign: the KL is sum_v p_v (log p_v - log q_v), its
    # error relative to E_p |log p - log q| (two close rows: 100x their KL); the gradients (identity head)
    # g p_v (log p_v - log q_v - KL) and g (q_v - p_v), relative to g p_v (|log p_v - log q_v| + KL) and
    # g (q_v + p_v). A sweep that forgets a rescale or a re-basing is off by far more.
    p, q = torch.softmax(a, 1), torch.softmax(b, 1)
    log_ratio = (torch.log_softmax(a, 1) - torch.log_softmax(b, 1)).abs()
    scales = [
        torch.maximum(ref.abs(), (p * log_ratio).sum(1)),
        (upstream.unsqueeze(1) * p * (log_ratio + ref.abs().unsqueeze(1))).norm(dim=1),
        (upstream.unsqueeze(1) * (p + q)).norm(dim=1),
    ]
    results = [(out, ref, "KL")] + [(g, r, f"d/dhidden of stream {i}") for i, (g, r) in enumerate(zip(grads, ref_grads))]
    for (got, want, what), scale in zip(results, scales):
        error = (got.cpu().double() - want).reshape(len(want), -1).norm(dim=1)[:-1]
        bound = TOLERANCE[torch.float32] * scale[:-1]
        assert (error <= bound).all(), f"{what}: row errors {error.tolist()} > bounds {bound.tolist()}"
    assert out[-1] == 0 and (grads[0][-1] == 0).all() and (grads[1][-1] == 0).all(), "a row that is not valid counts"


@pytest.mark.parametrize("beta", [0.2, 0.5, 0.9])
@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["offset0", "offset1e4"])
def test_jsd_over_many_vocabulary_blocks(offset, beta, small_blocks, device):
    """The KL's cornered pairs through the JSD sweep (``are_fast.ops.online_jsd``): its log-sum-exp sweep must
    rescale, and its later sweeps subtract the maximum and the log of the sum apart (an offset of 1e4 rounded into
    log p would cost 5e-4 absolute); p's and q's maxima in different blocks, close rows and an independent one."""
    small_blocks(registry.online_sweep("jsd").block_slots(False))
    pairs = [(3, 4 * BLOCK + 7), (2 * BLOCK + 5, 1), (VOCAB - 1, 2 * BLOCK), (4 * BLOCK + 7, VOCAB - 2)]
    base_a = torch.randn(len(pairs) + 3, VOCAB, dtype=torch.float64) * 3
    base_b = base_a + 0.3 * torch.randn_like(base_a)
    base_b[0] = torch.randn(VOCAB, dtype=torch.float64) * 3
    a = cornered(base_a, [p for p, _ in pairs], offset)
    b = cornered(base_b, [q for _, q in pairs], offset)
    upstream = torch.randn(a.shape[0], dtype=torch.float64)
    ref, ref_grads = _run("conditional_jsd", a, b, upstream, "reference", torch.float64, "cpu", beta=beta)
    out, grads = _run("conditional_jsd", a, b, upstream, "online", torch.float32, device, beta=beta)
    # float32's own floor (the PyTorch epilogue's too): the value is H(beta) - beta S - (1 - beta) T, S = sum p s,
    # T = sum q t, so its error is relative to those terms (two close rows: 1e3x their JSD); the gradients (identity
    # head) g beta p (S - s) and g (1 - beta) q (T - t), relative to g beta p (S + s) and g (1 - beta) q (T + t).
    # Hidden rows 0-4 count (row 5's label is ignored, row 6 has none); out[t + 1] is hidden row t's value.
    p, q = torch.softmax(a, 1), torch.softmax(b, 1)
    d = torch.log_softmax(b, 1) - torch.log_softmax(a, 1) + math.log((1 - beta) / beta)
    s, t = torch.nn.functional.softplus(d), torch.nn.functional.softplus(-d)
    sum_ps, sum_qt = (p * s).sum(1, keepdim=True), (q * t).sum(1, keepdim=True)
    g = upstream[1:].unsqueeze(1)
    counted = slice(0, 5)
    scales = [
        torch.maximum(ref[1:].abs(), beta * sum_ps[:-1, 0] + (1 - beta) * sum_qt[:-1, 0]),
        (g * beta * p[:-1] * (sum_ps[:-1] + s[:-1])).norm(dim=1),
        (g * (1 - beta) * q[:-1] * (sum_qt[:-1] + t[:-1])).norm(dim=1),
    ]
    results = [(out[1:], ref[1:], "JSD")]
    results += [(got[:-1], want[:-1], f"d/dhidden of stream {i}")
                for i, (got, want) in enumerate(zip(grads, ref_grads))]
    for (got, want, what), scale in zip(results, scales):
        error = (got.cpu().double() - want).reshape(len(want), -1).norm(dim=1)[counted]
        bound = TOLERANCE[torch.float32] * scale[counted]
        assert (error <= bound).all(), f"{what}: row errors {error.tolist()} > bounds {bound.tolist()}"
    assert out[0] == 0 and out[-1] == 0, "a row that is not valid counts"
    assert all((grad[5:] == 0).all() for grad in grads), "a row that is not valid has a gradient"


def test_frozen_full_precision_heads_take_the_sweep(device):
    """The online backend runs the sweeps for a float32 head, frozen or (log-probabilities) trainable, a bf16
    head and a float32 head under autocast (tests/ops/test_online_low_precision.py checks those), and the
    chunk driver (which makes a HeadMatmuls) for a trainable head's KL."""
    hidden = torch.randn(6, 8, device=device)
    weight = torch.randn(11, 8, device=device)
    targets = torch.randint(0, 11, (6,), device=device)
    cases = {
        "frozen": (hidden, weight, 0),
        "trainable": (hidden, weight.clone().requires_grad_(), 0),
        "bfloat16": (hidden.bfloat16(), weight.bfloat16(), 0),
    }
    for name, (h, w, drivers) in cases.items():
        with use_mode() as made:
            are_fast.token_logprobs(h.clone().requires_grad_(), w, targets, backend="online").sum().backward()
        assert len(made) == drivers, name
    trainable = weight.clone().requires_grad_()
    with use_mode() as made:
        are_fast.conditional_kl(hidden[None], hidden[None] + 1, trainable, targets[None], backend="online").backward()
    assert len(made) == 1 and trainable.grad is not None
    with use_mode() as made, torch.autocast(device.type, dtype=torch.bfloat16):
        are_fast.token_logprobs(hidden.clone().requires_grad_(), weight, targets, backend="online").sum().backward()
    assert not made


def test_only_target_rows_reach_the_sweep(monkeypatch):
    """With ignored rows left out (compaction, on CPU) the sweep multiplies only the target rows."""
    weight = torch.randn(11, 8)
    seen = []
    logits_block = SweepMatmuls.logits

    def counting(self, hidden, first, last, out):
        if first == 0:  # the first vocabulary block of a block of rows
            seen.append(hidden.shape[0])
        return logits_block(self, hidden, first, last, out)

    monkeypatch.setattr(SweepMatmuls, "logits", counting)
    labels = torch.full((40,), IGNORE)
    labels[[2, 9, 17, 30]] = torch.tensor([1, 5, 0, 10])
    hidden = torch.randn(40, 8, requires_grad=True)
    out = are_fast.token_logprobs(hidden, weight, labels, backend="online")
    out.sum().backward()
    assert seen == [4]
    assert (out[labels == IGNORE] == 0).all() and (hidden.grad[labels == IGNORE] == 0).all()


@pytest.mark.parametrize("kind", list(registry.KINDS))
@pytest.mark.parametrize("capped_grad", [False, True])
def test_block_shape_keeps_the_budget(kind, capped_grad, monkeypatch):
    """Each sweep's declared [rows, block] buffers (``block_slots``) fit the 2 MiB block budget."""
    monkeypatch.delenv("ARE_FAST_BLOCK_BYTES", raising=False)
    slots = registry.online_sweep(kind).block_slots(capped_grad)
    rows, vocab = online.block_shape(4096, 32000, slots)
    assert slots * rows * vocab * 4 <= 2 << 20 and vocab % 16 == 0 and rows == 512
    assert online.block_shape(5, 40, slots) == (5, 40)  # never wider than the vocabulary nor more rows than exist


@pytest.mark.parametrize("op", ["token_logprobs", "sequence_logprobs"])
def test_trainable_head_over_many_vocabulary_blocks(op, small_blocks, device):
    """A trainable head and bias: the values sweep saves each row's log-sum-exp and the backward sweeps again
    (online_weight_pass). Targets in the first block and the ragged tail, ignored rows (left out of both
    sweeps by compaction on CPU), blocks of 3 rows and 16 vocabulary entries; every gradient against float64."""
    small_blocks(1)
    hidden = torch.randn(2, 6, 8, dtype=torch.float64) * 2
    weight = torch.randn(VOCAB, 8, dtype=torch.float64)
    bias = torch.randn(VOCAB, dtype=torch.float64)
    labels = torch.tensor([[0, 3, VOCAB - 1, IGNORE, 40, VOCAB - 2], [IGNORE, IGNORE, 17, 5, 2 * BLOCK, 1]])
    upstream = torch.randn(2, 6, dtype=torch.float64) if op == "token_logprobs" else torch.randn(2, dtype=torch.float64)
    results = {}
    for backend, dtype, where in (("reference", torch.float64, "cpu"), ("online", torch.float32, device)):
        leaves = [leaf(t, dtype, True, where) for t in (hidden, weight, bias)]
        kwargs = dict(backend=backend) if backend == "reference" else dict(backend=backend, chunk_rows=3)
        values = getattr(are_fast, op)(leaves[0], leaves[1], labels.to(where), leaves[2], **kwargs)
        (values * upstream.to(where, dtype)).sum().backward()
        results[backend] = [values] + [t.grad for t in leaves]
    for what, got, want in zip(("values", "d/dhidden", "d/dweight", "d/dbias"), results["online"], results["reference"]):
        error = rel_error(got, want)
        assert error <= TOLERANCE[torch.float32], f"{op} {what}: relative error {error:.2e}"


TRANSFORMS = {"softcap": dict(softcap=2.0), "logit_scale": dict(logit_scale=0.7), "both": dict(softcap=3.0, logit_scale=2.0)}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_logit_transforms_over_many_vocabulary_blocks(transform, small_blocks, device):
    """The cornered rows through the sweeps with a softcap (the rising, falling and confident rows run far
    beyond the cap) and/or a logit scale: the running statistics are over the transformed logits, and the
    softcap's derivative weighs each block (the KL's fourth slot too, and the JSD's gradient sweep). The
    trainable head's weight pass is covered by test_logit_transforms.py on the online backend."""
    kw = TRANSFORMS[transform]
    small_blocks(2 if "softcap" in kw else 1)  # a softcap's gradient: one derivative block beside the logits
    logits = cornered(torch.randn(len(PEAKS) + 3, VOCAB, dtype=torch.float64) * 3, list(PEAKS.values()), 0.0)
    targets = torch.tensor([3, 2 * BLOCK + 6, 0, VOCAB - 1, VOCAB - 2, IGNORE, 40])
    upstream = torch.randn(len(targets), dtype=torch.float64)
    ref, (ref_grad,) = _run("token_logprobs", logits, targets, upstream, "reference", torch.float64, "cpu", **kw)
    out, (grad,) = _run("token_logprobs", logits, targets, upstream, "online", torch.float32, device, **kw)
    assert_rows_close(out.cpu(), ref, "log-probs")
    assert_rows_close(grad.cpu(), ref_grad, "d/dhidden")
    small_blocks(6 if "softcap" in kw else 3)  # the KL with a softcap's gradient: 4 slots, 2 derivative blocks
    other = cornered(torch.randn_like(logits) * 3, list(PEAKS.values())[::-1], 0.0)
    ref, ref_grads = _run("conditional_kl", logits, other, upstream, "reference", torch.float64, "cpu", **kw)
    out, grads = _run("conditional_kl", logits, other, upstream, "online", torch.float32, device, **kw)
    assert_rows_close(out.cpu()[:-1], ref[:-1], "KL")
    for stream, (got, want) in enumerate(zip(grads, ref_grads)):
        assert_rows_close(got.cpu()[:-1], want[:-1], f"d/dhidden of stream {stream}")
    small_blocks(registry.online_sweep("jsd").block_slots("softcap" in kw))  # the JSD's last sweep: derivatives
    ref, ref_grads = _run("conditional_jsd", logits, other, upstream, "reference", torch.float64, "cpu", beta=0.3, **kw)
    out, grads = _run("conditional_jsd", logits, other, upstream, "online", torch.float32, device, beta=0.3, **kw)
    assert_rows_close(out.cpu()[:-1], ref[:-1], "JSD")
    for stream, (got, want) in enumerate(zip(grads, ref_grads)):
        assert_rows_close(got.cpu()[:-1], want[:-1], f"d/dhidden of stream {stream}")


@pytest.mark.parametrize("op", ["token_logprobs", "conditional_kl", "conditional_jsd"])
def test_a_masked_first_vocabulary_block(op, small_blocks, device):
    """A bias of -inf over the whole first vocabulary block (a masked vocabulary, shared by both streams): each
    sweep's first block has no maximum, which must rescale by 1, not exp(-inf + inf) = NaN. Values and hidden
    gradients against float64 with a bias of -1e4 there (p = 0 exactly)."""
    kind = registry.OPS_TABLE[op].kind
    small_blocks(registry.online_sweep(kind).block_slots(False))
    hiddens = [torch.randn(1, 7, 8, dtype=torch.float64) for _ in range(registry.KINDS[kind].streams)]
    weight = torch.randn(VOCAB, 8, dtype=torch.float64)
    bias = torch.randn(VOCAB, dtype=torch.float64)
    labels = torch.randint(BLOCK, VOCAB, (1, 7))
    labels[0, 3] = IGNORE
    upstream = torch.randn(1, 7, dtype=torch.float64)
    results = {}
    for backend, dtype, where, fill in (("reference", torch.float64, "cpu", -1e4),
                                        ("online", torch.float32, device, float("-inf"))):
        leaves = [leaf(h, dtype, True, where) for h in hiddens]
        head = leaf(weight, dtype, False, where)
        masked = leaf(bias.index_fill(0, torch.arange(BLOCK), fill), dtype, False, where)
        kwargs = dict(backend=backend, chunk_rows=3) if backend == "online" else dict(backend=backend)
        if op == "token_logprobs":
            out = are_fast.token_logprobs(leaves[0][0], head, labels[0].to(where), masked, **kwargs)[None]
        else:
            out = getattr(are_fast, op)(*leaves, head, labels.to(where), bias=masked, reduction="none", **kwargs)
        (out.double() * upstream.to(where)).sum().backward()
        results[backend] = [out] + [h.grad for h in leaves]
    for what, got, want in zip(("values", "d/dhidden", "d/dhidden_q"), results["online"], results["reference"]):
        error = rel_error(got, want)
        assert error <= TOLERANCE[torch.float32], f"{op} {what}: relative error {error:.2e}"
