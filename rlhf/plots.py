"""PNG plots rendered offline with matplotlib's Agg backend (`dvc plots show` loads Vega from a CDN; docs/design.md §8).

Each function takes rows as read from the pipeline's CSV files (``csv.DictReader``: every value a string) and writes
one PNG. matplotlib is imported lazily so the stage programs still run where only torch + transformers exist.
"""

from __future__ import annotations

from pathlib import Path

from rlhf.files import write_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede the pyplot import
    import matplotlib.pyplot as plt

    return plt


def _column(rows: list[dict[str, str]], name: str) -> list[float]:
    return [float(row[name]) for row in rows]


def plot_ppo_training(history: list[dict[str, str]], path: Path) -> None:
    """RM score (objective/scores) and sequence KL (objective/kl) over PPO iterations, from plots/ppo.csv (a DPO
    history, ``ppo.algorithm: dpo``, has neither: :func:`plot_dpo_training`)."""
    if history and "dpo/loss" in history[0]:
        plot_dpo_training(history, path)
        return
    plt = _pyplot()
    steps = _column(history, "step")
    figure, (score_axis, kl_axis) = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    score_axis.plot(steps, _column(history, "objective/scores"), label="RM score (proxy)")
    score_axis.plot(steps, _column(history, "objective/rlhf_reward"), label="RM score − β·KL")
    score_axis.set(xlabel="PPO iteration", ylabel="normalised RM units", title="Reward")
    score_axis.legend()
    kl_axis.plot(steps, _column(history, "objective/kl"), color="tab:red")
    kl_axis.set(xlabel="PPO iteration", ylabel="nats per sequence", title="KL(π ‖ π_SFT)")
    _save(figure, path)


def plot_dpo_training(history: list[dict[str, str]], path: Path) -> None:
    """Implicit rewards β·log(π/π_ref) of the chosen and rejected responses and their margin, and the preference
    accuracy (train batch; held-out where evaluated), over DPO steps, from plots/ppo.csv."""
    plt = _pyplot()
    steps = _column(history, "step")
    figure, (reward_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(9, 3.5), constrained_layout=True)
    for name, label in (("chosen", "chosen"), ("rejected", "rejected"), ("margin", "margin (chosen − rejected)")):
        reward_axis.plot(steps, _column(history, f"dpo/rewards/{name}"), label=label)
    reward_axis.set(xlabel="DPO step", ylabel="β·log(π/π_SFT), nats", title="Implicit reward (train batch)")
    reward_axis.legend()
    accuracy_axis.plot(steps, _column(history, "dpo/accuracy"), label="train batch", alpha=0.6)
    evaluated = [row for row in history if row.get("eval/accuracy") not in (None, "")]
    if evaluated:
        accuracy_axis.plot(
            _column(evaluated, "step"), _column(evaluated, "eval/accuracy"), marker="o", label="held-out pairs"
        )
    accuracy_axis.set(xlabel="DPO step", ylabel="share of pairs", title="Preference accuracy (margin > 0)")
    accuracy_axis.legend()
    _save(figure, path)


def plot_overoptimization(rows: list[dict[str, str]], path: Path) -> None:
    """Proxy (RM) and gold score of each PPO checkpoint against its KL to the SFT policy (plots/overoptimization.csv).

    Over-optimisation (Gao et al. 2022) shows as the RM curve still rising while the gold curve flattens or falls.
    """
    plt = _pyplot()
    kl = _column(rows, "kl")
    figure, axis = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    axis.plot(kl, _column(rows, "rm_score"), marker="o", color="tab:blue", label="RM score (proxy)")
    axis.set(
        xlabel="KL to the SFT policy (nats per sequence)",
        ylabel="RM score (normalised units)",
        title="Proxy vs gold across PPO checkpoints",
    )
    for row, x in zip(rows, kl):
        axis.annotate(
            f"step {row['step']}", (x, float(row["rm_score"])), textcoords="offset points", xytext=(4, 4), fontsize=7
        )
    lines = axis.get_lines()
    if all(row.get("gold_score") not in (None, "") for row in rows):
        gold_axis = axis.twinx()  # the two judges have different units: one y-axis each
        lines += gold_axis.plot(kl, _column(rows, "gold_score"), marker="s", color="tab:orange", label="gold score")
        gold_axis.set_ylabel("gold score")
    axis.legend(lines, [line.get_label() for line in lines])
    _save(figure, path)


def _save(figure, path: Path) -> None:
    # atomically (a full disk leaves the previous PNG, not half of one); no timestamp in the PNG metadata, so the same
    # numbers give the same bytes
    write_atomic(path, lambda handle: figure.savefig(handle, format="png", dpi=100, metadata={"Software": None}))
    figure.clear()
    import matplotlib.pyplot as plt

    plt.close(figure)
