"""Model directories checked before any work: config, weights, a usable tokenizer, and k from <EMBED*> tokens.

Every job calls ``inspect_model_dir`` on each model it is given, so a folder that cannot work is refused with
one line naming the option, the folder and the fix, before anything is computed: no config.json, no weights,
no tokenizer, or a tokenizer that maps a sample text to no tokens (an empty vocabulary would make every text
the same embedding). A tokenizer whose files are there but fail to load is reported as the failure it is (its
exception's type and message; an import failure as a problem of the installed packages).
``resolve_num_embed_tokens`` reads k from the tokenizer's <EMBED0>..<EMBED{k-1}> tokens; a --num-embed-tokens that disagrees with them is an error, never a silent second set of tokens.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from .compressor import count_embed_tokens

SAMPLE_TEXT = "A short sample text, 42."
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
            "pytorch_model.bin.index.json")
_SAMPLE_BYTES = 1 << 20
# A folder with none of these has no tokenizer at all (transformers' tokenizers save at least one of them).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model", "merges.txt")


@dataclass(frozen=True)
class ModelDirInfo:
    """A checked model directory: its path, the k of its <EMBED*> tokens (0: none) and its fingerprint."""

    path: str
    num_embed_tokens: int
    fingerprint: str


def _not_a_model(option: str, path: str, what: str) -> ValueError:
    hint = ""
    if os.path.isfile(os.path.join(path, "model", "config.json")):
        hint = ("; the training jobs write their model to <output-dir>/model: did you mean "
                f"{os.path.join(path, 'model')!r}?")
    return ValueError(f"{option}: {path!r} {what} (expected a saved Hugging Face model directory){hint}")


def model_fingerprint(path: str) -> str:
    """sha256 over the directory's file names and sizes, the contents of its small (< 1 MiB) files and the first
    and last MiB of the others: a retrained or other model differs, and multi-GB weights are not read whole."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            continue
        size = os.path.getsize(full)
        digest.update(f"{name}\0{size}\0".encode())
        with open(full, "rb") as f:
            if size < _SAMPLE_BYTES:
                digest.update(f.read())
            else:
                digest.update(f.read(_SAMPLE_BYTES))
                f.seek(size - _SAMPLE_BYTES)
                digest.update(f.read())
    return digest.hexdigest()


def inspect_model_dir(path: str, option: str = "model", trust_remote_code: bool = False) -> ModelDirInfo:
    """Check that ``path`` holds a config, weights and a usable tokenizer; ValueError naming ``option`` if not."""
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise _not_a_model(option, path, "is not a directory")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise _not_a_model(option, path, "has no config.json")
    names = os.listdir(path)
    if not any(n in _WEIGHTS or (n.startswith("model-") and n.endswith(".safetensors")) for n in names):
        raise _not_a_model(option, path, "has no weights (model.safetensors or pytorch_model.bin)")
    fix = "copy the tokenizer files of the model it was trained from into it"
    if not any(n in _TOKENIZER_FILES for n in names):
        raise ValueError(f"{option}: {path!r} has no usable tokenizer (none of {', '.join(_TOKENIZER_FILES[:3])}, "
                         f"...); {fix}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        ids = tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"]
    except Exception as err:  # transformers raises many types here (OSError, ValueError, ImportError, ...)
        raise ValueError(_tokenizer_failure(option, path, err)) from None
    if not ids:
        raise ValueError(f"{option}: the tokenizer in {path!r} maps the text {SAMPLE_TEXT!r} to no tokens (an empty "
                         f"vocabulary: every text would get the same embedding); {fix}")
    return ModelDirInfo(path, count_embed_tokens(tokenizer), model_fingerprint(path))


def _tokenizer_failure(option: str, path: str, err: Exception) -> str:
    """The line for a tokenizer whose files are there but fail to load: the exception as it is (type and first
    line), and for an import failure that the installed packages, not the folder, are at fault."""
    message = str(err).strip().splitlines()[0] if str(err).strip() else ""
    cause = f"{type(err).__name__}: {message}" if message else type(err).__name__
    if isinstance(err, ImportError):
        return (f"{option}: loading the tokenizer of {path!r} failed on an import ({cause}); the installed packages "
                "are at fault, not the model folder: check that transformers and its dependencies import")
    return f"{option}: loading the tokenizer files of {path!r} failed ({cause})"


def resolve_num_embed_tokens(info: ModelDirInfo, requested: int | None, default: int | None = None,
                             option: str = "--num-embed-tokens") -> int:
    """k for a job on the model ``info``: its own <EMBED*> count, which ``requested`` must equal when given.

    A model without <EMBED0> takes ``requested``, else ``default`` (stage 1 from a base LM: 5), else it is an
    error (a job that needs a trained model).
    """
    if requested is not None and requested < 1:
        raise ValueError(f"{option}: expected at least 1, got {requested}")
    if info.num_embed_tokens:
        if requested is not None and requested != info.num_embed_tokens:
            raise ValueError(f"{option} {requested}: the model {info.path!r} has k={info.num_embed_tokens} "
                             f"<EMBED*> tokens; give {info.num_embed_tokens} or leave the option out")
        return info.num_embed_tokens
    if requested is not None:
        return requested
    if default is not None:
        return default
    raise ValueError(f"model: {info.path!r} has no <EMBED0> token, so it is not a trained AutoRegEmbed model "
                     "(stage 1 writes one to <output-dir>/model); to use it anyway with k new untrained tokens give "
                     f"{option} K")
