"""Where the work runs: ``device: auto | cpu | cuda`` resolved once, and what each kind of variant runs on.

``auto`` picks CUDA when torch sees a GPU, else the CPU. Teacher encoding, training, PCA / calibration
samples and quality scoring run on the resolved device, in float32 except training, which uses bf16 (or
fp16 where the GPU has no bf16) autocast on CUDA unless ``training.mixed_precision`` says otherwise.
Variants whose runtime is CPU-only (ONNX Runtime, OpenVINO, torch dynamic int8) are timed on the CPU, and
their speed-up is taken against the teacher timed on the CPU in the same run.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Literal

import torch

Device = Literal["cpu", "cuda"]
MixedPrecision = Literal["no", "bf16", "fp16"]
# Backends that run on the CPU whatever the device: ONNX Runtime's CPU provider, OpenVINO, torch's dynamic
# int8 kernels (fbgemm / onednn).
CPU_ONLY_BACKENDS = ("onnx", "openvino", "torch-int8")


class DeviceError(ValueError):
    """A device that is asked for but not present."""


def resolve_device(requested: str) -> Device:
    """``auto`` -> ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` without one is an error."""
    if requested == "cpu":
        return "cpu"
    available = torch.cuda.is_available()
    if requested == "auto":
        return "cuda" if available else "cpu"
    if requested == "cuda":
        if not available:
            build = torch.version.cuda and f"CUDA {torch.version.cuda}" or "CPU only"
            raise DeviceError(
                f"device='cuda': torch {torch.__version__} ({build}) sees no CUDA GPU; use device: auto "
                f"(CUDA when present) or device: cpu, or install a CUDA build of torch on a GPU machine"
            )
        return "cuda"
    raise DeviceError(f"device={requested!r}: choose auto, cpu or cuda")


def device_label(device: str) -> str:
    """``cuda (NVIDIA H200)`` or ``cpu (<model> (N cores))``: what a speed figure was measured on."""
    if device == "cuda":
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({cpu_name()})"


def mixed_precision(device: str, requested: str = "auto") -> MixedPrecision:
    """Training precision: ``auto`` = bf16 on a GPU that has it, fp16 on an older GPU, none on the CPU."""
    if device != "cuda" or requested == "no":
        return "no"
    if requested in ("bf16", "fp16"):
        if requested == "bf16" and not torch.cuda.is_bf16_supported():
            raise DeviceError(
                f"training.mixed_precision='bf16': {torch.cuda.get_device_name(0)} has no bf16; "
                "use auto or fp16"
            )
        return requested  # type: ignore[return-value]
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def runs_on(backend: str, device: str) -> Device:
    """The device a variant with this backend is encoded and timed on."""
    return "cpu" if backend in CPU_ONLY_BACKENDS else device  # type: ignore[return-value]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
