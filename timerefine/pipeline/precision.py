"""``trainer.precision: auto``: bf16 autocast where the hardware computes bf16 natively and it pays, else fp32.

bf16 autocast is many times slower than fp32 where bf16 is emulated (an AVX2-only CPU, a GPU older
than Ampere). On a CPU with AVX-512 BF16 / AMX it pays for wider matmuls (the tiny LM 256 wide: 0.74x the fp32
step; SmolLM2, 576 wide: 0.51x) but not always for the tiny default's (128 wide: 0.81x on an AMD
EPYC, 1.04-1.09x on an Intel Xeon with AMX; bench/step_levers.py), whose casts cost about what its
small matmuls gain.
``auto`` picks ``bf16-mixed`` on CUDA with native bf16, and on a CPU with AVX-512 BF16 or AMX-BF16
whose instructions torch's kernels may use for an LM at least :data:`CPU_BF16_MIN_WIDTH` wide; else
``32-true``, so the tiny default trains alike on every CPU. Any other value is Lightning's and is
used unchanged.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from lightning.fabric.accelerators import CUDAAccelerator, MPSAccelerator

AUTO = "auto"
# Lightning's trainer.precision values this project runs with, plus auto.
PRECISIONS = (AUTO, "32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true")
# /proc/cpuinfo flag -> its name: the x86 instructions that compute bf16 products natively.
CPU_BF16_FLAGS = {"avx512_bf16": "AVX-512 BF16", "amx_bf16": "AMX-BF16"}
# The narrowest tiny LM that bf16 autocast runs on a CPU under auto. bf16 / fp32 step of the tiny
# LM on an Intel Xeon with AMX: 1.04-1.09 at 128 wide (the default), 0.74 at 256, 0.58 at 512
# (bench/step_levers.py); SmolLM2 (576) 0.51. Every pretrained LM the project names is wider.
CPU_BF16_MIN_WIDTH = 256
FLOAT16_WEIGHTS = "the LM's weights are float16, which bf16 autocast cannot mix"


@dataclass(frozen=True)
class Capabilities:
    """What decides whether bf16 is native here."""

    cuda_bf16: bool  # the CUDA device computes bf16 natively (compute capability 8.0+, or ROCm)
    cpu_bf16: tuple[str, ...]  # the CPU's bf16 instructions, named as in CPU_BF16_FLAGS
    cpu_limit: str | None = None  # what keeps torch's CPU kernels from using them, if anything


@dataclass(frozen=True)
class PrecisionChoice:
    precision: str
    reason: str


class PrecisionError(ValueError):
    """``trainer.precision`` asks for bf16 autocast over an LM whose weights are float16."""


def cpu_bf16_instructions(cpuinfo: str) -> tuple[str, ...]:
    """The bf16 instructions in the ``flags`` lines of a /proc/cpuinfo text."""
    flags = {f for line in cpuinfo.splitlines() if line.startswith("flags") for f in line.split()}
    return tuple(name for flag, name in CPU_BF16_FLAGS.items() if flag in flags)


def cpu_kernel_limit(aten_capability: str, onednn_max_isa: str | None) -> str | None:
    """What keeps torch's CPU kernels from bf16 instructions: ATen's vector kernels below AVX-512
    (``ATEN_CPU_CAPABILITY``) or oneDNN's matmuls capped below them (``ONEDNN_MAX_CPU_ISA``)."""
    if not aten_capability.startswith("AVX512"):
        return f"torch's CPU kernels use {aten_capability} (ATEN_CPU_CAPABILITY)"
    isa = (onednn_max_isa or "ALL").upper()
    if isa != "ALL" and not any(name in isa for name in ("BF16", "AMX", "AVX10")):
        return f"oneDNN is limited to {onednn_max_isa} (ONEDNN_MAX_CPU_ISA)"
    return None


@functools.cache
def machine_capabilities(cpuinfo: Path = Path("/proc/cpuinfo")) -> Capabilities:
    """This machine's, probed once per process (a CPU whose flags cannot be read counts as one
    without bf16)."""
    try:
        cpu_bf16 = cpu_bf16_instructions(cpuinfo.read_text())
    except OSError:
        cpu_bf16 = ()
    cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return Capabilities(
        cuda_bf16, cpu_bf16, cpu_kernel_limit(torch.backends.cpu.get_cpu_capability(), onednn)
    )


def device_type(accelerator: str) -> str:
    """The device a ``trainer.accelerator`` runs on, resolved as Lightning resolves ``auto`` and ``gpu``
    (TPUs aside)."""
    if accelerator in ("auto", "gpu"):
        if CUDAAccelerator.is_available():
            return "cuda"
        if MPSAccelerator.is_available():
            return "mps"
        return "cpu" if accelerator == "auto" else "cuda"
    return accelerator


def choose_precision(
    requested: str,
    device: str,
    probe: Callable[[], Capabilities],
    tiny_lm_width: int | None = None,
    lm_dtype: str = "float32",
    answering: bool = False,
) -> PrecisionChoice:
    """``requested`` unless it is ``auto``; for ``auto``, bf16 autocast only where bf16 is native on
    ``device`` (cpu, cuda, ...) by what ``probe`` finds and, on a CPU, the LM is wide enough
    (``tiny_lm_width``: the built-in tiny LM's hidden size; None: a pretrained LM).
    bf16 autocast cannot mix LM weights in float16 (``lm_dtype``, ``model.lm.dtype``) on any device
    (torch: "Unexpected floating ScalarType"): ``auto`` takes fp32 then, and a requested bf16 autocast
    is a PrecisionError, or fp32 when ``answering`` with a trained run."""
    runs_as = "bf16-mixed" if (requested, device) == ("16-mixed", "cpu") else requested
    if lm_dtype == "float16" and runs_as in (AUTO, "bf16-mixed"):
        if runs_as == AUTO or answering:
            return PrecisionChoice("32-true", f"{requested}: {FLOAT16_WEIGHTS}, so fp32")
        on_cpu = " (a CPU runs 16-mixed as bf16-mixed)" if runs_as != requested else ""
        raise PrecisionError(
            f"trainer.precision={requested} with model.lm.dtype=float16{on_cpu}: {FLOAT16_WEIGHTS}; "
            "set trainer.precision=32-true (or auto)"
        )
    if runs_as != requested:  # what Lightning runs, so what the run records
        return PrecisionChoice(runs_as, "trainer.precision=16-mixed: a CPU has no fp16 autocast")
    if requested != AUTO:
        return PrecisionChoice(str(requested), "set by trainer.precision")
    if device not in ("cpu", "cuda"):
        return PrecisionChoice("32-true", f"auto: fp32 on {device}")
    capabilities = probe()
    if device == "cuda":
        if capabilities.cuda_bf16:
            return PrecisionChoice("bf16-mixed", "auto: the CUDA device computes bf16 natively")
        return PrecisionChoice("32-true", "auto: the CUDA device has no native bf16 (before Ampere)")
    if not capabilities.cpu_bf16:
        return PrecisionChoice(
            "32-true", "auto: this CPU has no AVX-512 BF16 or AMX-BF16, so bf16 would be emulated (slower)"
        )
    found = " and ".join(capabilities.cpu_bf16)
    if capabilities.cpu_limit:
        return PrecisionChoice(
            "32-true", f"auto: this CPU has {found} but {capabilities.cpu_limit}, so bf16 would be slower"
        )
    if tiny_lm_width is not None and tiny_lm_width < CPU_BF16_MIN_WIDTH:
        return PrecisionChoice(
            "32-true",
            f"auto: this CPU has {found} but the tiny LM is {tiny_lm_width} wide (< {CPU_BF16_MIN_WIDTH}), "
            "too narrow for bf16 autocast to pay",
        )
    return PrecisionChoice("bf16-mixed", f"auto: this CPU computes bf16 natively ({found})")


def resolve_precision(
    requested: str, accelerator: str, tiny_lm_width: int | None = None, lm_dtype: str = "float32"
) -> PrecisionChoice:
    """The precision that ``trainer.precision`` and ``trainer.accelerator`` give on this machine for
    an LM as in :func:`choose_precision`."""
    device = device_type(str(accelerator))
    return choose_precision(requested, device, machine_capabilities, tiny_lm_width, lm_dtype)
