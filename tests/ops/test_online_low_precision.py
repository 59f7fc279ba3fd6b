"""The online sweep for low-precision heads (``are_fast.ops.online`` with ``sweep_matmuls`` and the dispatch of
``sweep_precision``), each path forced: ``lowp`` (bf16/fp16 block matmuls, float32 statistics) and ``float32``
(a float32 copy of the head), against float64 on the same bf16-rounded inputs, with small blocks so every row
spans many vocabulary blocks and every accumulator is rescaled. Log-probabilities within 0.05 absolute on every
row (one bf16 rounding per logit), gradients within the bf16 standard (2e-2 relative)."""
import pytest
import torch

from are_fast.ops import online, sweep_precision
from are_fast.ops.registry import OPS_TABLE
from are_fast.ops.sweep_matmuls import SweepMatmuls
from _helpers import OPS as OP_FORMS
from _helpers import TOLERANCE, leaf, rel_error

IGNORE = -100
B, T, H, V = 3, 7, 40, 203  # 21 rows in blocks of 4; 203 vocabulary entries in blocks of 16 (a ragged tail)
LOGPROB_TOLERANCE = 0.05


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setenv("ARE_FAST_BLOCK_BYTES", str(4 * 3 * 4 * 16))  # 16 entries for 4 rows, three slots


@pytest.fixture
def operands(monkeypatch):
    """Records (hidden dtype, head dtype) of every logits block product and the SweepMatmuls made."""
    seen, made = [], []
    logits, init = SweepMatmuls.logits, SweepMatmuls.__init__

    def recording_logits(self, hidden, first, last, out, **kwargs):
        seen.append((hidden.dtype, self.weight.dtype))
        return logits(self, hidden, first, last, out, **kwargs)

    def recording_init(self, *args):
        init(self, *args)
        made.append(self)

    monkeypatch.setattr(SweepMatmuls, "logits", recording_logits)
    monkeypatch.setattr(SweepMatmuls, "__init__", recording_init)
    return seen, made


def _masters(dtype, apart=None):
    """float64 masters, rounded to ``dtype`` (the reference sees the same inputs); logits spread ~3. apart
    ([B, T, 1] or a number): stream q as stream p plus that much noise (inf: independent, as without it)."""
    labels = torch.randint(0, V, (B, T))
    labels[0, :2] = IGNORE
    labels[2, 4] = IGNORE
    hidden = torch.randn(B, T, H, dtype=torch.float64)
    noise = torch.randn(B, T, H, dtype=torch.float64)
    masters = dict(
        hidden=hidden,
        hidden_q=noise if apart is None else torch.where(torch.as_tensor(apart).isinf(), noise, hidden + apart * noise),
        weight=torch.randn(V, H, dtype=torch.float64) * 3 / H**0.5,
        bias=torch.randn(V, dtype=torch.float64) * 0.5,
    )
    return {n: v.to(dtype).double() for n, v in masters.items()}, labels


def _call(op, args, labels, **kwargs):
    """The registry's op ``op`` on [B, T, H] streams: token ops as they are, sequence_logprobs summed, pair ops per
    position (reduction "none", their parameters at their defaults)."""
    spec = OPS_TABLE[op]
    form = {"tokens": f"{op}-3d", "pair": f"{op}-none"}.get(spec.inputs, op if op in OP_FORMS else f"{op}-sum")
    return OP_FORMS[form](dict(args, labels=labels), **kwargs)


def _run(op, masters, labels, dtype, trainable, upstream=None, autocast=False, **kwargs):
    args = {n: leaf(v, dtype, n.startswith("hidden") or trainable) for n, v in masters.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = _call(op, args, labels, **kwargs)
    if upstream is None:
        upstream = torch.randn(out.shape, dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    names = [n for n, t in args.items() if t.requires_grad and (op in PAIR_OPS or n != "hidden_q")]
    return out, upstream, {n: args[n].grad for n in names}


def _check(op, dtype, trainable, path, autocast=False, apart=None, **transform):
    masters, labels = _masters(torch.bfloat16 if autocast else dtype, apart)
    ref, upstream, ref_grads = _run(op, masters, labels, torch.float64, trainable, backend="reference", **transform)
    with sweep_precision.use_path(path) as choices:
        out, _, grads = _run(op, masters, labels, torch.float32 if autocast else dtype, trainable, upstream,
                             autocast=autocast, backend="online", chunk_rows=4, **transform)
    assert choices and {c.path for c in choices} == {path}
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    if op in PAIR_OPS:
        error = rel_error(out, ref)
        assert error <= TOLERANCE[torch.bfloat16], f"{op}: relative error {error:.2e}"
    else:
        worst = (out.double() - ref).abs().max().item()
        assert worst <= LOGPROB_TOLERANCE, f"{op}: a row is {worst:.3f} off"
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert grad.dtype == (torch.float32 if autocast else dtype), name
        error = rel_error(grad, ref_grads[name])
        assert error <= TOLERANCE[torch.bfloat16], f"{op} d{name}: relative error {error:.2e}"
    return out, grads


PAIR_OPS = [name for name, spec in OPS_TABLE.items() if spec.inputs == "pair"]
FROZEN_OPS = list(OPS_TABLE)


@pytest.mark.parametrize("path", ["lowp", "float32"])
@pytest.mark.parametrize("op", FROZEN_OPS)
def test_frozen_bf16_head(op, path, small_blocks, operands):
    seen, made = operands
    _check(op, torch.bfloat16, False, path)
    expected = torch.bfloat16 if path == "lowp" else torch.float32
    assert seen and set(seen) == {(expected, expected)}, "the block matmuls ran in another dtype"
    assert len(made) == 1, "one cast of the head per call (a frozen head: one pass)"


@pytest.mark.parametrize("path", ["lowp", "float32"])
@pytest.mark.parametrize("op", ["token_logprobs", "sequence_logprobs"])
def test_trainable_bf16_head(op, path, small_blocks, operands):
    """The values sweep, then the weight sweep (online_weight_pass) with float32 weight/bias accumulators."""
    seen, made = operands
    _check(op, torch.bfloat16, True, path)
    expected = torch.bfloat16 if path == "lowp" else torch.float32
    assert set(seen) == {(expected, expected)} and len(made) == 2  # forward and backward


@pytest.mark.parametrize("transform", [{}, {"softcap": 2.5, "logit_scale": 1.3}])
def test_trainable_compression_loss_takes_two_sweeps(transform, small_blocks, operands):
    """compression_loss knows its row scale in the forward, so a trainable head gets every gradient from one
    chunk-driver pass (3 matmuls per chunk); but for a bf16 head that pass multiplies a float32 copy, so on the
    lowp path it takes the values sweep and the weight sweep instead, its gradient through the loss's row scale."""
    seen, made = operands
    _check("compression_loss", torch.bfloat16, True, "lowp", **transform)
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)} and len(made) == 2  # forward and backward


@pytest.mark.parametrize(("op", "trainable"), [("token_logprobs", False), ("token_logprobs", True),
                                                *((op, False) for op in PAIR_OPS)])
def test_logit_transforms_in_bf16(op, trainable, small_blocks):
    """A softcap (its derivative weighs each block before the low-precision product) and a logit scale."""
    _check(op, torch.bfloat16, trainable, "lowp", softcap=2.5, logit_scale=1.3)


# Rows by 4 (the chunks): close, independent, then alternating, so chunks of every kind occur.
MIXED = torch.tensor([0.01] * 4 + [torch.inf] * 4 + [0.01, torch.inf] * 6 + [0.01])[: B * T].view(B, T, 1)


@pytest.mark.parametrize("streams", [0.01, 0.1, "mixed"], ids=["1%-apart", "10%-apart", "mixed"])
@pytest.mark.parametrize("transform", [{}, {"softcap": 2.5, "logit_scale": 1.3}], ids=["plain", "softcap+scale"])
@pytest.mark.parametrize("op", PAIR_OPS)
def test_pair_ops_of_close_streams(op, transform, streams, small_blocks):
    """A pair's log-ratio a - b is as small as the streams are close, and a bf16 logit is rounded to 2^-9 of its
    size: formed from two bf16 logits it was lost (value and gradients 0.64-0.68 relative error at 1% apart,
    as naive bf16 code gets). b = a - (h_p - h_q) W on close rows, and stream q's gradient as one sum of
    (q - p) W, keep the bf16 standard at any distance; mixed chunks (close and independent rows) take each
    row's own form."""
    _check(op, torch.bfloat16, False, "lowp", apart=MIXED if streams == "mixed" else streams, **transform)


@pytest.mark.parametrize("op", ["token_logprobs", *PAIR_OPS])
def test_fp16_head(op, small_blocks):
    _check(op, torch.float16, False, "lowp")


@pytest.mark.parametrize(("op", "trainable"), [("token_logprobs", False), ("token_logprobs", True),
                                                ("compression_loss", True), *((op, False) for op in PAIR_OPS)])
def test_autocast_takes_the_sweep_with_one_cast(op, trainable, small_blocks, operands):
    """A float32 head under CPU bf16 autocast: the sweep with bf16 operands (the head cast once per pass, not
    per block), float32 gradients, against float64 on the bf16-rounded inputs. (A trainable head's KL takes
    the chunk driver: the sweep covers the log-probability ops.) The pair ops take it with a frozen head."""
    seen, made = operands
    _check(op, torch.float32, trainable, "lowp", autocast=True)
    assert set(seen) == {(torch.bfloat16, torch.bfloat16)}
    assert len(made) == (2 if trainable else 1)


def test_chunk_path_leaves_the_sweep(operands):
    seen, made = operands
    masters, labels = _masters(torch.bfloat16)
    with sweep_precision.use_path("chunk") as choices:
        _run("token_logprobs", masters, labels, torch.bfloat16, False, backend="online")
    assert not seen and not made and not choices


def test_low_precision_paths_agree_with_each_other(small_blocks):
    """lowp and float32 paths on the same bf16 inputs: the same numbers up to bf16 logit rounding."""
    masters, labels = _masters(torch.bfloat16)
    upstream = torch.randn(B, T, dtype=torch.float64)
    results = {}
    for path in ("lowp", "float32"):
        with sweep_precision.use_path(path):
            results[path] = _run("token_logprobs", masters, labels, torch.bfloat16, False, upstream,
                                 backend="online", chunk_rows=4)
    assert (results["lowp"][0] - results["float32"][0]).abs().max() <= LOGPROB_TOLERANCE
    assert rel_error(results["lowp"][2]["hidden"], results["float32"][2]["hidden"]) <= TOLERANCE[torch.bfloat16]


def test_sweep_block_shape_grows_for_low_precision(monkeypatch):
    """1024 x 2048 blocks for low-precision operands (8 MiB per float32 buffer), against 512 rows within 2 MiB."""
    monkeypatch.delenv("ARE_FAST_BLOCK_BYTES", raising=False)
    for slots in (1, 3, 5):
        assert online.block_shape(4096, 32000, slots, low_precision=True) == (1024, 2048)
        rows, vocab = online.block_shape(4096, 32000, slots)
        assert rows == 512 and 4 * slots * rows * vocab <= 2 << 20
