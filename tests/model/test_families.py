"""Every causal-LM family on every route gives the model's own numbers (tiny random configs, ``_families``).

Decoder: the fused per-token log-probabilities of targets after k compressed vectors, and their gradient into
the vectors, against the model's own log_softmax(lm(inputs_embeds=...).logits) in float64, one row at a time
(no padding). Compressor: the k states of a batch against the same texts compressed one at a time on the padded
route. Rows run past the families' 4-token windows.
"""
import copy

import pytest
import torch
from transformers import ByT5Tokenizer

from _families import FAMILIES, WINDOW, build
from _helpers import rel_error

from are_fast.model import Compressor, FrozenDecoder
from are_fast.model.layout import ROUTES, run_varlen
from are_fast.model.objectives import target_logprobs

K = 3
TARGET_LENGTHS = [9, 2, 13, 6]  # with k in front: rows of 5 to 16 positions, most past the window
TEXTS = ["a", "a text longer than any window", "mid-sized text", "the longest text of this small batch by far"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_route_gives_the_bodys_own_states_in_float64(family):
    """Float64, where a route's masking shows exactly: the final states of right-padded rows equal each row's own
    run (with a padding mask, Gemma 2's eager kernel turns a padding query past its window into NaN)."""
    body = build(family).double().base_model
    lengths = torch.tensor([11, 3, 9, 1, 13, 9])
    gen = torch.Generator().manual_seed(0)
    embeds = torch.randn(len(lengths), int(lengths.max()) + 1, body.config.hidden_size, generator=gen,
                         dtype=torch.float64)
    alone = torch.cat([body(inputs_embeds=embeds[i: i + 1, :n]).last_hidden_state[0]
                       for i, n in enumerate(lengths.tolist())])
    for route in ROUTES:
        states = run_varlen(body, lengths, route, inputs_embeds=embeds)
        assert rel_error(torch.cat([states[i, :n] for i, n in enumerate(lengths.tolist())]), alone) <= 1e-12, route


def _targets(seed=0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(TARGET_LENGTHS)
    ids = torch.randint(3, 380, (len(TARGET_LENGTHS), max(TARGET_LENGTHS)), generator=gen)
    ids[torch.arange(ids.shape[1]) >= lengths.unsqueeze(1)] = 0  # right padding
    return ids, lengths


def _model_logprobs(lm, compressed, ids, lengths):
    """The model's own: per row, log_softmax(logits) of each target token after the k vectors, float64."""
    out = []
    for row, n in enumerate(lengths.tolist()):
        embeds = torch.cat([compressed[row], lm.get_input_embeddings()(ids[row, :n])])
        logits = lm(inputs_embeds=embeds[None], use_cache=False).logits[0]
        out.append(logits[K - 1: K - 1 + n].log_softmax(-1).gather(1, ids[row, :n, None])[:, 0])
    return torch.cat(out)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_decoder_logprobs_and_gradients_are_the_models_own(family, route):
    assert WINDOW < K + max(TARGET_LENGTHS)
    lm = build(family)
    oracle = copy.deepcopy(lm).double()
    decoder = FrozenDecoder(lm, ByT5Tokenizer(), num_embed_tokens=K, route=route)
    assert decoder.resolved_route == route
    ids, lengths = _targets()
    gen = torch.Generator().manual_seed(1)
    vectors = torch.randn(len(TARGET_LENGTHS), K, lm.config.hidden_size, generator=gen)
    up = torch.randn(int(lengths.sum()), generator=gen, dtype=torch.float64)  # weighs every token's log-prob

    compressed = vectors.clone().requires_grad_(True)
    hidden, labels = decoder(compressed, ids, lengths)
    logp, rows = target_logprobs(hidden, labels, *decoder.head, **decoder.logit_transform)
    (logp.double() * up).sum().backward()

    expected_vectors = vectors.double().requires_grad_(True)
    expected = _model_logprobs(oracle, expected_vectors, ids, lengths)
    (expected * up).sum().backward()
    assert rows.tolist() == [r for r, n in enumerate(TARGET_LENGTHS) for _ in range(n)]
    assert rel_error(logp, expected) <= 1e-5, family
    assert rel_error(compressed.grad, expected_vectors.grad) <= 1e-5, family


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("family", list(FAMILIES))
def test_compressor_states_equal_one_text_at_a_time(family, route):
    compressor = Compressor(build(family), ByT5Tokenizer(), K, route=route)
    reference = Compressor(build(family), ByT5Tokenizer(), K, route="padded")
    assert compressor.resolved_route == route
    batch = compressor.compress(TEXTS, "in one word:")
    assert max(map(len, compressor.tokenize(TEXTS, "in one word:").ids)) > WINDOW
    alone = torch.cat([reference.compress([text], "in one word:") for text in TEXTS])
    assert rel_error(batch, alone) <= 1e-5, family


def _own_stream_logprobs(compressor, decoder, prefixes, targets):
    """Per stream, the model's own log_softmax(logits) [n, V] at the positions predicting its n target tokens
    (one stream at a time, no padding), and the targets."""
    compressed = compressor(compressor.collate(prefixes))
    out = []
    for row, target in enumerate(targets):
        ids = torch.tensor(target)
        embeds = torch.cat([compressed[row], decoder.lm.get_input_embeddings()(ids)])
        logits = decoder.lm(inputs_embeds=embeds[None], use_cache=False).logits[0]
        out.append((logits[K - 1: K - 1 + len(target)].log_softmax(-1), ids))
    return out


@pytest.mark.parametrize("distance", ["logprob", "kl"])
@pytest.mark.parametrize("family", ["llama", "gemma2", "granite", "cohere"])
def test_stage2_loss_and_reference_scores_use_the_models_own_logits(family, distance):
    """Stage 2 (both distances) and the reference scores, with each family's logit transforms, against the
    model's own logits: loss and compressor gradients of float64 models, to 1e-5 because these models compute
    parts in float32 anyway (RMSNorm, Gemma 2's attention softmax), which the loss's differences of large
    log-prob sums amplify."""
    from are_fast.training.data import stage2_items
    from are_fast.model import Stage2Model, reference_scores
    from are_fast.ops import reference
    from are_fast.toy.data import triplet_rows

    compressor = Compressor(build(family).requires_grad_(True), ByT5Tokenizer(), K, route="varlen").double()
    decoder = FrozenDecoder(build(family), ByT5Tokenizer(), num_embed_tokens=K, route="varlen").double()
    rows = triplet_rows(3, 2, seed=0)
    rows[1]["pos"] += " and some more words"
    scores = {r["id"]: (-40.0 + i, [-45.0 - i, -50.0]) for i, r in enumerate(rows)}
    items = stage2_items(rows, compressor, decoder, scores=scores)
    model = Stage2Model(compressor, decoder, beta=0.5, tau=0.2, distance=distance)
    loss, _ = model(model.collate(items))
    grads = torch.autograd.grad(loss, list(compressor.parameters()))

    q_pos = _own_stream_logprobs(compressor, decoder, [i.query for i in items], [i.pos_target for i in items])
    pos_pos = _own_stream_logprobs(compressor, decoder, [i.pos_prefix for i in items], [i.pos_target for i in items])
    q_neg = _own_stream_logprobs(compressor, decoder, [i.query for i in items for _ in range(2)],
                                 [n for i in items for n in i.neg_targets])

    def summed(streams):
        return torch.stack([logp.gather(1, ids[:, None]).sum() for logp, ids in streams])

    kl = torch.stack([(p.exp() * (p - q)).sum() for (p, _), (q, _) in zip(q_pos, pos_pos)])
    expected = reference.alignment_loss(summed(q_pos), summed(pos_pos), summed(q_neg).view(3, 2),
                                        torch.tensor([s[0] for s in scores.values()], dtype=torch.float64),
                                        torch.tensor([s[1] for s in scores.values()], dtype=torch.float64),
                                        0.5, 0.2, 1.0, kl if distance == "kl" else None)
    expected_grads = torch.autograd.grad(expected, list(compressor.parameters()))
    assert rel_error(loss, expected) <= 1e-5, family
    for got, want in zip(grads, expected_grads):
        assert rel_error(got, want) <= 1e-5, family
    ref_p, ref_n = reference_scores(compressor, decoder, items)
    assert rel_error(ref_p, summed(q_pos)) <= 1e-6 and rel_error(ref_n, summed(q_neg).view(3, 2)) <= 1e-6


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "granite", "cohere"])
def test_stage1_loss_uses_the_models_own_logits(family):
    from are_fast.model import Stage1Item, Stage1Model

    compressor = Compressor(build(family), ByT5Tokenizer(), K)
    decoder = FrozenDecoder(build(family), ByT5Tokenizer(), num_embed_tokens=K)
    prefixes = compressor.tokenize(TEXTS, "restate:").ids
    targets = decoder.tokenize(["an output", "x", "a longer output text"] + TEXTS[3:]).ids
    model = Stage1Model(compressor, decoder)
    loss, _ = model(model.collate([Stage1Item(p, t) for p, t in zip(prefixes, targets)]))
    own = _own_stream_logprobs(compressor, decoder, prefixes, targets)
    expected = -torch.cat([logp.gather(1, ids[:, None])[:, 0] for logp, ids in own]).mean()
    assert rel_error(loss, expected) <= 1e-5, family
