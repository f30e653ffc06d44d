"""Stage `sample_pairs`: K sampled responses per training prompt from the SFT policy.

    python -m tasks.sample_pairs
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf import data, ppo
from rlhf.config import load_params
from rlhf.modeling import check_prompts_fit, encode_prompts, load_policy, load_tokenizer, set_seed
from rlhf.rollout import generate_responses
from tasks.stage_io import emit, refuse_bad_input
from rlhf.validation import check_model_dir, check_tokenizer_fits_model, read_records

SFT_MODEL, PROMPTS, OUT = Path("models/sft"), Path("data/prompts/train.jsonl"), Path("data/pairs/samples.jsonl")
METRICS = Path("metrics/sample_pairs.json")


def main() -> None:
    with refuse_bad_input():  # cheap checks only: params, prompts, the SFT folder and its tokenizer
        params = load_params()
        config = params.sample_pairs
        prompts = read_records(PROMPTS, data.validate_prompts)
        check_model_dir(SFT_MODEL)
        tokenizer = load_tokenizer(SFT_MODEL)
        check_tokenizer_fits_model(tokenizer, SFT_MODEL)
        check_prompts_fit(tokenizer, [r["prompt"] for r in prompts], SFT_MODEL, config.max_new_tokens, str(PROMPTS))
    prompts = prompts[: config.n_prompts] if config.n_prompts else prompts
    set_seed(params.seed + 1)
    policy = load_policy(SFT_MODEL).eval()
    rows, n_finished = [], 0
    for start in range(0, len(prompts), config.batch_size):
        chunk = [r["prompt"] for r in prompts[start : start + config.batch_size]]
        expanded = [p for p in chunk for _ in range(config.samples_per_prompt)]
        query_ids, query_mask = encode_prompts(tokenizer, expanded)
        with torch.no_grad():
            raw = generate_responses(policy, query_ids, query_mask, config.max_new_tokens, config.temperature, tokenizer.eos_token_id, tokenizer.pad_token_id)
        responses, mask, finished = ppo.truncate_after_stop_token(raw, tokenizer.eos_token_id, tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(responses.masked_fill(~mask, tokenizer.pad_token_id), skip_special_tokens=True)
        n_finished += int(finished.sum())
        k = config.samples_per_prompt
        for i, prompt in enumerate(chunk):
            rows.append({
                "prompt_id": start + i,
                "prompt": prompt,
                "responses": texts[i * k : (i + 1) * k],
                "finished": finished[i * k : (i + 1) * k].tolist(),
            })
        emit("sample_pairs", "progress", step=min(start + config.batch_size, len(prompts)), total=len(prompts))
    data.write_jsonl(OUT, rows)
    n_samples = len(rows) * config.samples_per_prompt
    metrics = {
        "n_prompts": len(rows),
        "n_samples": n_samples,
        "eos_rate": n_finished / n_samples,
        "distinct_per_prompt": sum(len(set(r["responses"])) for r in rows) / len(rows),
    }
    data.write_json(METRICS, metrics)
    emit("sample_pairs", "metrics", **metrics)


if __name__ == "__main__":
    main()
