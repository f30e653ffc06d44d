"""What a person reads at a glance: a stage's summary line, its metrics artifact, the evaluation artifact.

Pure functions from flattened metrics (``{"tail_mean/objective/kl": 2.4, …}``) to text; flows/stages.py publishes
them as Prefect artifacts and prints the summary line on the console. The evaluation leads with the verdict (PPO vs
SFT on the gold judge, with its interval; KL against its band; validity; diversity), then gold vs proxy, cost, health,
and the samples.
"""

from __future__ import annotations

from collections.abc import Mapping

Metrics = Mapping[str, object]

# The key results of each stage, in the order a person reads them: (label, key) or (label, (from key, to key)). A
# ``NAME_policy`` key is shown with its ``NAME_sft`` twin; a key with ``KEY_ci_low``/``KEY_ci_high`` with its interval.
SUMMARY_FIELDS: dict[str, tuple[tuple[str, str | tuple[str, str]], ...]] = {
    "prepare": (
        ("demonstrations", "n_demonstrations_train"),
        ("prompts", "n_prompts_train"),
        ("vocabulary", "vocab_size"),
    ),
    "sft": (("eval loss", ("eval_loss_initial", "eval_loss")),),
    "sample_pairs": (("samples", "n_samples"), ("distinct per prompt", "distinct_per_prompt")),
    "label": (("train pairs", "n_train"), ("eval pairs", "n_eval"), ("agreement with gold", "agreement_with_gold")),
    "reward": (("held-out accuracy", "accuracy"), ("of the annotator's", "accuracy_vs_annotator")),
    "ppo": (
        ("RM score", "tail_mean/objective/scores"),
        ("KL", "tail_mean/objective/kl"),
        ("DPO loss", "tail_mean/dpo/loss"),
        ("held-out accuracy", "final/eval/accuracy"),
        ("episodes/s", "episodes_per_second"),
    ),
    "evaluate": (
        ("gold win rate", "gold_win_rate"),
        ("KL", "kl_to_ref"),
        ("validity", "valid_rate_policy"),
        ("distinct", "distinct_policy"),
    ),
}


def number(value: object) -> str:
    """``0.939``, ``20000``, ``2.42``: three significant figures for floats."""
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return f"{value:.3g}"


def stage_summary(stage: str, metrics: Metrics) -> str:
    """``eval loss 6.06 → 1.57``: the stage's key results (those its metrics have)."""
    parts = []
    for label, key in SUMMARY_FIELDS.get(stage, ()):
        if isinstance(key, tuple):
            if all(k in metrics for k in key):
                parts.append(f"{label} {number(metrics[key[0]])} → {number(metrics[key[1]])}")
        elif key in metrics:
            text = f"{label} {number(metrics[key])}"
            low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
            if low is not None and high is not None:
                text += f" [{number(low)}, {number(high)}]"
            sft = metrics.get(key.removesuffix("_policy") + "_sft") if key.endswith("_policy") else None
            if sft is not None:
                text += f" (SFT {number(sft)})"
            parts.append(text)
    return " · ".join(parts)


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def stage_markdown(stage: str, by_file: Mapping[str, Metrics]) -> str:
    """A stage's metrics artifact: its summary line first, then one table per metrics file (in dvc.yaml order)."""
    merged = {name: value for values in by_file.values() for name, value in values.items()}
    summary = stage_summary(stage, merged)
    parts = [f"# Stage `{stage}`", "", f"**{summary}**" if summary else "", ""]
    for path, metrics in by_file.items():
        parts += [
            f"## {path}",
            "",
            table([(name, number(value)) for name, value in metrics.items()], ("metric", "value")),
        ]
        parts.append("")
    return "\n".join(parts)


def verdict(evaluation: Metrics) -> str:
    """One sentence: does the policy beat SFT on the gold judge? Decided by the 95 % interval of the win rate."""
    rate, low, high = (evaluation.get(k) for k in ("gold_win_rate", "gold_win_rate_ci_low", "gold_win_rate_ci_high"))
    if rate is None:
        return "No gold judge: the win rate against SFT is unknown."
    if low is not None and float(low) > 0.5:
        return f"The policy beats SFT on the gold judge: it wins {float(rate):.1%} of paired comparisons."
    if high is not None and float(high) < 0.5:
        return f"The policy is worse than SFT on the gold judge: it wins only {float(rate):.1%} of paired comparisons."
    return f"No clear difference from SFT on the gold judge ({float(rate):.1%} wins; the interval includes 50 %)."


def _kl_row(evaluation: Metrics) -> tuple[str, str, str]:
    kl, band, inside = (
        evaluation.get("kl_to_ref"),
        evaluation.get("kl_target_band"),
        evaluation.get("kl_in_target_band"),
    )
    if kl is None:
        return ("KL to SFT (nats)", "–", "")
    where = ""
    if isinstance(band, (list, tuple)) and len(band) == 2:
        where = f"target band {number(float(band[0]))}–{number(float(band[1]))}: " + ("inside" if inside else "OUTSIDE")
    elif "kl_target" in evaluation:
        where = f"target {number(evaluation['kl_target'])}"
    return ("KL to SFT (nats)", number(kl), where)


def _pair(evaluation: Metrics, label: str, stem: str) -> tuple[str, str, str]:
    policy, sft = evaluation.get(f"{stem}_policy"), evaluation.get(f"{stem}_sft")
    return (label, number(policy) if policy is not None else "–", f"SFT {number(sft)}" if sft is not None else "")


def evaluation_markdown(evaluation: Metrics, ppo: Metrics, samples: str) -> str:
    """The evaluation artifact: verdict, then gold vs proxy, cost, health, and the samples markdown."""
    rate = evaluation.get("gold_win_rate")
    interval = ""
    if "gold_win_rate_ci_low" in evaluation:
        interval = (
            f"95 % interval {number(evaluation['gold_win_rate_ci_low'])}–{number(evaluation['gold_win_rate_ci_high'])}"
        )
    algorithm = str(ppo.get("algorithm", "ppo")).upper()
    verdict_rows = [
        ("gold win rate vs SFT", number(rate) if rate is not None else "–", interval),
        ("gold gain", number(evaluation.get("gold_gain_in_sft_std", "–")), "SFT standard deviations"),
        _kl_row(evaluation),
        _pair(evaluation, "validity", "valid_rate"),
        _pair(evaluation, "distinct responses", "distinct"),
    ]
    proxy_rows = [
        ("gold score", number(evaluation.get("gold_score_policy", "–")), number(evaluation.get("gold_score_sft", "–"))),
        (
            "RM (proxy) score",
            number(evaluation.get("rm_score_policy", "–")),
            number(evaluation.get("rm_score_sft", "–")),
        ),
        ("win rate vs SFT", number(evaluation.get("gold_win_rate", "–")) + " (gold)", ""),
        ("win rate vs SFT", number(evaluation.get("rm_win_rate", "–")) + " (RM)", ""),
    ]
    cost_rows = [
        (label, number(ppo[key]))
        for label, key in (
            ("training seconds", "seconds"),
            ("episodes", "episodes"),
            ("episodes per second", "episodes_per_second"),
            ("peak RSS (MiB)", "peak_rss_mib"),
            ("peak GPU memory (MiB)", "peak_gpu_mib"),
            ("processes", "world_size"),
            ("trained parameters", "trainable_parameters"),
        )
        if key in ppo
    ]
    health_rows = [
        _pair(evaluation, "EOS rate", "eos_rate"),
        _pair(evaluation, "response length (tokens)", "response_length"),
        _pair(evaluation, "repetition rate", "repetition_rate"),
        _pair(evaluation, "distinct-1", "distinct_1"),
        _pair(evaluation, "distinct-2", "distinct_2"),
    ]
    parts = [
        f"# {algorithm} policy vs SFT",
        "",
        f"**{verdict(evaluation)}**",
        "",
        table(verdict_rows, ("", "policy", "")),
        "",
        "## Gold judge vs the reward model (proxy)",
        "",
        "A proxy that rises while gold does not is reward over-optimisation.",
        "",
        table(proxy_rows, ("", "policy", "SFT")),
        "",
        "## Cost",
        "",
        table(cost_rows, ("", "")) if cost_rows else "(metrics/ppo.json not found)",
        "",
        "## Health",
        "",
        table(health_rows, ("", "policy", "")),
        "",
        samples,
    ]
    return "\n".join(parts)
