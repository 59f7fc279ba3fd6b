"""Compressor and frozen decoder: the released batch layout, gradients, packing, checkpoint loading."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from _helpers import rel_error

import are_fast
from are_fast.model import Compressor, FrozenDecoder, Stage1Item, Stage1Model, load_compressor
from are_fast.model.layout import decoder_labels


def _pair(tiny_dir, k=3, **kwargs):
    torch.manual_seed(1)
    comp = Compressor.from_pretrained(tiny_dir, num_embed_tokens=k, **kwargs)
    dec = FrozenDecoder.from_pretrained(tiny_dir, **kwargs)
    return comp, dec


def test_layout_matches_released(tiny_dir):
    comp, _ = _pair(tiny_dir)
    tok = comp.tokenizer
    assert tok.bos_token_id is None  # ByT5: no BOS, so none is prepended
    prefixes = comp.tokenize(["ab", "hello"], "do").ids
    assert prefixes[0] == tok("ab\n", add_special_tokens=False).input_ids + tok("do\n", add_special_tokens=False).input_ids
    batch = comp.collate(prefixes)
    embed = comp.embed_token_ids
    assert tok.convert_ids_to_tokens(embed) == ["<EMBED0>", "<EMBED1>", "<EMBED2>"]
    for row, prefix in enumerate(prefixes):
        n = len(prefix)
        assert batch.input_ids[row, :n].tolist() == prefix
        assert batch.input_ids[row, n: n + 3].tolist() == embed  # right after the last real token
        assert batch.embed_positions[row].tolist() == [n, n + 1, n + 2]
        assert int(batch.lengths[row]) == n + 3


def test_compressed_vectors_are_final_normed_hidden_states(tiny_dir):
    comp, _ = _pair(tiny_dir)
    texts = ["the cat", "a much longer text than the first"]
    out = comp.compress(texts, "in one word:")
    assert out.shape == (2, 3, comp.hidden_size)
    for row, text in enumerate(texts):  # one row at a time, no padding: the model's own last hidden state
        ids = comp.collate(comp.tokenize([text], "in one word:").ids)
        alone = comp.backbone(input_ids=ids.input_ids).last_hidden_state[0, ids.embed_positions[0]]
        assert rel_error(out[row], alone) <= 1e-5


def test_bos_is_prepended_when_the_tokenizer_has_one(tiny_dir):
    comp, _ = _pair(tiny_dir)
    comp.tokenizer.bos_token = "<extra_id_0>"
    bos = comp.tokenizer.bos_token_id
    assert comp.tokenize(["x"], "y").ids[0][0] == bos


@pytest.mark.parametrize("route", ["padded", "packed", "varlen"])
def test_stage1_loss_equals_transformers_logits_loss(tiny_dir, route):
    """(a) the fused stage-1 loss equals the causal LM's own logits-based loss on the same batch."""
    comp, dec = _pair(tiny_dir, route=route)
    model = Stage1Model(comp, dec)
    texts = ["short", "a somewhat longer context", "mid size"]
    items = [Stage1Item(p, t) for p, t in zip(comp.tokenize(texts, "restate:").ids,
                                               dec.tokenize(["out one", "a longer output text", "x"]).ids)]
    batch = model.collate(items)
    loss, _ = model(batch)
    loss.backward()
    ours = [p.grad.clone() for p in comp.parameters()]
    comp.zero_grad()

    compressed = comp(batch.compressor)
    k = compressed.shape[1]
    embeds = torch.cat([compressed, dec.lm.get_input_embeddings()(batch.targets.ids)], dim=1)
    mask = (torch.arange(embeds.shape[1]) < (batch.targets.lengths + k).unsqueeze(1)).long()
    labels = decoder_labels(batch.targets.ids, batch.targets.lengths, k)
    expected = dec.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss
    expected.backward()
    assert rel_error(loss, expected) <= 1e-5
    for got, p in zip(ours, comp.parameters()):
        assert rel_error(got, p.grad) <= 1e-5
    assert all(p.grad is None for p in dec.parameters())  # the decoder is frozen


def test_gradient_reaches_compressed_vectors_not_decoder(tiny_dir):
    comp, dec = _pair(tiny_dir)
    compressed = torch.randn(2, 3, comp.hidden_size, requires_grad=True)
    ids, lengths = dec.collate(dec.tokenize(["abc", "de"]).ids)
    hidden, labels = dec(compressed, ids, lengths)
    are_fast.compression_loss(hidden, *dec.head[:1], labels).backward()
    assert compressed.grad is not None and compressed.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in dec.parameters())


def test_checkpointed_decoder_gives_the_same_gradients(tiny_dir):
    comp, dec = _pair(tiny_dir)
    plain = FrozenDecoder.from_pretrained(tiny_dir)
    ckpt = FrozenDecoder.from_pretrained(tiny_dir, checkpointing=True)
    ckpt.train()
    assert not ckpt.lm.model.layers[0].self_attn.training  # no dropout: only the layers are flagged
    ids, lengths = plain.collate(plain.tokenize(["abc", "defgh"]).ids)
    grads, saved = [], []
    for dec in (plain, ckpt):
        compressed = torch.randn(2, 3, comp.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
        count = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: count.append(t.numel()) or t, lambda t: t):
            hidden, labels = dec(compressed, ids, lengths)
        are_fast.compression_loss(hidden, dec.head[0], labels).backward()
        grads.append(compressed.grad)
        saved.append(sum(count))
    assert rel_error(grads[1], grads[0]) <= 1e-5
    assert saved[1] < saved[0] / 2  # the layers' activations were not kept


def test_loads_a_released_style_checkpoint(tiny_dir, tmp_path):
    """A released AutoRegEmbed checkpoint: a body-only model directory whose tokenizer holds <EMBED{i}>."""
    comp, _ = _pair(tiny_dir, k=5)
    comp.save_pretrained(tmp_path)
    loaded = load_compressor(str(tmp_path))
    assert loaded.num_embed_tokens == 5 and loaded.embed_token_ids == comp.embed_token_ids
    text = ["the same text"]
    assert rel_error(loaded.compress(text, "i"), comp.compress(text, "i")) <= 1e-6


def test_bad_paths_and_models_are_refused(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="path"):
        Compressor.from_pretrained(str(tmp_path / "missing"), 5)
    with pytest.raises(ValueError, match="no <EMBED0>"):
        load_compressor(tiny_dir)
    lm = AutoModelForCausalLM.from_pretrained(tiny_dir)
    lm.lm_head = None
    with pytest.raises(ValueError, match="output embeddings are an nn.Linear"):
        FrozenDecoder(lm, AutoTokenizer.from_pretrained(tiny_dir))


def test_stage1_under_bf16_autocast_matches_fp32(tiny_dir):
    comp, dec = _pair(tiny_dir)
    model = Stage1Model(comp, dec)
    items = [Stage1Item(p, t) for p, t in zip(comp.tokenize(["some text", "more"], "r").ids,
                                               dec.tokenize(["an output", "x y"]).ids)]
    batch = model.collate(items)
    expected, _ = model(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = model(batch)
    loss.backward()
    assert loss.dtype == torch.float32 and rel_error(loss, expected) <= 2e-2
    assert all(torch.isfinite(p.grad).all() for p in comp.parameters())
