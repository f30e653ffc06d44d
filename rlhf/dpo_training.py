"""DPO's training loop (the ``ppo`` stage with ``ppo.algorithm: dpo``; docs/design.md §4b): the reward model's loop
of rlhf/training.py (global batches drawn alike on every rank, rank r's pairs r, r+N, …, micro-batches weighted by
their share of the pairs) on the DPO loss of rlhf/dpo.py. Its own module so that SFT and the reward model do not
depend on DPO's code (dvc.yaml). No resume checkpoints: see :func:`train_dpo`.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable

import torch
from accelerate import Accelerator
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlhf.config import ConfigError, DPOConfig
from rlhf.distributed import gather_in_order, shard_slice, token_weight
from rlhf.dpo import pair_losses, preference_logratio, preference_stats, response_mask, sequence_logprobs
from rlhf.guards import require_finite
from rlhf.modeling import causal_lm_logits, encode_prompt_response, right_pad
from rlhf.training import (
    Log,
    Prepared,
    clipped_step,
    exported_model,
    global_sums,
    micro_batches,
    prepare_supervised,
    set_learning_rate,
    warmup_linear,
)

DPOExample = tuple[list[int], list[int], int]  # ids of prompt + chosen + EOS, of prompt + rejected + EOS, prompt length


def dpo_examples(tokenizer: PreTrainedTokenizerBase, rows: list[dict]) -> list[DPOExample]:
    """Each preference pair tokenised once, as the SFT loss and the reward model see it (prompt + response + EOS)."""
    prompts = [r["prompt"] for r in rows]
    chosen, prompt_lengths = encode_prompt_response(tokenizer, prompts, [r["chosen"] for r in rows])
    rejected, _ = encode_prompt_response(tokenizer, prompts, [r["rejected"] for r in rows])
    return list(zip(chosen, rejected, prompt_lengths))


def dpo_batch(examples: list[DPOExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """b pairs as one right-padded batch: rows [0, b) chosen, [b, 2b) rejected. (2b, t) ids, mask, response mask."""
    ids, mask = right_pad([c for c, _, _ in examples] + [r for _, r, _ in examples], pad_id)
    prompt_lengths = torch.tensor([n for _, _, n in examples] * 2, dtype=torch.long)
    return ids, mask, response_mask(mask, prompt_lengths)


def pair_logprobs(forward: nn.Module, examples: list[DPOExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(b,) log π(chosen | prompt) and (b,) log π(rejected | prompt), fp32, of ``forward`` (a :class:`TrainedForward`
    computing logits, possibly wrapped), on its device; one forward over the 2b sequences."""
    device = next(forward.parameters()).device
    ids, mask, response = (t.to(device) for t in dpo_batch(examples, pad_id))
    logprobs = sequence_logprobs(forward(ids, mask), ids, response)
    return logprobs[: len(examples)], logprobs[len(examples) :]


@torch.no_grad()
def sharded_pair_logprobs(
    forward: nn.Module, examples: list[DPOExample], pad_id: int, accelerator: Accelerator, batch_size: int = 256
) -> torch.Tensor:
    """(n, 2) fp32 log-probs (chosen, rejected) of every pair, on every process, in ``examples`` order (CPU).

    Each process scores its shard (pairs r, r+N, …), all in the same number of forwards (a process short of pairs
    scores a spare one and drops it: an FSDP forward is a collective), and the shards are gathered in order.
    """
    world = accelerator.num_processes
    mine = [examples[i] for i in shard_slice(len(examples), accelerator.process_index, world)]
    local: list[tuple[float, float]] = []
    for batch in range(math.ceil(math.ceil(len(examples) / world) / batch_size)):
        chunk = mine[batch * batch_size : (batch + 1) * batch_size]
        with accelerator.autocast():
            chosen, rejected = pair_logprobs(forward, chunk or examples[:1], pad_id)
        local += list(zip(chosen.tolist(), rejected.tolist()))[: len(chunk)]
    return torch.tensor(gather_in_order(local, accelerator), dtype=torch.float32).reshape(len(examples), 2)


def dpo_snapshot_steps(every: int, total: int) -> set[int]:
    """Steps after which the policy is saved for evaluation: every ``every`` (0: none) and always the last."""
    return set(range(every, total + 1, every) if every else ()) | {total}


def held_out_preferences(
    forward: nn.Module,
    examples: list[DPOExample],
    reference: torch.Tensor,
    config: DPOConfig,
    pad_id: int,
    accelerator: Accelerator,
) -> dict[str, float]:
    """``eval/…``: the DPO loss and implicit-reward statistics of the policy on held-out pairs (every process gets
    them; nothing when there are none). ``reference``: their (n, 2) reference log-probs."""
    if not examples:
        return {}
    policy = sharded_pair_logprobs(forward, examples, pad_id, accelerator)
    chosen, rejected = policy[:, 0], policy[:, 1]
    logratio = preference_logratio(chosen, rejected, reference[:, 0], reference[:, 1])
    loss = pair_losses(logratio, config.loss, config.beta, config.label_smoothing).mean()
    stats = preference_stats(chosen, rejected, reference[:, 0], reference[:, 1], config.beta)
    return {"eval/loss": float(loss), **{f"eval/{name}": float(value) for name, value in stats.items()}}


DPO_STATS = ("dpo/loss", "dpo/rewards/chosen", "dpo/rewards/rejected", "dpo/rewards/margin", "dpo/accuracy")
DPO_EVAL_STATS = ("eval/loss", "eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margin", "eval/accuracy")


def train_dpo(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: DPOConfig,
    seed: int,
    train_rows: list[dict],
    eval_rows: list[dict],
    accelerator: Accelerator,
    log: Log = lambda record: None,
    on_snapshot: Callable[[int, Prepared], None] = lambda step, prepared: None,
) -> tuple[PreTrainedModel | None, list[dict]]:
    """DPO from ``model`` (the SFT policy) on preference pairs; returns the trained policy (main process, else None)
    and the per-step history.

    The reference is ``model`` itself before its first update, i.e. the SFT model: the reference log-probs of every
    train and held-out pair are computed once, up front, with the weights about to be trained, so only one model is
    ever in memory. Then ``config.epochs`` shuffled passes of ``config.batch_size`` pairs per step (over all
    processes; the tail short of a batch is skipped each epoch), AdamW with linear warm-up and linear decay, clipped
    gradients. Rank r trains on pairs r, r+N, … of each global batch as ``config.gradient_accumulation_steps``
    micro-batches, each mean loss weighted by its share of the global batch's pairs: the same update on any number
    of processes, up to float rounding (docs/design.md §6).

    Each history row has ``step``, ``total``, ``epoch``, ``lr``, the global batch's :data:`DPO_STATS` and
    ``timing/step``; rows of the :func:`dpo_snapshot_steps` (the last included) also have the held-out
    :data:`DPO_EVAL_STATS` (None elsewhere), and after them ``on_snapshot(step, prepared)`` runs on every process.

    No resume checkpoints: an epoch over the embedded task's pairs takes a few minutes, and a killed run leaves the
    stage's previous outputs whole (the stage writes through staging folders) and starts over. Raises
    :class:`~rlhf.guards.NonFiniteError` on a non-finite log-prob, loss or gradient norm, before the optimiser step,
    and ConfigError when there are fewer training pairs than ``config.batch_size``.
    """
    steps_per_epoch = len(train_rows) // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"params.yaml: dpo.batch_size ({config.batch_size}) is more than the {len(train_rows)} training pairs; "
            "lower dpo.batch_size or label more pairs"
        )
    total_steps = steps_per_epoch * config.epochs
    train_examples, eval_examples = dpo_examples(tokenizer, train_rows), dpo_examples(tokenizer, eval_rows)
    pad_id, world = tokenizer.pad_token_id, accelerator.num_processes
    prepared = prepare_supervised(model, config, causal_lm_logits, accelerator, "CAUSAL_LM")
    # the reference: the SFT weights, scored before the first update (then never held again)
    prepared.forward.eval()
    train_reference = sharded_pair_logprobs(prepared.forward, train_examples, pad_id, accelerator)
    eval_reference = sharded_pair_logprobs(prepared.forward, eval_examples, pad_id, accelerator)
    prepared.forward.train()
    generator = torch.Generator().manual_seed(seed)
    snapshots = dpo_snapshot_steps(config.snapshot_every, total_steps)
    hint = (
        f"lower dpo.learning_rate (now {config.learning_rate}) or dpo.max_grad_norm (now {config.max_grad_norm}) "
        "in params.yaml"
    )
    history: list[dict] = []
    order: list[int] = []
    for step in range(total_steps):
        started = time.perf_counter()
        epoch, batch_index = divmod(step, steps_per_epoch)
        if batch_index == 0:
            order = torch.randperm(len(train_examples), generator=generator).tolist()
        # 1. the global batch of pairs (same order on every process), this process's micro-batches of it
        rows = order[batch_index * config.batch_size : (batch_index + 1) * config.batch_size]
        parts = micro_batches(rows, accelerator, config.gradient_accumulation_steps)
        check = functools.partial(require_finite, "ppo", step + 1, hint)
        learning_rate = config.learning_rate * warmup_linear(step, total_steps, config.warmup_steps)
        set_learning_rate(prepared, learning_rate)
        # 2. the DPO loss against the precomputed reference, each micro-batch weighted to its share of the pairs
        local = torch.zeros(len(DPO_STATS), dtype=torch.float64)
        for position, part in enumerate(parts):
            with accelerator.autocast():
                chosen, rejected = pair_logprobs(prepared.forward, [train_examples[i] for i in part], pad_id)
            reference_chosen, reference_rejected = (train_reference[part, k].to(chosen.device) for k in (0, 1))
            logratio = preference_logratio(chosen, rejected, reference_chosen, reference_rejected)
            micro_loss = pair_losses(logratio, config.loss, config.beta, config.label_smoothing).mean()
            check(policy_chosen=chosen, policy_rejected=rejected, loss=micro_loss)
            with prepared.no_sync(position == len(parts) - 1):
                accelerator.backward(micro_loss * token_weight(len(part), len(rows), world, 1))
            stats = preference_stats(chosen, rejected, reference_chosen, reference_rejected, config.beta)
            values = [micro_loss.detach(), *(stats[name.removeprefix("dpo/")] for name in DPO_STATS[1:])]
            local += torch.tensor([float(v) for v in values], dtype=torch.float64) * (len(part) / len(rows))
        # 3. clipped AdamW step
        clipped_step(prepared, config.max_grad_norm, check)
        record = {
            "step": step + 1,
            "total": total_steps,
            "epoch": epoch + 1,
            "lr": learning_rate,
            **dict(zip(DPO_STATS, global_sums(local, accelerator))),
            **dict.fromkeys(DPO_EVAL_STATS),
        }
        if step + 1 in snapshots:
            prepared.forward.eval()
            record.update(
                held_out_preferences(prepared.forward, eval_examples, eval_reference, config, pad_id, accelerator)
            )
            prepared.forward.train()
            on_snapshot(step + 1, prepared)
        record["timing/step"] = time.perf_counter() - started
        log(record)
        history.append(record)
    prepared.forward.eval()
    return exported_model(prepared), history
