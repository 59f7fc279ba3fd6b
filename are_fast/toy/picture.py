"""The main job's picture (matplotlib): each stage's loss, raw and smoothed, with the held-out loss, and the
held-out triplet accuracy through stage 1 and stage 2 against hard and random negatives."""
from __future__ import annotations


def smooth(values, window: int) -> list[float]:
    """A centered moving average over ``window`` points (fewer at the ends): no lag behind a falling loss,
    unlike an exponential average. ``window`` 1 keeps ``values``."""
    half, out = window // 2, []
    for i in range(len(values)):
        part = values[max(0, i - half): i + half + 1]
        out.append(sum(part) / len(part))
    return out


def plot_main_job(losses: dict, evals: dict, out: str) -> None:
    """Write the picture to ``out`` (PNG).

    Args:
        losses: {panel title: (training records, evaluation records)} as ``reporting.read_log`` returns them.
        evals: {stage name: evaluation records} of the stages whose triplet accuracy is drawn, in order.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(losses) + 1, figsize=(4.6 * (len(losses) + 1), 3.6))
    for ax, (title, (train, held)) in zip(axes, losses.items()):
        steps, values = [r["step"] for r in train], [r["loss"] for r in train]
        ax.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8, label="training loss")
        ax.plot(steps, smooth(values, max(1, len(values) // 15)), color="tab:blue", linewidth=2, label="smoothed")
        held = [r for r in held if "eval_loss" in r]
        if held:
            ax.plot([r["step"] for r in held], [r["eval_loss"] for r in held], "o-", color="tab:orange",
                    markersize=4, label="held-out loss")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

    ax, offset, ends = axes[-1], 0, []
    for name, records in evals.items():
        records = [r for r in records if "eval_acc_hard" in r]
        for key, color, label in (("eval_acc_hard", "tab:red", "hard negatives"),
                                  ("eval_acc_random", "tab:green", "random negatives")):
            ax.plot([offset + r["step"] for r in records], [r[key] for r in records], "o-", color=color,
                    markersize=4, label=label if not ends else None)
        offset += records[-1]["step"] if records else 0
        ends.append((offset, name))
    start = 0
    for end, name in ends:
        ax.axvline(end, color="gray", linewidth=0.8)
        ax.text((start + end) / 2, 0.03, name, ha="center", fontsize=9)
        start = end
    ax.axhline(0.5, color="gray", linestyle="--", linewidth=0.8, label="chance")
    ax.set_ylim(0, 1.02)
    ax.set_title("held-out triplet accuracy")
    ax.set_xlabel("optimizer step (stage 1, then stage 2)")
    ax.set_ylabel("cos(q, pos) > cos(q, neg)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 0.08))
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
