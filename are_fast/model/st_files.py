"""The three small JSON files that make a saved compressor folder load in sentence-transformers: modules.json
(naming ``are_fast.encoding.st_module.AutoRegEmbedModule`` by its path, never importing it: this is the model
layer), are_fast_module.json (k, max length) and config_sentence_transformers.json (the prompt). README
"Encoding" describes them."""
from __future__ import annotations

import json
import os
from collections import Counter
from typing import Iterable, Mapping

from ..runtime import written_atomically

ST_MODULE_TYPE = "are_fast.encoding.st_module.AutoRegEmbedModule"
MODULES_FILE = "modules.json"
MODULE_CONFIG_FILE = "are_fast_module.json"
ST_CONFIG_FILE = "config_sentence_transformers.json"
# AutoRegEmbed compresses queries and documents with the same instruction: both prompt names hold it, so
# sentence-transformers' encode, encode_query and encode_document agree (its default "query" prompt is empty).
PROMPT_NAMES = ("query", "document")


def module_config(num_embed_tokens: int, max_length: int | None) -> dict:
    """The sentence-transformers module's config: {"num_embed_tokens": k, "max_length": tokens or None}."""
    return {"num_embed_tokens": int(num_embed_tokens), "max_length": max_length}


def instruction_prompts(instructions: Iterable[str | None]) -> dict:
    """``prompts`` and ``default_prompt_name`` for the instructions of a training set's rows.

    The most frequent instruction (ties: the first seen) becomes the "query" and "document" prompt, "query" the
    default; rows without one are ignored. No instruction at all gives no prompt (an empty instruction then).
    """
    counts = Counter(i for i in instructions if i is not None)
    if not counts:
        return {"prompts": {}, "default_prompt_name": None}
    instruction = counts.most_common(1)[0][0]
    return {"prompts": dict.fromkeys(PROMPT_NAMES, instruction), "default_prompt_name": PROMPT_NAMES[0]}


def _write_json(path: str, obj) -> None:
    with written_atomically(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def write_module_config(path: str | os.PathLike, num_embed_tokens: int, max_length: int | None) -> None:
    """Write ``are_fast_module.json`` into the folder ``path``."""
    _write_json(os.path.join(path, MODULE_CONFIG_FILE), module_config(num_embed_tokens, max_length))


def write_sentence_transformers_files(path: str | os.PathLike, compressor, prompts: Mapping[str, str] | None = None,
                                      default_prompt_name: str | None = None) -> None:
    """Write the three files into the model folder ``path`` (which holds, or will hold, the compressor's files).

    compressor: the ``Compressor`` saved there (its k and ``max_text_tokens`` go into the module config).
    prompts / default_prompt_name: as sentence-transformers stores them; a prompt is the AutoRegEmbed
    instruction (placed after the text, see ``are_fast.encoding.st_module``).
    """
    prompts = dict(prompts or {})
    if default_prompt_name is not None and default_prompt_name not in prompts:
        raise ValueError(f"default_prompt_name: {default_prompt_name!r} is not one of the prompts {sorted(prompts)}")
    os.makedirs(path, exist_ok=True)
    _write_json(os.path.join(path, MODULES_FILE), [{"idx": 0, "name": "0", "path": "", "type": ST_MODULE_TYPE}])
    write_module_config(path, compressor.num_embed_tokens, compressor.max_text_tokens)
    _write_json(os.path.join(path, ST_CONFIG_FILE), {
        "model_type": "SentenceTransformer", "prompts": prompts, "default_prompt_name": default_prompt_name,
        "similarity_fn_name": "cosine",
    })


def read_sentence_transformers_files(path: str | os.PathLike) -> dict:
    """What a folder's files say: {"max_length", "prompts", "default_prompt_name"} for those present ({} if none)."""
    found: dict = {}
    module_path = os.path.join(path, MODULE_CONFIG_FILE)
    if os.path.isfile(module_path):
        with open(module_path, encoding="utf-8") as f:
            found["max_length"] = json.load(f).get("max_length")
    config_path = os.path.join(path, ST_CONFIG_FILE)
    if os.path.isfile(config_path):
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
        found["prompts"] = dict(config.get("prompts") or {})
        found["default_prompt_name"] = config.get("default_prompt_name")
    return found
