"""The routes of are_fast.model.layout: packed and varlen rows give the padded rows' states and gradients."""
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from _helpers import rel_error

from are_fast.model import Compressor, FrozenDecoder
from are_fast.model.layout import (ROUTES, attention_groups, check_route, computed_tokens, default_route, pack_rows, run_varlen,
                                   varlen_attention)

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


def test_varlen_needs_a_registered_attention_kernel(tiny_dir):
    comp = Compressor.from_pretrained(tiny_dir, 3, attn_implementation="eager", route="varlen")
    with pytest.raises(ValueError, match="route: 'varlen'.*'eager'"):
        comp.compress(["a text"], "i")
    comp.route = "packed"  # the other routes run eager attention as loaded
    assert torch.isfinite(comp.compress(["a text", "another one"], "i")).all()
