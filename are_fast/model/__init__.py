"""Model layer: the compressor (text -> k vectors), the frozen decoder, the two training objectives.

    from are_fast.model import Compressor, FrozenDecoder, load_compressor
"""
from .compressor import Compressor, CompressorBatch, count_embed_tokens, embed_token_names, load_compressor
from .decoder import FrozenDecoder
from .objectives import (
    Stage1Item,
    Stage1Model,
    Stage2Item,
    Stage2Model,
    collate_stage1,
    collate_stage2,
    reference_scores,
    stream_logprobs,
)

__all__ = [
    "Compressor",
    "CompressorBatch",
    "FrozenDecoder",
    "Stage1Item",
    "Stage1Model",
    "Stage2Item",
    "Stage2Model",
    "collate_stage1",
    "collate_stage2",
    "count_embed_tokens",
    "embed_token_names",
    "load_compressor",
    "reference_scores",
    "stream_logprobs",
]
