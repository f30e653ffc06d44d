"""Supervised fine-tuning and Bradley–Terry reward-model training (the loops on fixed data), on any launch; DPO's loop
(rlhf/dpo_training.py) builds on the same pieces.

All pre-tokenise once, draw each step's global batch from a seeded generator (the same on every process), use
AdamW with warm-up then decay, clip gradient norms, and report held-out metrics. Under accelerate (docs/design.md §6)
rank r trains on rows r, r+N, … of the global batch as G micro-batches (gradient accumulation), and each micro-batch
loss is weighted so the summed gradient is that of the global batch's mean (:func:`rlhf.distributed.token_weight`):
the same update for any number of processes, up to float rounding. bf16 autocasts the forward (fp32 master weights),
LoRA (peft) trains adapters only, gradient checkpointing recomputes activations.

All stop on a non-finite loss/score/gradient norm (:mod:`rlhf.guards`). SFT and the reward model, given
:class:`~rlhf.checkpoint.ResumeCheckpoints`, save resume checkpoints every N steps and resume from the latest matching
one: the learning rate is a function of the step and every random draw comes from a generator whose state is
checkpointed, so a resumed run ends with the same weights as an uninterrupted one (bitwise on CPU, same thread count).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.checkpoint import ResumeCheckpoints, capture_rng, restore_rng
from rlhf.config import ConfigError, DPOConfig, RewardConfig, SFTConfig
from rlhf.distributed import shard_for_rank, token_weight
from rlhf.guards import require_finite
from rlhf.modeling import (
    add_lora,
    causal_lm_logits,
    enable_gradient_checkpointing,
    encode_prompt_response,
    merge_lora,
    right_pad,
    sequence_scores,
)

Log = Callable[[dict], None]


# ----------------------------------------------------------------------------------------------------------------
# What both loops share: the trained module under accelerate, resume state, schedules


class TrainedForward(nn.Module):
    """The model and the function of it a loop trains, as one module whose forward accelerate wraps: DDP's gradient
    hooks and FSDP's weight gathers need every training forward to enter through the wrapper.

    ``forward(ids, mask)`` = ``function(model, ids, mask, lean)``; ``lean`` is off under FSDP/DeepSpeed, whose
    per-module hooks the lean GPT-2 path would bypass.
    """

    def __init__(self, model: nn.Module, function: Callable[..., torch.Tensor]):
        super().__init__()
        self.model, self.function, self.lean = model, function, True

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.function(self.model, input_ids, attention_mask, self.lean)


@dataclass
class Prepared:
    """A supervised loop's model, optimiser and accelerator after :func:`prepare_supervised`."""

    forward: nn.Module  # TrainedForward, wrapped by accelerate (DDP, FSDP, DeepSpeed … or as is)
    optimizer: torch.optim.Optimizer
    accelerator: Accelerator

    @property
    def model(self) -> nn.Module:
        """The trained model itself (LoRA: the peft wrapper), outside accelerate's wrapper."""
        return self.accelerator.unwrap_model(self.forward).model

    def no_sync(self, sync: bool) -> contextlib.AbstractContextManager:
        """Skip DDP's gradient all-reduce on micro-batches before the last of a step."""
        return contextlib.nullcontext() if sync else self.accelerator.no_sync(self.forward)


def prepare_supervised(
    model: PreTrainedModel,
    config: SFTConfig | RewardConfig | DPOConfig,
    function: Callable[..., torch.Tensor],
    accelerator: Accelerator,
    task_type: str,
) -> Prepared:
    """LoRA and gradient checkpointing as ``config`` says (DPO has neither), AdamW over the trainable weights,
    wrapped for the launch."""
    if getattr(config, "lora_rank", 0) > 0:
        model = add_lora(model, config.lora_rank, config.lora_alpha, config.lora_target_modules, task_type)
    if getattr(config, "gradient_checkpointing", False):
        enable_gradient_checkpointing(model)
    forward = TrainedForward(model, function)
    forward.lean = accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    optimizer = torch.optim.AdamW(
        [p for p in forward.parameters() if p.requires_grad],
        lr=config.learning_rate,
        weight_decay=getattr(config, "weight_decay", 0.01),  # reward, dpo: AdamW's default, as it always trained
    )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # no dataloader to infer the micro-batch from; DeepSpeed clips gradients itself
        deepspeed_config = accelerator.state.deepspeed_plugin.deepspeed_config
        deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size(config, accelerator)
        deepspeed_config["gradient_clipping"] = config.max_grad_norm
    forward, optimizer = accelerator.prepare(forward, optimizer)
    return Prepared(forward, optimizer, accelerator)


def micro_batch_size(config: SFTConfig | RewardConfig | DPOConfig, accelerator: Accelerator) -> int:
    """Rows (DPO: pairs) per micro-batch on each process; the global batch must split exactly, and DeepSpeed (which
    steps and rescales inside each backward) takes no accumulation here. A ConfigError names the keys."""
    section = "sft" if isinstance(config, SFTConfig) else "dpo" if isinstance(config, DPOConfig) else "reward"
    if accelerator.distributed_type == DistributedType.DEEPSPEED and config.gradient_accumulation_steps > 1:
        raise ConfigError(
            f"params.yaml: {section}.gradient_accumulation_steps > 1 is not supported under DeepSpeed; "
            f"set it to 1 and raise launch.num_processes or lower {section}.batch_size"
        )
    world_size = accelerator.num_processes
    parts = world_size * config.gradient_accumulation_steps
    if config.batch_size % parts:
        lower = max(parts, config.batch_size - config.batch_size % parts)
        raise ConfigError(
            f"params.yaml: {section}.batch_size ({config.batch_size}) must be divisible by the processes "
            f"({world_size}) × {section}.gradient_accumulation_steps ({config.gradient_accumulation_steps}) = {parts}: "
            f"e.g. {section}.batch_size = {lower} or {lower + parts}"
        )
    return config.batch_size // parts


def micro_batches(rows: list, accelerator: Accelerator, accumulation_steps: int) -> list[list]:
    """This process's share of a global batch (rows r, r+N, …) cut into ``accumulation_steps`` micro-batches."""
    local = shard_for_rank(rows, accelerator.process_index, accelerator.num_processes)
    size = len(local) // accumulation_steps
    return [local[i * size : (i + 1) * size] for i in range(accumulation_steps)]


def global_sum(value: float, accelerator: Accelerator) -> float:
    """Sum of a per-process number over the processes (itself on one process)."""
    if accelerator.num_processes == 1:
        return value
    total = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(total, reduction="sum"))


def global_sums(values: torch.Tensor, accelerator: Accelerator) -> list[float]:
    """Sums over the processes of a (k,) vector of per-process numbers, in one collective (itself on one process)."""
    if accelerator.num_processes == 1:
        return values.tolist()
    return accelerator.reduce(values.to(accelerator.device), reduction="sum").cpu().tolist()


def set_learning_rate(prepared: Prepared, learning_rate: float) -> None:
    """The step's scheduled learning rate, set before its backward passes: DeepSpeed steps inside the last one."""
    for group in prepared.optimizer.param_groups:
        group["lr"] = learning_rate


def clipped_step(prepared: Prepared, max_grad_norm: float, check: Callable[..., None]) -> None:
    """Clip the gradient norm (checked finite by ``check``), step, zero the grads."""
    grad_norm = prepared.accelerator.clip_grad_norm_(prepared.forward.parameters(), max_grad_norm)
    if grad_norm is not None:  # None under DeepSpeed, which clips inside its step
        check(gradient_norm=grad_norm)
    prepared.optimizer.step()
    prepared.optimizer.zero_grad(set_to_none=True)


def resume_training(
    checkpointer: ResumeCheckpoints | None,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
) -> tuple[int, dict]:
    """Where a loop starts: step 0 and {} when fresh, else the checkpoint's step and state, with the model, the
    optimiser and ``generators`` (and the global RNGs) restored from it."""
    resumed = checkpointer.resume() if checkpointer else None
    if resumed is None:
        return 0, {}
    model.load_state_dict(resumed[1]["model"])
    optimizer.load_state_dict(resumed[1]["optimizer"])
    restore_rng(resumed[1]["rng"], generators)
    return resumed


def training_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator], **extra
) -> Callable[[], dict]:
    """What :func:`resume_training` restores, plus the loop's own ``extra`` entries (made on the main process only).
    The generators are the same on every process (each draws the global batch), so the main process's state holds."""
    return lambda: {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": capture_rng(generators),
        **extra,
    }


def exported_model(prepared: Prepared) -> PreTrainedModel | None:
    """The trained model as a plain transformers model (LoRA merged) on the main process, None elsewhere.

    Call it on every process: under FSDP gathering the full weights is a collective.
    """
    accelerator = prepared.accelerator
    if accelerator.distributed_type != DistributedType.FSDP:
        return merge_lora(prepared.model) if accelerator.is_main_process else None
    state = accelerator.get_state_dict(prepared.forward)  # whole weights on the main process
    if not accelerator.is_main_process:
        return None
    # the sharded model holds DTensors: rebuild it whole from its config (as the PPO export does) and load the state
    trained = prepared.model
    base = trained.get_base_model() if hasattr(trained, "get_base_model") else trained
    model = type(base)(base.config)
    if hasattr(trained, "peft_config"):
        from peft import get_peft_model

        model = get_peft_model(model, trained.peft_config["default"])
    model.load_state_dict({name.removeprefix("model."): value for name, value in state.items()})
    return merge_lora(model)


def warmup_cosine(step: int, total: int, warmup: int, floor: float = 0.1) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine decay to ``floor``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_linear(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up, then linear decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


# ----------------------------------------------------------------------------------------------------------------
# SFT


def sft_examples(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> list[tuple[list[int], int]]:
    """Each demonstration as (ids of prompt + response + EOS, prompt length)."""
    sequences, prompt_lengths = encode_prompt_response(
        tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows]
    )
    return list(zip(sequences, prompt_lengths))


def response_tokens(example: tuple[list[int], int]) -> int:
    """Tokens of an example the SFT loss counts: positions 1 … len−1 at or after the prompt (predicted tokens)."""
    sequence, prompt_length = example
    return len(sequence) - max(prompt_length, 1)


def sft_batch(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (b, t) ids, mask and labels; labels are −100 on prompt tokens and padding (loss on responses)."""
    ids, mask = right_pad([seq for seq, _ in examples], pad_id)
    labels = ids.masked_fill(mask == 0, -100)
    for row, (_, prompt_length) in enumerate(examples):
        labels[row, :prompt_length] = -100
    return ids, mask, labels


def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens. (b, t, v) logits, (b, t) labels → ()."""
    logits = logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=-100)


@torch.no_grad()
def sft_eval_loss(
    forward: nn.Module, examples: list, pad_id: int, accelerator: Accelerator, batch_size: int = 256
) -> float:
    """Mean response-token loss of ``examples`` (every process computes all of it: held-out sets are small)."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        ids, mask, labels = (t.to(accelerator.device) for t in sft_batch(examples[start : start + batch_size], pad_id))
        n_tokens = int((labels[:, 1:] != -100).sum())
        with accelerator.autocast():
            total += float(sft_loss(forward(ids, mask), labels)) * n_tokens
        count += n_tokens
    return total / max(1, count)


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_rows: list[dict],
    eval_rows: list[dict],
    config: SFTConfig,
    seed: int,
    accelerator: Accelerator,
    log: Log = lambda record: None,
    checkpointer: ResumeCheckpoints | None = None,
) -> tuple[PreTrainedModel | None, dict[str, float]]:
    """Fine-tune ``model`` on demonstrations; returns the trained model (on the main process; LoRA merged) and the
    final metrics.

    With a ``checkpointer``: resumes from its latest matching checkpoint and saves one every ``checkpointer.every``
    steps (model, optimiser, batch-generator and global RNG states, the initial held-out loss). Raises
    :class:`~rlhf.guards.NonFiniteError` on a non-finite loss or gradient norm, before the optimiser step.
    """
    train_examples = sft_examples(tokenizer, train_rows)
    eval_examples = sft_examples(tokenizer, eval_rows)
    prepared = prepare_supervised(model, config, causal_lm_logits, accelerator, "CAUSAL_LM")
    generator = torch.Generator().manual_seed(seed)
    hint = (
        f"lower sft.learning_rate (now {config.learning_rate}) or sft.max_grad_norm (now {config.max_grad_norm}) "
        "in params.yaml"
    )
    pad_id, world = tokenizer.pad_token_id, accelerator.num_processes
    prepared.forward.train()
    start, loss = time.perf_counter(), float("nan")
    first_step, state = resume_training(checkpointer, prepared.model, prepared.optimizer, {"batches": generator})
    initial_eval = (
        state["extras"]["eval_loss_initial"]
        if state
        else sft_eval_loss(prepared.forward, eval_examples, pad_id, accelerator)
    )
    for step in range(first_step, config.steps):
        # 1. the global batch (same draw on every process), this process's micro-batches of it
        index = torch.randint(len(train_examples), (config.batch_size,), generator=generator).tolist()
        batch = [train_examples[i] for i in index]
        batch_tokens = sum(response_tokens(example) for example in batch)
        parts = micro_batches(batch, accelerator, config.gradient_accumulation_steps)
        check = functools.partial(require_finite, "sft", step + 1, hint)
        set_learning_rate(prepared, config.learning_rate * warmup_cosine(step, config.steps, config.warmup_steps))
        # 2. loss on response tokens, each micro-batch weighted to its share of the global batch's tokens
        local_loss = 0.0
        for position, part in enumerate(parts):
            ids, mask, labels = (t.to(accelerator.device) for t in sft_batch(part, pad_id))
            with accelerator.autocast():
                micro_loss = sft_loss(prepared.forward(ids, mask), labels)
            check(loss=micro_loss)
            part_tokens = sum(response_tokens(example) for example in part)
            weight = token_weight(part_tokens, batch_tokens, world, 1)
            with prepared.no_sync(position == len(parts) - 1):
                accelerator.backward(micro_loss * weight)
            local_loss += micro_loss.item() * (part_tokens / batch_tokens)
        # 3. clipped AdamW step (at the learning rate scheduled for this step)
        clipped_step(prepared, config.max_grad_norm, check)
        last = step + 1 == config.steps
        if (step + 1) % config.eval_every == 0 or last:
            loss = global_sum(local_loss, accelerator)
            eval_loss = sft_eval_loss(prepared.forward, eval_examples, pad_id, accelerator)
            log({"step": step + 1, "total": config.steps, "train/loss": loss, "eval/loss": eval_loss})
        if checkpointer and checkpointer.due(step + 1, config.steps):
            state = training_state(
                prepared.model, prepared.optimizer, {"batches": generator}, extras={"eval_loss_initial": initial_eval}
            )
            checkpointer.save(step + 1, state)
    prepared.forward.eval()
    metrics = {
        "train_loss": loss,
        "eval_loss_initial": initial_eval,
        "eval_loss": sft_eval_loss(prepared.forward, eval_examples, pad_id, accelerator),
        "steps": config.steps,
        "resumed_from_step": first_step,
        "seconds": time.perf_counter() - start,
    }
    return exported_model(prepared), metrics


# ----------------------------------------------------------------------------------------------------------------
# Reward model


@dataclass
class PairBatch:
    """Chosen and rejected sequences stacked as one right-padded batch: rows [0, b) chosen, [b, 2b) rejected."""

    ids: torch.Tensor  # (2b, t)
    mask: torch.Tensor  # (2b, t)


def pair_batch(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> PairBatch:
    prompts = [r["prompt"] for r in rows]
    chosen, _ = encode_prompt_response(tokenizer, prompts, [r["chosen"] for r in rows])
    rejected, _ = encode_prompt_response(tokenizer, prompts, [r["rejected"] for r in rows])
    ids, mask = right_pad(chosen + rejected, tokenizer.pad_token_id)
    return PairBatch(ids, mask)


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """−log σ(r_chosen − r_rejected), mean over pairs (Bradley & Terry 1952; Ouyang et al. 2022 eq. 1). (b,) → ()."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def pair_scores(forward: nn.Module, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(b,) chosen and (b,) rejected scores (fp32) of a :class:`PairBatch` on ``forward``'s device."""
    device = next(forward.parameters()).device
    scores = forward(batch.ids.to(device), batch.mask.to(device)).float()
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


@torch.no_grad()
def preference_accuracy(
    forward: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict],
    accelerator: Accelerator,
    batch_size: int = 256,
) -> dict[str, float]:
    """Held-out accuracy (chosen scored above rejected) and mean BT loss (every process computes all of it)."""
    correct, loss_sum = 0.0, 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        with accelerator.autocast():
            chosen, rejected = pair_scores(forward, pair_batch(tokenizer, chunk))
        correct += float((chosen > rejected).float().sum() + 0.5 * (chosen == rejected).float().sum())
        loss_sum += float(bradley_terry_loss(chosen, rejected)) * len(chunk)
    return {"accuracy": correct / max(1, len(rows)), "loss": loss_sum / max(1, len(rows))}


def train_reward_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: RewardConfig,
    seed: int,
    train_rows: list[dict],
    eval_rows: list[dict],
    accelerator: Accelerator,
    log: Log = lambda record: None,
    checkpointer: ResumeCheckpoints | None = None,
) -> tuple[PreTrainedModel | None, dict[str, float]]:
    """Train ``model`` with the Bradley–Terry loss; returns the trained model (on the main process; LoRA merged) and
    held-out metrics.

    One shuffled pass per epoch; the data position is (step, this epoch's order), checkpointed with the model,
    optimiser and generator states when a ``checkpointer`` is given. Raises :class:`~rlhf.guards.NonFiniteError` on
    non-finite scores, loss or gradient norm, before the optimiser step.
    """
    prepared = prepare_supervised(model, config, sequence_scores, accelerator, "SEQ_CLS")
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, len(train_rows) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    hint = (
        f"lower reward.learning_rate (now {config.learning_rate}) or reward.max_grad_norm (now {config.max_grad_norm}) "
        "in params.yaml"
    )
    start = time.perf_counter()
    prepared.forward.train()
    first_step, state = resume_training(checkpointer, prepared.model, prepared.optimizer, {"order": generator})
    order = state["order"].tolist() if state else []
    for step in range(first_step, total_steps):
        epoch, batch_index = divmod(step, steps_per_epoch)
        if batch_index == 0:
            order = torch.randperm(len(train_rows), generator=generator).tolist()
        # 1. the global batch of pairs (same order on every process), this process's micro-batches of it
        rows = [train_rows[i] for i in order[batch_index * config.batch_size : (batch_index + 1) * config.batch_size]]
        parts = micro_batches(rows, accelerator, config.gradient_accumulation_steps)
        check = functools.partial(require_finite, "reward", step + 1, hint)
        set_learning_rate(prepared, config.learning_rate * warmup_linear(step, total_steps, config.warmup_steps))
        # 2. BT loss on last-token scores, each micro-batch weighted to its share of the global batch's pairs
        local_loss = 0.0
        for position, part in enumerate(parts):
            with accelerator.autocast():
                chosen, rejected = pair_scores(prepared.forward, pair_batch(tokenizer, part))
            micro_loss = bradley_terry_loss(chosen, rejected)
            check(chosen_scores=chosen, rejected_scores=rejected, loss=micro_loss)
            weight = token_weight(len(part), len(rows), accelerator.num_processes, 1)
            with prepared.no_sync(position == len(parts) - 1):
                accelerator.backward(micro_loss * weight)
            local_loss += micro_loss.item() * (len(part) / len(rows))
        # 3. clipped AdamW step
        clipped_step(prepared, config.max_grad_norm, check)
        if batch_index + 1 == steps_per_epoch:
            prepared.forward.eval()
            held_out = preference_accuracy(prepared.forward, tokenizer, eval_rows, accelerator)
            prepared.forward.train()
            log(
                {
                    "epoch": epoch + 1,
                    "step": step + 1,
                    "total": total_steps,
                    "train/loss": global_sum(local_loss, accelerator),
                    "eval/accuracy": held_out["accuracy"],
                    "eval/loss": held_out["loss"],
                }
            )
        if checkpointer and checkpointer.due(step + 1, total_steps):
            order_state = torch.tensor(order, dtype=torch.int64)
            checkpointer.save(
                step + 1, training_state(prepared.model, prepared.optimizer, {"order": generator}, order=order_state)
            )
    prepared.forward.eval()
    held_out = preference_accuracy(prepared.forward, tokenizer, eval_rows, accelerator)
    train_metrics = preference_accuracy(prepared.forward, tokenizer, train_rows[: len(eval_rows) or 1], accelerator)
    metrics = {
        "accuracy": held_out["accuracy"],
        "eval_loss": held_out["loss"],
        "train_accuracy": train_metrics["accuracy"],
        "steps": total_steps,
        "resumed_from_step": first_step,
        "seconds": time.perf_counter() - start,
    }
    return exported_model(prepared), metrics


@torch.no_grad()
def raw_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    responses: list[str],
    batch_size: int = 256,
) -> torch.Tensor:
    """(n,) unnormalised RM scores of prompt + response + EOS."""
    out = []
    for start in range(0, len(prompts), batch_size):
        sequences, _ = encode_prompt_response(
            tokenizer, prompts[start : start + batch_size], responses[start : start + batch_size]
        )
        ids, mask = right_pad(sequences, tokenizer.pad_token_id)
        device = next(model.parameters()).device
        out.append(sequence_scores(model, ids.to(device), mask.to(device)).float().cpu())
    return torch.cat(out)
