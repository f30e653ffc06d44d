"""Models and tokenisation shared by the stages: the policy (a causal LM), scalar models (reward model and critic:
a sequence-classification model with one output, read per token), and batch encoding with explicit masks.

Padding is never inferred from token ids (the pad may equal EOS for real tokenizers such as GPT-2's); every function
takes an attention mask, and position ids are derived from it so left-padded queries see positions 0, 1, 2, …
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.pytorch_utils import Conv1D

from rlhf import lean as lean_forward  # "lean" is also the switch of causal_lm_logits & co.
from rlhf.config import TinyModelConfig
from rlhf.files import write_text

REWARD_NORMALIZATION_FILE = "reward_normalization.json"


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_tiny_gpt2(shape: TinyModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> GPT2LMHeadModel:
    """A GPT-2-style model initialised from scratch, dropout off (PPO needs deterministic logprobs)."""
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=shape.n_positions,
        n_embd=shape.n_embd,
        n_layer=shape.n_layer,
        n_head=shape.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    set_seed(seed)
    return GPT2LMHeadModel(config)


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout probability to 0 (N implementation details of RLHF, §"Disable dropout")."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Tokenizer with left padding (generation) and a pad token (EOS when the tokenizer has none)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


ADAPTER_CONFIG = "adapter_config.json"  # what peft's save_pretrained writes for a LoRA adapter


def merged_adapter(path: str | Path, load_base) -> PreTrainedModel | None:
    """The model of a peft LoRA adapter folder, merged into its base (loaded by ``load_base(base path)``); None when
    ``path`` holds a whole model. The stages save merged models; this lets a user's adapter folder stand in for one."""
    config = Path(path, ADAPTER_CONFIG)
    if not config.is_file():
        return None
    from peft import PeftModel  # imported here: stage programs must run without peft when no adapter is involved

    base = load_base(json.loads(config.read_text())["base_model_name_or_path"])
    return PeftModel.from_pretrained(base, str(path)).merge_and_unload()


def load_policy(path: str | Path) -> PreTrainedModel:
    """A causal LM from a save_pretrained folder (a whole model or a LoRA adapter, merged), dropout off."""
    merged = merged_adapter(path, load_policy)
    if merged is not None:
        return disable_dropout(merged)
    return disable_dropout(AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32))


def load_scalar_model(path: str | Path, pad_token_id: int | None = None) -> PreTrainedModel:
    """A one-output sequence-classification model (reward model or critic); dropout off.

    From a causal-LM folder (the SFT model) this adds a fresh ``score`` head, as reward models are initialised;
    a LoRA adapter folder is merged into its base.
    """
    merged = merged_adapter(path, lambda base: load_scalar_model(base, pad_token_id))
    model = (
        merged
        if merged is not None
        else (AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, dtype=torch.float32))
    )
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return disable_dropout(model)


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(b, t) mask → (b, t) positions counting only real tokens (left padding gets position 0)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def causal_lm_logits(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, lean: bool = True
) -> torch.Tensor:
    """(b, t) ids → (b, t, vocab) logits with positions from the mask (the lean forward where it applies;
    ``lean=False`` under FSDP/DeepSpeed, whose hooks on each module's forward the lean path would bypass)."""
    if lean and lean_forward.supports(model):
        return lean_forward.lm_logits(model, lean_forward.full_forward(model, input_ids, attention_mask))
    output = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return output.logits


def per_token_scalars(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, lean: bool = True
) -> torch.Tensor:
    """(b, t) ids → (b, t) scalar head output at every position (values of a critic, scores of a reward model)."""
    if lean and lean_forward.supports(model):
        return model.score(lean_forward.full_forward(model, input_ids, attention_mask)).squeeze(-1)
    # a peft (LoRA) model's base_model is its whole wrapped model: the trunk is one level further in
    scorer = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = scorer.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state
    return scorer.score(hidden).squeeze(-1)


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(b, t) mask → (b,) index of the last real token (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), positions, -1).max(dim=1).values


def sequence_scores(
    model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor, lean: bool = True
) -> torch.Tensor:
    """(b, t) ids → (b,) reward-model score read at the last real token (the EOS, not the pad after it)."""
    scores = per_token_scalars(model, input_ids, attention_mask, lean)
    return scores.gather(1, last_real_index(attention_mask).clamp(min=0)[:, None]).squeeze(1)


@dataclass
class RewardNormalization:
    """Affine map applied to raw RM scores so SFT samples score mean 0, std 1 (Ziegler et al. 2019)."""

    mean: float = 0.0
    std: float = 1.0

    def apply(self, raw_scores: torch.Tensor) -> torch.Tensor:
        return (raw_scores - self.mean) / self.std

    def save(self, folder: str | Path) -> None:
        write_text(Path(folder, REWARD_NORMALIZATION_FILE), json.dumps({"mean": self.mean, "std": self.std}, indent=2))

    @classmethod
    def load(cls, folder: str | Path) -> RewardNormalization:
        path = Path(folder, REWARD_NORMALIZATION_FILE)
        return cls(**json.loads(path.read_text())) if path.exists() else cls()


# ----------------------------------------------------------------------------------------------------------------
# Encoding


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded query ids and mask, (b, q)."""
    ids = [tokenizer(prompt, add_special_tokens=False)["input_ids"] for prompt in prompts]
    return left_pad(ids, tokenizer.pad_token_id)


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists → left-padded (b, t) ids and mask."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
    return ids, mask


def right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged id lists → right-padded (b, t) ids and mask."""
    width = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def encode_prompt_response(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], responses: list[str]
) -> tuple[list[list[int]], list[int]]:
    """Token ids of prompt + response + EOS (the format every stage scores and trains on), and each prompt's length."""
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(responses, add_special_tokens=False)["input_ids"]
    sequences = [p + r + [tokenizer.eos_token_id] for p, r in zip(prompt_ids, response_ids)]
    return sequences, [len(p) for p in prompt_ids]


def max_positions(path: str | Path) -> int | None:
    """Longest sequence the model at ``path`` accepts (from its config, without loading weights)."""
    config = AutoConfig.from_pretrained(str(path))
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def check_prompts_fit(
    tokenizer: PreTrainedTokenizerBase, prompts: list[str], model_path: str | Path, response_length: int, source: str
) -> None:
    """Refuse (DataError naming ``source``) prompts that leave no room for ``response_length`` new tokens."""
    from rlhf.data import check_lengths

    limit = max_positions(model_path)
    if limit is not None:
        check_lengths(
            prompts, tokenizer, limit - response_length, source, f"prompt (+ {response_length} response tokens)"
        )


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Memory options for PPO (docs/design.md §6)


def enable_gradient_checkpointing(model: PreTrainedModel) -> PreTrainedModel:
    """Recompute each block's activations in backward instead of storing them (Chen et al. 2016).

    Non-reentrant checkpointing: works under DDP, with frozen inputs (LoRA) and without `enable_input_require_grads`.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.2x; the old name warns of removal in v6
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def add_lora(
    policy: PreTrainedModel, rank: int, alpha: int, target_modules: str, task_type: str = "CAUSAL_LM"
) -> nn.Module:
    """Wrap ``policy`` with trainable LoRA adapters (Hu et al. 2021, via peft); the base weights are frozen.

    ``task_type`` "SEQ_CLS" for a reward model: peft then also trains (and saves) its fresh ``score`` head whole.

    With the adapter disabled the model computes exactly the SFT policy, so it doubles as the PPO reference
    (no second copy; TRL's PPO trainer does the same with peft). Dropout stays off, as everywhere in PPO.
    ``target_modules``: "all-linear" (every linear / GPT-2 Conv1D layer except the output head) or a comma list.
    """
    from peft import LoraConfig, get_peft_model  # imported here: stage programs must run without peft when LoRA is off

    targets: str | list[str] = (
        target_modules if target_modules == "all-linear" else [m.strip() for m in target_modules.split(",")]
    )
    transposed = any(isinstance(m, Conv1D) for m in policy.modules())  # GPT-2 family stores weights as (in, out)
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=targets,
        bias="none",
        task_type=task_type,
        fan_in_fan_out=transposed,
    )
    return get_peft_model(policy, config)


def value_head_for(policy: PreTrainedModel, reward_model: PreTrainedModel | None) -> nn.Linear:
    """(hidden → 1) value head for the policy's trunk: a copy of the reward model's score head, or zeros.

    Copying the RM head is the trunk-sharing analogue of initialising the critic from the RM (docs/design.md §4.8);
    it needs the RM's hidden size to match the policy's (true when the RM was initialised from the SFT model).
    """
    hidden_size = policy.config.hidden_size
    head = nn.Linear(hidden_size, 1, bias=False)
    nn.init.zeros_(head.weight)
    if reward_model is not None:
        score = reward_model.score
        if score.weight.shape != head.weight.shape:
            raise ValueError(
                f"reward head {tuple(score.weight.shape)} does not fit the policy trunk (hidden size {hidden_size})"
            )
        head.weight.data.copy_(score.weight.detach().float())
    return head


def merge_lora(policy: nn.Module) -> PreTrainedModel:
    """A plain causal LM: LoRA adapters (if any) folded into the base weights, peft wrapper removed."""
    return policy.merge_and_unload() if hasattr(policy, "merge_and_unload") else policy
