"""What machine a benchmark ran on, reported with every result (docs/performance.md keeps a table per machine type).

The matrix ISA decides what bf16 can reach on a CPU: AMX tiles (Intel Sapphire Rapids and later), AVX512-BF16 dot
products (Intel Cooper Lake, AMD Zen 4/5), or neither (bf16 then runs through fp32 conversions and is slower than
fp32). On CUDA the GPU's name says which tensor cores it has.
"""

from __future__ import annotations

import subprocess

MATRIX_FLAGS = ("amx_bf16", "amx_tile", "amx_int8", "amx_fp16", "avx512_bf16", "avx512_fp16", "avx512f", "avx2")


def lscpu() -> dict:
    """lscpu's fields that identify the CPU (model, family, counts, caches, flags); {} where lscpu is missing."""
    keep = ("Model name", "CPU family", "Model", "CPU(s)", "Thread(s) per core", "L2 cache", "L3 cache", "Flags")
    fields = {}
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in keep:
                fields[key.strip()] = value.strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return fields


def describe(device: str = "cpu") -> dict:
    """The CPU (model, family/model numbers, threads torch uses, matrix ISA flags, torch's detected capability,
    whether oneDNN has bf16 kernels) and, with ``device="cuda"``, the GPU."""
    import torch

    cpu = lscpu()
    flags = set(cpu.get("Flags", "").split())
    described = {
        "cpu": cpu.get("Model name", "unknown"),
        "cpu_family_model": f"{cpu.get('CPU family', '?')}/{cpu.get('Model', '?')}",
        "cpus": cpu.get("CPU(s)"),
        "torch_threads": torch.get_num_threads(),
        "matrix_isa": [flag for flag in MATRIX_FLAGS if flag in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "torch": torch.__version__,
    }
    if device == "cuda":
        described["gpu"] = torch.cuda.get_device_name()
        described["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return described


def one_line(described: dict) -> str:
    """E.g. "AMD EPYC (family/model 26/2), 2 CPUs, 2 torch threads, matrix ISA avx512_bf16 avx512f avx2, no AMX"."""
    isa = described["matrix_isa"]
    line = (
        f"{described['cpu']} (family/model {described['cpu_family_model']}), {described['cpus']} CPUs, "
        f"{described['torch_threads']} torch threads, matrix ISA {' '.join(isa) or 'none'}"
        f"{'' if any(f.startswith('amx') for f in isa) else ', no AMX'}"
    )
    if "gpu" in described:
        line += f"; GPU {described['gpu']} (compute capability {described['gpu_capability']})"
    return line
