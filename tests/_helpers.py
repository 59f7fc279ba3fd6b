"""Shared test helpers: tolerances, the float64 oracle, and the backends runnable here."""
import torch

import are_fast

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float64: 1e-10}
FUSED_BACKENDS = [b for b in are_fast.BACKENDS if b != "reference"]


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Norm-wise relative error ||out - ref|| / ||ref||, in float64 on CPU (either may live on any device); NaN
    anywhere gives inf."""
    out, ref = out.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    if not torch.isfinite(out).all() or not torch.isfinite(ref).all():
        return float("inf")
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff if denom == 0 else diff / denom


def assert_rel_close(out, ref, dtype, what=""):
    err = rel_error(out, ref)
    assert err <= TOLERANCE[dtype], f"{what}: relative error {err:.3e} > {TOLERANCE[dtype]:.0e}"


def leaf(tensor: torch.Tensor, dtype, requires_grad: bool, device="cpu") -> torch.Tensor:
    """A fresh leaf: tensor as dtype on device."""
    return tensor.detach().to(device, dtype, copy=True).requires_grad_(requires_grad)


def byte_level_bpe_tokenizer(merges: int = 300, seed: int = 0):
    """A real byte-level BPE tokenizer (GPT-2 / Llama 3 / Qwen style), trained offline here with the ``tokenizers``
    package on generated text (``are_fast.toy.data``): ByteLevel pre-tokenizer and decoder, 256 byte symbols plus
    up to ``merges`` merges (the toy text's few words give about 170), "<|endoftext|>" as bos/eos and "<pad>".
    Returns a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from are_fast.toy.data import compression_rows, triplet_rows

    texts = [r[key] for r in compression_rows(400, seed) for key in ("context", "output")]
    texts += [r["query"] + " " + r["pos"] for r in triplet_rows(200, 1, seed)]
    specials = ["<|endoftext|>", "<pad>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + len(specials) + merges, special_tokens=specials,
                                  initial_alphabet=alphabet, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<pad>")


def tiny_llama_with_bpe(path, hidden_size: int = 16, layers: int = 1, seed: int = 0):
    """Save a random tiny Llama sized to ``byte_level_bpe_tokenizer()``'s vocabulary, with that tokenizer
    (``save_pretrained``: tokenizer.json and its config), to the folder ``path``; returns the tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_level_bpe_tokenizer(seed=seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return tokenizer
