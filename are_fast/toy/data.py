"""The embedded default's data and model, no download: a tiny random Llama with ByT5's byte tokenizer, and
generated paraphrase rows (each meaning: size, animal, action, place, three synonyms a slot) where a positive
and a hard negative both differ from the query in one word, one by a synonym, one by meaning."""
from __future__ import annotations

import json
import os
import random

SLOTS = [
    [["big", "large", "huge"], ["small", "tiny", "little"], ["old", "aged", "elderly"], ["young", "new", "fresh"]],
    [["dog", "hound", "puppy"], ["cat", "kitten", "feline"], ["bird", "sparrow", "finch"], ["horse", "pony", "mare"]],
    [["runs", "sprints", "dashes"], ["sleeps", "naps", "dozes"], ["eats", "feeds", "dines"], ["sings", "chirps", "hums"]],
    [["in the park", "at the park", "in the green"], ["by the river", "near the stream", "at the brook"],
     ["at home", "in the house", "indoors"], ["on the hill", "up the slope", "atop the mound"]],
]
STAGE1_INSTRUCTION = "Restate:"
STAGE2_INSTRUCTION = "In one word:"


def tiny_llama(path: str, hidden_size: int = 64, layers: int = 2, seed: int = 0, **overrides):
    """Save a random-init Llama-style causal LM (ByT5 byte vocabulary, no BOS) and ByT5Tokenizer to ``path``."""
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = ByT5Tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False, **overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer


def _render(meaning, choice):
    size, animal, action, place = (SLOTS[s][m][c] for s, (m, c) in enumerate(zip(meaning, choice)))
    return f"the {size} {animal} {action} {place}"


def _other_choice(rng, choice):
    """Synonym choices that differ from ``choice`` in every slot."""
    return [rng.choice([c for c in range(3) if c != old]) for old in choice]


def _one_synonym_changed(rng, choice):
    """``choice`` with one random slot's synonym replaced by another."""
    slot = rng.randrange(len(choice))
    return choice[:slot] + [rng.choice([c for c in range(3) if c != choice[slot]])] + choice[slot + 1:]


def triplet_rows(count: int, num_negatives: int = 2, seed: int = 0) -> list[dict]:
    """Stage-2 rows {id, query, pos, neg: [num_negatives], instruction}: the positive swaps one word for a
    synonym; each hard negative changes a different slot's meaning, keeping the query's words elsewhere."""
    if not 1 <= num_negatives <= len(SLOTS):
        raise ValueError(f"num_negatives: expected 1 to {len(SLOTS)} (one changed slot each), got {num_negatives}")
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        meaning = [rng.randrange(len(s)) for s in SLOTS]
        choice = [rng.randrange(3) for _ in SLOTS]
        negs = []
        for slot in rng.sample(range(len(SLOTS)), num_negatives):
            changed = list(meaning)
            changed[slot] = rng.choice([m for m in range(len(SLOTS[slot])) if m != meaning[slot]])
            negs.append(_render(changed, choice))
        rows.append({"id": f"t{seed}-{i}", "query": _render(meaning, choice),
                     "pos": _render(meaning, _one_synonym_changed(rng, choice)), "neg": negs,
                     "instruction": STAGE2_INSTRUCTION})
    return rows


def compression_rows(count: int, seed: int = 0) -> list[dict]:
    """Stage-1 rows {id, context, instruction, output}: the output restates the context with other synonyms."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        meaning = [rng.randrange(len(s)) for s in SLOTS]
        choice = [rng.randrange(3) for _ in SLOTS]
        rows.append({"id": f"c{seed}-{i}", "context": _render(meaning, choice), "instruction": STAGE1_INSTRUCTION,
                     "output": _render(meaning, _other_choice(rng, choice))})
    return rows


def write_jsonl(path: str, rows) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
