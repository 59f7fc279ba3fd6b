"""Shared test helpers: tolerances, the float64 oracle, the backends runnable here, the op cases, cornered logits,
the encoder tests' texts and naive embeddings, and tokenizers trained here."""
import random

import torch

import are_fast
from are_fast.ops import torch_epilogues
from are_fast.ops.registry import OPS_TABLE

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float64: 1e-10}
FUSED_BACKENDS = [b for b in are_fast.BACKENDS if b != "reference"]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error ||out - ref|| / ||ref||, in float64 on CPU (either may live on any device); NaN
    anywhere gives inf."""
    out, ref = out.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if not torch.isfinite(out).all() or not torch.isfinite(ref).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def assert_rel_close(out, ref, dtype, what=""):
    err = rel_error(out, ref)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e}"


def leaf(tensor: torch.Tensor, dtype, requires_grad: bool, device="cpu") -> torch.Tensor:
    """A fresh leaf: tensor as dtype on device."""
    return tensor.detach().to(device, dtype, copy=True).requires_grad_(requires_grad)


# The op cases: fresh float64 masters, each public op on them, run on a backend and dtype.
IGNORE_INDEX = -100


def make_inputs(batch=3, length=9, hidden=32, vocab=203, logit_scale=3.0):
    """Fresh float64 masters: two decoder streams, a head with bias, labels with an ignored prefix and holes. The
    default vocabulary is on no block boundary; the 27 rows in chunks of 4 leave a remainder."""
    labels = torch.randint(0, vocab, (batch, length))
    labels[:, :2] = IGNORE_INDEX  # the compressed-token prefix
    labels[torch.rand(batch, length) < 0.2] = IGNORE_INDEX
    return dict(
        hidden=torch.randn(batch, length, hidden, dtype=torch.float64),
        hidden_q=torch.randn(batch, length, hidden, dtype=torch.float64),
        weight=torch.randn(vocab, hidden, dtype=torch.float64) * logit_scale / hidden**0.5,
        bias=torch.randn(vocab, dtype=torch.float64),
        labels=labels,
    )


def _registry_ops() -> dict:
    """name -> op(args, **kwargs) for every op of the registry, in each of its forms: token ops on [N, H] and
    [B, T, H], sequence ops as they are (and sequence_logprobs averaged), pair ops in each reduction."""
    ops = {}
    for spec in OPS_TABLE.values():
        fn = getattr(are_fast, spec.name)
        if spec.inputs == "tokens":
            ops[f"{spec.name}-2d"] = lambda a, fn=fn, **k: fn(
                a["hidden"].reshape(-1, a["hidden"].shape[-1]), a["weight"], a["labels"].reshape(-1), a["bias"], **k
            )
            ops[f"{spec.name}-3d"] = lambda a, fn=fn, **k: fn(a["hidden"], a["weight"], a["labels"], a["bias"], **k)
        elif spec.inputs == "sequences":
            ops[spec.name] = lambda a, fn=fn, **k: fn(a["hidden"], a["weight"], a["labels"], a["bias"], **k)
        else:
            for reduction in ("sum", "mean", "none"):
                ops[f"{spec.name}-{reduction}"] = lambda a, fn=fn, reduction=reduction, **k: fn(
                    a["hidden"], a["hidden_q"], a["weight"], a["labels"], bias=a["bias"], reduction=reduction, **k
                )
    ops["sequence_logprobs-sum"] = ops.pop("sequence_logprobs")
    ops["sequence_logprobs-mean"] = lambda a, **k: are_fast.sequence_logprobs(
        a["hidden"], a["weight"], a["labels"], a["bias"], average=True, **k
    )
    return ops


OPS = _registry_ops()
PAIR_OPS = [name for name in OPS if OPS_TABLE[name.rsplit("-", 1)[0]].inputs == "pair"]  # they read hidden_q
STREAMS = {"hidden", "hidden_q"}


def representable(masters, dtype):
    """The masters rounded to dtype (still float64), so the oracle sees exactly the inputs the op sees."""
    return {n: v.to(dtype).double() if v.dtype.is_floating_point else v for n, v in masters.items()}


def run_op(op, masters, dtype, backend, trainable_head, upstream=None, device="cpu", frozen_bias=False, **kwargs):
    """Run op on dtype copies of the (CPU) masters on device; return (output, upstream grad used (CPU),
    {name: grad}); output and grads stay on device. A frozen head has no bias unless ``frozen_bias``."""
    args = {}
    for name, value in masters.items():
        if name == "labels":
            args[name] = value.to(device)
        elif name == "bias" and not trainable_head and not frozen_bias:
            args[name] = None
        else:
            args[name] = leaf(value, dtype, name in STREAMS or trainable_head, device)
    out = OPS[op](args, backend=backend, **kwargs)
    if upstream is None:
        upstream = torch.randn(out.shape, dtype=torch.float64)
    (out.double() * upstream.to(out.device)).sum().backward()
    grads = {n: t.grad for n, t in args.items() if isinstance(t, torch.Tensor) and t.requires_grad}
    return out, upstream, grads


# Cornered logits: where an online log-sum-exp or a tile's tail mask goes wrong.
def rounded(x: torch.Tensor) -> torch.Tensor:
    """x as the float32 values the kernel sees, kept in float64 for the oracle."""
    return x.float().double()


def cornered(base: torch.Tensor, peaks: list, offset: float) -> torch.Tensor:
    """base [len(peaks) + 2, V] float64 logits with the row max lifted 4 above the rest at column peaks[i] of
    row i, the next row rising by 12 over its length (the max moves up with every tile) and the last falling by
    200 (each tile's max is far below the first's: exp(first max - tile max) overflows float32). All shifted by
    ``offset`` and rounded to float32."""
    rows = base.clone()
    for row, column in enumerate(peaks):
        rows[row, column] = rows[row].max() + 4
    rows[-2] += torch.linspace(0, 12, rows.shape[1], dtype=torch.float64)
    rows[-1] += torch.linspace(0, -200, rows.shape[1], dtype=torch.float64)
    return rounded(rows + offset)


def assert_rows_close(out: torch.Tensor, ref: torch.Tensor, what: str, peer: torch.Tensor | None = None) -> None:
    """Each row (a value, or a row of gradients) within the float32 tolerance of its own reference, or within
    twice the error of ``peer`` (the PyTorch epilogue's float32 result) on a row so ill-conditioned that float32
    itself cannot do better."""
    assert out.shape == ref.shape, what
    out = out.cpu()
    for row in range(len(ref)):
        bound = TOLERANCE[torch.float32]
        if peer is not None:
            bound = max(bound, 2 * rel_error(peer[row], ref[row]))
        error = rel_error(out[row], ref[row])
        assert error <= bound, f"{what}, row {row}: relative error {error:.2e} > {bound:.1e}"


TILE = 16  # the kernel tests' small tile (the launchers' block_v), so that a short row spans many tiles
VOCAB = 5 * TILE + 3  # four full tiles after the first, then a ragged tail of 3


MASKED = -1e4  # a logit whose probability is exactly 0 in float32 and float64 (exp(-1e4) underflows)


def masked_kl_rows(vocab: int = VOCAB, tile: int = TILE) -> tuple:
    """Logits p, q [5, V] float64 (float32 values) with -inf entries, a masked vocabulary, and the same rows
    with -inf replaced by -1e4: the limit the masked rows must give (p = 0 there contributes nothing, where a
    careless p * (log p - log q) is 0 * -inf = NaN). Rows: p masked at scattered columns, q finite; both masked
    at the same columns, one a whole middle tile; q masked only where p is; both masked over the whole first
    tile; none masked."""
    a = rounded(torch.randn(5, vocab, dtype=torch.float64) * 3)
    b = rounded(torch.randn(5, vocab, dtype=torch.float64) * 3)
    minus_inf = torch.zeros(2, 5, vocab, dtype=torch.bool)  # [p or q, row, column]
    minus_inf[0, 0, [0, 5, tile + 1, vocab - 1]] = True
    minus_inf[:, 1, [1, vocab - 1]] = True
    minus_inf[:, 1, tile:2 * tile] = True
    minus_inf[0, 2, [2, 3, 2 * tile]] = True
    minus_inf[1, 2, [3]] = True
    minus_inf[:, 3, :tile] = True
    masked = [x.masked_fill(m, float("-inf")) for x, m in zip((a, b), minus_inf)]
    limits = [x.masked_fill(m, MASKED) for x, m in zip((a, b), minus_inf)]
    return masked, limits


def check_masked_kl(kl_epilogue_under_test, device):
    """``kl_epilogue_under_test`` (the contract of torch_epilogues.kl_epilogue) on masked_kl_rows in float32:
    values and both gradients against the float64 PyTorch epilogue on the limit rows, exact zeros where p is
    masked; and +inf, not NaN, where only q is masked (p > 0 there: the KL is infinite)."""
    (a, b), (limit_a, limit_b) = masked_kl_rows()
    valid, scale = torch.ones(len(a), dtype=torch.bool), torch.randn(len(a)).double()
    ref_a, ref_b = limit_a.clone(), limit_b.clone()
    ref = torch_epilogues.kl_epilogue(ref_a, ref_b, valid, scale)
    ours_a, ours_b = a.to(device, torch.float32), b.to(device, torch.float32)
    assert_rows_close(kl_epilogue_under_test(ours_a, ours_b, valid.to(device), None), ref, "KL, values only")
    out = kl_epilogue_under_test(ours_a, ours_b, valid.to(device), scale.to(device, torch.float32))
    assert_rows_close(out, ref, "KL")
    assert_rows_close(ours_a, ref_a, "d/dlogits_p")
    assert_rows_close(ours_b, ref_b, "d/dlogits_q")
    assert (ours_a.cpu()[a == float("-inf")] == 0).all()
    only_q = b.clone()
    only_q[:, 2 * TILE + 5] = float("-inf")  # a column p never masks
    infinite = kl_epilogue_under_test(a.to(device, torch.float32), only_q.to(device, torch.float32),
                                      valid.to(device), None)
    assert torch.isinf(infinite).all() and (infinite > 0).all(), f"only q masked: {infinite.tolist()}"


def byte_level_bpe_tokenizer(merges: int = 300, seed: int = 0):
    """A real byte-level BPE tokenizer (GPT-2 / Llama 3 / Qwen style), trained offline here with the ``tokenizers``
    package on generated text (``are_fast.toy.data``): ByteLevel pre-tokenizer and decoder, 256 byte symbols plus
    up to ``merges`` merges (the toy text's few words give about 170), "<|endoftext|>" as bos/eos and "<pad>".
    Returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from are_fast.toy.data import compression_rows, triplet_rows

    texts = [r[key] for r in compression_rows(400, seed) for key in ("context", "output")]
    texts += [r["query"] + " " + r["pos"] for r in triplet_rows(200, 1, seed)]
    specials = ["<|endoftext|>", "<pad>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + len(specials) + merges, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>")


def tiny_llama_with_bpe(path, hidden_size: int = 16, layers: int = 1, seed: int = 0):
    """Save a random tiny Llama sized to ``byte_level_bpe_tokenizer()``'s vocabulary, with that tokenizer
    (``save_pretrained``: tokenizer.json and its config), to the folder ``path``; returns the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level_bpe_tokenizer(seed=seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer


# The encoder tests' model (tests/encoding/conftest.py): k <EMBED*> tokens, texts cut to a length, an instruction.
ENCODER_K = 3
ENCODER_MAX_LENGTH = 48
ENCODER_INSTRUCTION = "In one word:"


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Texts of 1-120 characters, some over ENCODER_MAX_LENGTH tokens (byte tokenizer: a token per byte), some non-ASCII."""
    rng = random.Random(seed)
    alphabet = "abcdefghij klmnop qrstuv wxyz .,é中"
    return ["".join(rng.choice(alphabet) for _ in range(int(rng.lognormvariate(3.2, 0.8)) % 120 + 1))
            for _ in range(n)]


def naive_embeddings(model_dir: str, texts, instruction=None, max_length=ENCODER_MAX_LENGTH, normalize=True,
                     dtype=torch.float64) -> torch.Tensor:
    """The oracle: transformers alone, one text at a time, no padding: [bos] text\\n instruction\\n <EMBED*>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    body = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).model
    embed_ids = tok.convert_tokens_to_ids([f"<EMBED{i}>" for i in range(ENCODER_K)])
    bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
    tail = tok((instruction or "") + "\n", add_special_tokens=False).input_ids + embed_ids
    rows = []
    with torch.no_grad():
        for text in texts:
            ids = bos + tok(text + "\n", add_special_tokens=False).input_ids[:max_length] + tail
            hidden = body(input_ids=torch.tensor([ids])).last_hidden_state[0, -ENCODER_K:]
            emb = hidden.mean(0)
            rows.append(emb / emb.norm() if normalize else emb)
    return torch.stack(rows)
