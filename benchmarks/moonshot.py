"""The CPU moonshot of issue 12, measured: what skipping the gradient matmul for vocabulary blocks whose
probabilities are all below a threshold (Cut Cross-Entropy's gradient filter, 2^-12 on GPU) would save on
peaked next-token distributions, and what it would cost in exactness.

    python -m benchmarks.moonshot [--rows 1024] [--vocab 32000] [--hidden 512]

Distributions with the next-token entropy of a trained LM (2 and 4 nats) are built two ways: (a) "zipf":
a global Zipf frequency prior over token ids (BPE vocabularies put frequent tokens first) plus per-row
Gaussian noise, the temperature bisected to the entropy; (b) "shuffled": the same per-row distributions with
the token ids permuted per row (no id is likely for every row: the worst case for block skipping). For each
tile of rows x vocabulary entries it reports the share of tiles (= of the gradient matmul's work) whose
probabilities are all below the threshold, and the norm-wise relative error of the frozen head's hidden
gradient (onehot - p) @ W with those tiles left out, against float64.
"""
from __future__ import annotations

import argparse
import math

import torch

THRESHOLD = 2.0**-12
TILES = ((16, 256), (64, 1024), (512, 1024))


def logits_with_entropy(prior: torch.Tensor, noise: torch.Tensor, entropy: float) -> torch.Tensor:
    """(prior + noise) / T with T bisected so that the mean row entropy (nats) is ``entropy``. float64 [N, V]."""
    base = prior.unsqueeze(0) + noise
    low, high = 1e-3, 1e3
    for _ in range(60):
        temperature = math.sqrt(low * high)
        p = torch.softmax(base / temperature, 1)
        mean_entropy = -(p * torch.log(p.clamp_min(1e-300))).sum(1).mean().item()
        low, high = (temperature, high) if mean_entropy < entropy else (low, temperature)
    return base / math.sqrt(low * high)


def skip_report(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, tiles=TILES) -> list[dict]:
    """Per tile shape (rows, vocabulary entries) that fits the logits: share of tiles with every probability
    < THRESHOLD (the target's entry excluded: its one-hot term is added apart), and the norm-wise relative
    error of the hidden gradient with them skipped. logits [N, V] float64, targets [N], weight [V, H]."""
    p = torch.softmax(logits, 1)
    exact = -p @ weight
    exact += weight[targets]
    reports = []
    rows, vocab = p.shape
    for tile_rows, tile_vocab in [t for t in tiles if t[0] <= rows and t[1] <= vocab]:
        masked = p.clone()
        masked[torch.arange(rows), targets] = 0.0
        r, v = rows // tile_rows * tile_rows, vocab // tile_vocab * tile_vocab
        tiles = masked[:r, :v].reshape(r // tile_rows, tile_rows, v // tile_vocab, tile_vocab)
        small = tiles.amax(dim=(1, 3)) < THRESHOLD  # [row tiles, vocabulary tiles]
        keep = (~small).repeat_interleave(tile_rows, 0).repeat_interleave(tile_vocab, 1).to(p.dtype)
        filtered = p.clone()
        filtered[:r, :v] *= keep
        approx = -filtered @ weight
        approx += weight[targets]
        error = ((approx - exact).norm() / exact.norm()).item()
        reports.append(dict(tile=f"{tile_rows}x{tile_vocab}", skipped=small.double().mean().item(), error=error))
    return reports


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(args.seed)
    prior = -1.1 * torch.log1p(torch.arange(args.vocab, dtype=torch.float64))  # Zipf over token ids
    noise = 2.0 * torch.randn(args.rows, args.vocab, generator=generator, dtype=torch.float64)
    weight = torch.randn(args.vocab, args.hidden, generator=generator, dtype=torch.float64) / args.hidden**0.5
    print("| distribution | entropy (nats) | top-1 p (mean) | tile rows x vocab | tiles skipped | hidden-gradient rel. error |")
    print("|---|---|---|---|---|---|")
    for entropy in (2.0, 4.0):
        zipf = logits_with_entropy(prior, noise, entropy)
        shuffled = torch.stack([row[torch.randperm(args.vocab, generator=generator)] for row in zipf])
        for name, logits in (("zipf", zipf), ("shuffled", shuffled)):
            targets = torch.multinomial(torch.softmax(logits, 1), 1, generator=generator).squeeze(1)
            top1 = torch.softmax(logits, 1).amax(1).mean().item()
            for report in skip_report(logits, targets, weight):
                print(f"| {name} | {entropy:.0f} | {top1:.2f} | {report['tile']} | {report['skipped']:.2%} | "
                      f"{report['error']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
