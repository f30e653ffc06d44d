"""One renderer for the pipeline (rlhf.importers): a tokenizer's chat template when it has one, else hh-rlhf text.

The tokenizers are built here: a byte-level BPE (rlhf.embedded.train_tokenizer) with ChatML or Llama-3 special
tokens and template. No Hub access.
"""

from __future__ import annotations

import pytest

from rlhf import embedded
from rlhf.data import DataError
from rlhf.importers import (
    ChatTemplateRenderer,
    end_of_turn_token,
    hh_messages,
    render_messages,
    renderer_for,
    to_demonstrations,
    to_preference_records,
    to_prompts,
)
from rlhf.modeling import encode_prompt_response
from tasks.prepare import end_turns_with_eos

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
TEXTS = ["How do I bake bread?", "What kind of bread?", "Sourdough, please.", "Start with an active starter."]


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def bpe_tokenizer(special_tokens: list[str] = (), template: str | None = None):
    tokenizer = embedded.train_tokenizer(TEXTS)
    if special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    tokenizer.chat_template = template
    return tokenizer


@pytest.fixture
def chatml():
    return bpe_tokenizer(["<|im_start|>", "<|im_end|>"], CHATML)


def template_prompt(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


HH_PROMPT = (
    "\n\nHuman: How do I bake bread?\n\nAssistant: What kind of bread?\n\nHuman: Sourdough, please.\n\nAssistant:"
)
HH_ROW = {"chosen": HH_PROMPT + " Start with an active starter.", "rejected": HH_PROMPT + " I don't know."}
HH_PROMPT_MESSAGES = [user("How do I bake bread?"), assistant("What kind of bread?"), user("Sourdough, please.")]


# ------------------------------------------------------------------------------------------ end-of-turn token


def test_the_end_of_turn_token_is_the_special_token_after_the_answer(chatml) -> None:
    assert end_of_turn_token(chatml) == "<|im_end|>"
    llama3 = bpe_tokenizer(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], LLAMA3)
    assert end_of_turn_token(llama3) == "<|eot_id|>"
    assert end_of_turn_token(bpe_tokenizer()) is None  # no template
    # a template that closes a turn with plain text has none: prepare refuses it (below)
    assert end_of_turn_token(bpe_tokenizer(["<|im_start|>"], CHATML)) is None
    render = renderer_for(chatml)
    assert isinstance(render, ChatTemplateRenderer) and render.end_of_turn == "<|im_end|>"


def test_prepare_makes_the_end_of_turn_token_the_eos(chatml) -> None:
    assert chatml.eos_token == embedded.BOS_EOS_TOKEN
    end_turns_with_eos(chatml, "local/chat-model")
    assert chatml.eos_token == "<|im_end|>" and chatml.eos_token_id == chatml.convert_tokens_to_ids("<|im_end|>")
    plain = bpe_tokenizer()
    end_turns_with_eos(plain, "local/plain")
    assert plain.eos_token == embedded.BOS_EOS_TOKEN  # no template: the model's own EOS
    no_special_end = bpe_tokenizer(["<|im_start|>"], CHATML)
    with pytest.raises(DataError, match=r"^params\.yaml: prepare\.base_model 'local/odd': .* Fix: "):
        end_turns_with_eos(no_special_end, "local/odd")


# ------------------------------------------------------------------------------------- rendering each schema


def test_conversational_preferences_render_the_prompt_as_the_template_does(chatml) -> None:
    history = [{"role": "system", "content": "Be brief."}, *HH_PROMPT_MESSAGES]
    rows = [
        {"chosen": [*history, assistant("Start with an active starter.")], "rejected": [*history, assistant("No.")]},
        {"prompt": [user("Name a prime.")], "chosen": [assistant("7")], "rejected": [assistant("8")]},  # TRL's
    ]
    records, dropped = to_preference_records(rows, "uf", renderer_for(chatml))
    assert dropped == 0
    assert records[0] == {
        "prompt": template_prompt(chatml, history),
        "chosen": "Start with an active starter.",  # no <|im_end|>: the pipeline appends it as EOS
        "rejected": "No.",
    }
    assert records[0]["prompt"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert records[0]["prompt"].endswith("<|im_start|>user\nSourdough, please.<|im_end|>\n<|im_start|>assistant\n")
    assert records[1] == {"prompt": template_prompt(chatml, [user("Name a prime.")]), "chosen": "7", "rejected": "8"}


def test_hh_transcripts_become_messages_rendered_with_the_template(chatml) -> None:
    assert hh_messages(HH_ROW["chosen"]) == [*HH_PROMPT_MESSAGES, assistant("Start with an active starter.")]
    assert hh_messages("Be kind." + HH_PROMPT)[0] == {"role": "system", "content": "Be kind."}
    render = renderer_for(chatml)
    expected_prompt = template_prompt(chatml, HH_PROMPT_MESSAGES)
    records, _ = to_preference_records([HH_ROW], "hh", render)
    answers = {"chosen": "Start with an active starter.", "rejected": "I don't know."}
    assert records == [{"prompt": expected_prompt, **answers}]
    # prepare's imports of the same transcripts: demonstrations (the chosen side) and prompts
    assert to_demonstrations([HH_ROW], "hh", render) == [
        {"prompt": expected_prompt, "response": "Start with an active starter."}
    ]
    assert to_prompts([HH_ROW], "hh", render) == [{"prompt": expected_prompt}]
    # hh-format prompts given as strings take the same path
    pairs = [{"prompt": HH_PROMPT, "chosen": " Start with an active starter.", "rejected": " I don't know."}]
    assert to_preference_records(pairs, "pcr", render)[0] == records
    assert to_prompts([{"prompt": HH_PROMPT}], "p", render) == [{"prompt": expected_prompt}]
    assert to_prompts([{"prompt": "The plot was"}], "p", render) == [{"prompt": "The plot was"}]  # plain text stays


def test_messages_demonstrations_render_the_prompt_as_the_template_does(chatml) -> None:
    conversation = [*HH_PROMPT_MESSAGES, assistant("Start with an active starter.")]
    render = renderer_for(chatml)
    expected = {"prompt": template_prompt(chatml, HH_PROMPT_MESSAGES), "response": "Start with an active starter."}
    assert to_demonstrations([{"messages": conversation}], "sft", render) == [expected]
    assert to_prompts([{"messages": conversation}], "sft", render) == [{"prompt": expected["prompt"]}]


def test_prompt_response_and_eos_tokenise_to_the_whole_conversation(chatml) -> None:
    end_turns_with_eos(chatml, "local/chat-model")  # as prepare saves models/base
    conversation = [*HH_PROMPT_MESSAGES, assistant("Start with an active starter.")]
    full = chatml.apply_chat_template(conversation, tokenize=False)
    [record] = to_demonstrations([{"messages": conversation}], "sft", renderer_for(chatml))
    [sequence], [prompt_length] = encode_prompt_response(chatml, [record["prompt"]], [record["response"]])
    # ChatML ends a turn with "<|im_end|>\n": everything but that newline is the training sequence
    assert full.endswith("<|im_end|>\n")
    assert sequence == chatml(full.removesuffix("\n"), add_special_tokens=False)["input_ids"]
    assert sequence[-1] == chatml.eos_token_id == chatml.convert_tokens_to_ids("<|im_end|>")
    assert prompt_length == len(chatml(record["prompt"], add_special_tokens=False)["input_ids"])


def test_without_a_template_the_hh_format_stays_byte_for_byte() -> None:
    plain = bpe_tokenizer()
    render = renderer_for(plain)
    assert render is render_messages
    records, _ = to_preference_records([HH_ROW], "hh", render)
    assert records == [{"prompt": HH_PROMPT, "chosen": " Start with an active starter.", "rejected": " I don't know."}]
    conversation = [*HH_PROMPT_MESSAGES, assistant("Start with an active starter.")]
    assert to_demonstrations([{"messages": conversation}], "sft", render) == [
        {"prompt": HH_PROMPT, "response": " Start with an active starter."}
    ]
    pairs = [{"prompt": HH_PROMPT, "chosen": "  odd  spacing ", "rejected": " no"}]
    assert to_preference_records(pairs, "pcr", render)[0] == [
        {"prompt": HH_PROMPT, "chosen": "  odd  spacing ", "rejected": " no"}
    ]


def test_a_template_that_fails_names_the_row(chatml) -> None:
    chatml.chat_template = "{{ raise_exception('roles must alternate') }}"
    rows = [{"messages": [user("Hi"), assistant("Hello.")]}]
    with pytest.raises(DataError, match=r"^sft: row 0: rendering the conversation failed: .*roles must alternate"):
        to_demonstrations(rows, "sft", ChatTemplateRenderer(chatml))


def test_label_renders_with_the_tokenizer_in_models_base(chatml, tmp_path) -> None:
    from tasks.label import base_renderer

    base = tmp_path / "models/base"
    chatml.save_pretrained(base)  # the EOS is still "<|endoftext|>": not a folder prepare wrote
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(b"")  # label reads only the tokenizer; the folder must be whole
    with pytest.raises(DataError, match=r"models/base: the tokenizer's EOS '<\|endoftext\|>' is not .*'<\|im_end\|>'"):
        base_renderer(base)
    end_turns_with_eos(chatml, "local/chat-model")
    chatml.save_pretrained(base)
    render = base_renderer(base)
    assert render.end_of_turn == "<|im_end|>"
    records, _ = to_preference_records([HH_ROW], "hh", render)
    assert records[0]["prompt"] == template_prompt(chatml, HH_PROMPT_MESSAGES)
