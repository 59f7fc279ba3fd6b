"""Every bad input named in the loss-ops issue raises a clear error that names the argument, on the device under
test (``--device``)."""
import pytest
import torch

import are_fast

B, T, H, V = 2, 5, 8, 11


def good():
    return dict(
        hidden=torch.randn(B, T, H), hidden_q=torch.randn(B, T, H), weight=torch.randn(V, H),
        labels=torch.randint(0, V, (B, T)), bias=torch.randn(V),
    )


def call_all(a):
    """Each sequence op with the same arguments."""
    are_fast.sequence_logprobs(a["hidden"], a["weight"], a["labels"], a["bias"])
    are_fast.compression_loss(a["hidden"], a["weight"], a["labels"], a["bias"])
    are_fast.conditional_kl(a["hidden"], a["hidden_q"], a["weight"], a["labels"], a["bias"])


CASES = [
    ("hidden H != weight H", dict(weight=torch.randn(V, H + 1)), ValueError, r"weight: expected \[V, H\] with H=8"),
    ("bias V != weight V", dict(bias=torch.randn(V + 2)), ValueError, r"bias: expected shape \(11,\)"),
    ("labels B mismatch", dict(labels=torch.randint(0, V, (B + 1, T))), ValueError, r"labels: expected shape \(2, 5\)"),
    ("labels T mismatch", dict(labels=torch.randint(0, V, (B, T - 1))), ValueError, r"labels: expected shape \(2, 5\)"),
    ("integer hidden", dict(hidden=torch.randint(0, 3, (B, T, H))), TypeError, r"hidden: expected a floating tensor"),
    ("float labels", dict(labels=torch.rand(B, T)), TypeError, r"labels: expected an integer tensor"),
    ("label >= V", dict(labels=torch.full((B, T), V)), ValueError, r"labels: labels must lie in \[0, 11\).*found 11"),
    ("negative label", dict(labels=torch.full((B, T), -3)), ValueError, r"labels must lie in \[0, 11\).*found -3"),
    ("weight not 2-D", dict(weight=torch.randn(V, H, 1)), ValueError, r"weight: expected a 2-D LM head"),
    ("weight dtype", dict(weight=torch.randn(V, H, dtype=torch.float64)), TypeError, r"weight: expected the hidden"),
    ("hidden not 3-D", dict(hidden=torch.randn(B * T, H)), ValueError, r"hidden: expected \[B, T, H\]"),
    ("different devices", dict(weight=torch.empty(V, H, device="meta")), ValueError, r"one device.*weight on meta"),
]


@pytest.mark.parametrize("what,change,error,message", CASES, ids=[c[0] for c in CASES])
def test_bad_sequence_inputs(what, change, error, message, device):
    a = {name: v if v.device.type == "meta" else v.to(device) for name, v in (good() | change).items()}
    with pytest.raises(error, match=message):
        call_all(a)


def test_bad_token_inputs(device):
    h, w = torch.randn(6, H, device=device), torch.randn(V, H, device=device)
    with pytest.raises(ValueError, match=r"targets: expected shape \(6,\)"):
        are_fast.token_logprobs(h, w, torch.zeros(5, dtype=torch.long, device=device))
    with pytest.raises(TypeError, match="targets: expected an integer tensor"):
        are_fast.token_logprobs(h, w, torch.zeros(6, device=device))
    with pytest.raises(ValueError, match=r"hidden: expected \[N, H\] or \[B, T, H\]"):
        are_fast.token_logprobs(torch.randn(H, device=device), w, torch.zeros((), dtype=torch.long, device=device))
    with pytest.raises(ValueError, match=r"targets: labels must lie in \[0, 11\)"):
        are_fast.token_logprobs(h, w, torch.full((6,), 99, device=device))
    with pytest.raises(TypeError, match="hidden: expected a torch.Tensor"):
        are_fast.token_logprobs([[0.0]], w, torch.zeros(1, dtype=torch.long))


def test_bad_kl_inputs(device):
    a = {name: v.to(device) for name, v in good().items()}
    with pytest.raises(ValueError, match=r"hidden_q: expected shape \(2, 5, 8\)"):
        are_fast.conditional_kl(a["hidden"], a["hidden_q"][:, :3], a["weight"], a["labels"])
    with pytest.raises(ValueError, match="reduction: expected 'sum', 'mean' or 'none'"):
        are_fast.conditional_kl(a["hidden"], a["hidden_q"], a["weight"], a["labels"], reduction="max")


TRANSFORM_CASES = [
    ("zero", 0.0, ValueError, "got 0.0"),
    ("negative", -30, ValueError, "got -30"),
    ("infinite", float("inf"), TypeError, r"a finite real number\), got inf"),
    ("NaN", float("nan"), TypeError, r"a finite real number\), got nan"),
    ("string", "30", TypeError, "got '30'"),
    ("bool", True, TypeError, "got True"),
    ("tensor", torch.tensor(30.0), TypeError, r"got tensor\(30\.\)"),
]


@pytest.mark.parametrize("name", ["softcap", "logit_scale"])
@pytest.mark.parametrize("what,value,error,message", TRANSFORM_CASES, ids=[c[0] for c in TRANSFORM_CASES])
def test_bad_logit_transforms(name, what, value, error, message, device):
    """softcap / logit_scale: None or a positive finite real, on every head-taking op and module wrapper."""
    a = {n: v.to(device) for n, v in good().items()}
    expected = rf"{name}: expected None or a positive (cap|scale).*{message}"
    calls = [
        lambda kw: are_fast.token_logprobs(a["hidden"], a["weight"], a["labels"], **kw),
        lambda kw: are_fast.sequence_logprobs(a["hidden"], a["weight"], a["labels"], **kw),
        lambda kw: are_fast.compression_loss(a["hidden"], a["weight"], a["labels"], **kw),
        lambda kw: are_fast.conditional_kl(a["hidden"], a["hidden_q"], a["weight"], a["labels"], **kw),
        lambda kw: are_fast.CompressionLoss(**kw),
        lambda kw: are_fast.SequenceLogprobs(**kw),
        lambda kw: are_fast.ConditionalKL(**kw),
    ]
    for call in calls:
        with pytest.raises(error, match=expected):
            call({name: value})


def test_bad_alignment_inputs():
    lp, lpn = torch.randn(4), torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"ref_n: expected the shape of lp_qn \(4, 2\)"):
        are_fast.alignment_loss(lp, lp, lpn, lp, torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"lp_qn: expected \[B, n\] with B=4"):
        are_fast.alignment_loss(lp, lp, torch.randn(5, 2), lp, torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"lp_pp: expected shape \(4,\)"):
        are_fast.alignment_loss(lp, torch.randn(3), lpn, lp, lpn)
    with pytest.raises(ValueError, match="tau: expected a positive temperature"):
        are_fast.alignment_loss(lp, lp, lpn, lp, lpn, tau=0)


@pytest.mark.parametrize("triton_version, numpy_version, refused", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False), ("3.9.0+git1", "2.5.0", False),
])
def test_interpreter_numpy_clash_is_named(monkeypatch, triton_version, numpy_version, refused):
    """Triton < 3.7's interpreter fails inside every kernel with numpy >= 2.4: say so before launching one."""
    import numpy
    import triton

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a = good()
    if refused:
        with pytest.raises(ValueError, match=rf"triton {triton_version} cannot run with numpy {numpy_version}"):
            are_fast.compression_loss(a["hidden"], a["weight"], a["labels"], backend="triton")
    else:
        from are_fast.ops.backends import REGISTRY

        assert REGISTRY["triton"].unavailable(torch.device("cpu")) is None


def test_backend_choice(monkeypatch):
    a = good()
    with pytest.raises(ValueError, match="backend: expected one of"):
        are_fast.compression_loss(a["hidden"], a["weight"], a["labels"], backend="fast")
    monkeypatch.setenv("ARE_FAST_BACKEND", "nope")
    with pytest.raises(ValueError, match="backend: expected one of"):
        are_fast.compression_loss(a["hidden"], a["weight"], a["labels"])
    monkeypatch.setenv("ARE_FAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        are_fast.compression_loss(a["hidden"], a["weight"], a["labels"])
    monkeypatch.delenv("ARE_FAST_BACKEND")
    monkeypatch.setenv("ARE_FAST_NATIVE", "0")  # an installed ahead-of-time native build would be the default
    from are_fast.ops.backends import resolve_backend

    assert resolve_backend(None, torch.device("cpu")) == "online"
