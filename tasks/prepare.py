"""Stage `prepare`: demonstrations, prompts (train/eval), tokenizer and base model.

    python -m tasks.prepare --sft-data data/sft --prompts data/prompts --base models/base --metrics metrics/prepare.json

Embedded default: a generated review corpus, a byte-level BPE trained here, a tiny GPT-2 built from params.
Real sources: `prepare.base_model` / `prepare.dataset` name a Hub id or a local path (e.g. `gpt2`,
`Anthropic/hh-rlhf`), loaded with transformers / datasets. Inputs are validated before the model is loaded.
A base model whose tokenizer has a chat template renders conversations with it, and its end-of-turn token becomes
the EOS saved in models/base (docs/design.md, "Chat models: one renderer").
"""

from __future__ import annotations

from transformers import AutoModelForCausalLM

from rlhf import data, embedded, importers
from rlhf.files import tensor_bytes, write_folder, write_json, write_jsonl
from rlhf.modeling import build_tiny_gpt2, count_parameters, disable_dropout, load_tokenizer
from rlhf.params import load_params
from rlhf.validation import check_tokenizer_fits_model
from tasks.stage_io import emit, parse_paths, refuse_bad_input, reports_full_disk, start_events


def end_turns_with_eos(tokenizer, base_model: str) -> None:
    """With a chat template, make EOS the token that closes an assistant turn (ChatML `<|im_end|>`).

    Every later stage appends EOS after a response and samples until EOS, so the policy learns and is stopped
    at the token its template ends a turn with; the tokenizer saved in models/base carries this EOS.
    """
    if not getattr(tokenizer, "chat_template", None):
        return
    token = importers.end_of_turn_token(tokenizer)
    if token is None:
        raise data.DataError(
            f"params.yaml: prepare.base_model {base_model!r}: its chat template closes an assistant turn with no "
            "special token, so responses could not end with EOS. Fix: use a model whose template ends a turn with "
            "a special token (e.g. <|im_end|>), or remove chat_template from its tokenizer_config.json"
        )
    tokenizer.eos_token = token


def use_tokenizer_eos(model, tokenizer) -> None:
    """The model's config and generation config stop on the tokenizer's EOS too (the end-of-turn token)."""
    model.config.eos_token_id = tokenizer.eos_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.eos_token_id = tokenizer.eos_token_id


def load_real_dataset(
    source: str, split: str, eval_fraction: float, max_rows: int, seed: int, render
) -> dict[str, list[dict]]:
    """Demonstrations and prompts from a public dataset (any schema rlhf.importers understands)."""
    rows = importers.load_table(source, split)
    rows = rows[:max_rows] if max_rows else rows
    demonstrations = importers.to_demonstrations(rows, source, render)
    sft_train, sft_eval = data.split_train_eval(demonstrations, eval_fraction, seed)
    return {
        "sft_train": sft_train,
        "sft_eval": sft_eval,
        "prompts_train": [{"prompt": r["prompt"]} for r in sft_train],
        "prompts_eval": [{"prompt": r["prompt"]} for r in sft_eval],
    }


@reports_full_disk("prepare")  # a full disk: one line, exit 4 (tasks/stage_io.py)
def main(argv: list[str] | None = None) -> None:
    start_events("prepare")  # this run's events only (.rlhf/logs/prepare.jsonl)
    args = parse_paths(argv, "python -m tasks.prepare", "sft_data prompts base metrics")
    with refuse_bad_input():  # params, tokenizer and text data are checked before any model is built or loaded
        params = load_params()
        config, seed = params.prepare, params.stage_seed("prepare")
        # 1. tokenizer first (cheap): the real one, or for the embedded default one trained on the corpus
        if config.base_model == "embedded":
            tokenizer = None
        else:
            tokenizer = load_tokenizer(config.base_model)
            end_turns_with_eos(tokenizer, config.base_model)
            check_tokenizer_fits_model(tokenizer, config.base_model)  # reads config.json only
        render = importers.renderer_for(tokenizer) if tokenizer is not None else importers.render_messages
        # 2. text data
        if config.dataset == "embedded":
            corpus = embedded.make_corpus(seed, config.n_demonstrations, config.n_train_prompts, config.n_eval_prompts)
        else:
            corpus = load_real_dataset(
                config.dataset, config.dataset_split, config.eval_fraction, config.max_rows, seed, render
            )
            if config.prompts_dataset:
                prompt_rows = importers.to_prompts(
                    importers.load_table(config.prompts_dataset, config.dataset_split), config.prompts_dataset, render
                )
                corpus["prompts_train"], corpus["prompts_eval"] = data.split_train_eval(
                    prompt_rows, config.eval_fraction, seed
                )
        if tokenizer is None:
            texts = [row["prompt"] + row["response"] for row in corpus["sft_train"]]
            tokenizer = embedded.train_tokenizer(texts, config.vocab_size)
            tokenizer.padding_side = "left"
        # 3. validate before loading or building any model: prompts must fit the model with room to answer
        source = config.prompts_dataset or config.dataset
        max_positions = config.model.n_positions if config.base_model == "embedded" else None
        for name in ("prompts_train", "prompts_eval"):
            data.validate_prompts(corpus[name], f"{source} ({name})")
            data.check_lengths(
                [r["prompt"] for r in corpus[name]], tokenizer, config.max_prompt_tokens, f"{source} ({name})", "prompt"
            )
        for name in ("sft_train", "sft_eval"):
            data.validate_demonstrations(corpus[name], f"{source} ({name})")
    # 4. base model
    if config.base_model == "embedded":
        model = build_tiny_gpt2(config.model, tokenizer, seed)
    else:
        model = disable_dropout(AutoModelForCausalLM.from_pretrained(config.base_model))
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(tokenizer, "chat_template", None):  # EOS became the end-of-turn token (end_turns_with_eos)
            use_tokenizer_eos(model, tokenizer)
        max_positions = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", None
        )
    # 5. outputs
    for name, rows in corpus.items():
        folder = args.sft_data if name.startswith("sft") else args.prompts
        write_jsonl(folder / f"{name.split('_', 1)[1]}.jsonl", rows)
    with write_folder(args.base, needed=tensor_bytes(model.state_dict().values())) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    metrics = {
        "n_demonstrations_train": len(corpus["sft_train"]),
        "n_demonstrations_eval": len(corpus["sft_eval"]),
        "n_prompts_train": len(corpus["prompts_train"]),
        "n_prompts_eval": len(corpus["prompts_eval"]),
        "vocab_size": len(tokenizer),
        "n_parameters": count_parameters(model),
        "max_positions": max_positions,
    }
    write_json(args.metrics, metrics)
    emit("prepare", "metrics", **metrics)


if __name__ == "__main__":
    main()
