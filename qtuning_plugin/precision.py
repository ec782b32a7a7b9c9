"""bf16 only where the hardware computes it natively.

On a CPU without bf16 instructions (no AVX512-BF16, no AMX) PyTorch emulates bf16 matmuls, and
autocast makes training far slower, not faster: on a 2-core AMD EPYC with AVX2 a [256, 576] x
[576, 1536] matmul took 24 ms in fp32 and 1.2 s under bf16 autocast (0.34 s on an idle machine:
15-50x slower); ``qtuning demo`` went from about 2 minutes to about an hour. So bf16 is used on
CUDA devices that support it natively (Ampere and newer, ROCm) and on CPUs with AVX512-BF16 or AMX,
and fp32 everywhere else (MPS included).
"""

from __future__ import annotations

import contextlib

import torch

CPUINFO = "/proc/cpuinfo"  # the fallback where torch lacks its (private) probes
_CPU_FLAGS = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX"}


def _device_type(device) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type


def _cpuinfo_flags() -> set[str]:
    try:
        with open(CPUINFO, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _cpu_bf16_feature() -> str | None:
    """The CPU's native bf16 feature ("AVX512-BF16" / "AMX"), or None."""
    probes = {"AVX512-BF16": getattr(torch.cpu, "_is_avx512_bf16_supported", None),  # private torch
              "AMX": getattr(torch.cpu, "_is_amx_tile_supported", None)}
    if all(probes.values()):
        with contextlib.suppress(Exception):  # a probe that fails: read /proc/cpuinfo instead
            return next((name for name, probe in probes.items() if probe()), None)
    flags = _cpuinfo_flags()
    return next((label for flag, label in _CPU_FLAGS.items() if flag in flags), None)


def native_bf16(device=None) -> bool:
    """Whether ``device`` (default: CUDA if available, else CPU) computes bf16 natively."""
    kind = _device_type(device)
    if kind == "cuda":  # Ampere and newer, ROCm; not the emulation on older GPUs
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if kind == "cpu":
        return _cpu_bf16_feature() is not None
    return False


def compute_dtype(device=None) -> torch.dtype:
    """bfloat16 where it is native, else float32 (e.g. bitsandbytes' 4-bit compute dtype)."""
    return torch.bfloat16 if native_bf16(device) else torch.float32


def describe_precision(device=None) -> str:
    """One line: the precision chosen for ``device`` and why."""
    kind = _device_type(device)
    if native_bf16(device):
        where = f"CPU with {_cpu_bf16_feature()}" if kind == "cpu" else kind.upper()
        return f"precision: bf16 autocast ({where})"
    if kind == "cpu":
        try:
            isa = torch.backends.cpu.get_cpu_capability()
        except Exception:  # noqa: BLE001
            isa = "unknown"
        return f"precision: fp32 (this CPU has no native bf16: {isa}; bf16 autocast would be 15-50x slower)"
    if kind == "cuda":
        return "precision: fp32 (this GPU has no native bf16: pre-Ampere)"
    return f"precision: fp32 (bf16 is used only on CUDA and on CPUs with AVX512-BF16 or AMX, not on {kind})"
