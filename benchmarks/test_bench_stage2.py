"""One stage-2 training step (forward + backward to the compressor), ours against the released pattern.

Same model, same batch, same loss (checked before timing), with 1 and 4 negatives per query:
- released: three model calls (q->pos, pos->pos, q->neg with the query encoded again for every negative),
  each padded on its own, each a full causal-LM forward with [S, T, V] logits and a log-softmax
  (``are_fast.model.released``);
- ours-logits: ``Stage2Model`` with the reference backend: our batching (queries and positives compressed
  once in one call, every decoder stream in one call) but the logits materialized, to separate the gains;
- ours-<route>: ``Stage2Model``: the batching above and every log-prob in one fused ``token_logprobs`` call on
  the stacked hidden states, no N x V logits, the rows run by one route of ``are_fast.model.layout``
  ("padded": attention mask; "packed": several sequences per row, transformers' packed-sequence mask;
  "varlen": one row, attention per sequence) in the compressor and the decoder;
- ours-checkpointing: ours on the device's default route with per-layer activation checkpointing.
``ours-logits`` and ``ours-checkpointing`` run the device's default route (``layout.default_route``).
On CPU the released pattern and ours (default route) also run with bf16 weights (``--dtype bfloat16``: the
compressor, the frozen decoder and the head in bf16, the head's ops on the bf16 sweep where the CPU's bf16
units measure faster), in groups ``stage2-step-neg<n>-bf16``; their rows record speedup_vs_float32 (against
the same impl's float32 row of this session) beside speedup_vs_released (the released pattern in bf16).
The model is a random-init Llama read by a byte-level tokenizer: on CPU H=256, 4 layers and the Llama-2
vocabulary size (32000); on CUDA a ~1B Llama (Llama-3.2-1B's shape, vocabulary 128256) in bfloat16.
The rows are ../shared/data/medi_nli_sample.jsonl's when present (extra negatives taken from the next rows),
else (and in smoke mode) the generated triplets of ``are_fast.toy.data``. Timings on a shared CPU are steadier
with ``OMP_NUM_THREADS=1 pytest benchmarks/test_bench_stage2.py --benchmark-timer=time.process_time``. ``extra_info`` holds tokens (all the batch's texts),
tokens_per_s, the loss, the route, computed_tokens (tokens the bodies' linear layers run, padding included)
and for our rows speedup_vs_released and memory_vs_released, read side by side. ``-k`` selects rows, e.g.
``-k "released or varlen"``.
"""
from __future__ import annotations

import tempfile

import pytest
import torch

from are_fast.model import Stage2Model
from are_fast.model.layout import ROUTES, computed_tokens, default_route
from are_fast.model.released import released_stage2_loss

from .cases import bench_device, smoke_mode
from .stage2_setup import CONFIGS, K, bench_items, bench_rows, load_pair, write_model

IMPLS = ["released", "ours-logits", *(f"ours-{route}" for route in ROUTES), "ours-checkpointing"]
_DEVICE = bench_device()
_DTYPE = "bfloat16" if _DEVICE.type == "cuda" else "float32"  # the device's main dtype: every impl
# CPU: also bf16 weights, for the released pattern and ours on the default route.
_BF16_IMPLS = [] if _DEVICE.type == "cuda" else ["released", f"ours-{default_route(_DEVICE)}"]
_results: dict = {}  # (negatives, impl, dtype) -> (mean seconds, peak bytes) of this session
_released_loss: dict = {}  # negatives -> the released pattern's loss on this session's batch


@pytest.fixture(scope="module")
def models():
    """(device, name, {(dtype name, checkpointing): (compressor, decoder)}, batch rows) of this run."""
    device = bench_device()
    name = "smoke" if smoke_mode() else device.type
    with tempfile.TemporaryDirectory() as path:
        write_model(path, name)
        kinds = [(_DTYPE, False), (_DTYPE, True)] + ([("bfloat16", False)] if _BF16_IMPLS else [])
        pairs = {kind: load_pair(path, getattr(torch, kind[0]), device, kind[1]) for kind in kinds}
    yield device, name, pairs, CONFIGS[name][1]


_PARAMS = [pytest.param(n, impl, dtype, id=f"neg{n}-{impl}" + ("-bf16" if dtype != _DTYPE else ""))
           for n in (1, 4) for dtype, impls in ((_DTYPE, IMPLS), ("bfloat16", _BF16_IMPLS)) for impl in impls]


@pytest.mark.parametrize(("negatives", "impl", "dtype"), _PARAMS)
def test_stage2_step(negatives, impl, dtype, models, measure, benchmark):
    device, name, pairs, count = models
    comp, dec = pairs[(dtype, impl == "ours-checkpointing")]
    released_key = (negatives, dtype)
    route = impl.removeprefix("ours-") if impl.removeprefix("ours-") in ROUTES else default_route(device)
    comp.route = dec.route = route
    rows, source = bench_rows(count, negatives, smoke=name == "smoke")
    items = bench_items(rows, negatives, comp, dec)
    model = Stage2Model(comp, dec, backend="reference" if impl == "ours-logits" else None)
    batch = model.collate(items).to(device)

    def ours():
        loss, _ = model(batch)
        loss.backward()
        return loss

    def released():
        loss = released_stage2_loss(comp, dec, items)
        loss.backward()
        return loss

    step = released if impl == "released" else ours
    loss = step().item()
    comp.zero_grad(set_to_none=True)
    if impl == "released":
        _released_loss[released_key] = loss
    elif released_key not in _released_loss:
        _released_loss[released_key] = released().item()
        comp.zero_grad(set_to_none=True)
    other = _released_loss[released_key]  # the same loss, or the comparison is void
    assert abs(loss - other) <= (2e-2 if dtype == "bfloat16" else 1e-5) * max(abs(other), 1e-6)

    tokens = sum(len(i.query) + len(i.pos_prefix) + len(i.pos_target) + sum(map(len, i.neg_targets)) for i in items)
    computed = None
    if impl != "released":  # compressor rows (queries, positives) and decoder streams (k vectors + target)
        streams = [batch.queries.lengths.tolist(), batch.positives.lengths.tolist(),
                   (batch.targets.lengths + K).tolist()]
        computed = sum(computed_tokens(lengths, route) for lengths in streams)
    group = f"stage2-step-neg{negatives}" + ("-bf16" if dtype != _DTYPE else "")
    peak = measure(step, lambda: comp.zero_grad(set_to_none=True), group=group, suite="stage2", impl=impl,
                   negatives=negatives, config=name, rows=count, tokens=tokens, source=source, loss=loss,
                   route=None if impl == "released" else route, computed_tokens=computed, dtype=dtype)
    mean = benchmark.stats.stats.mean
    _results[(negatives, impl, dtype)] = (mean, peak)
    benchmark.extra_info["tokens_per_s"] = tokens / mean
    if impl != "released" and (negatives, "released", dtype) in _results:
        base_time, base_peak = _results[(negatives, "released", dtype)]
        benchmark.extra_info["speedup_vs_released"] = base_time / mean
        benchmark.extra_info["memory_vs_released"] = peak / max(base_peak, 1)
    if dtype != _DTYPE and (negatives, impl, _DTYPE) in _results:
        benchmark.extra_info["speedup_vs_float32"] = _results[(negatives, impl, _DTYPE)][0] / mean
