"""Stage `sft`: supervised fine-tuning of the base model on demonstrations (loss on response tokens).

    python -m tasks.launch -m tasks.sft --base models/base --data data/sft --out models/sft --metrics metrics/sft.json \
        --live dvclive/sft

(`accelerate launch` with params.yaml's `launch`: tasks/launch.py). Every process trains on its share of each batch;
the main process writes models/sft (LoRA merged) and the metrics; its training curves go to
dvclive/sft (DVCLive: tasks/stage_io.py TrainingLog).
"""

from __future__ import annotations

from rlhf import data
from rlhf.checkpoint import ResumeCheckpoints, kept_on_disk
from rlhf.config import ConfigError
from rlhf.distributed import launch_part, make_accelerator, processes_of, unsupported_resume
from rlhf.files import tensor_bytes, write_folder, write_json
from rlhf.guards import NonFiniteError
from rlhf.modeling import load_policy, load_tokenizer, max_positions, set_seed
from rlhf.params import load_params
from rlhf.training import micro_batch_size, train_sft
from rlhf.validation import check_model_dir, check_tokenizer_fits_model, read_records
from tasks.stage_io import (
    EXIT_DIVERGED,
    TrainingLog,
    checkpoint_events,
    emit,
    fail,
    parse_paths,
    refuse_bad_input,
    reports_full_disk,
    start_events,
)
from tasks.stall import end_stage


@reports_full_disk("sft", kept=lambda: kept_on_disk("sft"))  # a full disk: one line, exit 4 (tasks/stage_io.py)
def main(argv: list[str] | None = None) -> None:
    start_events("sft")  # this run's events only (.rlhf/logs/sft.jsonl)
    args = parse_paths(argv, "python -m tasks.sft", "base data out metrics live")
    with refuse_bad_input():  # cheap checks only: params, demonstrations, the base folder and its tokenizer
        params = load_params()
        train_rows = read_records(args.data / "train.jsonl", data.validate_demonstrations)
        eval_rows = read_records(args.data / "eval.jsonl", data.validate_demonstrations)
        check_model_dir(args.base)
        tokenizer = load_tokenizer(args.base)
        check_tokenizer_fits_model(tokenizer, args.base)
        limit = max_positions(args.base)
        if limit:
            texts = [r["prompt"] + r["response"] for r in train_rows]
            data.check_lengths(texts, tokenizer, limit - 1, str(args.data / "train.jsonl"), "demonstration")
    try:
        accelerator = make_accelerator(params.launch.for_stage("sft"), "sft")
        micro_batch_size(params.sft, accelerator)  # the global batch must split exactly
    except ConfigError as error:
        fail(str(error))
    seed = params.stage_seed("sft")
    set_seed(seed)
    model = load_policy(args.base)
    # resume checkpoints outside DVC's outs (DVC deletes those before a rerun), valid for this launch only
    checkpoints = ResumeCheckpoints.for_config(
        "sft",
        params.sft,
        seed,
        args.data,
        args.base,
        launch_part(accelerator),
        notify=checkpoint_events("sft"),
        processes=processes_of(accelerator),
    )
    checkpoints.open(unsupported=unsupported_resume(accelerator))
    log = TrainingLog("sft", args.live, accelerator.is_main_process)
    try:
        model, metrics = train_sft(
            model, tokenizer, train_rows, eval_rows, params.sft, seed, accelerator, log, checkpoints
        )
    except NonFiniteError as error:
        fail(f"{error}; {checkpoints.kept()}", code=EXIT_DIVERGED)
    if accelerator.is_main_process:
        with write_folder(args.out, needed=tensor_bytes(model.state_dict().values())) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
        metrics.update(world_size=accelerator.num_processes, distributed_type=accelerator.distributed_type.value)
        write_json(args.metrics, metrics)
    accelerator.wait_for_everyone()
    checkpoints.clear()  # the final model is in place: resume state no longer needed
    if accelerator.is_main_process:
        emit("sft", "metrics", **metrics)
    end_stage(accelerator)  # several processes: exits here, past a teardown that can deadlock


if __name__ == "__main__":
    main()
