"""Stage 2 and reference scores against the released pattern (logits, query re-encoded, a call per stream)."""
import pytest
import torch

from _helpers import rel_error

from are_fast.ops import reference, registry
from are_fast.training.data import stage2_items
from are_fast.model import Compressor, FrozenDecoder, Stage2Model, reference_scores
from are_fast.model.released import _score, released_stage2_loss
from are_fast.toy.data import triplet_rows


def _setup(tiny_dir, negatives, rows=3, seed=0):
    torch.manual_seed(seed)
    comp = Compressor.from_pretrained(tiny_dir, num_embed_tokens=3)
    dec = FrozenDecoder.from_pretrained(tiny_dir)
    data = triplet_rows(rows, negatives, seed=seed)
    data[1]["pos"] += " and then some more words"  # uneven lengths across streams
    gen = torch.Generator().manual_seed(seed + 1)
    scores = {r["id"]: (float(torch.randn(1, generator=gen)) * 5, (torch.randn(negatives, generator=gen) * 5).tolist())
              for r in data}
    return comp, dec, stage2_items(data, comp, dec, scores=scores)


def _loss_and_grads(fn, comp):
    comp.zero_grad()
    loss = fn()
    loss.backward()
    return [loss] + [p.grad.clone() for p in comp.parameters()]


@pytest.mark.parametrize("negatives", [1, 3], ids=["neg1", "neg3"])
@pytest.mark.parametrize("ref_sign", [1.0, -1.0], ids=["released-sign", "dpo-sign"])
def test_stage2_loss_and_grads_equal_released_pattern(tiny_dir, negatives, ref_sign):
    """(b) loss and compressor gradients equal the released pattern's: the same math in float64 (to 1e-6:
    transformers' RMSNorm computes in float32 even in a float64 model), and in float32 within 1e-5 or, where
    the loss's conditioning (differences of large log-prob sums) makes float32 itself less exact, within
    twice the released pattern's own float32 error, both measured against the float64 oracle."""
    comp, dec, items = _setup(tiny_dir, negatives)
    kw = dict(beta=0.5, tau=0.2, ref_sign=ref_sign)

    def ours():
        model = Stage2Model(comp, dec, **kw)
        return model(model.collate(items))[0]

    def released():
        return released_stage2_loss(comp, dec, items, **kw)

    ours32, released32 = _loss_and_grads(ours, comp), _loss_and_grads(released, comp)
    assert all(p.grad is None for p in dec.parameters())
    comp.double(), dec.double()
    ours64, oracle = _loss_and_grads(ours, comp), _loss_and_grads(released, comp)
    names = ["loss"] + [n for n, _ in comp.named_parameters()]
    for name, a, b, got, ref in zip(names, ours64, oracle, ours32, released32):
        assert rel_error(a, b) <= 1e-6, name
        assert rel_error(got, b) <= max(1e-5, 2 * rel_error(ref, b)), name


@pytest.mark.parametrize("distance", list(registry.DISTANCES))
def test_stage2_pair_distance_matches_reference(tiny_dir, distance):
    """Stage 2 with each pair op's distance (kl, jsd, ...) against the reference formulas, loss and gradients."""
    comp, dec, items = _setup(tiny_dir, 2)
    model = Stage2Model(comp, dec, distance=distance)
    batch = model.collate(items)
    loss, _ = model(batch)
    loss.backward()
    ours = [p.grad.clone() for p in comp.parameters()]
    comp.zero_grad()
    b = len(items)
    c_q = comp(batch.queries)
    hidden, labels = dec(torch.cat([c_q, comp(batch.positives), c_q.repeat_interleave(2, 0)]), batch.targets.ids,
                         batch.targets.lengths)
    w = dec.head[0]
    logp = reference.sequence_logprobs(hidden, w, labels)
    gap = getattr(reference, registry.DISTANCES[distance])(hidden[:b], hidden[b: 2 * b], w, labels[:b])
    expected = reference.alignment_loss(logp[:b], logp[b: 2 * b], logp[2 * b:].view(b, 2), batch.ref_p, batch.ref_n,
                                        distance=gap)
    expected.backward()
    assert rel_error(loss, expected) <= 1e-5
    for got, p in zip(ours, comp.parameters()):
        assert rel_error(got, p.grad) <= 1e-5


def test_reference_scores_equal_released_pattern(tiny_dir):
    comp, dec, items = _setup(tiny_dir, 2, rows=4)
    ref_p, ref_n = reference_scores(comp, dec, items)
    with torch.no_grad():
        exp_p = _score(comp, dec, [i.query for i in items], [i.pos_target for i in items])
        exp_n = _score(comp, dec, [i.query for i in items for _ in range(2)],
                       [n for i in items for n in i.neg_targets]).view(4, 2)
    assert ref_p.shape == (4,) and ref_n.shape == (4, 2)
    assert rel_error(ref_p, exp_p) <= 1e-5 and rel_error(ref_n, exp_n) <= 1e-5


def test_stage2_refuses_rows_without_reference_scores(tiny_dir):
    comp, dec, items = _setup(tiny_dir, 1)
    items[0].ref_p = None
    with pytest.raises(ValueError, match="reference scores"):
        Stage2Model(comp, dec).collate(items)
    with pytest.raises(ValueError, match="distance"):
        Stage2Model(comp, dec, distance="cos")


def test_reference_score_file_is_keyed_by_row_id(tiny_dir, tmp_path):
    from are_fast.training.refscores import compute_reference_scores, load_reference_scores, save_reference_scores

    comp, dec, _ = _setup(tiny_dir, 2)
    rows = triplet_rows(5, 2, seed=3)
    ref_p, ref_n = compute_reference_scores(comp, dec, rows, batch_size=2, progress=False)
    path = str(tmp_path / "scores.safetensors")
    save_reference_scores(path, rows, ref_p, ref_n)
    shuffled = [rows[3], rows[0], rows[4]]  # shuffled and filtered: each row still gets its own scores
    scores = load_reference_scores(path, shuffled)
    for row in shuffled:
        i = rows.index(row)
        assert scores[row["id"]] == (float(ref_p[i]), ref_n[i].tolist())
    with pytest.raises(ValueError, match="differ from those scored"):
        load_reference_scores(path, [{**rows[0], "pos": "another text"}])
    with pytest.raises(ValueError, match="no score for 1"):
        load_reference_scores(path, [{**rows[0], "id": "unknown"}])
    with pytest.raises(ValueError, match="negatives"):
        load_reference_scores(path, [{**rows[0], "neg": rows[0]["neg"][:1]}])
    with pytest.raises(ValueError, match="cannot be read"):
        load_reference_scores(str(tmp_path / "missing.safetensors"), rows)
