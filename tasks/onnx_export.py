"""ONNX export (fp32) and ONNX Runtime dynamic int8 quantization through sentence-transformers / optimum.

The int8 kernel variant (avx2 / avx512 / avx512_vnni / arm64) is chosen from the CPU's flags unless the
config names one; naming one the CPU lacks is an error raised before any export.
"""

from __future__ import annotations

import logging
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.files import atomic_dir
from tasks.models import load_sentence_transformer

log = logging.getLogger(__name__)

KERNELS = ("avx512_vnni", "avx512", "avx2", "arm64")
# CPU flags each kernel needs (Linux /proc/cpuinfo names).
_KERNEL_FLAGS = {
    "avx512_vnni": {"avx512_vnni", "avx512f"},
    "avx512": {"avx512f", "avx512bw"},
    "avx2": {"avx2"},
}


class OnnxConfigError(ValueError):
    """An ONNX setting this machine or install cannot honour."""


@dataclass(frozen=True)
class OnnxExport:
    model_dir: Path
    fp32_file: str
    int8_file: str | None
    kernel: str | None
    export_seconds: float
    quantize_seconds: float


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def pick_kernel(
    requested: str = "auto",
    flags: set[str] | None = None,
    machine: str | None = None,
    field: str = "kernel",
) -> str:
    """The best int8 kernel variant this CPU runs, or check that the requested one runs here."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    supported = [k for k, need in _KERNEL_FLAGS.items() if need <= flags]
    if machine in ("aarch64", "arm64"):
        supported.append("arm64")
    if requested == "auto":
        if not supported:
            raise OnnxConfigError(
                f"{field}=auto: this CPU has none of avx2/avx512/avx512_vnni/arm64; "
                "remove the onnx-int8 step from compress.steps"
            )
        return supported[0]
    if requested not in KERNELS:
        raise OnnxConfigError(f"{field}={requested!r}: choose auto or one of {list(KERNELS)}")
    if requested not in supported:
        raise OnnxConfigError(
            f"{field}={requested!r}: this CPU lacks it (it supports {supported or 'none'}); use {field}=auto"
        )
    return requested


def check_onnx_installed() -> None:
    try:
        import onnxruntime  # noqa: F401
        import optimum.onnxruntime  # noqa: F401
    except ImportError as exc:
        raise OnnxConfigError(
            f"ONNX variants need optimum[onnxruntime] ({exc}); `pip install 'optimum[onnxruntime]'` "
            f"or remove the onnx and onnx-int8 steps from compress.steps"
        ) from exc


def export_onnx(source_dir: Path, out_dir: Path, kernel: str | None) -> OnnxExport:
    """Copy ``source_dir`` to ``out_dir`` with ``onnx/model.onnx`` and, given a kernel, an int8 file."""
    from sentence_transformers import export_dynamic_quantized_onnx_model

    check_onnx_installed()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(source_dir, tmp, ignore=shutil.ignore_patterns("checkpoints", "onnx"))
        start = time.perf_counter()
        model = load_sentence_transformer(tmp, backend="onnx")  # exports to ONNX on first load
        model.save(str(tmp))
        export_seconds = time.perf_counter() - start
        int8_file, quantize_seconds = None, 0.0
        if kernel is not None:
            start = time.perf_counter()
            before = set((tmp / "onnx").glob("*.onnx"))
            export_dynamic_quantized_onnx_model(model, kernel, str(tmp))
            created = sorted(set((tmp / "onnx").glob("*.onnx")) - before)
            if not created:
                raise RuntimeError(f"int8 export for {kernel} wrote no .onnx file in {tmp / 'onnx'}")
            int8_file = created[0].relative_to(tmp).as_posix()
            quantize_seconds = time.perf_counter() - start
    log.info(
        "ONNX export of %s: %.1f s; int8 (%s): %.1f s", source_dir, export_seconds, kernel, quantize_seconds
    )
    return OnnxExport(out_dir, "onnx/model.onnx", int8_file, kernel, export_seconds, quantize_seconds)
