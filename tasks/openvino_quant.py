"""OpenVINO static int8: NNCF post-training quantization through optimum-intel, calibrated offline.

sentence-transformers' ``export_static_quantized_openvino_model`` always loads its calibration set from the
Hugging Face Hub (glue/sst2), so this module drives ``OVQuantizer`` itself with corpus sentences (never
evaluation sentences). The result is a copy of the model folder with ``openvino/openvino_model.xml`` (fp32
IR) and ``openvino/openvino_model_qint8_quantized.xml`` (int8), loadable with
``SentenceTransformer(dir, backend="openvino", model_kwargs={"file_name": ...})``.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.files import atomic_dir
from tasks.models import load_sentence_transformer

log = logging.getLogger(__name__)

INT8_FILE = "openvino/openvino_model_qint8_quantized.xml"


class OpenVinoConfigError(ValueError):
    """OpenVINO asked for but not installed."""


@dataclass(frozen=True)
class OpenVinoExport:
    model_dir: Path
    int8_file: str
    calibration_sentences: int
    seconds: float


def check_openvino_installed() -> None:
    try:
        import nncf  # noqa: F401
        import openvino  # noqa: F401
        from optimum.intel.openvino import OVQuantizer  # noqa: F401
    except ImportError as exc:
        raise OpenVinoConfigError(
            f"the openvino-int8 step needs optimum-intel, openvino and nncf ({exc}); reinstall the project "
            f"(`pip install -e .`, which pins them) or remove the openvino-int8 step from compress.steps"
        ) from exc


def quantize_openvino_int8(source_dir: Path, out_dir: Path, calibration: list[str]) -> OpenVinoExport:
    """Copy ``source_dir`` to ``out_dir`` with an OpenVINO fp32 IR and its static int8 quantization."""
    from datasets import Dataset
    from optimum.intel.openvino import OVConfig, OVQuantizationConfig, OVQuantizer

    check_openvino_installed()
    if not calibration:
        raise ValueError("OpenVINO int8 needs at least one calibration sentence")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(source_dir, tmp, ignore=shutil.ignore_patterns("checkpoints", "onnx", "openvino"))
        model = load_sentence_transformer(tmp, backend="openvino")  # exports the fp32 IR on first load
        model.save(str(tmp))
        tokenizer = model.tokenizer
        dataset = Dataset.from_dict({"sentence": calibration}).map(
            lambda batch: tokenizer(batch["sentence"], truncation=True, max_length=model.max_seq_length),
            batched=True,
            remove_columns=["sentence"],
        )
        quantizer = OVQuantizer.from_pretrained(model.transformers_model)
        config = OVConfig(quantization_config=OVQuantizationConfig(num_samples=len(calibration)))
        quantized = tmp / "openvino-int8"
        quantizer.quantize(dataset, save_directory=str(quantized), ov_config=config)
        for suffix in (".xml", ".bin"):
            shutil.move(
                quantized / "openvino" / f"openvino_model{suffix}", tmp / Path(INT8_FILE).with_suffix(suffix)
            )
        shutil.rmtree(quantized)
    seconds = time.perf_counter() - start
    log.info("OpenVINO int8 of %s (%d calibration sentences): %.1f s", source_dir, len(calibration), seconds)
    return OpenVinoExport(out_dir, INT8_FILE, len(calibration), seconds)
