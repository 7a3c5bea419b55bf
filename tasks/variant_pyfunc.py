"""MLflow pyfunc model (models-from-code) for variants that are not a plain SentenceTransformer.

ONNX and OpenVINO graphs, torch dynamic int8, and int8 / binary output vectors run through the same code as
the benchmark (:func:`tasks.variants.load_model` and :func:`tasks.variants.encode`), so
``mlflow.pyfunc.load_model(uri).predict(sentences)`` returns the vectors the benchmark scored. MLflow loads
this file as code (nothing is unpickled); the model's folder and its ``variant.json`` (how to run it) are
artifacts. Logged by :func:`tasks.mlflow_models.log_variant_model`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd

BATCH_SIZE = 64
SIDES = ("document", "query")


class VariantModel(mlflow.pyfunc.PythonModel):
    """Sentences in (a list, a Series or a DataFrame's first column), vectors out as the variant stores
    them: float32, int8 (calibrated ranges) or packed bits (uint8)."""

    def load_context(self, context: Any) -> None:
        from tasks.variants import load_model, variant_from_spec

        spec = json.loads(Path(context.artifacts["variant"]).read_text(encoding="utf-8"))
        calibration = context.artifacts.get("calibration")
        self.variant = variant_from_spec(
            spec, Path(context.artifacts["model"]), Path(calibration) if calibration else None
        )
        self.model = load_model(self.variant)

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """``params={"side": "query"}``: for a rescoring row, the float vectors its queries are scored with
        against the stored bits; any other row encodes queries as it stores documents."""
        from dataclasses import replace

        from tasks.variants import encode

        side = (params or {}).get("side", "document")
        if side not in SIDES:
            raise ValueError(f"params.side: {side!r} is not one of {', '.join(SIDES)}")
        variant = self.variant
        if side == "query" and variant.rescore:
            variant = replace(variant, precision="float32", rescore=False)
        return encode(self.model, variant, sentences_of(model_input), BATCH_SIZE)


def sentences_of(model_input: Any) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        model_input = model_input.iloc[:, 0]
    if isinstance(model_input, str):
        return [model_input]
    return [str(s) for s in list(model_input)]


mlflow.models.set_model(VariantModel())
