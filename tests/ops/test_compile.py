"""The fused ops under torch.compile(fullgraph=True): one custom-op node each, no graph break, the same values
and gradients as eager; and torch.library.opcheck of the custom op's schema, fake and autograd registrations."""
import pytest
import torch

import are_fast
from are_fast.ops import autograd as op_autograd, registry
from _helpers import assert_rel_close

B, T, H, V = 2, 7, 16, 61
PAIR_OPS = [op.name for op in registry.OPS_TABLE.values() if op.inputs == "pair"]  # conditional_kl, _jsd, ...
IGNORE = -100


class AllOps(torch.nn.Module):
    """A module that calls every fused op on shared inputs, as a training step would."""

    def __init__(self, trainable: bool, **transform):
        super().__init__()
        self.head = torch.nn.Parameter(torch.randn(V, H) / H**0.5, requires_grad=trainable)
        self.proj = torch.nn.Linear(H, H)
        self.options = dict(backend="chunked", **transform)  # transform: softcap= / logit_scale=, or none

    def forward(self, hidden, hidden_q, labels):
        h = self.proj(hidden)
        kw = self.options
        return (
            are_fast.compression_loss(h, self.head, labels, **kw)
            + are_fast.sequence_logprobs(h, self.head, labels, **kw).sum() * 0.3
            + are_fast.token_logprobs(h, self.head, labels, **kw).mean()
            + sum(getattr(are_fast, op)(h, hidden_q, self.head, labels, reduction="mean", **kw).sum()
                  for op in PAIR_OPS)
        )


def _inputs():
    labels = torch.randint(0, V, (B, T))
    labels[:, :2] = IGNORE
    labels[0, 4] = IGNORE
    return torch.randn(B, T, H), torch.randn(B, T, H, requires_grad=True), labels


TRANSFORMS = {"plain": {}, "softcap+scale": dict(softcap=0.7, logit_scale=1.5)}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("head", ["frozen", "trainable"])
def test_fullgraph_compile_matches_eager(head, transform):
    torch._dynamo.reset()
    module = AllOps(head == "trainable", **TRANSFORMS[transform])
    hidden, hidden_q, labels = _inputs()
    eager = module(hidden, hidden_q, labels)
    params = [p for p in module.parameters() if p.requires_grad] + [hidden_q]
    eager_grads = torch.autograd.grad(eager, params)
    compiled = torch.compile(module, fullgraph=True, backend="inductor" if head == "frozen" else "aot_eager")
    out = compiled(hidden, hidden_q, labels)
    grads = torch.autograd.grad(out, params)
    assert_rel_close(out, eager, torch.float32, "compiled value")
    for g, e in zip(grads, eager_grads):
        assert_rel_close(g, e, torch.float32, "compiled gradient")


def test_fullgraph_compile_of_a_trainable_bf16_head_takes_the_bf16_sweeps():
    """compression_loss with a trainable bf16 head chooses its mode from the machine (the lowp sweep: two
    sweeps, "recompute") at trace time, without a graph break; compiled and eager agree, on the lowp path."""
    from are_fast.ops import sweep_precision

    torch._dynamo.reset()
    hidden, _, labels = _inputs()
    hidden = hidden.bfloat16().requires_grad_()
    head = (torch.randn(V, H) / H**0.5).bfloat16().requires_grad_()
    loss = lambda h, w: are_fast.compression_loss(h, w, labels, backend="online")  # noqa: E731
    with sweep_precision.use_path("lowp") as choices:
        eager = loss(hidden, head)
        eager_grads = torch.autograd.grad(eager, (hidden, head))
        out = torch.compile(loss, fullgraph=True, backend="aot_eager")(hidden, head)
        grads = torch.autograd.grad(out, (hidden, head))
    assert choices and {c.path for c in choices} == {"lowp"}
    assert_rel_close(out, eager, torch.float32, "compiled value")
    for g, e in zip(grads, eager_grads):
        assert_rel_close(g.float(), e.float(), torch.bfloat16, "compiled gradient")


def test_compiled_label_check_still_raises():
    """The label-range check moves into the op under torch.compile: a bad label still gives a ValueError."""
    torch._dynamo.reset()
    module = AllOps(False)
    hidden, hidden_q, labels = _inputs()
    labels[1, 3] = V + 5
    with pytest.raises(ValueError, match="labels must lie in"):
        torch.compile(module, fullgraph=True, backend="aot_eager")(hidden, hidden_q, labels)


def _op_args(mode, kind="logprob", backend="chunked", transform=(None, None)):
    """The op's arguments in ``mode``; "recompute+row_scale": recompute with a row scale (a trainable bf16 head's
    compression_loss on the lowp sweep), whose total's gradient flows through the recompute backward."""
    scaled = mode in ("scalar", "recompute+row_scale")
    mode = mode.removesuffix("+row_scale")
    hidden = torch.randn(9, H, dtype=torch.float64, requires_grad=True)
    hidden_q = torch.randn(9, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=mode in ("scalar", "recompute"))
    labels = torch.randint(0, V, (9,))
    labels[::3] = IGNORE
    spec = registry.kind(kind)
    hiddens = [hidden, hidden_q][: spec.streams]
    if spec.row_label == "valid":
        labels = labels != IGNORE
    row_scale = torch.rand(9, dtype=torch.float64) if scaled else None
    train = mode in ("scalar", "recompute")
    return (kind, hiddens, weight, None, labels, row_scale, IGNORE, backend, 4, True, mode,
            [True] * len(hiddens), train, False, False, None, *transform, [0.3] * len(spec.params))


@pytest.mark.parametrize("transform", [(None, None), (0.7, 1.5)], ids=["plain", "softcap+scale"])
@pytest.mark.parametrize("mode", ["values", "rescale", "scalar", "recompute", "recompute+row_scale"])
@pytest.mark.parametrize("kind", list(registry.KINDS))
@pytest.mark.parametrize("backend", ["chunked", "online"])
def test_opcheck_linear_streams(mode, kind, backend, transform):
    args = _op_args(mode, kind, backend, transform)
    if mode == "values":
        args = args[:11] + ([False] * len(args[1]), False, False, False, None) + args[16:]
        for h in args[1]:
            h.requires_grad_(False)
    with op_autograd.allow_retain_graph():  # opcheck runs the backward more than once
        torch.library.opcheck(op_autograd.linear_streams, args)
