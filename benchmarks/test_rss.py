"""The peak-RSS probe sees what it should: the naive formulas' materialized logits, the fused op's chunk."""
import pytest
import torch

from . import rss
from .cases import HEADS, Case, Shape


@pytest.mark.skipif(not rss.supported(), reason="needs /proc/self/clear_refs (Linux) to reset the RSS peak")
def test_probe_sees_the_logits_the_naive_path_materializes():
    case = Case("token_logprobs", Shape(HEADS["issue2"], 512, torch.float32, False, 256))
    logits_mib = 512 * 32000 * 4 / 2**20  # 62.5
    naive = rss.probe(case, "reference", rounds=1)
    fused = rss.probe(case, "chunked", rounds=1)
    assert naive["peak_rss_bytes"] / 2**20 > 2 * logits_mib  # logits, log-probs, their gradient
    assert fused["peak_rss_bytes"] / 2**20 < logits_mib
    assert naive["median"] > 0 and fused["median"] > 0
