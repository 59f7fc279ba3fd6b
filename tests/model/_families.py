"""Tiny random causal LMs of the families a user brings (no download): 2 layers, hidden 32-64, a ByT5-sized
vocabulary, windows of 4 tokens so that test rows run past them. ``build(name)`` -> a fresh float32 model."""
import torch
import transformers as tf

WINDOW = 4  # sliding windows; the test rows are longer
VOCAB = 400  # ByT5's 384 ids and the <EMBED{i}> tokens a compressor adds
# A wide initialization (transformers' default is 0.02): attention scores and logits large enough that a window,
# a softcap or a scale left out changes the numbers well beyond the tolerance.
INIT = 0.3
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, eos_token_id=1, pad_token_id=0, bos_token_id=None,
              initializer_range=INIT)
SLIDING_THEN_FULL = ["sliding_attention", "full_attention"]

FAMILIES = {
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**COMMON)),
    "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**COMMON, sliding_window=WINDOW)),
    "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON)),
    "qwen2-sliding": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**COMMON, use_sliding_window=True,
                                                                 sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**COMMON, head_dim=16)),
    "gemma": lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**COMMON, head_dim=16)),
    "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(
        **COMMON, head_dim=16, sliding_window=WINDOW, layer_types=SLIDING_THEN_FULL, attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0)),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
        **COMMON, head_dim=16, sliding_window=WINDOW, layer_types=SLIDING_THEN_FULL, final_logit_softcapping=5.0)),
    "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**COMMON, sliding_window=WINDOW)),
    "gpt-neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
        **{k: v for k, v in COMMON.items() if k != "num_key_value_heads"}, rotary_pct=0.5)),
    "olmo2": lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**COMMON)),
    "granite": lambda: tf.GraniteForCausalLM(tf.GraniteConfig(
        **COMMON, logits_scaling=4.0, embedding_multiplier=3.0, residual_multiplier=0.5, attention_multiplier=0.2)),
    "cohere": lambda: tf.CohereForCausalLM(tf.CohereConfig(**COMMON, logit_scale=0.5, tie_word_embeddings=True)),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                     n_positions=128, eos_token_id=1, bos_token_id=None,
                                                     initializer_range=INIT)),
}


def build(name: str, seed: int = 0):
    """A fresh random-init model of family ``name`` in float32, eval mode, frozen."""
    torch.manual_seed(seed)
    return FAMILIES[name]().eval().requires_grad_(False)
