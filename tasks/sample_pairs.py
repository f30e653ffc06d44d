"""Stage `sample_pairs`: K sampled responses per training prompt from the SFT policy.

    python -m tasks.launch -m tasks.sample_pairs --sft models/sft --prompts data/prompts/train.jsonl --out data/pairs \
        --metrics metrics/sample_pairs.json

(`accelerate launch` with params.yaml's `launch`: tasks/launch.py). Each process samples its shard of the prompts
on its device (rlhf/generation.py); the main process writes data/pairs/samples.jsonl in prompt order.
"""

from __future__ import annotations

from rlhf import data
from rlhf.config import ConfigError
from rlhf.distributed import gather_in_order, make_accelerator, shard_slice
from rlhf.files import write_json, write_jsonl
from rlhf.generation import decode_responses, rank_seed, sample_batches
from rlhf.modeling import check_prompts_fit, load_policy, load_tokenizer, set_seed
from rlhf.params import load_params
from rlhf.validation import check_model_dir, check_tokenizer_fits_model, read_records
from tasks.stage_io import emit, fail, parse_paths, refuse_bad_input, reports_full_disk, start_events
from tasks.stall import end_stage


@reports_full_disk("sample_pairs")  # a full disk: one line, exit 4 (tasks/stage_io.py)
def main(argv: list[str] | None = None) -> None:
    start_events("sample_pairs")  # this run's events only (.rlhf/logs/sample_pairs.jsonl)
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
    try:
        accelerator = make_accelerator(params.launch.for_stage("sample_pairs"), "sample_pairs")
    except ConfigError as error:
        fail(str(error))
    rank, world = accelerator.process_index, accelerator.num_processes
    seed = params.stage_seed("sample_pairs")
    set_seed(rank_seed(seed, rank))
    policy = load_policy(args.sft).eval().to(accelerator.device)
    mine = shard_slice(len(prompts), rank, world)  # prompts r, r+N, … (disjoint shards, every prompt once)
    k, local, done = config.samples_per_prompt, [], 0
    with accelerator.autocast():
        for batch in sample_batches(
            policy,
            tokenizer,
            [prompts[i]["prompt"] for i in mine],
            list(mine),
            k,
            config.max_new_tokens,
            config.temperature,
            config.batch_size,
            episode_seed=seed if config.sampling_seeds == "per_episode" else None,
        ):
            texts, finished = decode_responses(tokenizer, batch), batch.finished.tolist()
            for i, prompt in enumerate(batch.prompts):
                local.append(
                    {
                        "prompt_id": mine[done + i],
                        "prompt": prompt,
                        "responses": texts[i * k : (i + 1) * k],
                        "finished": finished[i * k : (i + 1) * k],
                    }
                )
            done += len(batch.prompts)
            if accelerator.is_main_process:  # rank 0's share stands for all: the shards are the same size ± 1
                emit("sample_pairs", "progress", step=min(done * world, len(prompts)), total=len(prompts))
    rows = gather_in_order(local, accelerator)
    if accelerator.is_main_process:
        write_jsonl(args.out / "samples.jsonl", rows)
        n_samples = len(rows) * k
        metrics = {
            "n_prompts": len(rows),
            "n_samples": n_samples,
            "eos_rate": sum(sum(r["finished"]) for r in rows) / n_samples,
            "distinct_per_prompt": sum(len(set(r["responses"])) for r in rows) / len(rows),
            "world_size": world,
        }
        write_json(args.metrics, metrics)
        emit("sample_pairs", "metrics", **metrics)
    accelerator.wait_for_everyone()
    end_stage(accelerator)  # several processes: exits here, past a teardown that can deadlock


if __name__ == "__main__":
    main()
