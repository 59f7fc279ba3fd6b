"""What the op benchmarks run: LM heads, token counts per device, and random inputs for each op.

A shape is (head, N, dtype, frozen or trainable head); N counts the LM-head rows of all decoder streams
together, so every op at one shape does the same matmul work and shares one bare-matmul floor:
- token_logprobs: hidden [N, H], targets [N];
- compression_loss, sequence_logprobs: hidden [N / T, T, H], labels [N / T, T];
- conditional_kl: two streams (p, q) of [N / (2T), T, H];
- alignment_loss: three decoder streams, q->pos and pos->pos [B, T, H] and q->neg_j [B * NEGATIVES, T, H],
  with B * T * (2 + NEGATIVES) = N.
Labels ignore the first positions of each sequence, where AutoRegEmbed's decoder reads the compressed tokens.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace

import torch

OPS = ("token_logprobs", "compression_loss", "sequence_logprobs", "conditional_kl", "alignment_loss")
NEGATIVES = 2  # q->neg_j streams per query in alignment_loss
IGNORE_INDEX = -100


@dataclass(frozen=True)
class Head:
    name: str
    hidden: int
    vocab: int


HEADS = {
    head.name: head
    for head in (
        Head("llama2-7b", 4096, 32000),
        Head("llama3-8b", 4096, 128256),
        Head("qwen2.5-7b", 3584, 152064),
        Head("small", 896, 151936),  # Qwen2.5-0.5B's head
        Head("cpu-target", 1024, 32000),  # the CPU target of the benchmark issue
        Head("issue2", 512, 32000),  # the closing figure of the loss-ops issue
        Head("tiny", 64, 1000),  # smoke mode
    )
}

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Shape:
    head: Head
    tokens: int  # N: LM-head rows of all streams together
    dtype: torch.dtype
    trainable: bool  # the head gets a weight gradient
    seq_len: int  # T of the sequence ops

    @property
    def mode(self) -> str:
        return "trainable" if self.trainable else "frozen"

    @property
    def id(self) -> str:
        return f"{self.head.name}-N{self.tokens}-{_DTYPE_NAMES[self.dtype]}-{self.mode}"


@dataclass(frozen=True)
class Case:
    op: str
    shape: Shape

    @property
    def id(self) -> str:
        return f"{self.op}-{self.shape.id}"


def smoke_mode() -> bool:
    """ARE_FAST_BENCH_SMOKE=1: tiny shapes and one round, so CI checks that every case still runs."""
    return os.environ.get("ARE_FAST_BENCH_SMOKE", "0") not in ("", "0", "false", "False")


def bench_device() -> torch.device:
    """ARE_FAST_BENCH_DEVICE, else CUDA when present, else CPU."""
    name = os.environ.get("ARE_FAST_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def op_cases(device: torch.device, smoke: bool) -> list[Case]:
    """The (op, shape) pairs of this run: the full matrix on GPU, a budgeted set on CPU (2 cores: each case
    a few seconds) with bf16 rows beside the float32 ones at the CPU target (every op, frozen and trainable
    head), one tiny shape per head mode (and on CPU per dtype) in smoke mode."""
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    if smoke:
        dtypes = (dtype,) if gpu else (torch.float32, torch.bfloat16)
        tiny = [Shape(HEADS["tiny"], 128, d, trainable, 16) for d in dtypes for trainable in (False, True)]
        return [Case(op, shape) for shape in tiny for op in OPS]
    if gpu:
        seq = 512
        core = [Shape(HEADS["llama3-8b"], 16384, dtype, trainable, seq) for trainable in (False, True)]
        cases = [Case(op, shape) for shape in core for op in OPS]
        token_counts = [Shape(HEADS["llama3-8b"], n, dtype, False, seq) for n in (8192, 32768)]
        other_heads = [Shape(HEADS[name], 16384, dtype, False, seq) for name in ("llama2-7b", "qwen2.5-7b", "small")]
        extra_ops = ("token_logprobs", "sequence_logprobs")
        return cases + [Case(op, s) for s in token_counts + other_heads for op in extra_ops]
    seq = 256
    target = Shape(HEADS["cpu-target"], 4096, dtype, False, seq)
    cases = [Case(op, target) for op in OPS]
    trainable = Shape(HEADS["cpu-target"], 4096, dtype, True, seq)
    cases += [Case("token_logprobs", trainable), Case("compression_loss", trainable)]
    cases.append(Case("token_logprobs", Shape(HEADS["issue2"], 4096, dtype, False, seq)))
    named = ("llama2-7b", "llama3-8b", "qwen2.5-7b", "small")
    cases += [Case("token_logprobs", Shape(HEADS[name], 128, dtype, False, seq)) for name in named]
    bf16 = [Shape(HEADS["cpu-target"], 4096, torch.bfloat16, trainable, seq) for trainable in (False, True)]
    return cases + [Case(op, shape) for shape in bf16 for op in OPS]


def floor_shapes(cases: list[Case]) -> list[Shape]:
    """The distinct shapes of ``cases``, in order: one floor measurement each."""
    return list(dict.fromkeys(case.shape for case in cases))


def _labels(batch: int, seq: int, vocab: int, generator, device) -> torch.Tensor:
    labels = torch.randint(0, vocab, (batch, seq), generator=generator, device=device)
    labels[:, : min(8, seq // 4)] = IGNORE_INDEX  # the compressed-token positions
    return labels


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> SimpleNamespace:
    """Random inputs of ``case`` on ``device``; ``leaves`` are the tensors that get gradients.

    Hidden states ~ N(0, 1) and a head ~ N(0, 2 / sqrt(H)) give logits of standard deviation ~2, spread
    like a trained model's.
    """
    shape, head = case.shape, case.shape.head
    generator = torch.Generator(device=device).manual_seed(seed)

    def hidden(*dims):
        x = torch.randn(*dims, head.hidden, generator=generator, device=device, dtype=torch.float32)
        return x.to(shape.dtype).requires_grad_(True)

    weight = (torch.randn(head.vocab, head.hidden, generator=generator, device=device) * (2 / head.hidden**0.5)).to(
        shape.dtype
    )
    weight.requires_grad_(shape.trainable)
    x = SimpleNamespace(weight=weight)
    n, seq = shape.tokens, shape.seq_len
    if case.op == "token_logprobs":
        x.hidden = hidden(n)
        x.targets = torch.randint(0, head.vocab, (n,), generator=generator, device=device)
        x.leaves = [x.hidden]
    elif case.op in ("compression_loss", "sequence_logprobs"):
        x.hidden = hidden(_batch(n, seq, 1), seq)
        x.labels = _labels(x.hidden.shape[0], seq, head.vocab, generator, device)
        x.leaves = [x.hidden]
    elif case.op == "conditional_kl":
        batch = _batch(n, seq, 2)
        x.hidden_p, x.hidden_q = hidden(batch, seq), hidden(batch, seq)
        x.labels = _labels(batch, seq, head.vocab, generator, device)
        x.leaves = [x.hidden_p, x.hidden_q]
    elif case.op == "alignment_loss":
        batch = _batch(n, seq, 2 + NEGATIVES)
        x.h_qp, x.h_pp, x.h_qn = hidden(batch, seq), hidden(batch, seq), hidden(batch * NEGATIVES, seq)
        x.pos_labels = _labels(batch, seq, head.vocab, generator, device)
        x.neg_labels = _labels(batch * NEGATIVES, seq, head.vocab, generator, device)
        # The frozen stage-1 model's scores of the same texts: constants here.
        x.ref_p = -seq * torch.rand(batch, generator=generator, device=device)
        x.ref_n = -seq * torch.rand(batch, NEGATIVES, generator=generator, device=device)
        x.leaves = [x.h_qp, x.h_pp, x.h_qn]
    else:
        raise ValueError(f"op: expected one of {', '.join(OPS)}, got {case.op!r}")
    if shape.trainable:
        x.leaves.append(weight)
    return x


def _batch(tokens: int, seq: int, streams: int) -> int:
    if tokens % (seq * streams):
        raise ValueError(f"tokens: {tokens} is not a multiple of seq_len * streams = {seq * streams}")
    return tokens // (seq * streams)


def clear_grads(x: SimpleNamespace) -> None:
    """Drop the gradients of the last round, so each round allocates its own like a training step."""
    for leaf in x.leaves:
        leaf.grad = None
