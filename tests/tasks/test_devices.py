"""Device resolution, training precision and where each runtime is timed (CPU-side; the CUDA path itself
runs in tests/flows/test_cuda.py where a GPU is present)."""

import pytest
import torch

from tasks import devices
from tasks.devices import DeviceError, mixed_precision, resolve_device, runs_on


@pytest.fixture()
def gpu(monkeypatch: pytest.MonkeyPatch):
    """Pretend torch sees a GPU (with or without bf16: set ``gpu.bf16``)."""

    class Gpu:
        bf16 = True

    fake = Gpu()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: fake.bf16)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _index=0: "Test GPU")
    return fake


@pytest.fixture()
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize(("requested", "expected"), [("auto", "cpu"), ("cpu", "cpu")])
def test_without_a_gpu_auto_is_the_cpu(no_gpu, requested: str, expected: str) -> None:
    assert resolve_device(requested) == expected


@pytest.mark.parametrize(("requested", "expected"), [("auto", "cuda"), ("cuda", "cuda"), ("cpu", "cpu")])
def test_with_a_gpu_auto_is_cuda(gpu, requested: str, expected: str) -> None:
    assert resolve_device(requested) == expected


def test_cuda_without_a_gpu_names_the_field_and_the_fix(no_gpu) -> None:
    with pytest.raises(DeviceError, match=r"device='cuda'.*sees no CUDA GPU.*device: auto"):
        resolve_device("cuda")


def test_an_unknown_device_is_refused() -> None:
    with pytest.raises(DeviceError, match="choose auto, cpu or cuda"):
        resolve_device("tpu")


@pytest.mark.parametrize(
    ("device", "requested", "bf16", "expected"),
    [
        ("cpu", "auto", True, "no"),  # the CPU trains in float32 whatever is asked
        ("cpu", "bf16", True, "no"),
        ("cuda", "auto", True, "bf16"),
        ("cuda", "auto", False, "fp16"),  # an older GPU
        ("cuda", "fp16", True, "fp16"),
        ("cuda", "no", True, "no"),
    ],
)
def test_mixed_precision(gpu, device: str, requested: str, bf16: bool, expected: str) -> None:
    gpu.bf16 = bf16
    assert mixed_precision(device, requested) == expected


def test_bf16_on_a_gpu_without_it_is_refused(gpu) -> None:
    gpu.bf16 = False
    with pytest.raises(DeviceError, match="Test GPU has no bf16; use auto or fp16"):
        mixed_precision("cuda", "bf16")


@pytest.mark.parametrize(
    ("backend", "device", "expected"),
    [
        ("torch", "cuda", "cuda"),
        ("torch", "cpu", "cpu"),
        ("onnx", "cuda", "cpu"),
        ("openvino", "cuda", "cpu"),
        ("torch-int8", "cuda", "cpu"),
    ],
)
def test_cpu_only_runtimes_run_on_the_cpu(backend: str, device: str, expected: str) -> None:
    assert runs_on(backend, device) == expected


def test_labels_say_what_the_speed_was_measured_on(gpu) -> None:
    assert devices.device_label("cuda") == "cuda (Test GPU)"
    assert devices.device_label("cpu").startswith("cpu (") and "cores)" in devices.device_label("cpu")
