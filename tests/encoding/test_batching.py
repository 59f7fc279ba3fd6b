"""Batch planning: every row once, longest first, within the token budget and the row cap."""
import random

from are_fast.encoding.batching import plan_batches


def test_plan_batches_budget_order_and_coverage():
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(200)] + [500]
    for packed in (False, True):
        batches = plan_batches(lengths, 256, batch_size=16, packed=packed)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each row exactly once
        firsts = [lengths[b[0]] for b in batches]
        assert firsts == sorted(firsts, reverse=True)  # longest first
        for b in batches:
            cost = sum(lengths[i] for i in b) if packed else len(b) * max(lengths[i] for i in b)
            assert len(b) <= 16 and (cost <= 256 or len(b) == 1)
        assert [200] in batches  # the row over the budget runs alone
    assert plan_batches([], 10) == []
