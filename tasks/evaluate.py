"""Stage `evaluate`: the PPO policy against the SFT policy on held-out prompts (proxy RM and gold side by side).

    python -m tasks.evaluate
"""

from __future__ import annotations

from pathlib import Path

from rlhf import data
from rlhf.annotators import load_callable
from rlhf.config import ConfigError, load_params
from rlhf.data import DataError
from rlhf.evaluation import compare_policies, sample_and_score, samples_table
from rlhf.modeling import RewardNormalization, check_prompts_fit, load_policy, load_scalar_model, load_tokenizer
from rlhf.stage import emit, fail

POLICY, SFT_MODEL, REWARD_MODEL = Path("models/policy"), Path("models/sft"), Path("models/reward")
PROMPTS, METRICS, TABLE = Path("data/prompts/eval.jsonl"), Path("metrics/evaluate.json"), Path("metrics/samples.md")


def main() -> None:
    try:
        params = load_params()
        config = params.evaluate
        prompts = data.read_jsonl(PROMPTS)
        data.validate_prompts(prompts, str(PROMPTS))
        check_prompts_fit(load_tokenizer(POLICY), [r["prompt"] for r in prompts], POLICY, config.max_new_tokens, str(PROMPTS))
        gold = load_callable(config.gold) if config.gold else None
        is_valid = load_callable(config.validity) if config.validity else None
    except (ConfigError, DataError, ValueError) as error:
        fail(str(error))
    prompts = [r["prompt"] for r in (prompts[: config.n_prompts] if config.n_prompts else prompts)]
    tokenizer = load_tokenizer(POLICY)
    sft = load_policy(SFT_MODEL).eval()
    policy = load_policy(POLICY).eval()
    reward_model = load_scalar_model(REWARD_MODEL, tokenizer.pad_token_id).eval()
    normalization = RewardNormalization.load(REWARD_MODEL)
    common = dict(reward_model=reward_model, normalization=normalization, tokenizer=tokenizer, prompts=prompts,
                  samples_per_prompt=config.samples_per_prompt, max_new_tokens=config.max_new_tokens,
                  temperature=config.temperature, seed=params.seed + 5, batch_size=config.batch_size)
    policy_samples = sample_and_score(policy, sft, **common)
    emit("evaluate", "progress", step=1, total=2)
    sft_samples = sample_and_score(sft, sft, **common)
    emit("evaluate", "progress", step=2, total=2)
    metrics = compare_policies(policy_samples, sft_samples, gold, is_valid)
    # the adaptive controller aims at kl_target; within ±50 % of it counts as on target
    low, high = 0.5 * params.ppo.kl_target, 1.5 * params.ppo.kl_target
    metrics["kl_target"] = params.ppo.kl_target
    metrics["kl_target_band"] = [low, high]
    metrics["kl_in_target_band"] = bool(low <= metrics["kl_to_ref"] <= high)
    data.write_json(METRICS, metrics)
    TABLE.write_text("# Samples: SFT vs PPO on held-out prompts\n\n" + samples_table(policy_samples, sft_samples, gold, config.n_samples_table))
    emit("evaluate", "metrics", **metrics)


if __name__ == "__main__":
    main()
