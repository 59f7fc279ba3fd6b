"""Rows that are not targets never reach the LM-head matmuls, and compression_loss computes every gradient
(the head's too) in its one forward pass: both checked by counting the rows the head multiplies, and the
values and gradients against the float64 reference with many ignored rows."""
import pytest
import torch

import are_fast
from are_fast.ops import autograd as op_autograd, registry
from are_fast.ops.head_matmuls import HeadMatmuls
from _helpers import assert_rel_close

B, T, H, V = 4, 12, 16, 97
IGNORE = -100


@pytest.fixture
def head_rows(monkeypatch):
    """Counts the rows of every logits product (h @ W.T) the chunk driver runs."""
    seen = []
    logits = HeadMatmuls.logits

    def counting(self, hidden, out, **kwargs):
        seen.append(hidden.shape[0])
        return logits(self, hidden, out, **kwargs)

    monkeypatch.setattr(HeadMatmuls, "logits", counting)
    return seen


def _inputs(ignored_fraction=0.8):
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < ignored_fraction] = IGNORE
    labels[0, 5] = 3  # at least one target
    return dict(
        hidden=torch.randn(B, T, H, dtype=torch.float64),
        hidden_q=torch.randn(B, T, H, dtype=torch.float64),
        weight=torch.randn(V, H, dtype=torch.float64) * 2 / H**0.5,
        bias=torch.randn(V, dtype=torch.float64),
        labels=labels,
    )


def _call(spec):
    """op(args, **kwargs) for an op of the registry (pair ops per position: reduction="none")."""
    fn = getattr(are_fast, spec.name)
    if spec.inputs == "pair":
        return lambda a, **k: fn(a["hidden"], a["hidden_q"], a["weight"], a["labels"], bias=a["bias"],
                                 reduction="none", **k)
    return lambda a, **k: fn(a["hidden"], a["weight"], a["labels"], a["bias"], **k)


OPS = {name: _call(spec) for name, spec in registry.OPS_TABLE.items()}


def _target_rows(labels, op):
    if registry.OPS_TABLE[op].inputs == "tokens":
        return int((labels != IGNORE).sum())
    return int((labels[:, 1:] != IGNORE).sum())  # position t predicts labels[:, t + 1]


def _run(op, masters, dtype, trainable, upstream=None, **kwargs):
    args = {
        n: (v if n == "labels" else v.detach().to(dtype).clone().requires_grad_(n.startswith("hidden") or trainable))
        for n, v in masters.items()
    }
    out = OPS[op](args, **kwargs)
    upstream = torch.randn(out.shape, dtype=torch.float64) if upstream is None else upstream
    (out.double() * upstream).sum().backward()
    return out, upstream, {n: v.grad for n, v in args.items() if n != "labels" and v.grad is not None}


@pytest.mark.parametrize("head", ["frozen", "trainable"])
@pytest.mark.parametrize("op", list(OPS))
def test_ignored_rows_skip_the_matmuls_and_match_reference(op, head, head_rows):
    masters = _inputs()
    trainable = head == "trainable"
    ref, upstream, ref_grads = _run(op, masters, torch.float64, trainable, backend="reference")
    head_rows.clear()
    out, _, grads = _run(op, masters, torch.float32, trainable, upstream, backend="chunked", chunk_rows=5)
    streams = registry.kind(registry.OPS_TABLE[op].kind).streams
    # One forward pass (and for a trainable head with a per-row output, one recomputing backward pass).
    passes = 2 if trainable and op != "compression_loss" else 1
    assert sum(head_rows) == _target_rows(masters["labels"], op) * streams * passes
    assert_rel_close(out, ref, torch.float32, f"{op} value")
    assert set(grads) == set(ref_grads)
    for name, grad in grads.items():
        assert_rel_close(grad, ref_grads[name], torch.float32, f"{op} d/d{name}")


def test_no_target_rows_at_all():
    masters = _inputs(ignored_fraction=1.0)
    masters["labels"][:] = IGNORE
    for op in OPS:
        out, _, grads = _run(op, masters, torch.float32, True, backend="chunked", chunk_rows=5)
        assert (out == 0).all(), op
        assert all((g == 0).all() for g in grads.values()), op


def test_compression_loss_trainable_head_is_one_pass(head_rows):
    """The weight gradient comes out of the forward: no chunk is multiplied twice."""
    masters = _inputs(ignored_fraction=0.0)
    head_rows.clear()
    _run("compression_loss", masters, torch.float32, True, backend="chunked", chunk_rows=7)
    assert sum(head_rows) == B * (T - 1)


def test_second_backward_raises_unless_allowed():
    masters = _inputs()
    hidden = masters["hidden"].float().requires_grad_()
    loss = are_fast.token_logprobs(hidden, masters["weight"].float(), masters["labels"], backend="chunked").sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="allow_retain_graph"):
        loss.backward()
    with op_autograd.allow_retain_graph():
        loss = are_fast.token_logprobs(hidden, masters["weight"].float(), masters["labels"], backend="chunked").sum()
    first = torch.autograd.grad(loss, hidden, retain_graph=True)[0]
    second = torch.autograd.grad(loss, hidden)[0]
    assert torch.equal(first, second)
