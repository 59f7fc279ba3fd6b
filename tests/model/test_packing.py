"""The routes of are_fast.model.layout: packed and varlen rows give the padded rows' states and gradients."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from _helpers import rel_error

from are_fast.model import Compressor, FrozenDecoder
from are_fast.model.layout import (ROUTES, attention_groups, check_route, computed_tokens, default_route, flash_varlen,
                                   pack_rows, run_varlen, varlen_attention)

LENGTHS = [9, 3, 14, 1, 7, 14, 5]  # ties, a length-1 row, rows that pair up and rows that do not


def _rows(width, lengths, hidden, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(len(lengths), width, hidden, generator=gen)


@pytest.mark.parametrize("route", ["packed", "varlen"])
def test_route_equals_padded_states_and_gradients(tiny_dir, route):
    """Decoder-style input (embeddings): same final states at every real position, same input gradients."""
    body = AutoModelForCausalLM.from_pretrained(tiny_dir).model.requires_grad_(False)
    lengths = torch.tensor(LENGTHS)
    width = max(LENGTHS) + 2  # extra right padding, as collated batches may have
    valid = torch.arange(width) < lengths.unsqueeze(1)
    weights = _rows(width, LENGTHS, body.config.hidden_size, seed=1)  # a loss that weighs every real state
    results = {}
    for name in ("padded", route):
        embeds = _rows(width, LENGTHS, body.config.hidden_size).requires_grad_(True)
        hidden = run_varlen(body, lengths, name, inputs_embeds=embeds)
        assert hidden.shape == (len(LENGTHS), width, body.config.hidden_size)
        (hidden * weights)[valid].sum().backward()
        results[name] = hidden[valid].detach(), embeds.grad[valid]
        assert torch.isfinite(hidden[valid]).all()
    assert rel_error(results[route][0], results["padded"][0]) <= 1e-5
    assert rel_error(results[route][1], results["padded"][1]) <= 1e-5


@pytest.mark.parametrize("route", ROUTES)
def test_compressor_and_decoder_routes_equal_padded(tiny_dir, route):
    """Compressed vectors, decoder states and the compressor's weight gradients agree across routes."""
    texts = ["a", "a longer text to compress", "mid-sized", "the longest text of this small batch by far"]
    outputs = {}
    for name in ("padded", route):
        torch.manual_seed(1)
        comp = Compressor.from_pretrained(tiny_dir, 3, route=name)
        dec = FrozenDecoder.from_pretrained(tiny_dir, route=name)
        assert comp.resolved_route == name and comp.pack == (name != "padded")
        vectors = comp.compress(texts, "in one word:")
        ids, lengths = dec.collate(dec.tokenize(["x", "an output", "a much longer output text", "ok"]).ids)
        hidden, labels = dec(vectors, ids, lengths)
        mask = labels != -100
        (hidden[mask].square().sum() + vectors.sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in comp.parameters()])
        outputs[name] = vectors.detach(), hidden[mask].detach(), grads
    for got, expected in zip(outputs[route], outputs["padded"]):
        assert rel_error(got, expected) <= 1e-5


def test_varlen_attention_equals_per_sequence_attention():
    """The CPU path of the varlen attention function: each sequence attends causally to itself only (GQA), also
    when sequences of one length share an attention call."""
    sizes = [6, 4, 6, 1, 6]
    assert attention_groups(sizes) == [[0, 2, 4], [1], [3]]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, sum(sizes), 8, generator=gen) for heads in (4, 2, 2))
    cu = torch.tensor([0, *sizes], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    module = torch.nn.Module().eval()
    out, weights = varlen_attention(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=6)
    assert out.shape == (1, sum(sizes), 4, 8) and weights is None
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        expected = F.scaled_dot_product_attention(q[..., start:end, :], k[..., start:end, :], v[..., start:end, :],
                                                  is_causal=True, scale=0.3, enable_gqa=True)
        assert rel_error(out[0, start:end], expected[0].transpose(0, 1)) <= 1e-6
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        varlen_attention(module, q, k, v, None)


def _per_sequence_attention(q, k, v, cu, scaling, window=None, softcap=None):
    """float64 reference: each sequence alone, q [1, heads, N, d], k and v [1, kv_heads, N, d] -> [1, N, heads, d]."""
    out = torch.full((q.shape[2], q.shape[1], q.shape[3]), float("nan"), dtype=torch.float64)
    share = q.shape[1] // k.shape[1]
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        part_q, part_k, part_v = (t[0, :, start:end].double() for t in (q, k, v))
        part_k, part_v = part_k.repeat_interleave(share, 0), part_v.repeat_interleave(share, 0)
        scores = part_q @ part_k.transpose(-1, -2) * scaling
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        i = torch.arange(end - start)
        allowed = (i[None] <= i[:, None]) & (i[None] > i[:, None] - (window or end))
        out[start:end] = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ part_v).transpose(0, 1)
    return out.unsqueeze(0)


@pytest.mark.parametrize(("window", "softcap"), [(None, None), (4, None), (None, 5.0), (4, 5.0)])
def test_varlen_attention_blocks_forward_and_gradients(window, softcap):
    """The CPU path's padded blocks (sequences of unequal length in one block, one per group): output and the
    gradients of q, k and v against each sequence's own attention in float64, with GQA, a sliding window and a
    softcap; every packed token gets an output (none left unwritten) and a NaN in one sequence stays in it."""
    sizes = [50, 49, 50, 1, 10, 9, 3]
    assert any(len({sizes[i] for i in group}) > 1 for group in attention_groups(sizes))  # a block has padding
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, heads, sum(sizes), 8, generator=gen).requires_grad_() for heads in (4, 2, 2))
    grad = torch.randn(1, sum(sizes), 4, 8, generator=gen)
    cu = torch.tensor([0, *sizes], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    module = torch.nn.Module().eval()
    out, _ = varlen_attention(module, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=50,
                              sliding_window=window, softcap=softcap)
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = _per_sequence_attention(*ref_inputs, cu, 0.3, window, softcap)
    expected = torch.autograd.grad(ref, ref_inputs, grad.double())
    assert not out.isnan().any()
    assert rel_error(out, ref) <= 1e-5
    for g, e in zip(got, expected):
        assert rel_error(g, e) <= 1e-5
    poisoned = [t.detach().clone() for t in (q, k, v)]
    others = torch.ones(sum(sizes), dtype=torch.bool)
    for sequence in (0, 3):  # one that shares its block with a shorter sequence, and the length-1 one
        others[cu[sequence]:cu[sequence + 1]] = False
        for t in poisoned:
            t[0, :, cu[sequence]:cu[sequence + 1]] = float("nan")
    out, _ = varlen_attention(module, *poisoned, None, scaling=0.3, cu_seq_lens_q=cu, max_length_q=50,
                              sliding_window=window, softcap=softcap)
    assert out[0, ~others].isnan().all() and not out[0, others].isnan().any()
    with pytest.raises(ValueError, match="cu_seq_lens_q"):
        varlen_attention(module, q, k, v, None, cu_seq_lens_q=cu[:-1], max_length_q=50)


def _varlen_attn_of(version):
    """A stand-in for torch's varlen_attn with torch ``version``'s signature, computed by per-sequence sdpa (the
    flash kernel runs only on CUDA); 2.11's has no enable_gqa and needs as many key/value heads as query heads.
    ``kv_heads`` records the key/value heads of each call."""
    calls = []

    def varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
                    enable_gqa=False):
        left, right = window_size  # flash's window: keys from query - left to query + right; -1: unbounded
        assert right == 0 and cu_q is cu_k and max_q == max_k  # causal, self-attention
        assert enable_gqa or k.shape[1] == q.shape[1]
        calls.append(k.shape[1])
        out = torch.full_like(q, float("nan"))
        for start, end in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
            i = torch.arange(end - start)
            allowed = (i[None] <= i[:, None]) & ((i[None] >= i[:, None] - left) if left >= 0 else True)
            part = (t[start:end].transpose(0, 1) for t in (q, k, v))
            out[start:end] = F.scaled_dot_product_attention(*part, attn_mask=allowed, scale=scale,
                                                            enable_gqa=enable_gqa).transpose(0, 1)
        return out

    def varlen_attn_211(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        return varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)

    chosen = varlen_attn_211 if version == "2.11" else varlen_attn
    chosen.kv_heads = calls
    return chosen


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("version", ["2.11", "2.13"])
def test_flash_varlen_groups_heads_on_either_torch(version, window):
    """The CUDA route's call of varlen_attn, emulated on CPU: torch 2.11's signature gets the key/value heads
    repeated per query group (head h reads key/value head h // 2 here), 2.13's gets enable_gqa; a sliding window
    of W keys (transformers' meaning: the query itself and W - 1 before it) becomes flash's window (W - 1, 0)."""
    sizes = [5, 3, 7]
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(sum(sizes), heads, 8, generator=gen) for heads in (4, 2, 2))
    cu = torch.tensor([0, *sizes], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    attn = _varlen_attn_of(version)
    out = flash_varlen(attn, q, k, v, cu, max(sizes), 0.3, window)
    assert attn.kv_heads == [4 if version == "2.11" else 2]  # 2.13 reads the grouped heads as they are
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        i = torch.arange(end - start)
        allowed = (i[None] <= i[:, None]) & (i[None] > i[:, None] - (window or end))
        for head in range(4):
            expected = F.scaled_dot_product_attention(q[start:end, head], k[start:end, head // 2],
                                                      v[start:end, head // 2], attn_mask=allowed, scale=0.3)
            assert rel_error(out[start:end, head], expected) <= 1e-6


def test_attention_groups_pad_little():
    sizes = [50, 49, 50, 10, 3, 3, 2, 10]
    groups = attention_groups(sizes)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    for group in groups:
        real = sum(sizes[i] for i in group)
        assert len(group) * max(sizes[i] for i in group) <= 1.02 * real
    assert len(groups) == 4  # [50, 50, 49], [10, 10], [3, 3], [2]


def test_pack_rows_first_fit_decreasing():
    rows = pack_rows(LENGTHS, 14)
    assert sorted(i for row in rows for i in row) == list(range(len(LENGTHS)))  # every sequence exactly once
    assert all(sum(LENGTHS[i] for i in row) <= 14 for row in rows)
    assert len(rows) == 4  # 53 tokens in rows of 14: the fewest possible
    assert pack_rows([4, 3, 3, 1], 4) == [[0], [1, 3], [2]]  # a sequence that fills a row exactly goes in
    assert pack_rows([20, 3], 10) == [[0], [1]]  # an over-wide sequence gets a row of its own


def test_computed_tokens_and_route_checks():
    assert computed_tokens(LENGTHS, "padded") == 7 * 14
    assert computed_tokens(LENGTHS, "packed") == 4 * 14
    assert computed_tokens(LENGTHS, "varlen") == sum(LENGTHS) == computed_tokens(LENGTHS, "packed", one_row=True)
    assert default_route("cpu") in ROUTES and default_route("cuda") in ROUTES
    assert check_route(None) is None
    with pytest.raises(ValueError, match="route: expected one of padded, packed, varlen"):
        check_route("flex")


def test_varlen_runs_eager_bodies_and_needs_a_known_kernel(tiny_dir):
    """An eager body's other calls go to its modeling file's own eager function; an unknown kernel is refused."""
    comp = Compressor.from_pretrained(tiny_dir, 3, attn_implementation="eager", route="varlen")
    texts = ["a text", "another one"]
    varlen = comp.compress(texts, "i")
    comp.route = "padded"  # the body's attention is now the varlen function, calling the eager one here
    assert rel_error(varlen, comp.compress(texts, "i")) <= 1e-5
    comp = Compressor.from_pretrained(tiny_dir, 3, route="varlen")
    comp.backbone.config._attn_implementation = "no_such_kernel"
    with pytest.raises(ValueError, match="route: 'varlen'.*'no_such_kernel'"):
        comp.compress(texts, "i")
