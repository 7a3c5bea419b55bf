"""Which teacher layers a layer-reduced student keeps, chosen by measurement (``students[].layers: auto``).

Evenly spaced layers are a rule of thumb; this measures instead. Greedy backward elimination on the teacher
itself: starting from all its layers, each step tries removing every remaining layer, encodes probe
sentences with each candidate (untrained: the kept layers with the teacher's own weights) and keeps the
candidate whose embeddings are closest to the teacher's (MSE to the cached teacher embeddings), until the
budget is reached. That is ``L + (L-1) + ... + (k+1)`` candidate encodings of the probe, and every
candidate's score is kept, so a user can see how close the runner-up was.

The probe is drawn from the distillation corpus (training-side data, evenly strided, with the targets
already in the teacher cache): selection never looks at STS-B test, the held-out suites or the held-out
Wikipedia pairs of the agreement measure. The search is a content-addressed stage output of its own, so a
re-run reuses the choice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tasks.artifacts import ArtifactStore, stage_key
from tasks.models import fingerprint_model_dir, load_sentence_transformer

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

Probe = tuple[list[str], np.ndarray]  # sentences and their teacher embeddings

STAGE = "layer-search"
STAGE_VERSION = 1
CRITERION = "mse to the teacher's embeddings of the probe sentences, untrained candidate"


@dataclass(frozen=True)
class Candidate:
    step: int  # 1 = first removal
    layers: tuple[int, ...]
    mse: float
    chosen: bool

    def as_row(self) -> dict[str, object]:
        return {
            "step": self.step,
            "layers": ",".join(map(str, self.layers)),
            "num_layers": len(self.layers),
            "mse": self.mse,
            "chosen": self.chosen,
        }


@dataclass(frozen=True)
class LayerChoice:
    layers: tuple[int, ...]
    mse: float  # of the chosen layers
    candidates: tuple[Candidate, ...]
    probe_sentences: int
    seconds: float
    key: str = ""
    reused: bool = False

    def rows(self) -> list[dict[str, object]]:
        return [c.as_row() for c in self.candidates]


def probe_rows(blocks: Iterable[tuple[list[str], np.ndarray]], total: int, count: int) -> Probe:
    """``count`` evenly strided (sentence, target) rows of a corpus streamed in blocks (all when smaller)."""
    count = min(count, total)
    wanted = set(np.linspace(0, total - 1, count).round().astype(int).tolist()) if count else set()
    sentences: list[str] = []
    targets: list[np.ndarray] = []
    offset = 0
    for texts, block in blocks:
        for i in range(len(texts)):
            if offset + i in wanted:
                sentences.append(texts[i])
                targets.append(np.asarray(block[i], dtype=np.float32))
        offset += len(texts)
    return sentences, np.stack(targets) if targets else np.zeros((0, 0), np.float32)


def greedy_elimination(
    budget: int, total_layers: int, score: Callable[[tuple[int, ...]], float]
) -> tuple[tuple[int, ...], tuple[Candidate, ...]]:
    """Remove one layer at a time, each time the one whose removal scores best (lowest), down to ``budget``.

    ``score(layers)`` returns the candidate's error; ties go to the candidate listed first (removing the
    deepest layer), so the result is deterministic.
    """
    if not 1 <= budget <= total_layers:
        raise ValueError(f"layer budget {budget} is outside 1..{total_layers}")
    kept = tuple(range(total_layers))
    candidates: list[Candidate] = []
    step = 0
    while len(kept) > budget:
        step += 1
        scored = []
        for drop in reversed(kept):
            layers = tuple(i for i in kept if i != drop)
            scored.append((float(score(layers)), layers))
        best_mse, best = min(scored, key=lambda item: item[0])
        candidates += [Candidate(step, layers, mse, layers == best) for mse, layers in scored]
        log.info(
            "layer search step %d: keep %s (mse %.6f of %d candidates)",
            step,
            list(best),
            best_mse,
            len(scored),
        )
        kept = best
    return kept, tuple(candidates)


def search_layers(
    model: SentenceTransformer,  # its first module a Transformer with encoder.layer
    budget: int,
    sentences: list[str],
    targets: np.ndarray,
    *,
    batch_size: int = 64,
) -> tuple[tuple[int, ...], float, tuple[Candidate, ...]]:
    """Greedy layer choice on ``model`` (restored to all its layers afterwards)."""
    from tasks.students import reduce_layers, transformer_layers

    original = transformer_layers(model)
    depth = len(original)

    def score(layers: tuple[int, ...]) -> float:
        reduce_layers(model, layers, source=original)
        with torch.inference_mode():
            out = model.encode(
                sentences, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False
            )
        return float(np.mean((out.astype(np.float32) - targets) ** 2))

    try:
        chosen, candidates = greedy_elimination(budget, depth, score)
        mse = next((c.mse for c in reversed(candidates) if c.chosen), None)
        return chosen, (score(chosen) if mse is None else mse), candidates
    finally:
        reduce_layers(model, range(depth), source=original)


def choose_layers(
    teacher_dir: Path,
    budget: int,
    probe: Callable[[], Probe],
    probe_key: str,
    artifacts: Path,
    *,
    max_seq_length: int | None = None,
    trust_remote_code: bool = False,
    device: str = "cpu",
    batch_size: int = 64,
) -> LayerChoice:
    """The layers to keep for a ``budget``-layer student (searched once, then reused from the store).

    ``probe()`` returns (sentences, teacher targets), read only when the search runs; ``probe_key``
    identifies them (the teacher cache key and the probe size), so the store key does not hash the arrays.
    """
    inputs = {
        "teacher": fingerprint_model_dir(Path(teacher_dir), max_seq_length),
        "budget": budget,
        "probe": probe_key,
        "criterion": CRITERION,
    }
    key = stage_key(STAGE, STAGE_VERSION, inputs)

    def build(out_dir: Path, work_dir: Path) -> dict:
        start = time.perf_counter()
        sentences, targets = probe()
        if not sentences:
            raise ValueError("layers: auto needs probe sentences, but the distillation corpus is empty")
        model = load_sentence_transformer(
            teacher_dir, max_seq_length=max_seq_length, trust_remote_code=trust_remote_code, device=device
        )
        layers, mse, candidates = search_layers(model, budget, sentences, targets, batch_size=batch_size)
        seconds = time.perf_counter() - start
        log.info(
            "layer search for %d layers: keep %s (mse %.6f), %d candidates on %d probe sentences in %.1f s",
            budget, list(layers), mse, len(candidates), len(sentences), seconds,
        )  # fmt: skip
        return {
            "layers": list(layers),
            "mse": mse,
            "candidates": [c.as_row() for c in candidates],
            "probe_sentences": len(sentences),
            "seconds": seconds,
        }

    entry = ArtifactStore(artifacts).build(STAGE, key, build, f"layer search ({budget} layers)")
    result = entry.result
    candidates = tuple(
        Candidate(int(r["step"]), _layers(r["layers"]), float(r["mse"]), bool(r["chosen"]))
        for r in result["candidates"]
    )
    return LayerChoice(
        tuple(result["layers"]),
        float(result["mse"]),
        candidates,
        int(result["probe_sentences"]),
        float(result["seconds"]),
        key=entry.key,
        reused=entry.reused,
    )


def _layers(text: object) -> tuple[int, ...]:
    return tuple(int(i) for i in str(text).split(",") if i)


def log_layer_search(run_id: str, choice: LayerChoice) -> None:
    """Every candidate's score as an MLflow table (``layer_search.json``) on the student's child run."""
    import mlflow
    import pandas as pd

    from tasks.tracking_store import with_retries

    table = pd.DataFrame(choice.rows())
    with_retries(
        lambda: mlflow.log_table(table, artifact_file="layer_search.json", run_id=run_id),
        what="logging the layer search",
    )
