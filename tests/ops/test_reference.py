"""The reference formulas against outside definitions: transformers' causal-LM loss and DPO's get_batch_logps."""
import torch

import are_fast
from _helpers import assert_rel_close


def get_batch_logps(logits, labels, average_log_prob=False, ignore_index=-100):
    """DPO's get_batch_logps, transcribed: logits [B, T, V], labels [B, T] -> [B]."""
    labels = labels[:, 1:].clone()
    logits = logits[:, :-1, :]
    loss_mask = labels != ignore_index
    labels[labels == ignore_index] = 0
    per_token_logps = torch.gather(logits.log_softmax(-1), dim=2, index=labels.unsqueeze(2)).squeeze(2)
    if average_log_prob:
        return (per_token_logps * loss_mask).sum(-1) / loss_mask.sum(-1)
    return (per_token_logps * loss_mask).sum(-1)


def test_sequence_logprobs_equal_get_batch_logps():
    hidden, weight = torch.randn(3, 8, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    labels = torch.randint(0, 50, (3, 8))
    labels[:, :3] = -100
    logits = hidden @ weight.T
    for backend in ("reference", "chunked"):
        for average in (False, True):
            ours = are_fast.sequence_logprobs(hidden, weight, labels, average=average, backend=backend)
            assert_rel_close(ours, get_batch_logps(logits, labels, average), torch.float64, f"{backend} {average}")


def test_compression_loss_equals_transformers_loss(device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, 97, (3, 12))
    labels = input_ids.clone()
    labels[:, :4] = -100
    labels[2, 9:] = -100
    with torch.no_grad():
        expected = model(input_ids=input_ids, labels=labels).loss
        hidden = model.model(input_ids=input_ids).last_hidden_state
    for backend in are_fast.BACKENDS:  # the model on CPU, the op on the device under test
        ours = are_fast.compression_loss(hidden.to(device), model.lm_head.weight.detach().to(device), labels.to(device),
                                         backend=backend)
        assert_rel_close(ours, expected, torch.float32, backend)
