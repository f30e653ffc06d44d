"""Peak memory and throughput of PPO's memory options on a GPT-2 of ≥ 20 M parameters (docs/performance.md).

    python bench/memory_table.py                                          # CPU: peak RSS, episodes/s
    python bench/memory_table.py --device cuda --mixed-precision bf16     # GPU: peak GPU memory too
    python bench/memory_table.py --layers 12 --hidden 768 --episodes 64   # another model / batch
    python bench/memory_table.py --only "K = 4" --checkpointing off        # PPO vs GRPO at the same settings

Every configuration runs in a fresh process (peak RSS only ever grows) on the same randomly initialised policy
(7 layers × 512 hidden ≈ 22 M parameters with the embedded 512-token vocabulary) and a reward model/critic built
from it. An untrained policy rarely samples EOS, so every episode is full length: the worst case for memory.
Timing: mean of the iterations after the first (warm-up). Prints a markdown table; --out also writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import machine  # noqa: E402

# (label, models held in memory, PPOConfig options)
CONFIGURATIONS: list[tuple[str, str, dict]] = [
    ("full policy + separate critic + reference", "policy, reference, critic, RM", {"value_model": "critic"}),
    ("value head on the policy trunk + reference", "policy, reference, RM", {"value_model": "head"}),
    (
        "LoRA r=16 + separate critic, adapter-off reference",
        "policy (+adapters), critic, RM",
        {"value_model": "critic", "lora_rank": 16},
    ),
    (
        "LoRA r=16 + value head, adapter-off reference",
        "policy (+adapters), RM",
        {"value_model": "head", "lora_rank": 16},
    ),
    # PPO against a critic-free successor at the same settings (K = 4 samples per prompt), docs/algorithms.md
    ("PPO, K = 4 per prompt, separate critic", "policy, reference, critic, RM", {"group_size": 4}),
    ("GRPO, K = 4 per prompt, no value model", "policy, reference, RM", {"algorithm": "grpo", "group_size": 4}),
]


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_models(folder: Path, layers: int, hidden: int, heads: int) -> int:
    """SFT policy (random init), reward model from it, and prompts; returns the policy's parameter count."""
    from rlhf import embedded
    from rlhf.config import TinyModelConfig
    from rlhf.modeling import build_tiny_gpt2, count_parameters, load_scalar_model

    rng = random.Random(0)
    tokenizer = embedded.train_tokenizer([embedded.sample_review(rng) for _ in range(2000)])
    policy = build_tiny_gpt2(
        TinyModelConfig(n_layer=layers, n_head=heads, n_embd=hidden, n_positions=64), tokenizer, seed=0
    )
    policy.save_pretrained(folder / "sft")
    tokenizer.save_pretrained(folder / "sft")
    load_scalar_model(folder / "sft", tokenizer.pad_token_id).save_pretrained(folder / "reward")
    prompts = [embedded.split_prompt(embedded.sample_review(rng), rng)[0] for _ in range(512)]
    (folder / "prompts.json").write_text(json.dumps(prompts))
    return count_parameters(policy)


def run_configuration(folder: Path, options: dict, args: argparse.Namespace) -> dict:
    """In a fresh process: a few PPO iterations; peak memory and episodes/s."""
    from accelerate import Accelerator

    from rlhf.config import PPOConfig
    from rlhf.ppo_trainer.loop import train_ppo
    from rlhf.ppo_trainer.models import load_ppo_models
    from rlhf.ppo_trainer.optimise import prepare_training

    baseline = peak_rss_mib()  # interpreter + torch + transformers
    config = PPOConfig(
        iterations=args.iterations,
        rollout_batch_size=args.episodes,
        num_minibatches=1,
        ppo_epochs=1,
        response_length=args.response_length,
        mixed_precision=args.mixed_precision,
        **options,
    )
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=args.mixed_precision)
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    models = load_ppo_models(config, folder / "sft", folder / "reward")
    prepared = prepare_training(models, config, accelerator)
    prompts = json.loads((folder / "prompts.json").read_text())
    history = train_ppo(models, prompts, config, 0, accelerator, prepared=prepared)
    timed = history[1:] or history
    result = {
        "trainable_parameters": sum(p.numel() for p in prepared.module.parameters() if p.requires_grad),
        "peak_rss_mib": peak_rss_mib(),
        "baseline_rss_mib": baseline,
        "episodes_per_second": len(timed) * config.rollout_batch_size / sum(r["timing/iteration"] for r in timed),
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
    }
    if accelerator.device.type == "cuda":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    return result


def markdown_table(rows: list[dict], parameters: int, args: argparse.Namespace) -> str:
    gpu = any("peak_gpu_mib" in r for r in rows)
    header = "| configuration | models in memory | grad. ckpt | trainable params | peak RSS MiB (Δ over imports) |"
    header += " peak GPU MiB |" if gpu else ""
    header += " episodes/s |"
    lines = [
        f"Policy {parameters / 1e6:.1f} M parameters, {args.episodes} episodes × "
        f"{args.response_length} tokens per iteration, "
        f"device {rows[0]['device']}, mixed precision {rows[0]['mixed_precision']}.",
        "",
        header,
        "|" + "---|" * (header.count("|") - 1),
    ]
    for r in rows:
        line = (
            f"| {r['label']} | {r['models']} | {'on' if r['gradient_checkpointing'] else 'off'} |"
            f" {r['trainable_parameters'] / 1e6:.1f} M |"
            f" {r['peak_rss_mib']:.0f} ({r['peak_rss_mib'] - r['baseline_rss_mib']:+.0f}) |"
        )
        line += f" {r['peak_gpu_mib']:.0f} |" if gpu else ""
        lines.append(line + f" {r['episodes_per_second']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--episodes", type=int, default=16, help="rollout batch = one minibatch = one micro-batch")
    parser.add_argument("--response-length", type=int, default=32)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--only", default="", help="run the configurations whose label contains this text")
    parser.add_argument("--checkpointing", choices=["both", "off"], default="both", help="off: skip the ckpt runs")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # index into the run list, in a fresh process
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    runs = [
        (label, held, {**options, "gradient_checkpointing": gc})
        for label, held, options in CONFIGURATIONS
        for gc in ((False, True) if args.checkpointing == "both" else (False,))
        if args.only in label
    ]
    if args.child is not None:
        print(json.dumps(run_configuration(args.folder, runs[args.child][2], args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        parameters = build_models(folder, args.layers, args.hidden, args.heads)
        rows = []
        for index, (label, held, options) in enumerate(runs):
            started = time.perf_counter()
            child = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--child", str(index), "--folder", str(folder)],
                capture_output=True,
                text=True,
                check=False,
            )
            if child.returncode:
                raise SystemExit(f"{label}: failed\n{child.stderr[-3000:]}")
            row = {
                "label": label,
                "models": held,
                "gradient_checkpointing": options["gradient_checkpointing"],
                **json.loads(child.stdout.strip().splitlines()[-1]),
            }
            rows.append(row)
            print(
                f"{label}, checkpointing {row['gradient_checkpointing']}: {json.dumps(row)} "
                f"({time.perf_counter() - started:.0f} s)",
                file=sys.stderr,
            )
    table = markdown_table(rows, parameters, args)
    described = machine.describe(args.device)
    print(f"machine: {machine.one_line(described)}\n{table}")
    if args.out:
        result = {"machine": described, "parameters": parameters, "rows": rows, "table": table}
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
