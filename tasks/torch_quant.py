"""PyTorch dynamic int8 quantization of Linear layers (int8 weights, activations quantized on the fly).

Applied when the variant is loaded (a quantized torch module cannot be saved without pickling, and this
project never unpickles), so the variant's folder is its parent's; its size is the serialized state dict.
Modules whose names match one of the ``exclude`` regular expressions stay in float32: on mpnet the FFN
down-projection (``layer.N.output.dense``) ruins quality when quantized.
"""

from __future__ import annotations

import io
import re
import warnings
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer


def check_patterns(patterns: tuple[str, ...], field: str = "exclude") -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{field}: {pattern!r} is not a regular expression ({exc})") from exc


def linear_names(model: torch.nn.Module, exclude: tuple[str, ...] = ()) -> list[str]:
    """Names of the Linear modules that will be quantized."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not any(re.search(p, name) for p in exclude)
    ]


def quantize_dynamic_int8(
    model: SentenceTransformer, exclude: tuple[str, ...] = (), per_channel: bool = True
) -> SentenceTransformer:
    from torch.ao import quantization as tq

    qconfig = tq.per_channel_dynamic_qconfig if per_channel else tq.default_dynamic_qconfig
    spec = {name: qconfig for name in linear_names(model, exclude)}
    with warnings.catch_warnings():  # eager-mode quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        return tq.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=False)


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's weights take when serialized (what saving them would cost on disk)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes
