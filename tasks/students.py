"""Layer-reduced students: keep some of the teacher's transformer layers, then train them with MSELoss
against the cached teacher embeddings (sentence-transformers' Trainer), keeping the best sts-dev checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from prefect import task

from tasks.config import StudentSpec, TrainingConfig
from tasks.data import PreparedData, read_lines, read_sts
from tasks.files import atomic_dir
from tasks.models import load_sentence_transformer
from tasks.teacher_cache import CachedEmbeddings
from tasks.variants import Variant

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)


class LayerSpecError(ValueError):
    """A layer list that does not fit the teacher."""


@dataclass(frozen=True)
class TrainedStudent:
    name: str
    model_dir: Path
    layers: tuple[int, ...]
    teacher_layers: int
    best_dev_spearman: float | None
    train_seconds: float
    train_sentences: int
    loss: str = "mse"

    def as_variant(self) -> Variant:
        return Variant(
            self.name,
            "layer-reduced",
            self.model_dir,
            parent="teacher",
            params={
                "layers": ",".join(map(str, self.layers)),
                "num_layers": str(len(self.layers)),
                "lineage": f"teacher > {self.name}",
                "loss": self.loss,
            },
            build_seconds=self.train_seconds,
        )


def plan_layers(teacher_layers: int, spec: StudentSpec) -> tuple[int, ...]:
    """The 0-based teacher layers a student keeps.

    ``num_layers=k`` keeps k evenly spaced layers including the first and the last (k=1 keeps the first);
    an explicit ``layers`` list is checked against the teacher's depth.
    """
    if spec.layers is not None:
        layers = tuple(sorted(spec.layers))
        bad = [i for i in layers if not 0 <= i < teacher_layers]
        if bad:
            raise LayerSpecError(
                f"students[].layers {list(spec.layers)}: indices {bad} are out of range for a teacher with "
                f"{teacher_layers} layers; use 0..{teacher_layers - 1}"
            )
        return layers
    assert spec.num_layers is not None
    if spec.num_layers > teacher_layers:
        raise LayerSpecError(
            f"students[].num_layers={spec.num_layers} exceeds the teacher's {teacher_layers} layers; "
            f"use 1..{teacher_layers}"
        )
    if spec.num_layers == 1:
        return (0,)
    return tuple(int(round(x)) for x in np.linspace(0, teacher_layers - 1, spec.num_layers))


def student_name(spec: StudentSpec, layers: tuple[int, ...], teacher_layers: int) -> str:
    suffix = "" if spec.loss == "mse" else "-" + spec.loss.replace("mse+", "")
    return spec.name or f"layers-{len(layers)}of{teacher_layers}{suffix}"


def transformer_layers(model: SentenceTransformer) -> torch.nn.ModuleList:
    """The encoder's layer list of a BERT / RoBERTa / MPNet-style SentenceTransformer."""
    auto_model = model[0].auto_model
    encoder = getattr(auto_model, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise LayerSpecError(
            f"cannot remove layers from a {type(auto_model).__name__}: layer reduction supports models with "
            f"encoder.layer (BERT, RoBERTa, MPNet, ...); use a light pretrained student instead"
        )
    return layers


def reduce_layers(model: SentenceTransformer, layers: tuple[int, ...]) -> SentenceTransformer:
    """Keep only ``layers`` of the model's transformer (in place); saving and reloading then work."""
    existing = transformer_layers(model)
    model[0].auto_model.encoder.layer = torch.nn.ModuleList([existing[i] for i in layers])
    model[0].auto_model.config.num_hidden_layers = len(layers)
    return model


def count_teacher_layers(teacher_dir: Path) -> int:
    config = json.loads((Path(teacher_dir) / "config.json").read_text())
    if "num_hidden_layers" not in config:
        raise LayerSpecError(f"{teacher_dir}/config.json has no num_hidden_layers: cannot plan layer removal")
    return int(config["num_hidden_layers"])


def _distillation_dataset(sentences: list[str], targets: np.ndarray):
    import pyarrow as pa
    from datasets import Dataset

    flat = pa.array(np.ascontiguousarray(targets, dtype=np.float32).ravel())
    labels = pa.FixedSizeListArray.from_arrays(flat, targets.shape[1])
    return Dataset(pa.table({"sentence": pa.array(sentences, pa.string()), "label": labels}))


def train_layer_reduced(
    teacher_dir: Path,
    spec: StudentSpec,
    data: PreparedData,
    corpus_embeddings: CachedEmbeddings,
    training: TrainingConfig,
    out_root: Path,
    *,
    max_seq_length: int | None = None,
    trust_remote_code: bool = False,
) -> TrainedStudent:
    """Build the student from the teacher, train it, save the best checkpoint to ``out_root/<name>/model``."""
    from sentence_transformers.sentence_transformer import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
        evaluation,
        losses,
    )

    teacher_layers = count_teacher_layers(teacher_dir)
    layers = plan_layers(teacher_layers, spec)
    name = student_name(spec, layers, teacher_layers)
    start = time.perf_counter()

    model = load_sentence_transformer(
        teacher_dir, max_seq_length=max_seq_length, trust_remote_code=trust_remote_code
    )
    reduce_layers(model, layers)
    log.info("student %s keeps teacher layers %s of %d", name, list(layers), teacher_layers)

    sentences = read_lines(data.corpus_file)
    targets = corpus_embeddings.load()
    if len(sentences) != targets.shape[0]:
        raise ValueError(f"corpus has {len(sentences)} sentences but {targets.shape[0]} cached embeddings")
    train_dataset = _distillation_dataset(sentences, targets)
    loss = losses.MSELoss(model)
    if spec.loss == "mse+cosent":  # add the STS-B train labels; the trainer samples both datasets
        from datasets import Dataset

        train = read_sts(data.sts_file("train"))
        pairs = Dataset.from_dict(
            {"sentence1": train.sentences1, "sentence2": train.sentences2, "score": train.scores}
        )
        train_dataset = {"distill": train_dataset, "stsb": pairs}
        loss = {"distill": loss, "stsb": losses.CoSENTLoss(model)}
    dev = read_sts(data.sts_file("dev"))
    dev_evaluator = evaluation.EmbeddingSimilarityEvaluator(
        dev.sentences1, dev.sentences2, dev.scores, name="sts-dev", batch_size=training.batch_size
    )

    student_dir = Path(out_root) / name
    rows = sum(len(d) for d in train_dataset.values()) if isinstance(train_dataset, dict) else len(sentences)
    steps_per_epoch = max(1, -(-rows // training.batch_size))
    eval_steps = max(1, steps_per_epoch // training.evaluations_per_epoch)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(student_dir / "checkpoints"),
        num_train_epochs=training.epochs,
        per_device_train_batch_size=training.batch_size,
        per_device_eval_batch_size=training.batch_size,
        learning_rate=training.learning_rate,
        warmup_ratio=training.warmup_ratio,
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="steps",
        save_steps=eval_steps,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="eval_sts-dev_spearman_cosine",
        greater_is_better=True,
        logging_steps=max(1, eval_steps // 2),
        report_to="none",  # the flow logs to MLflow itself; transformers would default to ["mlflow"]
        seed=training.seed,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        loss=loss,
        evaluator=dev_evaluator,
    )
    trainer.train()
    best = trainer.state.best_metric

    final = student_dir / "model"
    with atomic_dir(final) as tmp:
        model.save(str(tmp))
    shutil.rmtree(student_dir / "checkpoints", ignore_errors=True)
    seconds = time.perf_counter() - start
    log.info(
        "student %s trained on %d sentences in %.0f s; best sts-dev Spearman %.4f",
        name,
        len(sentences),
        seconds,
        best if best is not None else float("nan"),
    )
    return TrainedStudent(name, final, layers, teacher_layers, best, seconds, len(sentences), spec.loss)


@task(name="train-layer-reduced-student", log_prints=False)  # trainer output stays on stdout
def train_student(
    teacher_dir: Path,
    spec: StudentSpec,
    data: PreparedData,
    corpus_embeddings: CachedEmbeddings,
    training: TrainingConfig,
    out_root: Path,
    max_seq_length: int | None = None,
    trust_remote_code: bool = False,
) -> TrainedStudent:
    """Prefect task around :func:`train_layer_reduced`."""
    return train_layer_reduced(
        teacher_dir,
        spec,
        data,
        corpus_embeddings,
        training,
        out_root,
        max_seq_length=max_seq_length,
        trust_remote_code=trust_remote_code,
    )
