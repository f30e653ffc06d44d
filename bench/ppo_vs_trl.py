"""Our PPO stage loop against TRL 1.12's PPOTrainer, side by side on identical settings (docs/performance.md).

    pip install -c constraints.txt -e ".[bench]"        # trl==1.12.0, the last TRL with a PPO trainer
    python bench/ppo_vs_trl.py                          # both sizes on the CPU, ≈ 10 minutes on 2 cores
    python bench/ppo_vs_trl.py --sizes 125m --device cuda --rounds 2   # a GPU

What is compared: the same randomly initialised GPT-2-style policy, reference, reward model and value model (a
separate critic: TRL's architecture), the same prompts, batch, response length (responses run to the length cap
unless a row samples EOS, as in TRL with ``stop_token="eos"``), PPO epochs, minibatches, learning rate, clip ranges,
fixed KL coefficient and k1 estimator, one process, torch's default threads. Four implementations:

- ``ours``: :func:`rlhf.ppo_trainer.loop.train_ppo`, the loop of the ``ppo`` stage, fp32, in a process set up as
  the stage sets up its own (``tasks.stage_io.tune_malloc_for_training``, the heap trimmed after every iteration);
- ``ours_bf16``: the same with ``launch.mixed_precision: bf16`` (kept bf16 copies of the trained weights for every
  forward and backward with fp32 master weights and optimiser state, ``rlhf.ppo_trainer.memory.Bf16Weights``; frozen
  models in bf16; decoding with prepacked bf16 weights, or in fp32 below 4096 rows × width where oneDNN's small bf16
  GEMMs cost more than MKL's fp32 ones);
- ``trl``: TRL 1.12's ``PPOTrainer.train()`` with its shipped defaults (``bf16=True`` mixed precision, which
  accelerate applies on GPUs; on this CPU it runs fp32);
- ``trl_nogc``: the same with the ``gc.collect()`` calls of its loop patched out (its strongest form here).

The headline ratios use the faster of ``ours``/``ours_bf16`` at each size (both are reported).

Every trial runs in a fresh process (peak RSS only grows; nothing leaks between trials), trials alternate
ours/trl/trl_nogc for ``--rounds`` rounds so slow drift of the machine hits all three alike, and the medians are
compared. Throughput counts the iterations after ``--warmup`` (first-call costs excluded on both sides).

``peak_fraction``: model FLOPs of our loop per second over the machine's measured matmul peak in the same dtype
(a probe: the best of large square matmuls). FLOPs counted: generation (prefill + one token per step with the KV
cache), the reference, reward and critic forwards, and forward + backward (3×) of policy and critic in every PPO
epoch; per token 2 × (weight parameters + LM head) + the attention products (Kaplan et al. 2020, §2.1).
``best_peak_fraction``: the same over the better of the two dtypes' peaks. ``speedup_bound_vs_trl``: the speedup over
TRL if our loop's FLOPs ran at 100 % of that peak, i.e. the most any implementation of the same work could reach on
the machine.

Every run reports the machine with its results (``bench/machine.py``: CPU model, family/model, matrix ISA flags
such as amx_bf16 / avx512_bf16, torch's CPU capability; the GPU on CUDA).

The last line printed is one JSON object with the ratios of the largest CPU size and every size's figures.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import machine  # noqa: E402

SIZES = {  # GPT-2 shapes over the embedded 512-token vocabulary
    "1m": {"n_layer": 4, "n_head": 4, "n_embd": 128},  # 0.86 M parameters, the embedded default
    "20m": {"n_layer": 6, "n_head": 8, "n_embd": 512},  # 19.2 M
    "125m": {"n_layer": 12, "n_head": 12, "n_embd": 768},  # GPT-2 small's trunk (85 M + embeddings); GPUs
}
IMPLEMENTATIONS = ("ours", "ours_bf16", "trl", "trl_nogc")


def peak_rss_mib() -> float:
    """Peak resident memory of this process, MiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------------------------------------
# FLOPs


def forward_flops(n_layer: int, n_embd: int, head_params: int, tokens: int, context: int) -> float:
    """Model FLOPs of one forward over ``tokens`` tokens that each attend to ``context`` positions (mean).

    2 FLOPs per multiply-add: 2·12·L·d² for the block weights, 2·head for the LM/score head, 2·2·L·ctx·d for
    QKᵀ and AV (Kaplan et al. 2020, Table 1).
    """
    per_token = 2 * (12 * n_layer * n_embd**2 + head_params) + 4 * n_layer * context * n_embd
    return float(per_token * tokens)


def iteration_flops(shape: dict, vocab: int, batch: int, query: int, response: int, ppo_epochs: int) -> float:
    """Model FLOPs of one PPO iteration with a separate critic (b episodes, q prompt + t response tokens).

    Generation: prefill b·q tokens, then t−1 decoding steps of b tokens (the last sampled token is never fed);
    reference, reward model and critic: one forward over b·(q+t); training: ppo_epochs × 3 × (policy + critic).
    """
    L, d = shape["n_layer"], shape["n_embd"]
    sequence = query + response
    lm = lambda tokens, context: forward_flops(L, d, vocab * d, tokens, context)  # noqa: E731
    scalar = lambda tokens, context: forward_flops(L, d, d, tokens, context)  # noqa: E731
    generation = lm(batch * query, query / 2) + lm(batch * (response - 1), query + response / 2)
    scoring = lm(batch * sequence, sequence / 2) + 2 * scalar(batch * sequence, sequence / 2)
    training = ppo_epochs * 3 * (lm(batch * sequence, sequence / 2) + scalar(batch * sequence, sequence / 2))
    return generation + scoring + training


def matmul_peak(device: str, dtype: str, seconds: float = 3.0) -> float:
    """FLOP/s of the best large square matmul on this machine (its practical peak for dense math)."""
    import torch

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    best = 0.0
    for n in (4096, 8192) if device == "cuda" else (1024, 2048, 3072):
        a = torch.randn(n, n, device=device, dtype=torch_dtype)
        b = torch.randn(n, n, device=device, dtype=torch_dtype)
        for _ in range(2):
            a @ b
        deadline = time.perf_counter() + seconds / 3
        while time.perf_counter() < deadline:
            if device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(4):
                a @ b
            if device == "cuda":
                torch.cuda.synchronize()
            best = max(best, 4 * 2 * n**3 / (time.perf_counter() - started))
    return best


# ----------------------------------------------------------------------------------------------------------------
# Models and data


def build(folder: Path, size: str) -> dict:
    """Random-init policy (+ tokenizer), reward/value model from it, prompts; returns the shape and counts."""
    from rlhf import embedded
    from rlhf.config import TinyModelConfig
    from rlhf.modeling import RewardNormalization, build_tiny_gpt2, count_parameters, load_scalar_model

    rng = random.Random(0)
    tokenizer = embedded.train_tokenizer([embedded.sample_review(rng) for _ in range(2000)])
    shape = SIZES[size]
    policy = build_tiny_gpt2(TinyModelConfig(n_positions=64, **shape), tokenizer, seed=0)
    policy.save_pretrained(folder / "sft")
    tokenizer.save_pretrained(folder / "sft")
    load_scalar_model(folder / "sft", tokenizer.pad_token_id).save_pretrained(folder / "reward")
    tokenizer.save_pretrained(folder / "reward")
    RewardNormalization(0.0, 1.0).save(folder / "reward")
    prompts = [embedded.split_prompt(embedded.sample_review(rng), rng)[0] for _ in range(512)]
    (folder / "prompts.json").write_text(json.dumps(prompts))
    return {"parameters": count_parameters(policy), "vocab": len(tokenizer), **shape}


# ----------------------------------------------------------------------------------------------------------------
# Trials (each in its own process)


def run_ours(folder: Path, args: argparse.Namespace, dtype: str) -> dict:
    from accelerate import Accelerator

    from rlhf.config import PPOConfig
    from rlhf.ppo_trainer.loop import train_ppo
    from rlhf.ppo_trainer.models import load_ppo_models
    from rlhf.ppo_trainer.optimise import prepare_training
    from tasks.stage_io import release_free_heap, tune_malloc_for_training

    tune_malloc_for_training()  # as tasks/ppo.py does
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
        mixed_precision="bf16" if dtype == "bf16" else "no",
        value_model="critic",
        value_init="reward",
    )
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=config.mixed_precision)
    models = load_ppo_models(config, folder / "sft", folder / "reward")
    prepared = prepare_training(models, config, accelerator)
    prompts = json.loads((folder / "prompts.json").read_text())
    ends: list[float] = []
    synchronize = (lambda: __import__("torch").cuda.synchronize()) if args.device == "cuda" else (lambda: None)

    def mark(step, accelerator, prepared):
        synchronize()
        ends.append(time.perf_counter())

    history = train_ppo(
        models, prompts, config, 0, accelerator, prepared=prepared, on_iteration=mark, after_iteration=release_free_heap
    )
    timed = history[args.warmup :]
    return {
        "seconds": ends[-1] - ends[args.warmup - 1],
        "episodes": args.batch * len(timed),
        "generated_tokens": sum(r["rollout/generated_tokens"] for r in timed),
        "query_length": statistics.mean(r["rollout/query_length"] for r in timed),
        "response_columns": statistics.mean(r["rollout/response_columns"] for r in timed),
        "mean_scores": statistics.mean(r["objective/scores"] for r in timed),
    }


def run_trl(folder: Path, args: argparse.Namespace, no_gc: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    if no_gc:  # only TRL's own per-step collections; the interpreter's automatic GC stays as it is
        trl_ppo.gc = type("NoCollect", (), {"collect": staticmethod(lambda *a, **k: 0)})
    generated = []
    original_batch_generation = trl_ppo.batch_generation

    def counting_batch_generation(model, queries, *rest):
        query_responses, logits = original_batch_generation(model, queries, *rest)
        generated.append(queries.shape[0] * (query_responses.shape[1] - queries.shape[1]))
        return query_responses, logits

    trl_ppo.batch_generation = counting_batch_generation
    tokenizer = AutoTokenizer.from_pretrained(folder / "sft")
    tokenizer.padding_side = "left"
    prompts = json.loads((folder / "prompts.json").read_text())
    dataset = Dataset.from_dict({"input_ids": [tokenizer(p)["input_ids"] for p in prompts]})

    def load_lm():
        return AutoModelForCausalLM.from_pretrained(folder / "sft", dtype=torch.float32)

    def load_scalar():
        return AutoModelForSequenceClassification.from_pretrained(folder / "reward", num_labels=1, dtype=torch.float32)

    iterations = args.warmup + args.iterations
    config = PPOConfig(
        output_dir=str(folder / "trl-out"),
        per_device_train_batch_size=args.batch // args.minibatches,
        gradient_accumulation_steps=1,
        num_mini_batches=args.minibatches,
        num_ppo_epochs=args.ppo_epochs,
        total_episodes=args.batch * iterations,
        local_rollout_forward_batch_size=args.batch,
        response_length=args.response_length,
        temperature=1.0,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        kl_coef=args.kl_coef,
        kl_estimator="k1",
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        stop_token="eos",
        missing_eos_penalty=None,
        num_sample_generations=0,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=args.device == "cpu",
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )  # everything else as TRL ships it (bf16=True and gradient_checkpointing=True included)
    ends: list[float] = []
    synchronize = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    class Mark(TrainerCallback):
        def on_step_end(self, *_, **__):
            synchronize()
            ends.append(time.perf_counter())

    ref = load_lm()
    trainer = PPOTrainer(
        args=config,
        processing_class=tokenizer,
        model=load_lm(),
        ref_model=ref,
        reward_model=load_scalar(),
        value_model=load_scalar(),
        train_dataset=dataset,
        callbacks=[Mark()],
    )
    trainer.train()
    timed = ends[args.warmup - 1 :]
    return {
        "seconds": timed[-1] - timed[0],
        "episodes": args.batch * (len(timed) - 1),
        "generated_tokens": sum(generated[args.warmup :]),
        "mixed_precision": trainer.accelerator.mixed_precision,
        "gradient_checkpointing": bool(trainer.model.policy.is_gradient_checkpointing),
    }


def trial(args: argparse.Namespace) -> None:
    """One implementation in this (fresh) process; prints a JSON line."""
    import torch

    folder = Path(args.folder)
    started = time.perf_counter()
    if args.implementation.startswith("ours"):
        result = run_ours(folder, args, "bf16" if args.implementation == "ours_bf16" else "fp32")
    else:
        result = run_trl(folder, args, args.implementation == "trl_nogc")
    result.update(
        implementation=args.implementation,
        peak_rss_mib=peak_rss_mib(),
        wall_seconds=time.perf_counter() - started,
        threads=torch.get_num_threads(),
    )
    if args.device == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    print("TRIAL " + json.dumps(result), flush=True)


def spawn(implementation: str, folder: Path, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--trial", implementation, "--folder", str(folder)]
    for name in (
        "device",
        "batch",
        "minibatches",
        "ppo_epochs",
        "response_length",
        "warmup",
        "iterations",
        "learning_rate",
        "kl_coef",
    ):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    lines = [line for line in done.stdout.splitlines() if line.startswith("TRIAL ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"{implementation} trial failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
        )
    return json.loads(lines[-1][len("TRIAL ") :])


def summarise(
    size: str, info: dict, trials: dict[str, list[dict]], peaks: dict[str, float], args: argparse.Namespace
) -> dict:
    def median(name: str, key: str) -> float:
        return statistics.median(t[key] for t in trials[name])

    eps = {name: statistics.median(t["episodes"] / t["seconds"] for t in trials[name]) for name in trials}
    tokens = {name: statistics.median(t["generated_tokens"] / t["seconds"] for t in trials[name]) for name in trials}
    best = max((name for name in trials if name.startswith("ours")), key=eps.get)
    ours = trials[best]
    peak = peaks["bf16" if best == "ours_bf16" else "fp32"]
    trl_rss = min((median(name, "peak_rss_mib") for name in trials if name.startswith("trl")), default=None)
    versus = lambda name: eps[best] / eps[name] if name in eps else None  # noqa: E731  (not every run has both TRLs)
    flops = statistics.median(
        iteration_flops(
            info, info["vocab"], args.batch, round(t["query_length"]), round(t["response_columns"]), args.ppo_epochs
        )
        * (t["episodes"] / args.batch)
        / t["seconds"]
        for t in ours
    )
    # What 100 % of the matmul peak would give for the same work: the most any implementation of these FLOPs could
    # reach on this machine, as a speedup over TRL (its own FLOPs are more: gradient checkpointing recomputes forwards).
    flops_per_episode = flops / eps[best]
    result = {
        "size": size,
        "parameters": info["parameters"],
        "speedup_bound_vs_trl": peak / flops_per_episode / eps["trl"] if "trl" in eps else None,
        "episodes_per_second": eps,
        "generated_tokens_per_second": tokens,
        "peak_rss_mib": {name: median(name, "peak_rss_mib") for name in trials},
        "ours": best,
        "trl_precision": trials["trl"][0].get("mixed_precision") if "trl" in trials else None,
        "speedup_vs_trl": versus("trl"),
        "speedup_vs_trl_nogc": versus("trl_nogc"),
        "rss_ratio": median(best, "peak_rss_mib") / trl_rss if trl_rss else None,  # against the leaner TRL run
        "model_flops_per_second": flops,
        "matmul_peak_flops_per_second": peak,
        "peak_fraction": flops / peak,
        "best_peak_fraction": flops / max(peaks.values()),
        "trials": {name: [round(t["episodes"] / t["seconds"], 2) for t in trials[name]] for name in trials},
    }
    if args.device == "cuda":
        result["peak_gpu_mib"] = {name: median(name, "peak_gpu_mib") for name in trials}
    return result


def markdown(results: list[dict]) -> str:
    rows = ["| size | implementation | episodes/s | generated tokens/s | peak RSS MiB |", "|---|---|---|---|---|"]
    for r in results:
        for name in r["episodes_per_second"]:
            rows.append(
                f"| {r['size']} ({r['parameters'] / 1e6:.2f} M) | {name} | {r['episodes_per_second'][name]:.1f} | "
                f"{r['generated_tokens_per_second'][name]:.0f} | {r['peak_rss_mib'][name]:.0f} |"
            )
    rows += [
        "",
        "| size | ours | speedup vs TRL | vs TRL without gc | RSS ratio | model TFLOP/s | matmul peak TFLOP/s "
        "| peak fraction | of the best peak | speedup vs TRL at 100 % of peak |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cell = lambda value, digits=2: "–" if value is None else f"{value:.{digits}f}"  # noqa: E731
    for r in results:
        rows.append(
            f"| {r['size']} | {r['ours']} | {cell(r['speedup_vs_trl'])} | {cell(r['speedup_vs_trl_nogc'])} | "
            f"{cell(r['rss_ratio'])} | {r['model_flops_per_second'] / 1e12:.3f} | "
            f"{r['matmul_peak_flops_per_second'] / 1e12:.3f} | {r['peak_fraction']:.2f} | "
            f"{r['best_peak_fraction']:.2f} | {cell(r['speedup_bound_vs_trl'], 1)} |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1m,20m")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--minibatches", type=int, default=1)
    parser.add_argument("--ppo-epochs", type=int, default=4)
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-6)
    parser.add_argument("--kl-coef", type=float, default=0.05)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=0, help="timed iterations per trial (0: by size)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating ours/trl/trl_nogc rounds")
    parser.add_argument("--implementations", default=",".join(IMPLEMENTATIONS))
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--trial", choices=IMPLEMENTATIONS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial:
        args.implementation = args.trial
        trial(args)
        return
    import torch

    described = machine.describe(args.device)
    print(f"machine: {machine.one_line(described)}", flush=True)
    peaks = {dtype: matmul_peak(args.device, dtype) for dtype in ("fp32", "bf16")}
    print(
        f"matmul peak ({args.device}, {torch.get_num_threads()} threads): "
        + ", ".join(f"{d} {p / 1e9:.1f} GFLOP/s" for d, p in peaks.items()),
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="ppo-vs-trl-") as tmp:
        for size in args.sizes.split(","):
            folder = Path(tmp) / size
            info = build(folder, size)
            size_args = argparse.Namespace(**vars(args))
            size_args.iterations = args.iterations or {"1m": 20, "20m": 4, "125m": 10}[size]
            trials: dict[str, list[dict]] = {name: [] for name in args.implementations.split(",")}
            for round_index in range(args.rounds):
                for name in trials:
                    result = spawn(name, folder, size_args)
                    trials[name].append(result)
                    print(
                        f"{size} round {round_index + 1} {name}: "
                        f"{result['episodes'] / result['seconds']:.2f} episodes/s, "
                        f"peak RSS {result['peak_rss_mib']:.0f} MiB",
                        flush=True,
                    )
            results.append(summarise(size, info, trials, peaks, size_args))
    print(markdown(results), flush=True)
    if args.out:
        args.out.write_text(json.dumps({"machine": described, "matmul_peaks": peaks, "results": results}, indent=2))
    headline = results[-1]

    def extreme(pick, key: str) -> float | None:  # over the sizes that measured it
        values = [r[key] for r in results if r[key] is not None]
        return round(pick(values), 3) if values else None

    print(
        json.dumps(
            {
                "speedup_vs_trl": extreme(min, "speedup_vs_trl"),
                "speedup_vs_trl_nogc": extreme(min, "speedup_vs_trl_nogc"),
                "rss_ratio": extreme(max, "rss_ratio"),
                "peak_fraction": round(headline["peak_fraction"], 3),
                "best_peak_fraction": round(headline["best_peak_fraction"], 3),
                "device": args.device,
                "machine": machine.one_line(described),
                "sizes": {
                    r["size"]: {
                        k: r[k]
                        for k in (
                            "parameters",
                            "ours",
                            "speedup_vs_trl",
                            "speedup_vs_trl_nogc",
                            "rss_ratio",
                            "peak_fraction",
                            "best_peak_fraction",
                            "speedup_bound_vs_trl",
                        )
                    }
                    for r in results
                },
            }
        )
    )


if __name__ == "__main__":
    main()
