"""Single-process bf16 training with fp32 master weights (rlhf.ppo_trainer.memory.Bf16Weights)."""

from __future__ import annotations

import random

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from rlhf import embedded
from rlhf.config import PPOConfig, TinyModelConfig
from rlhf.modeling import RewardNormalization, build_tiny_gpt2, load_scalar_model
from rlhf.ppo_trainer.loop import train_ppo
from rlhf.ppo_trainer.memory import Bf16Weights
from rlhf.ppo_trainer.models import PPOModels
from rlhf.ppo_trainer.optimise import prepare_training

PROMPTS = [
    "the plot was",
    "the music was very lovely and the cast was",
    "the film was",
    "the ending was dull but the script was",
]


def two_layer_net(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


def bf16_gradients(net: torch.nn.Module, weights: Bf16Weights, inputs: torch.Tensor) -> None:
    weights.compute()
    net(inputs.bfloat16()).float().pow(2).sum().backward()
    weights.master()


@pytest.mark.parametrize("max_grad_norm", [1e-3, 1e3])  # clipping active / inactive
def test_chunked_step_equals_clip_then_one_adamw_step_on_the_fp32_gradients(max_grad_norm: float) -> None:
    inputs = torch.randn(4, 6)
    net, reference = two_layer_net(0), two_layer_net(0)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, fused=True)
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=0.1, fused=True)
    weights = Bf16Weights(net, chunk_bytes=1)  # one chunk per parameter (or two small ones): several fused steps
    for _ in range(2):  # the second step uses AdamW state from the first
        bf16_gradients(net, weights, inputs)
        assert all(p.dtype == torch.float32 and p.grad.dtype == torch.bfloat16 for p in net.parameters())
        for p, q in zip(net.parameters(), reference.parameters()):
            q.grad = p.grad.float()
        expected_norm = torch.linalg.vector_norm(torch.stack([q.grad.norm() for q in reference.parameters()]))
        grads = [q.grad for q in reference.parameters()]
        norm = weights.step(optimizer, max_grad_norm)
        # clipped by the norm step() computed (per-tensor norms rounded to bf16), one fused step on all gradients
        torch._foreach_mul_(grads, (max_grad_norm / (norm + 1e-6)).clamp(max=1.0))
        reference_optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        reference_optimizer.zero_grad(set_to_none=True)
        assert torch.allclose(norm, expected_norm, rtol=2**-8)  # per-tensor norms rounded to bf16
        for p, q in zip(net.parameters(), reference.parameters()):
            assert p.dtype == torch.float32 and torch.allclose(p, q, rtol=0, atol=1e-7)
    assert all(int(optimizer.state[p]["step"]) == 2 for p in net.parameters())
    weights.close()
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_compute_casts_from_the_masters_and_close_restores_the_same_tensors() -> None:
    net = two_layer_net(1)
    masters = [p.data for p in net.parameters()]
    weights = Bf16Weights(net)
    weights.compute()
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    assert all(torch.equal(p.data, m.bfloat16()) for p, m in zip(net.parameters(), masters))
    weights.close()
    assert all(
        p.data_ptr() == m.data_ptr() for p, m in zip(net.parameters(), masters)
    )  # the fp32 storage itself, not a round trip


def test_step_recasts_the_moved_masters_and_compute_recasts_a_master_changed_from_outside() -> None:
    """The kept bf16 copies follow the masters: after every optimiser step, and after an in-place change from outside
    (a resume checkpoint loaded into the parameters), not only at construction."""
    net = two_layer_net(2)
    optimizer = torch.optim.AdamW(net.parameters(), lr=0.1, fused=True)
    weights = Bf16Weights(net)
    bf16_gradients(net, weights, torch.randn(4, 6))
    weights.step(optimizer, max_grad_norm=1.0)
    weights.compute()
    copies = [p.data for p in net.parameters()]
    weights.master()
    assert all(torch.equal(c, p.detach().bfloat16()) for c, p in zip(copies, net.parameters()))
    state = {name: torch.full_like(value, 0.5) for name, value in net.state_dict().items()}
    net.load_state_dict(state)  # in place, as restore_training loads a checkpoint
    weights.compute()
    assert all(torch.equal(p.data, torch.full_like(p.data, 0.5)) for p in net.parameters())
    weights.close()
    assert all(p.dtype == torch.float32 and torch.equal(p, torch.full_like(p, 0.5)) for p in net.parameters())


@pytest.mark.parametrize("policy_decodes_in_bf16", [False, True])
def test_the_rollout_reads_the_kept_bf16_copies(tmp_path, fresh_accelerator_state, monkeypatch, policy_decodes_in_bf16):
    """With kept bf16 copies the rollout's forwards read them (no per-op autocast casts of the fp32 weights); a policy
    the sampler decodes in fp32 (rows × width below CPU_BF16_DECODE_MIN_ELEMENTS) keeps its fp32 weights for that.
    Afterwards every parameter holds its fp32 master again."""
    from rlhf import sampling
    from rlhf.ppo_trainer.experience import roll_out

    if policy_decodes_in_bf16:
        monkeypatch.setattr(sampling, "CPU_BF16_DECODE_MIN_ELEMENTS", 0)
    config = PPOConfig(rollout_batch_size=4, response_length=6, mixed_precision="bf16", sampling_seeds="per_episode")
    models = fresh_models(tmp_path)
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    prepared = prepare_training(models, config, accelerator)
    seen = []  # (model, dtype of its weights) at each embedding lookup

    def record(name):
        return lambda module, args: seen.append((name, module.weight.dtype))

    trainable = accelerator.unwrap_model(prepared.module)
    trainable.policy.transformer.wte.register_forward_pre_hook(record("policy"))
    trainable.critic.transformer.wte.register_forward_pre_hook(record("critic"))
    uniforms = torch.rand(4, 6, generator=torch.Generator().manual_seed(0))
    experience = roll_out(models, prepared.module, PROMPTS, uniforms, config, accelerator, prepared.bf16_weights)
    policy_dtype = torch.bfloat16 if policy_decodes_in_bf16 else torch.float32
    assert set(seen) == {("policy", policy_dtype), ("critic", torch.bfloat16)}
    assert all(p.dtype == torch.float32 for p in trainable.parameters())
    assert torch.isfinite(experience.logprobs).all() and torch.isfinite(experience.values).all()


def fresh_models(folder) -> PPOModels:
    """The same policy, reference, critic and reward model on every call (score heads seeded)."""
    rng = random.Random(0)
    tokenizer = embedded.train_tokenizer([embedded.sample_review(rng) for _ in range(200)])
    shape = TinyModelConfig(n_layer=2, n_head=2, n_embd=32, n_positions=48)
    build_tiny_gpt2(shape, tokenizer, seed=0).save_pretrained(folder)
    torch.manual_seed(1)
    critic = load_scalar_model(folder, tokenizer.pad_token_id)
    torch.manual_seed(2)
    reward_model = load_scalar_model(folder, tokenizer.pad_token_id)
    return PPOModels(
        policy=build_tiny_gpt2(shape, tokenizer, seed=0),
        reference=build_tiny_gpt2(shape, tokenizer, seed=0),
        critic=critic,
        reward_model=reward_model,
        reward_normalization=RewardNormalization(),
        tokenizer=tokenizer,
    )


def policy_update(folder, precision: str, bf16_weights: bool) -> torch.Tensor:
    """Parameter change of the policy after one PPO iteration (2 epochs × 2 minibatches) in the given precision."""
    config = PPOConfig(
        iterations=1,
        rollout_batch_size=4,
        num_minibatches=2,
        ppo_epochs=2,
        response_length=6,
        learning_rate=1e-3,
        mixed_precision=precision,
        sampling_seeds="per_episode",
    )
    models = fresh_models(folder)
    initial = [p.detach().clone() for p in models.policy.parameters()]
    AcceleratorState._reset_state(reset_partial_state=True)  # one process-wide state; each run sets its own precision
    accelerator = Accelerator(cpu=True, mixed_precision=precision)
    prepared = prepare_training(models, config, accelerator)
    assert (prepared.bf16_weights is not None) == (precision == "bf16")
    if not bf16_weights:
        prepared.bf16_weights = None  # autocast over the fp32 weights
    history = train_ppo(models, PROMPTS, config, 0, accelerator, prepared=prepared)
    assert all(p.dtype == torch.float32 for p in prepared.module.parameters())
    assert all(
        v.dtype == torch.float32 for state in prepared.optimizer.state.values() for v in state.values() if v.dim()
    )
    assert all(torch.isfinite(torch.tensor(v)) for v in history[0].values() if isinstance(v, float))
    return torch.cat([(p.detach() - q).flatten() for p, q in zip(models.policy.parameters(), initial)])


@pytest.fixture()
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)  # leave no bf16 state to later tests in this process


def test_bf16_weights_update_is_as_close_to_fp32_as_autocasts(tmp_path, fresh_accelerator_state) -> None:
    """One bf16 PPO iteration on one process: the path applies, parameters and optimiser state stay fp32, and the
    update is as close to the fp32 one as the update of autocast over fp32 weights is."""
    fp32 = policy_update(tmp_path / "a", "no", False)
    bf16 = policy_update(tmp_path / "b", "bf16", True)
    autocast = policy_update(tmp_path / "c", "bf16", False)
    cosine = lambda a, b: float(torch.nn.functional.cosine_similarity(a, b, dim=0))  # noqa: E731
    print(
        f"cosine to fp32: bf16 weights {cosine(bf16, fp32):.5f}, autocast {cosine(autocast, fp32):.5f}; "
        f"bf16 vs autocast {cosine(bf16, autocast):.5f}"
    )
    assert fp32.norm() > 1e-3
    assert cosine(bf16, fp32) > 0.99 and cosine(bf16, fp32) > cosine(autocast, fp32) - 0.005
