"""The single-process paths for memory and bf16 speed; the update is the one of the joint backward (in bf16, up to
bf16 rounding). :func:`~rlhf.ppo_trainer.optimise.optimise` (and, for the rollout, ``roll_out``) takes them when they
apply, and only then:

- :func:`policy_then_critic_backward` (:func:`separate_backward_applies`: one process, lean policy + critic; the
  default single-process setup, fp32 or bf16) runs the policy's forward and backward, then the critic's, instead of
  one joint backward of :func:`~rlhf.ppo_trainer.losses.ppo_minibatch_loss`: the same gradients, bit for bit, with
  one model's activations alive at a time;
- :class:`Bf16Weights` (:meth:`Bf16Weights.applies`: one process, bf16, no gradient accumulation, every parameter
  trained) keeps bf16 copies of the fp32 master weights for every forward and backward, rollout included.

With several processes neither applies: DDP's hooks expect one backward per micro-batch and keep the gradient dtype
they were built with.
"""

from __future__ import annotations

import contextlib

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from rlhf.config import PPOConfig
from rlhf.ppo_trainer.losses import model_inputs, policy_side_loss, value_side_loss
from rlhf.ppo_trainer.models import PolicyAndCritic
from rlhf.rollout import Experience


def separate_backward_applies(module: nn.Module, accelerator: Accelerator) -> bool:
    """Whether :func:`policy_then_critic_backward` may replace the joint forward/backward of the unwrapped ``module``:
    one process (no DDP hooks to bypass) and a lean policy + critic."""
    return accelerator.distributed_type == DistributedType.NO and isinstance(module, PolicyAndCritic) and module.lean


def policy_then_critic_backward(
    module: PolicyAndCritic,
    batch: Experience,
    config: PPOConfig,
    weights: tuple[float, float],
    accelerator: Accelerator,
    bf16_weights: Bf16Weights | None,
    kl_coef: float = 0.0,
) -> dict[str, torch.Tensor]:
    """One micro-batch's forward and backward on one process: the policy's, then the critic's.

    The loss is a sum of a policy term and a critic term over disjoint parameters, so the gradients equal those of
    :func:`~rlhf.ppo_trainer.losses.ppo_minibatch_loss`'s one backward; but the policy's activations (and under
    bf16 its bf16 weight copies) are freed before the critic's forward, which lowers the peak memory of a step by
    about one model's share (19 M bench model, bf16: see docs/performance.md). ``weights`` = (policy, value)
    micro-batch weights. Returns the same statistics.
    """
    input_ids, attention_mask = model_inputs(batch)
    start = batch.query_ids.shape[1]
    losses, stats = [], {}
    for part, forward, side_loss, weight in (
        (module.policy, module.policy_logits, lambda *a: policy_side_loss(*a, kl_coef), weights[0]),
        (module.critic, module.critic_values, value_side_loss, weights[1]),
    ):
        if bf16_weights is not None:
            bf16_weights.compute(part)
        with accelerator.autocast():
            output = forward(input_ids, attention_mask, start)
        loss, part_stats = side_loss(
            output.float(), batch, config
        )  # fp32 loss, as accelerate returns the joint forward's outputs
        accelerator.backward(loss * weight)
        if bf16_weights is not None:
            bf16_weights.master(part)
        losses.append(loss.detach())
        stats.update(part_stats)
    stats["ppo/loss/total"] = losses[0] + losses[1]
    return stats


class Bf16Weights:
    """bf16 copies of the trained weights, kept for every forward and backward of the rollout and the PPO epochs; the
    fp32 tensors stay the optimiser's master weights (mixed precision with an fp32 master copy, Micikevicius et al.
    2018; bf16 needs no loss scaling). Swaps ``parameter.data``, so the optimiser, its state and every caller see the
    same fp32 parameters outside :meth:`compute` / :meth:`master` and the module is fp32 again after :meth:`close`.

    What makes it the fast path (docs/performance.md § "bf16 on the matrix units"): the copies are cast once, when
    the optimiser has moved a master (in :meth:`step`, right after each chunk's AdamW update while that chunk is still
    in cache), not before every forward; activations stay bf16 end to end (no per-op autocast casts, which under
    ``no_grad`` repeat for every decoded token); the fp32 gradients for AdamW's fused kernel are cast into one scratch
    buffer allocated once (a fresh multi-MiB tensor per parameter and step costs page faults on every use). A master
    changed from outside (a resume checkpoint loaded into the parameters) bumps its version counter, and
    :meth:`compute` recasts it (a write through ``parameter.data`` bumps no counter: callers must not change the
    masters that way).

    One process and one micro-batch per step only: DDP's buckets keep the dtype they were built with, and
    accumulating gradients in bf16 would lose precision.
    """

    def __init__(self, module: nn.Module, chunk_bytes: int = 16 << 20):
        self.parameters = [p for p in module.parameters()]
        self.chunk_bytes = chunk_bytes
        self.copies = {id(p): p.detach().to(torch.bfloat16) for p in self.parameters}  # id(parameter) → bf16 copy
        self.synced = {id(p): p._version for p in self.parameters}  # the master's version the copy was cast from
        self.masters: dict[int, torch.Tensor] = {}  # id(parameter) → its fp32 tensor while .data holds the bf16 copy
        self.scratch: torch.Tensor | None = None  # fp32 gradients of one chunk (allocated at the first step)

    @staticmethod
    def applies(module: nn.Module, config: PPOConfig, accelerator: Accelerator) -> bool:
        return (
            accelerator.mixed_precision == "bf16"
            and accelerator.distributed_type == DistributedType.NO
            and config.gradient_accumulation_steps == 1
            and all(p.requires_grad for p in module.parameters())
        )

    def compute(self, part: nn.Module | None = None) -> None:
        """Before a forward: the parameters (of ``part``, default all) hold their bf16 copies."""
        parameters = [p for p in (self.parameters if part is None else part.parameters()) if id(p) not in self.masters]
        self._recast([p for p in parameters if p._version != self.synced[id(p)]])  # changed in place (e.g. a resume)
        for parameter in parameters:
            self.masters[id(parameter)] = parameter.data
            parameter.data = self.copies[id(parameter)]

    def master(self, part: nn.Module | None = None) -> None:
        """After the backward: the parameters (of ``part``, default all) hold the fp32 masters again (their gradients
        stay bf16 until :meth:`step`)."""
        for parameter in self.parameters if part is None else part.parameters():
            if id(parameter) in self.masters:
                parameter.data = self.masters.pop(id(parameter))

    @contextlib.contextmanager
    def computing(self, part: nn.Module | None = None):
        """:meth:`compute` … :meth:`master` around a block (the rollout's forwards)."""
        self.compute(part)
        try:
            yield
        finally:
            self.master(part)

    def _recast(self, parameters: list[nn.Parameter]) -> None:
        """Recast the bf16 copies of ``parameters`` (holding their masters): one multi-tensor kernel on CUDA."""
        if parameters:
            torch._foreach_copy_([self.copies[id(p)] for p in parameters], [p.detach() for p in parameters])
            self.synced.update((id(p), p._version) for p in parameters)

    def step(self, optimizer: torch.optim.Optimizer, max_grad_norm: float) -> torch.Tensor:
        """Clip by the global gradient norm and step, then recast the moved masters' bf16 copies. The bf16 gradients
        are cast to fp32 (AdamW's fused kernel needs gradients in the parameters' dtype) a chunk of parameters at a
        time into the scratch buffer, so never more than ``chunk_bytes`` (or one parameter) of fp32 gradients exist.
        Parameters without a gradient are skipped by the optimiser, so stepping chunk by chunk gives the same numbers
        as one step. Returns the norm before clipping.
        """
        pending = [(p, p.grad) for p in self.parameters if p.grad is not None]
        for parameter, _ in pending:
            parameter.grad = None
        # per-tensor norms of bf16 gradients accumulate in fp32 (and are rounded to bf16); the total in fp32
        norms = torch._foreach_norm([grad for _, grad in pending]) if pending else []
        total_norm = torch.linalg.vector_norm(torch.stack(norms).float()) if norms else torch.zeros(())
        scale = (max_grad_norm / (total_norm + 1e-6)).clamp(max=1.0)  # torch.nn.utils.clip_grad_norm_'s rule
        clipping = bool(scale < 1.0)
        if pending and self.scratch is None:  # chunk_bytes of fp32, at least the largest parameter, at most all
            sizes = [p.numel() for p in self.parameters]
            elements = max(min(self.chunk_bytes // 4, sum(sizes)), max(sizes))
            self.scratch = torch.empty(elements, device=self.parameters[0].device)
        while pending:
            chunk, grads, used = [], [], 0
            while pending and used + pending[0][0].numel() <= self.scratch.numel():
                parameter, grad = pending.pop(0)
                parameter.grad = self.scratch[used : used + grad.numel()].view_as(grad)
                chunk.append(parameter)
                grads.append(grad)
                used += grad.numel()
            # one multi-tensor kernel each on CUDA (a loop of per-tensor kernels on the CPU)
            fp32_grads = [p.grad for p in chunk]
            torch._foreach_copy_(fp32_grads, grads)
            if clipping:
                torch._foreach_mul_(fp32_grads, scale)
            optimizer.step()
            for parameter in chunk:
                parameter.grad = None
            self._recast(chunk)
        return total_norm

    def close(self) -> None:
        self.master()
