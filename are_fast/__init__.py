"""are_fast: fused, memory-bounded loss ops for AutoRegEmbed text-embedding models.

    import are_fast
    loss = are_fast.compression_loss(decoder_hidden, lm_head.weight, labels)

See ``are_fast.ops.functional`` for the ops, ``are_fast.ops.backends`` for how an implementation is chosen.
"""
from .ops.backends import BACKENDS
from .ops.checks import set_label_checks
from .encoding.encoder import Encoder
from .ops.functional import (
    alignment_loss, compression_loss, conditional_jsd, conditional_kl, sequence_logprobs, token_logprobs,
)
from .ops.modules import AlignmentLoss, CompressionLoss, ConditionalJSD, ConditionalKL, SequenceLogprobs

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "AlignmentLoss",
    "CompressionLoss",
    "ConditionalJSD",
    "ConditionalKL",
    "Encoder",
    "SequenceLogprobs",
    "alignment_loss",
    "compression_loss",
    "conditional_jsd",
    "conditional_kl",
    "sequence_logprobs",
    "set_label_checks",
    "token_logprobs",
]
