"""Supervised fine-tuning and Bradley–Terry reward-model training (the two supervised stages).

Both pre-tokenise once, draw shuffled batches from a seeded generator, use AdamW with warm-up then decay, clip
gradient norms, and report held-out metrics. Both stop on a non-finite loss/score/gradient norm (:mod:`rlhf.guards`)
and, given :class:`~rlhf.checkpoint.ResumeCheckpoints`, save resume checkpoints every N steps and resume from the latest
matching one: the learning rate is a function of the step and every random draw comes from a generator whose state is
checkpointed, so a resumed run ends with the same weights as an uninterrupted one (bitwise on CPU, same thread count).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.checkpoint import ResumeCheckpoints, capture_rng, restore_rng
from rlhf.config import RewardConfig, SFTConfig
from rlhf.guards import require_finite
from rlhf.modeling import causal_lm_logits, encode_prompt_response, right_pad, sequence_scores

Log = Callable[[dict], None]


def resume_training(
    checkpointer: ResumeCheckpoints | None,
    model: PreTrainedModel,
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
    model: PreTrainedModel, optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator], **extra
) -> dict:
    """What :func:`resume_training` restores, plus the loop's own ``extra`` entries."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": capture_rng(generators), **extra}


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


def sft_batch(examples: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (b, t) ids, mask and labels; labels are −100 on prompt tokens and padding (loss on responses)."""
    ids, mask = right_pad([seq for seq, _ in examples], pad_id)
    labels = ids.masked_fill(mask == 0, -100)
    for row, (_, prompt_length) in enumerate(examples):
        labels[row, :prompt_length] = -100
    return ids, mask, labels


def sft_loss(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over response tokens."""
    logits = causal_lm_logits(model, ids, mask)[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


@torch.no_grad()
def sft_eval_loss(model: PreTrainedModel, examples: list, pad_id: int, batch_size: int = 256) -> float:
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        ids, mask, labels = sft_batch(examples[start : start + batch_size], pad_id)
        n_tokens = int((labels[:, 1:] != -100).sum())
        total += float(sft_loss(model, ids, mask, labels)) * n_tokens
        count += n_tokens
    return total / max(1, count)


def train_sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_rows: list[dict],
    eval_rows: list[dict],
    config: SFTConfig,
    seed: int,
    log: Log = lambda record: None,
    checkpointer: ResumeCheckpoints | None = None,
) -> dict[str, float]:
    """Fine-tune ``model`` in place on demonstrations; returns final metrics.

    With a ``checkpointer``: resumes from its latest matching checkpoint and saves one every ``checkpointer.every``
    steps (model, optimiser, batch-generator and global RNG states, the initial held-out loss). Raises
    :class:`~rlhf.guards.NonFiniteError` on a non-finite loss or gradient norm, before the optimiser step.
    """
    train_examples = sft_examples(tokenizer, train_rows)
    eval_examples = sft_examples(tokenizer, eval_rows)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(seed)
    hint = (
        f"lower sft.learning_rate (now {config.learning_rate}) or sft.max_grad_norm (now {config.max_grad_norm}) "
        "in params.yaml"
    )
    model.train()
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    first_step, state = resume_training(checkpointer, model, optimizer, {"batches": generator})
    initial_eval = (
        state["extras"]["eval_loss_initial"] if state else sft_eval_loss(model, eval_examples, tokenizer.pad_token_id)
    )
    for step in range(first_step, config.steps):
        # 1. sample a batch, 2. loss on response tokens, 3. clipped AdamW step with the scheduled learning rate
        index = torch.randint(len(train_examples), (config.batch_size,), generator=generator).tolist()
        ids, mask, labels = sft_batch([train_examples[i] for i in index], tokenizer.pad_token_id)
        loss = sft_loss(model, ids, mask, labels)
        require_finite("sft", step + 1, hint, loss=loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        require_finite("sft", step + 1, hint, gradient_norm=grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * warmup_cosine(step, config.steps, config.warmup_steps)
        optimizer.step()
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            record = {"step": step + 1, "total": config.steps, "train/loss": loss.item()}
            record["eval/loss"] = sft_eval_loss(model, eval_examples, tokenizer.pad_token_id)
            log(record)
        if checkpointer and checkpointer.due(step + 1, config.steps):
            checkpointer.save(
                step + 1,
                training_state(model, optimizer, {"batches": generator}, extras={"eval_loss_initial": initial_eval}),
            )
    model.eval()
    return {
        "train_loss": loss.item(),
        "eval_loss_initial": initial_eval,
        "eval_loss": sft_eval_loss(model, eval_examples, tokenizer.pad_token_id),
        "steps": config.steps,
        "resumed_from_step": first_step,
        "seconds": time.perf_counter() - start,
    }


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


def pair_scores(model: PreTrainedModel, batch: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
    scores = sequence_scores(model, batch.ids, batch.mask)
    half = scores.shape[0] // 2
    return scores[:half], scores[half:]


@torch.no_grad()
def preference_accuracy(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, rows: list[dict], batch_size: int = 256
) -> dict[str, float]:
    """Held-out accuracy (chosen scored above rejected) and mean BT loss."""
    correct, loss_sum = 0.0, 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        chosen, rejected = pair_scores(model, pair_batch(tokenizer, chunk))
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
    log: Log = lambda record: None,
    checkpointer: ResumeCheckpoints | None = None,
) -> dict[str, float]:
    """Train ``model`` in place with the Bradley–Terry loss; returns held-out metrics.

    One shuffled pass per epoch; the data position is (step, this epoch's order), checkpointed with the model,
    optimiser and generator states when a ``checkpointer`` is given. Raises :class:`~rlhf.guards.NonFiniteError` on
    non-finite scores, loss or gradient norm, before the optimiser step.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, len(train_rows) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    hint = (
        f"lower reward.learning_rate (now {config.learning_rate}) or reward.max_grad_norm (now {config.max_grad_norm}) "
        "in params.yaml"
    )
    start = time.perf_counter()
    model.train()
    first_step, state = resume_training(checkpointer, model, optimizer, {"order": generator})
    order = state["order"].tolist() if state else []
    for step in range(first_step, total_steps):
        epoch, batch_index = divmod(step, steps_per_epoch)
        if batch_index == 0:
            order = torch.randperm(len(train_rows), generator=generator).tolist()
        # 1. a batch of pairs, 2. BT loss on last-token scores, 3. clipped AdamW step
        rows = [train_rows[i] for i in order[batch_index * config.batch_size : (batch_index + 1) * config.batch_size]]
        chosen, rejected = pair_scores(model, pair_batch(tokenizer, rows))
        loss = bradley_terry_loss(chosen, rejected)
        require_finite("reward", step + 1, hint, chosen_scores=chosen, rejected_scores=rejected, loss=loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        require_finite("reward", step + 1, hint, gradient_norm=grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * warmup_linear(step, total_steps, config.warmup_steps)
        optimizer.step()
        if batch_index + 1 == steps_per_epoch:
            model.eval()
            held_out = preference_accuracy(model, tokenizer, eval_rows)
            model.train()
            log(
                {
                    "epoch": epoch + 1,
                    "step": step + 1,
                    "total": total_steps,
                    "train/loss": loss.item(),
                    "eval/accuracy": held_out["accuracy"],
                    "eval/loss": held_out["loss"],
                }
            )
        if checkpointer and checkpointer.due(step + 1, total_steps):
            checkpointer.save(
                step + 1,
                training_state(model, optimizer, {"order": generator}, order=torch.tensor(order, dtype=torch.int64)),
            )
    model.eval()
    held_out = preference_accuracy(model, tokenizer, eval_rows)
    train_metrics = preference_accuracy(model, tokenizer, train_rows[: len(eval_rows) or 1])
    return {
        "accuracy": held_out["accuracy"],
        "eval_loss": held_out["loss"],
        "train_accuracy": train_metrics["accuracy"],
        "steps": total_steps,
        "resumed_from_step": first_step,
        "seconds": time.perf_counter() - start,
    }


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
        out.append(sequence_scores(model, ids, mask))
    return torch.cat(out)
