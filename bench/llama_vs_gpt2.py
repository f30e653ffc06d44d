"""A Llama-family policy on the project's lean path (rlhf/lean.py → rlhf/lean_llama.py) against the same model on the
Hugging Face path and against the lean GPT-2 path in our PPO loop, optionally against TRL 1.12's PPO on the same Llama
model; with a phase profile of every trial of our loop (issue 14, docs/performance.md § "Llama-family models").

    python bench/llama_vs_gpt2.py --check              # only rlhf.lean_llama against the HF forward (20 s)
    # the recorded results (bench/results/llama-vs-gpt2-cpu-lean.json), ≈ 4 minutes on 2 shared cores:
    python bench/llama_vs_gpt2.py --sizes 1m --rounds 2 --out bench/results/X.json
    # the earlier comparison with TRL and the HF-path candidate fixes (bench/results/llama-vs-gpt2-cpu.json):
    pip install -c constraints.txt -e ".[bench]"       # trl==1.12.0, for the TRL trials
    python bench/llama_vs_gpt2.py --sizes 1m --rounds 2 --implementations gpt2,llama,hf,hf_eager,hf_static,trl,trl_nogc

What is compared, per size, on the settings of bench/ppo_vs_trl.py (batch 8, 32-token responses that run to the cap
unless EOS is sampled, 4 PPO epochs, 1 minibatch, fixed KL 0.05 with k1, a separate critic initialised from the reward
model, one process):

- ``gpt2``: the GPT-2 bench model of bench/ppo_vs_trl.py in our loop (``rlhf.ppo_trainer.loop.train_ppo``): the lean
  GPT-2 path (rlhf/lean_gpt2.py forwards, KV-cached lean decoder recording the old log-probs);
- ``llama``: a random-init ``LlamaConfig`` model of equal parameter count (same layers, width and heads; grouped-query
  attention with ``num_key_value_heads`` = heads/2 at 0.86 M and heads/4 at 19 M; RMSNorm, SwiGLU with the MLP width
  chosen to match GPT-2's parameter count, RoPE, tied head) in our loop as it is: ``rlhf.lean.supports`` it, so it
  takes the lean path as GPT-2 does (KV-cached lean decoder recording the old log-probs, lean scoring and training
  forwards, policy-then-critic backward);
- ``hf``: the same Llama model with the lean path turned off (:func:`hf_path_only` removes the Llama families from
  ``rlhf.lean.MODULES``, so ``supports`` is False): Hugging Face ``generate()`` (attention "sdpa", transformers'
  default), HF forwards for the scoring and the PPO epochs, old log-probs recomputed: the loop before issue 14;
- ``hf_eager``: ``hf`` with ``attn_implementation="eager"`` (matmul + softmax attention);
- ``hf_static``: ``hf`` with ``generation_config.cache_implementation = "static"`` (preallocated KV cache;
  transformers compiles it automatically only on accelerators, so on the CPU this is the uncompiled static cache);
- ``trl``, ``trl_nogc``: TRL 1.12's ``PPOTrainer`` on the Llama model as shipped / with its ``gc.collect()`` calls
  patched out (``run_trl`` of bench/ppo_vs_trl.py; on the CPU its ``bf16=True`` default is not applied: fp32).

Clock and threads: by default every trial runs on 1 torch thread and is timed by its process CPU time
(``--threads 1 --clock cpu``): on a machine whose cores other work shares, 2-thread wall-clock trials swung up to 10×
(OpenMP threads waiting on a descheduled peer), while one thread's CPU time is what an idle core would take. Wall-clock
episodes/s are recorded too. ``--threads 0 --clock wall`` measures as bench/ppo_vs_trl.py does, on an idle machine.

Precision: fp32 for every implementation (``--precision bf16`` runs ours with ``launch.mixed_precision: bf16``: on an
AVX2-only CPU without bf16 instructions its GEMMs are several times slower than fp32; see docs/performance.md).

Every trial runs in a fresh process and trials alternate over the implementations for ``--rounds`` rounds; medians are
compared; warm-up iterations are excluded. Every trial of our loop also records its phases per iteration: generation
(``sample()``), scoring (rollout minus generation: policy recompute when the sampler's log-probs are not used,
reference, critic, reward model), the PPO epochs (``optimise``) and the rest. ``--check`` compares rlhf.lean_llama
with the Hugging Face forward (logits, gradients, decoder log-probs, scorer) for a Llama and a Qwen2 config (with
biases) at the 0.86 M shape. The JSON written by ``--out`` holds the CPU (``lscpu``: model and flags), the library
versions, the check, every trial and the summary; results of earlier runs in the same file are kept (each names its
run).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from machine import lscpu  # noqa: E402

SIZES = {  # GPT-2 shapes of bench/ppo_vs_trl.py; Llama: the same trunk, GQA, MLP width matched on parameters
    "1m": {"n_layer": 4, "n_head": 4, "n_embd": 128, "kv_heads": 2},
    "20m": {"n_layer": 6, "n_head": 8, "n_embd": 512, "kv_heads": 2},
}
PRECISION = {"1m": "fp32", "20m": "fp32"}
ITERATIONS = {"1m": 12, "20m": 2}
WARMUP = {"1m": 2, "20m": 1}
OURS = ("gpt2", "llama", "hf", "hf_eager", "hf_static")
IMPLEMENTATIONS = OURS + ("trl", "trl_nogc")
DEFAULT_IMPLEMENTATIONS = {"1m": ("gpt2", "llama", "hf"), "20m": ("gpt2", "llama", "hf")}


# ----------------------------------------------------------------------------------------------------------------
# The Hugging Face path for comparison


def hf_path_only() -> None:
    """Turn the lean path off for Llama-family models in this process: ``rlhf.lean.supports`` is then False for them,
    so sampling takes ``generate()`` and every forward the HF model (GPT-2 keeps its lean path)."""
    from rlhf import lean, lean_llama

    for family in lean_llama.FAMILIES:
        lean.MODULES.pop(family, None)


# ----------------------------------------------------------------------------------------------------------------
# Models


def llama_config(size: str, vocab: int, tokenizer, family: str = "llama"):
    """The Llama shape of ``size``: GPT-2's trunk with GQA, the SwiGLU width matching GPT-2's parameter count."""
    from transformers import LlamaConfig, Qwen2Config

    shape = SIZES[size]
    layers, width, heads, kv_heads = shape["n_layer"], shape["n_embd"], shape["n_head"], shape["kv_heads"]
    head_dim = width // heads
    gpt2 = vocab * width + 64 * width + layers * (12 * width**2 + 13 * width) + 2 * width  # n_positions 64
    attention = 2 * width * heads * head_dim + 2 * width * kv_heads * head_dim
    rest = vocab * width + layers * (attention + 2 * width) + width
    intermediate = round((gpt2 - rest) / (3 * width * layers) / 32) * 32
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family]
    return config_class(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def embedded_tokenizer():
    from rlhf import embedded

    rng = random.Random(0)
    return embedded.train_tokenizer([embedded.sample_review(rng) for _ in range(2000)]), rng


def build(folder: Path, size: str, arch: str) -> dict:
    """Random-init policy (+ tokenizer), reward/critic init from it, prompts: the files of bench/ppo_vs_trl.py."""
    from transformers import LlamaForCausalLM

    from rlhf import embedded
    from rlhf.config import TinyModelConfig
    from rlhf.modeling import RewardNormalization, build_tiny_gpt2, count_parameters, load_scalar_model, set_seed

    tokenizer, rng = embedded_tokenizer()
    shape = SIZES[size]
    if arch == "gpt2":
        gpt2_shape = {k: shape[k] for k in ("n_layer", "n_head", "n_embd")}
        policy = build_tiny_gpt2(TinyModelConfig(n_positions=64, **gpt2_shape), tokenizer, seed=0)
    else:
        set_seed(0)
        policy = LlamaForCausalLM(llama_config(size, len(tokenizer), tokenizer))
    policy.save_pretrained(folder / "sft")
    tokenizer.save_pretrained(folder / "sft")
    load_scalar_model(folder / "sft", tokenizer.pad_token_id).save_pretrained(folder / "reward")
    tokenizer.save_pretrained(folder / "reward")
    RewardNormalization(0.0, 1.0).save(folder / "reward")
    prompts = [embedded.split_prompt(embedded.sample_review(rng), rng)[0] for _ in range(512)]
    (folder / "prompts.json").write_text(json.dumps(prompts))
    config = policy.config
    info = {"arch": arch, "parameters": count_parameters(policy), "vocab": len(tokenizer)}
    if arch != "gpt2":
        info.update(
            intermediate_size=config.intermediate_size,
            num_key_value_heads=config.num_key_value_heads,
            attn_implementation=policy.config._attn_implementation,
        )
    return info


# ----------------------------------------------------------------------------------------------------------------
# Trials (each in its own process)


class Clock:
    """Stands in for the ``time`` module where a trial's timings are taken: ``perf_counter()`` returns this process's
    CPU time (``--clock cpu``: all its threads, i.e. one core's time at 1 thread, whatever else runs on the machine) or
    the wall clock, and records the wall clock of every call in ``wall``."""

    def __init__(self, cpu: bool):
        self.cpu = cpu
        self.wall: list[float] = []

    def perf_counter(self) -> float:
        self.wall.append(time.perf_counter())
        return time.process_time() if self.cpu else self.wall[-1]


class PhaseTimer:
    """Time (on ``clock``) of named functions of rlhf.ppo_trainer.experience, per call, in call order."""

    def __init__(self, clock: Clock):
        self.clock = clock
        self.calls: dict[str, list[float]] = {}

    def wrap(self, module, name: str, label: str) -> None:
        original = getattr(module, name)

        def timed(*args, **kwargs):
            started = self.clock.perf_counter()
            result = original(*args, **kwargs)
            self.calls.setdefault(label, []).append(self.clock.perf_counter() - started)
            return result

        setattr(module, name, timed)


def run_ours(folder: Path, args: argparse.Namespace) -> dict:
    from accelerate import Accelerator

    import rlhf.ppo_trainer.experience as experience
    import rlhf.ppo_trainer.loop
    from rlhf.config import PPOConfig
    from rlhf.ppo_trainer.loop import train_ppo
    from rlhf.ppo_trainer.models import load_ppo_models
    from rlhf.ppo_trainer.optimise import prepare_training

    variant = args.implementation
    if variant.startswith("hf"):
        hf_path_only()
    rlhf.ppo_trainer.loop.time = Clock(args.clock == "cpu")  # the loop's timing/* records, on the same clock
    clock = Clock(args.clock == "cpu")
    timer = PhaseTimer(Clock(args.clock == "cpu"))
    timer.wrap(experience, "sample", "generation")
    timer.wrap(experience, "policy_logprobs_and_values", "policy_recompute")
    timer.wrap(experience, "reference_logprobs", "reference")
    timer.wrap(experience, "response_values", "critic")
    timer.wrap(experience, "reward_scores", "reward")
    config = PPOConfig(
        iterations=args.warmup + args.iterations,
        rollout_batch_size=args.batch,
        num_minibatches=args.minibatches,
        ppo_epochs=args.ppo_epochs,
        learning_rate=args.learning_rate,
        anneal_lr=False,
        response_length=args.response_length,
        kl_coef=args.kl_coef,
        adaptive_kl=False,
        kl_estimator="k1",
        mixed_precision="bf16" if args.precision == "bf16" else "no",
        value_model="critic",
        value_init="reward",
    )
    accelerator = Accelerator(cpu=True, mixed_precision=config.mixed_precision)
    models = load_ppo_models(config, folder / "sft", folder / "reward")
    if variant == "hf_eager":
        for model in (models.policy, models.reference, models.critic, models.reward_model):
            model.set_attn_implementation("eager")
    if variant == "hf_static":
        models.policy.generation_config.cache_implementation = "static"
    prepared = prepare_training(models, config, accelerator)
    prompts = json.loads((folder / "prompts.json").read_text())
    ends: list[float] = []

    def mark(step, accelerator, prepared):
        ends.append(clock.perf_counter())

    history = train_ppo(models, prompts, config, 0, accelerator, prepared=prepared, on_iteration=mark)
    timed = history[args.warmup :]
    n = len(history)

    def per_iteration(label: str) -> list[float]:  # one call per iteration (batch 8 = one forward chunk)
        calls = timer.calls.get(label, [])
        return calls[-len(timed) :] if len(calls) == n else [0.0] * len(timed)

    generation = per_iteration("generation")
    phases = {
        "generation": generation,
        "scoring": [r["timing/rollout"] - g for r, g in zip(timed, generation)],
        "optimise": [r["timing/optimise"] for r in timed],
        "other": [r["timing/iteration"] - r["timing/rollout"] - r["timing/optimise"] for r in timed],
    }
    for label in ("policy_recompute", "reference", "critic", "reward"):
        phases["scoring/" + label] = per_iteration(label)
    return {
        "seconds": ends[-1] - ends[args.warmup - 1],
        "wall_seconds_timed": clock.wall[-1] - clock.wall[args.warmup - 1],
        "episodes": args.batch * len(timed),
        "generated_tokens": sum(r["rollout/generated_tokens"] for r in timed),
        "response_columns": statistics.mean(r["rollout/response_columns"] for r in timed),
        "lean": bool(getattr(prepared.module, "lean", False)),
        "attn_implementation": models.policy.config._attn_implementation,
        "phase_ms": {name: 1000 * statistics.median(values) for name, values in phases.items()},
    }


def trial(args: argparse.Namespace) -> None:
    """One implementation in this (fresh) process; prints a JSON line."""
    from ppo_vs_trl import peak_rss_mib

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.folder)
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    if args.implementation in OURS:
        result = run_ours(folder, args)
    else:
        import ppo_vs_trl

        clock = Clock(args.clock == "cpu")
        ppo_vs_trl.time = clock  # run_trl reads the clock only in its on_step_end callback
        result = ppo_vs_trl.run_trl(folder, args, args.implementation == "trl_nogc")
        timed = clock.wall[args.warmup - 1 :]
        result["wall_seconds_timed"] = timed[-1] - timed[0]
    result.update(
        implementation=args.implementation,
        peak_rss_mib=peak_rss_mib(),
        wall_seconds=time.perf_counter() - started,
        threads=torch.get_num_threads(),
        # CPU seconds of this process per wall second over the whole trial (≈ threads when nothing competes) and the
        # machine's 1-minute load average before and after: to spot trials another process slowed down
        cpu_per_wall=(lambda u: (u.ru_utime + u.ru_stime) / (time.perf_counter() - started))(
            resource.getrusage(resource.RUSAGE_SELF)
        ),
        loadavg=[load_before, os.getloadavg()[0]],
    )
    print("TRIAL " + json.dumps(result), flush=True)


def spawn(implementation: str, folder: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--trial", implementation, "--folder", str(folder)]
    for name in (
        "batch",
        "minibatches",
        "ppo_epochs",
        "response_length",
        "warmup",
        "iterations",
        "learning_rate",
        "kl_coef",
        "precision",
        "threads",
        "clock",
    ):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("TRIAL ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{implementation} trial failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        )
    return json.loads(lines[-1][len("TRIAL ") :])


# ----------------------------------------------------------------------------------------------------------------
# Check of rlhf.lean_llama against the Hugging Face forward


def check(families: tuple[str, ...] = ("llama", "qwen2")) -> dict:
    """Max deviations of rlhf.lean_llama from HF (fp32, 0.86 M shape, left-padded batch of 8)."""
    from transformers import AutoModelForSequenceClassification, LlamaForCausalLM, Qwen2ForCausalLM

    from rlhf import lean
    from rlhf.modeling import encode_prompts, set_seed
    from rlhf.sampling import lean_sample

    tokenizer, rng = embedded_tokenizer()
    tokenizer.padding_side = "left"
    from rlhf import embedded

    prompts = [embedded.split_prompt(embedded.sample_review(rng), rng)[0] for _ in range(8)]
    query_ids, query_mask = encode_prompts(tokenizer, prompts)
    results = {}
    for family in families:
        set_seed(0)
        config = llama_config("1m", len(tokenizer), tokenizer, family)
        model_class = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[family]
        model = model_class(config).eval()
        if family == "qwen2":  # random biases, so that the bias path is exercised
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    nn.init.normal_(proj.bias, std=0.5)
        assert lean.supports(model), family
        # decode 24 tokens with the lean decoder, then compare teacher-forced HF forwards over the whole sequences
        uniforms = torch.rand(8, 24, generator=torch.Generator().manual_seed(0))
        drawn = lean_sample(
            model,
            query_ids,
            query_mask,
            uniforms=uniforms,
            max_new_tokens=uniforms.shape[1],
            temperature=1.0,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        responses = drawn.responses
        eos = responses == tokenizer.eos_token_id
        response_mask = (eos.long().cumsum(1) - eos.long()) == 0  # up to and including the first EOS
        ids = torch.cat([query_ids, responses], 1)
        mask = torch.cat([query_mask, response_mask.long()], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hf_logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        lean_logits = lean.lm_logits(model, lean.full_forward(model, ids, mask))
        real = mask.bool()
        q = query_ids.shape[1]
        hf_logprobs = torch.log_softmax(hf_logits[:, q - 1 : -1].float(), -1).gather(2, responses[..., None])[..., 0]
        hf_logprobs = hf_logprobs * response_mask  # the decoder records 0 after a row's EOS
        # gradients of a scalar through both forwards
        weights = torch.randn_like(hf_logits)
        hf_grads = torch.autograd.grad((hf_logits * weights)[real].sum(), list(model.parameters()))
        lean_grads = torch.autograd.grad((lean_logits * weights)[real].sum(), list(model.parameters()))
        grad_error = max(
            float((a - b).abs().max() / b.abs().max().clamp(min=1e-12)) for a, b in zip(lean_grads, hf_grads)
        )
        # the scorer class (critic / reward model) through the same trunk
        with tempfile.TemporaryDirectory(prefix="lean-llama-check-") as folder:
            model.save_pretrained(folder)
            scorer = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1).eval()
        hf_scores = scorer.score(
            scorer.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
        )
        lean_scores = scorer.score(lean.full_forward(scorer, ids, mask))
        hf_logits, lean_logits, hf_scores, lean_scores = (
            t.detach() for t in (hf_logits, lean_logits, hf_scores, lean_scores)
        )
        results[family] = {
            "logits_max_abs_error": float((hf_logits - lean_logits)[real].abs().max()),
            "decoder_logprob_max_abs_error": float((hf_logprobs - drawn.logprobs).abs().max()),
            "grad_max_relative_error": grad_error,
            "scorer_max_abs_error": float((hf_scores - lean_scores)[real].abs().max()),
        }
    return results


# ----------------------------------------------------------------------------------------------------------------
# Summary


def summarise(size: str, infos: dict, trials: dict[str, list[dict]], precision: str) -> dict:
    eps = {name: statistics.median(t["episodes"] / t["seconds"] for t in trials[name]) for name in trials}
    wall = {name: statistics.median(t["episodes"] / t["wall_seconds_timed"] for t in trials[name]) for name in trials}
    phases = {
        name: {
            phase: statistics.median(t["phase_ms"][phase] for t in trials[name])
            for phase in trials[name][0]["phase_ms"]
        }
        for name in trials
        if name in OURS
    }
    trl = [eps[name] for name in ("trl", "trl_nogc") if name in eps]
    result = {
        "size": size,
        "precision_ours": precision,
        "models": infos,
        "episodes_per_second": eps,
        "episodes_per_wall_second": wall,
        "cpu_per_wall": {name: statistics.median(t["cpu_per_wall"] for t in trials[name]) for name in trials},
        "ratio_to_gpt2": {name: eps[name] / eps["gpt2"] for name in eps} if "gpt2" in eps else {},
        "ratio_to_trl": {name: eps[name] / eps["trl"] for name in eps} if "trl" in eps else {},
        "ratio_to_trl_nogc": {name: eps[name] / eps["trl_nogc"] for name in eps} if "trl_nogc" in eps else {},
        "phase_ms": phases,
        "peak_rss_mib": {name: statistics.median(t["peak_rss_mib"] for t in trials[name]) for name in trials},
        "trials": {name: [round(t["episodes"] / t["seconds"], 2) for t in trials[name]] for name in trials},
        "best_trl": max(trl) if trl else None,
    }
    return result


def ratio(result: dict, key: str, name: str) -> str:
    return f"{result[key][name]:.2f}" if result[key] else "–"


def markdown(results: list[dict]) -> str:
    rows = [
        "| size | implementation | episodes/s | ÷ gpt2 | ÷ TRL | ÷ TRL no gc | generation ms | scoring ms "
        "| PPO epochs ms | other ms | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name, value in r["episodes_per_second"].items():
            ph = r["phase_ms"].get(name)
            cells = [f"{ph[p]:.0f}" for p in ("generation", "scoring", "optimise", "other")] if ph else ["–"] * 4

            rows.append(
                f"| {r['size']} | {name} | {value:.2f} | "
                + " | ".join(ratio(r, key, name) for key in ("ratio_to_gpt2", "ratio_to_trl", "ratio_to_trl_nogc"))
                + " | "
                + " | ".join(cells)
                + f" | {r['peak_rss_mib'][name]:.0f} |"
            )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1m,20m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--minibatches", type=int, default=1)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-6)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=0, help="untimed first iterations (0: by size)")
    parser.add_argument("--iterations", type=int, default=0, help="timed iterations per trial (0: by size)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds over the implementations")
    parser.add_argument("--implementations", default="", help="comma list for every size (default: by size)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per trial (0: torch's default)")
    parser.add_argument(
        "--clock", default="cpu", choices=["cpu", "wall"], help="time trials by process CPU time or wall clock"
    )
    parser.add_argument("--precision", default="", help="fp32 or bf16 for our loop (default: by size)")
    parser.add_argument("--check", action="store_true", help="only compare rlhf.lean_llama with HF")
    parser.add_argument("--skip-check", action="store_true", help="do not run the --check comparison first")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--trial", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.device = "cpu"  # run_trl of bench/ppo_vs_trl.py reads it
    if args.trial:
        args.implementation = args.trial
        trial(args)
        return
    checked = None if args.skip_check else check()
    print("rlhf.lean_llama against HF: " + json.dumps(checked), flush=True)
    if args.check:
        return
    results = []
    with tempfile.TemporaryDirectory(prefix="llama-vs-gpt2-") as tmp:
        for size in args.sizes.split(","):
            names = args.implementations.split(",") if args.implementations else list(DEFAULT_IMPLEMENTATIONS[size])
            infos = {}
            for arch in ("gpt2", "llama"):
                if any((name == "gpt2") == (arch == "gpt2") for name in names):
                    infos[arch] = build(Path(tmp) / size / arch, size, arch)
            size_args = argparse.Namespace(**vars(args))
            size_args.iterations = args.iterations or ITERATIONS[size]
            size_args.warmup = args.warmup or WARMUP[size]
            size_args.precision = args.precision or PRECISION[size]
            trials: dict[str, list[dict]] = {name: [] for name in names}
            for round_index in range(args.rounds):
                for name in names:
                    folder = Path(tmp) / size / ("gpt2" if name == "gpt2" else "llama")
                    result = spawn(name, folder, size_args)
                    trials[name].append(result)
                    phases = result.get("phase_ms", {})
                    print(
                        f"{size} round {round_index + 1} {name}: {result['episodes'] / result['seconds']:.2f} "
                        f"episodes/s, phases ms {json.dumps({k: round(v) for k, v in phases.items()})}"
                        f", peak RSS {result['peak_rss_mib']:.0f} MiB, CPU/wall {result['cpu_per_wall']:.2f}, "
                        f"load {result['loadavg'][0]:.1f}→{result['loadavg'][1]:.1f}",
                        flush=True,
                    )
            results.append(summarise(size, infos, trials, size_args.precision))
    print(markdown(results), flush=True)
    import transformers

    record = {
        "cpu": lscpu(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "settings": {k: str(v) for k, v in vars(args).items() if k not in ("trial", "folder", "out", "check")},
        "lean_llama_check": checked,
        "results": results,
    }
    for result in results:
        result["run"] = time.strftime("%Y-%m-%d %H:%M")
    if args.out:  # a file from earlier runs keeps their results: each result names its run, ratios are within a run
        if args.out.exists():
            old = json.loads(args.out.read_text())
            record["results"] = old["results"] + results
            record["runs"] = old.get("runs", []) + [record["settings"]]
            record["lean_llama_check"] = checked or old.get("lean_llama_check")
        args.out.write_text(json.dumps(record, indent=2))
    print(json.dumps({r["size"]: r["ratio_to_gpt2"] for r in results}))


if __name__ == "__main__":
    main()
