"""Stage `sample_pairs`: K sampled responses per training prompt from the SFT policy.

    python -m tasks.sample_pairs --sft models/sft --prompts data/prompts/train.jsonl --out data/pairs \
        --metrics metrics/sample_pairs.json
"""

from __future__ import annotations

import torch

from rlhf import data, ppo
from rlhf.files import write_json, write_jsonl
from rlhf.modeling import check_prompts_fit, encode_prompts, load_policy, load_tokenizer, set_seed
from rlhf.params import load_params
from rlhf.sampling import sample
from rlhf.validation import check_model_dir, check_tokenizer_fits_model, read_records
from tasks.stage_io import emit, parse_paths, refuse_bad_input


def main(argv: list[str] | None = None) -> None:
    args = parse_paths(argv, "python -m tasks.sample_pairs", "sft prompts out metrics")
    with refuse_bad_input():  # cheap checks only: params, prompts, the SFT folder and its tokenizer
        params = load_params()
        config = params.sample_pairs
        prompts = read_records(args.prompts, data.validate_prompts)
        check_model_dir(args.sft)
        tokenizer = load_tokenizer(args.sft)
        check_tokenizer_fits_model(tokenizer, args.sft)
        check_prompts_fit(tokenizer, [r["prompt"] for r in prompts], args.sft, config.max_new_tokens, str(args.prompts))
    prompts = prompts[: config.n_prompts] if config.n_prompts else prompts
    set_seed(params.stage_seed("sample_pairs"))
    policy = load_policy(args.sft).eval()
    rows, n_finished = [], 0
    for start in range(0, len(prompts), config.batch_size):
        chunk = [r["prompt"] for r in prompts[start : start + config.batch_size]]
        expanded = [p for p in chunk for _ in range(config.samples_per_prompt)]
        query_ids, query_mask = encode_prompts(tokenizer, expanded)
        with torch.no_grad():
            raw = sample(
                policy,
                query_ids,
                query_mask,
                config.max_new_tokens,
                config.temperature,
                tokenizer.eos_token_id,
                tokenizer.pad_token_id,
            ).responses
        responses, mask, finished = ppo.truncate_after_stop_token(raw, tokenizer.eos_token_id, tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(responses.masked_fill(~mask, tokenizer.pad_token_id), skip_special_tokens=True)
        n_finished += int(finished.sum())
        k = config.samples_per_prompt
        for i, prompt in enumerate(chunk):
            rows.append(
                {
                    "prompt_id": start + i,
                    "prompt": prompt,
                    "responses": texts[i * k : (i + 1) * k],
                    "finished": finished[i * k : (i + 1) * k].tolist(),
                }
            )
        emit("sample_pairs", "progress", step=min(start + config.batch_size, len(prompts)), total=len(prompts))
    write_jsonl(args.out / "samples.jsonl", rows)
    n_samples = len(rows) * config.samples_per_prompt
    metrics = {
        "n_prompts": len(rows),
        "n_samples": n_samples,
        "eos_rate": n_finished / n_samples,
        "distinct_per_prompt": sum(len(set(r["responses"])) for r in rows) / len(rows),
    }
    write_json(args.metrics, metrics)
    emit("sample_pairs", "metrics", **metrics)


if __name__ == "__main__":
    main()
