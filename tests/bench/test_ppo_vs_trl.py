"""bench/ppo_vs_trl.py's bookkeeping (not its timings): FLOPs, ratios from any subset of implementations, the machine
report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import machine  # noqa: E402
import ppo_vs_trl  # noqa: E402

INFO = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab": 100, "parameters": 1000}
ARGS = argparse.Namespace(batch=8, ppo_epochs=4, device="cpu")


def trial(eps: float, rss: float) -> dict:
    return {
        "episodes": 8 * 4,
        "seconds": 8 * 4 / eps,
        "generated_tokens": 100,
        "query_length": 8,
        "response_columns": 16,
        "peak_rss_mib": rss,
        "mixed_precision": "no",
    }


def test_forward_flops_count_weights_head_and_attention() -> None:
    # 2 FLOPs per multiply-add: 2·(12·L·d² + head) per token, plus 4·L·context·d for QKᵀ and AV
    assert ppo_vs_trl.forward_flops(2, 64, 6400, tokens=10, context=5) == 10 * (
        2 * (12 * 2 * 64**2 + 6400) + 4 * 2 * 5 * 64
    )


@pytest.mark.parametrize("names", [("ours", "ours_bf16", "trl", "trl_nogc"), ("ours", "ours_bf16", "trl"), ("ours",)])
def test_summary_ratios_from_whichever_implementations_ran(names: tuple[str, ...]) -> None:
    rates = {"ours": 4.0, "ours_bf16": 8.0, "trl": 2.0, "trl_nogc": 2.5}
    trials = {name: [trial(rates[name], 1000.0 if name.startswith("trl") else 800.0)] for name in names}
    peaks = {"fp32": 2e11, "bf16": 8e11}
    result = ppo_vs_trl.summarise("1m", INFO, trials, peaks, ARGS)
    best = "ours_bf16" if "ours_bf16" in names else "ours"
    assert result["ours"] == best
    assert result["speedup_vs_trl"] == (rates[best] / 2.0 if "trl" in names else None)
    assert result["speedup_vs_trl_nogc"] == (rates[best] / 2.5 if "trl_nogc" in names else None)
    assert result["rss_ratio"] == (0.8 if "trl" in names else None)
    flops = ppo_vs_trl.iteration_flops(INFO, 100, 8, 8, 16, 4) * rates[best] / 8
    assert result["model_flops_per_second"] == pytest.approx(flops)
    assert result["best_peak_fraction"] == pytest.approx(flops / 8e11)
    assert result["peak_fraction"] == pytest.approx(flops / peaks["bf16" if best == "ours_bf16" else "fp32"])
    assert "| 1m | " + best in ppo_vs_trl.markdown([result])


def test_the_machine_report_names_the_cpu_and_its_matrix_isa() -> None:
    described = machine.describe("cpu")
    assert described["cpu"] and described["torch_threads"] >= 1
    assert set(described["matrix_isa"]) <= set(machine.MATRIX_FLAGS)
    line = machine.one_line(described)
    assert line.startswith(described["cpu"]) and "matrix ISA" in line
    assert ("no AMX" in line) == (not any(flag.startswith("amx") for flag in described["matrix_isa"]))
