"""peak_extra_memory counts what a call allocates, temporaries included, and nothing held before it."""
import torch

from are_fast.tools.memory import peak_extra_memory


def test_cpu_peak_counts_temporaries_not_existing_tensors():
    held = torch.ones(1 << 20)  # 4 MiB allocated before the call: not counted

    def call():
        temporary = torch.ones(1 << 21)  # 8 MiB, freed before the end
        return float((temporary * 2).sum()) + held[0].item()

    result, peak = peak_extra_memory(call)
    assert result == 2 * (1 << 21) + 1
    assert 16 << 20 <= peak < 17 << 20  # the temporary and its doubled copy were alive together


def test_cpu_peak_ignores_earlier_profiles():
    """A tensor allocated under one profile and freed outside any must not inflate the next measurement."""
    kept = []
    peak_extra_memory(lambda: kept.append(torch.ones(1 << 20)))
    kept.clear()
    _, peak = peak_extra_memory(lambda: float(torch.ones(1 << 18).sum()))
    assert 1 << 20 <= peak < (1 << 20) + 4096
