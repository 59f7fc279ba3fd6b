"""are_fast: fused, memory-bounded loss ops for AutoRegEmbed text-embedding models.

    import are_fast
    loss = are_fast.compression_loss(decoder_hidden, lm_head.weight, labels)

See ``are_fast.functional`` for the ops, ``are_fast.backends`` for how an implementation is chosen.
"""
from .backends import BACKENDS
from .checks import set_label_checks
from .encoder import Encoder
from .functional import alignment_loss, compression_loss, conditional_kl, sequence_logprobs, token_logprobs
from .modules import AlignmentLoss, CompressionLoss, ConditionalKL, SequenceLogprobs

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "AlignmentLoss",
    "CompressionLoss",
    "ConditionalKL",
    "Encoder",
    "SequenceLogprobs",
    "alignment_loss",
    "compression_loss",
    "conditional_kl",
    "sequence_logprobs",
    "set_label_checks",
    "token_logprobs",
]
