"""End to end with a chat model: `dvc repro` of every stage in a fresh git repository, with a tiny Llama-family model
(grouped-query attention, untied embeddings) whose tokenizer carries a ChatML template as `prepare.base_model`,
conversational demonstrations as `prepare.dataset` and conversational preferences imported by `label`.

The reward model must be trained on prompts rendered exactly as the policy sees them (one renderer: the chat
template), and the policy must end its turns with the template's end-of-turn token, `<|im_end|>`.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support import REPO, git_env, make_tiny_repo, tiny_params

from rlhf import data, embedded
from rlhf.files import write_jsonl

pytestmark = pytest.mark.slow

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
GENERATION_PROMPT = IM_START + "assistant\n"
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
N_DEMONSTRATIONS = 400
N_PREFERENCES = 120


def conversation(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def write_demonstrations(path: Path) -> None:
    """The embedded review task as a chat: the user gives the start of a review, the assistant finishes it."""
    corpus = embedded.make_corpus(0, N_DEMONSTRATIONS, 1, 1)
    rows = [{"messages": conversation(row["prompt"], row["response"].strip())} for row in corpus["sft_train"]]
    write_jsonl(path, rows)


def write_preferences(path: Path) -> None:
    """UltraFeedback-style rows (chosen/rejected conversations): a positive ending preferred to a negative one."""
    rng = random.Random(0)
    positive = [word for word, score in embedded.ADJECTIVES.items() if score > 0]
    negative = [word for word, score in embedded.ADJECTIVES.items() if score < 0]
    rows = []
    for _ in range(N_PREFERENCES):
        prompt = f"the {rng.choice(embedded.NOUNS)} was"
        chosen, rejected = f"{rng.choice(positive)} .", f"{rng.choice(negative)} ."
        rows.append({"chosen": conversation(prompt, chosen), "rejected": conversation(prompt, rejected)})
    write_jsonl(path, rows)


def save_chat_model(folder: Path, demonstrations: Path) -> None:
    """A tiny Llama (2 layers, hidden 32, 2 heads, 1 KV head, untied) with a ChatML tokenizer, saved locally."""
    from transformers import LlamaConfig, LlamaForCausalLM

    texts = [message["content"] for row in data.read_jsonl(demonstrations) for message in row["messages"]]
    tokenizer = embedded.train_tokenizer([*texts, "user\n", "assistant\n"])
    tokenizer.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    tokenizer.chat_template = CHATML
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # "<|endoftext|>": prepare must switch it to "<|im_end|>"
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def chat_params(base_model: Path, demonstrations: Path, preferences: Path) -> dict:
    """tiny_params with the real-source modes; keys of the embedded modes stay at their defaults (rlhf/params.py)."""
    params, defaults = tiny_params(), yaml.safe_load((REPO / "params.yaml").read_text())
    params["prepare"] = {**defaults["prepare"], "base_model": str(base_model), "dataset": str(demonstrations)}
    params["label"].update(annotator="dataset", dataset=str(preferences))
    params["evaluate"].update(gold="", validity="")  # the embedded judges know nothing of this corpus
    return params


def prompts_of(folder: Path) -> list[str]:
    return [row["prompt"] for path in sorted(folder.glob("*.jsonl")) for row in data.read_jsonl(path)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sources = tmp_path_factory.mktemp("chat_sources")
    demonstrations, preferences = sources / "demonstrations.jsonl", sources / "preferences.jsonl"
    write_demonstrations(demonstrations)
    write_preferences(preferences)
    save_chat_model(sources / "chat-model", demonstrations)
    params = chat_params(sources / "chat-model", demonstrations, preferences)
    return make_tiny_repo(tmp_path_factory.mktemp("e2e_chat") / "repo", params)


def test_a_chat_model_runs_end_to_end_with_one_renderer(repo: Path) -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "repro"], cwd=repo, env=git_env(), capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"dvc repro failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    print(f"dvc repro of the chat pipeline: {time.monotonic() - started:.0f} s")

    # the reward model's training texts and the policy's prompts: the same rendering (the chat template)
    preference_prompts, policy_prompts = prompts_of(repo / "data/preferences"), prompts_of(repo / "data/prompts")
    for prompt in preference_prompts + policy_prompts:
        assert prompt.startswith(IM_START) and prompt.endswith(GENERATION_PROMPT), prompt
    # the preference data and the demonstrations share the short "the N was" prompts: rendered to identical text
    assert set(preference_prompts) & set(policy_prompts)
    for row in data.read_jsonl(repo / "data/preferences/train.jsonl"):
        assert IM_END not in row["chosen"] + row["rejected"]  # the pipeline appends it as EOS

    # the end-of-turn token is the EOS of every model folder and of the config the policy generates with
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    sft_tokenizer = AutoTokenizer.from_pretrained(repo / "models/sft")
    assert sft_tokenizer.eos_token == IM_END
    im_end_id = sft_tokenizer.convert_tokens_to_ids(IM_END)
    assert AutoConfig.from_pretrained(repo / "models/base").eos_token_id == im_end_id
    assert GenerationConfig.from_pretrained(repo / "models/base").eos_token_id == im_end_id

    evaluation = json.loads((repo / "metrics/evaluate.json").read_text())
    assert evaluation["n_prompts"] > 0
    assert 0.0 <= evaluation["eos_rate_policy"] <= 1.0 and 0.0 <= evaluation["eos_rate_sft"] <= 1.0
    pairs = json.loads((repo / "metrics/sample_pairs.json").read_text())
    # an untrained model ends ≈ 5 % of 24-token samples by chance (1 token in ≈ 500); SFT teaches it to stop (≈ 70 %)
    assert pairs["eos_rate"] > 0.25, "the SFT policy should learn to end its turn with <|im_end|>"
    assert (repo / "models/release/README.md").is_file()
