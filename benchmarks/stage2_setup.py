"""What the stage-2 step benchmarks run: the random-init Llama per device, its batch rows, and loading it (shared by
``test_bench_stage2.py`` and ``stage2_dtypes``)."""
from __future__ import annotations

import json
import os

import torch

from are_fast.model import Compressor, FrozenDecoder
from are_fast.toy.data import triplet_rows
from are_fast.training.data import stage2_items

MEDI = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
                    "medi_nli_sample.jsonl")
K = 5
CONFIGS = {  # LlamaConfig fields and rows per batch, per device; smoke mode shrinks the CPU one
    "cpu": (dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=32000), 8),
    "cuda": (dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=128256), 16),
    "smoke": (dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512), 2),
}


def bench_rows(count: int, negatives: int, smoke: bool = False) -> tuple[list[dict], str]:
    """``count`` stage-2 rows with ``negatives`` each and where they come from (smoke mode: short toy rows)."""
    if os.path.isfile(MEDI) and not smoke:
        with open(MEDI, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()][: count + negatives]
        out = []
        for i, row in enumerate(rows[:count]):
            negs = [row["neg"]] + [r["neg"] for r in rows[i + 1: i + negatives]]
            out.append({"id": str(i), "query": row["query"], "pos": row["pos"], "neg": negs,
                        "instruction": row["instruction"]})
        return out, "medi_nli_sample.jsonl"
    return triplet_rows(count, negatives), "are_fast.toy.data triplets (medi_nli_sample.jsonl not found)"


def write_model(path: str, name: str) -> None:
    """Save the random-init Llama of config ``name`` (CONFIGS) and its byte-level tokenizer under ``path``."""
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(**CONFIGS[name][0], max_position_embeddings=2048, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)


def load_pair(path: str, dtype: torch.dtype, device, checkpointing: bool = False):
    """(compressor, frozen decoder) from ``path`` in ``dtype``, train mode (as a training step runs them)."""
    torch.manual_seed(1)  # the same <EMBED*> rows in every copy
    comp = Compressor.from_pretrained(path, K, dtype=dtype, device=device).train()
    if checkpointing:
        comp.enable_checkpointing()
    dec = FrozenDecoder.from_pretrained(path, dtype=dtype, device=device, checkpointing=checkpointing).train()
    return comp, dec


def bench_items(rows: list[dict], negatives: int, comp, dec):
    """Stage-2 items of ``rows`` with fixed random reference scores (the timing does not depend on them)."""
    gen = torch.Generator().manual_seed(0)
    scores = {r["id"]: (float(torch.randn(1, generator=gen)), torch.randn(negatives, generator=gen).tolist())
              for r in rows}
    return stage2_items(rows, comp, dec, scores=scores)
