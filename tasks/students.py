"""Transformer students, trained with sentence-transformers' Trainer against the cached teacher embeddings.

Two ways to get a student (the two options of sentence-transformers' "Model Distillation" example):

- **layer-reduced**: the teacher with some of its transformer layers removed;
- **light**: any smaller pretrained model. When its dimension differs from the teacher's, either the teacher
  targets are PCA-reduced to the student's dimension (``projection="pca"``, the default, as the example does)
  or a trainable ``Dense`` layer maps the student into the teacher's space (``projection="dense"``).

Losses: ``MSELoss`` to the teacher's sentence embeddings; optionally plus ``CoSENTLoss`` on the STS-B train
labels, or plus hidden-state MSE between each kept layer and the teacher layer it came from
(:class:`HiddenStateMSELoss`, layer-reduced students only), or, for a Matryoshka student, MSE plus the
similarities of each prefix (:class:`MatryoshkaDistillLoss`). The best sts-dev checkpoint is kept.

Each student is a content-addressed stage output (:mod:`tasks.artifacts`): its key hashes the teacher, the
cached targets, the layers, the loss, the training settings and the STS-B train/dev files, so an unchanged
student is trained once and reused by every later run. Trainer checkpoints are kept in the key's work folder
while it trains: a run killed mid-training resumes the student from its last checkpoint.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from prefect import task

from tasks.artifacts import ArtifactStore, Entry, files_fingerprint, stage_key
from tasks.config import LightStudentSpec, StudentSpec, TrainingConfig
from tasks.data import PreparedData, read_sts
from tasks.devices import device_label, mixed_precision
from tasks.layer_search import LayerChoice, Probe, choose_layers, log_layer_search, probe_rows
from tasks.models import fingerprint_model_dir, load_sentence_transformer, resolve_model_dir
from tasks.pca import fit_pca, linear_dense
from tasks.teacher_cache import CachedEmbeddings, iter_lines, sentences_digest
from tasks.tracking import ChildRuns
from tasks.training_curves import HISTORY_FILE, MlflowCurves, log_history, read_history
from tasks.variants import Variant

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

log = logging.getLogger(__name__)

STAGE = "students"
STAGE_VERSION = 1  # bump when a change to this module changes what a trained student is


class LayerSpecError(ValueError):
    """A layer list that does not fit the teacher."""


@dataclass(frozen=True)
class TrainedStudent:
    name: str
    kind: Literal["layer-reduced", "light"]
    model_dir: Path
    best_dev_spearman: float | None
    train_seconds: float
    train_sentences: int
    loss: str = "mse"
    params: dict[str, str] = field(default_factory=dict)  # layers kept, or base model and projection
    key: str = ""  # content key of the stored student (tasks.artifacts)
    reused: bool = False  # taken from an earlier run instead of trained
    history_file: Path | None = None  # the Trainer's log history (training_log.json), when stored
    run_id: str | None = None  # its MLflow child run, opened before training (curves logged there)

    def as_variant(self) -> Variant:
        return Variant(
            self.name,
            self.kind,
            self.model_dir,
            parent="teacher",
            params={**self.params, "lineage": f"teacher > {self.name}", "loss": self.loss},
            build_seconds=self.train_seconds,
            train_sentences=self.train_sentences,
            uses_sts_labels="cosent" in self.loss,  # CoSENT trains on the STS-B train labels
            rotated="matryoshka" in self.loss,  # its output axes are the teacher's principal axes
            key=self.key,
            reused=self.reused,
        )

    @classmethod
    def from_entry(
        cls, name: str, kind: Literal["layer-reduced", "light"], entry: Entry, run_id: str | None = None
    ) -> TrainedStudent:
        result = entry.result
        history = entry.path / HISTORY_FILE
        return cls(
            name,
            kind,
            entry.path / "model",
            result["best_dev_spearman"],
            result["train_seconds"],
            result["train_sentences"],
            result["loss"],
            result["params"],
            key=entry.key,
            reused=entry.reused,
            history_file=history if history.is_file() else None,
            run_id=run_id,
        )


def plan_layers(teacher_layers: int, spec: StudentSpec) -> tuple[int, ...] | None:
    """The 0-based teacher layers a student keeps (``None`` for ``layers: auto``: searched when trained).

    ``num_layers=k`` keeps k evenly spaced layers including the first and the last; k=1 keeps the last, the
    layer whose output the student must reproduce (measured on STS-B dev with a 6-layer teacher: 0.820 vs
    0.732 for the first layer). An explicit ``layers`` list is checked against the teacher's depth.
    """
    if isinstance(spec.layers, tuple):
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
    if spec.auto_layers:
        return None
    if spec.num_layers == 1:
        return (teacher_layers - 1,)
    return tuple(int(round(x)) for x in np.linspace(0, teacher_layers - 1, spec.num_layers))


def student_name(spec: StudentSpec, teacher_layers: int) -> str:
    """``layers-<kept>of<total>[-auto][-<loss>]`` unless the spec names itself."""
    kept = spec.num_layers if spec.num_layers is not None else len(spec.layers or ())
    choice = "-auto" if spec.auto_layers else ""
    suffix = "" if spec.loss == "mse" else "-" + spec.loss.replace("mse+", "")
    return spec.name or f"layers-{kept}of{teacher_layers}{choice}{suffix}"


def light_student_name(spec: LightStudentSpec) -> str:
    suffix = "" if spec.loss == "mse" else "-" + spec.loss.replace("mse+", "")
    return spec.name or f"light-{Path(spec.model).name.lower()}-{spec.projection}{suffix}"


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


def reduce_layers(
    model: SentenceTransformer, layers: Iterable[int], source: torch.nn.ModuleList | None = None
) -> SentenceTransformer:
    """Keep only ``layers`` of the model's transformer (in place); saving and reloading then work.

    ``source``: the full layer list the indices refer to (default: the model's present layers), so a model
    already reduced can be re-reduced or restored from its original layers.
    """
    existing = transformer_layers(model) if source is None else source
    layers = tuple(layers)
    model[0].auto_model.encoder.layer = torch.nn.ModuleList([existing[i] for i in layers])
    model[0].auto_model.config.num_hidden_layers = len(layers)
    return model


def count_teacher_layers(teacher_dir: Path) -> int:
    config = json.loads((Path(teacher_dir) / "config.json").read_text())
    if "num_hidden_layers" not in config:
        raise LayerSpecError(f"{teacher_dir}/config.json has no num_hidden_layers: cannot plan layer removal")
    return int(config["num_hidden_layers"])


DATASET_FILE = "distillation.arrow"

Blocks = Iterable[tuple[list[str], np.ndarray]]


def corpus_blocks(
    corpus_file: Path, corpus_embeddings: CachedEmbeddings
) -> Iterator[tuple[list[str], np.ndarray]]:
    """The corpus sentences with their cached teacher embeddings, one cache shard at a time (memory-mapped
    rows, never the whole corpus); raises ``ValueError`` when sentences and embeddings do not pair up."""
    _, sentences = sentences_digest(iter_lines(corpus_file))
    if sentences != corpus_embeddings.rows:
        raise ValueError(f"corpus has {sentences} sentences but {corpus_embeddings.rows} cached embeddings")
    lines = iter_lines(corpus_file)
    for shard in corpus_embeddings.shards():
        texts = list(itertools.islice(lines, len(shard)))
        if len(texts) != len(shard):
            raise ValueError(f"{corpus_file} changed: fewer sentences than cached embeddings")
        yield texts, shard
    if next(lines, None) is not None:
        raise ValueError(f"{corpus_file} changed: more sentences than cached embeddings")


def _distillation_dataset(blocks: Blocks, dim: int, path: Path):
    """A ``datasets.Dataset`` of (sentence, label) rows backed by an Arrow file at ``path``, written block by
    block and memory-mapped: the trainer reads rows from disk, no corpus-sized array is ever built. Same rows,
    order, types and values as one in-memory table of all the blocks."""
    import pyarrow as pa
    from datasets import Dataset

    schema = pa.schema({"sentence": pa.string(), "label": pa.list_(pa.float32(), dim)})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for texts, targets in blocks:
            flat = pa.array(np.ascontiguousarray(targets, dtype=np.float32).ravel())
            labels = pa.FixedSizeListArray.from_arrays(flat, dim)
            writer.write_batch(pa.record_batch([pa.array(texts, pa.string()), labels], schema=schema))
    tmp.replace(path)
    return Dataset.from_file(str(path))


class HiddenStateMSELoss(torch.nn.Module):
    """MSE to the teacher's sentence embedding plus ``weight`` x the hidden-state MSE of every kept layer.

    Student layer ``i`` was copied from teacher layer ``teacher_layers[i]``; its output hidden states are
    pulled towards that teacher layer's outputs on the same tokens (padding masked), as in TinyBERT's
    intermediate-layer distillation. The teacher runs frozen, on the fly, on the student's own batch.
    """

    def __init__(
        self,
        model: SentenceTransformer,
        teacher: SentenceTransformer,
        teacher_layers: tuple[int, ...],
        weight: float = 1.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_layers = teacher_layers
        self.weight = weight

    def forward(self, sentence_features: list[dict[str, torch.Tensor]], labels: torch.Tensor) -> torch.Tensor:
        features = sentence_features[0]
        config = self.model[0].auto_model.config
        previous, config.output_hidden_states = config.output_hidden_states, True
        try:
            output = self.model(dict(features))
        finally:
            config.output_hidden_states = previous
        embedding_loss = torch.nn.functional.mse_loss(output["sentence_embedding"], labels)
        with torch.no_grad():
            inputs = {
                k: v for k, v in features.items() if k in ("input_ids", "attention_mask", "token_type_ids")
            }
            teacher_hidden = self.teacher[0].auto_model(**inputs, output_hidden_states=True).hidden_states
        mask = features["attention_mask"].unsqueeze(-1).to(output["sentence_embedding"].dtype)
        tokens = mask.sum() * teacher_hidden[0].shape[-1]
        student_hidden = output["all_layer_embeddings"]
        layer_losses = [
            (((student_hidden[i + 1] - teacher_hidden[t + 1]) ** 2) * mask).sum() / tokens
            for i, t in enumerate(self.teacher_layers)
        ]
        return embedding_loss + self.weight * torch.stack(layer_losses).mean()

    def get_config_dict(self) -> dict[str, object]:
        return {"teacher_layers": list(self.teacher_layers), "weight": self.weight}


class MatryoshkaDistillLoss(torch.nn.Module):
    """MSE to the teacher's (rotated) embedding, plus, for each prefix ``d`` of ``dims``, MSE between the
    in-batch cosine-similarity matrix of the student's first ``d`` dimensions and the teacher's full one.

    Used for ``mse+matryoshka`` students, which start as the teacher's layers plus an orthogonal rotation onto
    the principal axes of its corpus embeddings (:func:`principal_rotation`), so each prefix starts out as a
    PCA of that size. Not ``MatryoshkaLoss(MSELoss)``: that truncates the embedding labels too, pulling each
    prefix towards the teacher's own prefix (the PCA the rotation already gives). The similarity term pulls
    each prefix towards the teacher's full-dimension similarities, which is what a truncated vector is for.
    """

    def __init__(self, model: SentenceTransformer, dims: Iterable[int], weight: float = 1.0) -> None:
        super().__init__()
        self.model, self.dims, self.weight = model, tuple(dims), weight

    def forward(self, sentence_features: list[dict[str, torch.Tensor]], labels: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        embeddings = self.model(sentence_features[0])["sentence_embedding"]
        labels = labels.to(embeddings.dtype)
        loss = F.mse_loss(embeddings, labels)
        teacher = F.normalize(labels, dim=1)
        teacher_similarity = teacher @ teacher.T
        for dim in self.dims:
            prefix = F.normalize(embeddings[:, :dim], dim=1)
            loss = loss + self.weight * F.mse_loss(prefix @ prefix.T, teacher_similarity)
        return loss

    def get_config_dict(self) -> dict[str, object]:
        return {"dims": list(self.dims), "weight": self.weight}


ROTATION_SENTENCES = 5_000  # corpus embeddings (evenly strided) the Matryoshka rotation is fitted on


def principal_rotation(targets: np.ndarray) -> np.ndarray:
    """The (dim, dim) orthogonal matrix whose rows are the uncentred principal axes of ``targets``, largest
    first: ``x @ R.T`` keeps every cosine and puts the most variance in the first dimensions."""
    _, _, rotation = np.linalg.svd(np.asarray(targets, dtype=np.float64), full_matrices=True)
    return rotation.astype(np.float32)


def append_rotation(model: SentenceTransformer, rotation: np.ndarray) -> SentenceTransformer:
    """Append ``rotation`` as a bias-free ``Dense`` layer (in place); the model saves and loads as usual."""
    model.append(linear_dense(torch.from_numpy(rotation)).to(model.device))
    return model


def _rotated(blocks: Blocks, rotation: np.ndarray) -> Iterator[tuple[list[str], np.ndarray]]:
    for texts, targets in blocks:
        yield texts, np.asarray(targets, dtype=np.float32) @ rotation.T


def _dev_evaluator(data: PreparedData, training: TrainingConfig, dims: tuple[int, ...] = ()) -> object:
    """sts-dev, scored during training; with ``dims`` (a Matryoshka student) at the full dimension and each
    prefix, the checkpoint score being their mean."""
    from sentence_transformers.sentence_transformer import evaluation

    dev = read_sts(data.sts_file("dev"))

    def scorer(dim: int | None) -> object:
        return evaluation.EmbeddingSimilarityEvaluator(
            dev.sentences1,
            dev.sentences2,
            dev.scores,
            name="sts-dev" if dim is None else f"sts-dev-{dim}",
            batch_size=training.batch_size,
            truncate_dim=dim,
        )

    if not dims:
        return scorer(None)
    return evaluation.SequentialEvaluator(
        [scorer(None), *(scorer(d) for d in dims)], main_score_function=lambda scores: float(np.mean(scores))
    )


def _stsb_pairs(data: PreparedData):
    from datasets import Dataset

    train = read_sts(data.sts_file("train"))
    return Dataset.from_dict(
        {"sentence1": train.sentences1, "sentence2": train.sentences2, "score": train.scores}
    )


def _fit(
    model: SentenceTransformer,
    name: str,
    train_dataset: object,
    loss: object,
    data: PreparedData,
    training: TrainingConfig,
    out_dir: Path,
    work_dir: Path,
    run_id: str | None = None,
    device: str = "cpu",
    matryoshka_dims: tuple[int, ...] = (),
) -> float | None:
    """Train with the Trainer, score sts-dev during training, save the best checkpoint to ``out_dir/model``
    and the Trainer's log history to ``out_dir/training_log.json``. With ``matryoshka_dims`` the best
    checkpoint is the one with the best mean sts-dev Spearman over the full dimension and those prefixes.

    Checkpoints go to ``work_dir/checkpoints``; when one is there already (a killed run), training resumes
    from the last one. With ``run_id``, the curves are logged to that MLflow run as it trains. Returns the
    best sts-dev Spearman. On CUDA, the forward passes run under bf16 / fp16 autocast (``mixed_precision``).
    """
    from sentence_transformers.sentence_transformer import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    dev_evaluator = _dev_evaluator(data, training, matryoshka_dims)
    rows = (
        sum(len(d) for d in train_dataset.values()) if isinstance(train_dataset, dict) else len(train_dataset)
    )
    steps_per_epoch = max(1, -(-rows // training.batch_size))
    precision = mixed_precision(device, training.mixed_precision)
    eval_steps = max(1, steps_per_epoch // training.evaluations_per_epoch)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(work_dir / "checkpoints"),
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
        metric_for_best_model="eval_sequential_score" if matryoshka_dims else "eval_sts-dev_spearman_cosine",
        greater_is_better=True,
        logging_steps=max(1, eval_steps // 2),
        report_to="none",  # the flow logs to MLflow itself; transformers would default to ["mlflow"]
        seed=training.seed,
        use_cpu=device == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        loss=loss,
        evaluator=dev_evaluator,
        callbacks=[MlflowCurves(run_id)] if run_id else None,
    )
    last = last_complete_checkpoint(work_dir / "checkpoints")
    if last:
        log.info("student %s: resuming from %s (a run stopped while training it)", name, last)
    log.info(
        "training student %s on %d rows (%d steps per epoch) on %s%s",
        name,
        rows,
        steps_per_epoch,
        device_label(device),
        f", {precision} autocast" if precision != "no" else "",
    )
    trainer.train(resume_from_checkpoint=last)
    model.save(str(out_dir / "model"))
    (out_dir / HISTORY_FILE).write_text(json.dumps(trainer.state.log_history, indent=1), encoding="utf-8")
    return trainer.state.best_metric


def last_complete_checkpoint(checkpoints: Path) -> str | None:
    """The newest checkpoint the Trainer finished writing (its ``trainer_state.json``, written last, parses);
    checkpoints a kill interrupted are removed, so they cannot be resumed from or rotated in."""
    complete = None
    numbered = [p for p in checkpoints.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    found = sorted(numbered, key=lambda p: int(p.name.split("-")[-1]))
    for folder in found:
        try:
            json.loads((folder / "trainer_state.json").read_text())
            complete = folder
        except (OSError, ValueError):
            log.warning("removing %s: a stopped run left it half-written", folder)
            shutil.rmtree(folder, ignore_errors=True)
    return str(complete) if complete else None


def _losses(model: SentenceTransformer, spec_loss: str, data: PreparedData, distill: object, loss: object):
    """The distillation dataset and loss, plus CoSENT on the STS-B train pairs for ``mse+cosent``."""
    from sentence_transformers.sentence_transformer import losses

    if spec_loss != "mse+cosent":
        return distill, loss
    # The trainer draws batches from both datasets in proportion to their sizes.
    return {"distill": distill, "stsb": _stsb_pairs(data)}, {
        "distill": loss,
        "stsb": losses.CoSENTLoss(model),
    }


def _log_done(name: str, sentences: int, seconds: float, best: float | None) -> None:
    log.info(
        "student %s trained on %d sentences in %.0f s; best sts-dev Spearman %.4f",
        name,
        sentences,
        seconds,
        best if best is not None else float("nan"),
    )


def training_inputs(
    data: PreparedData, corpus_embeddings: CachedEmbeddings, training: TrainingConfig, precision: str = "no"
) -> dict:
    """What every student's key depends on besides its own spec: targets, STS-B train/dev, settings, and
    the autocast precision actually used (float32 training keeps the key it had before GPUs were known)."""
    inputs = {
        "targets": corpus_embeddings.key,
        "stsb_train_dev": files_fingerprint(data.sts_file("train"), data.sts_file("dev")),
        "training": training.model_dump(
            mode="json", exclude={"mixed_precision", "layer_search_sentences", "matryoshka_dims"}
        ),
    }
    if precision != "no":
        inputs["mixed_precision"] = precision
    return inputs


def train_layer_reduced(
    teacher_dir: Path,
    spec: StudentSpec,
    data: PreparedData,
    corpus_embeddings: CachedEmbeddings,
    training: TrainingConfig,
    artifacts: Path,
    *,
    max_seq_length: int | None = None,
    trust_remote_code: bool = False,
    runs: ChildRuns | None = None,
    device: str = "cpu",
) -> TrainedStudent:
    """The teacher with layers removed, trained against its cached embeddings (or reused from the store).

    With ``runs``, the student's MLflow child run is opened first and gets its training curves. With
    ``layers: auto`` the layers come from :func:`tasks.layer_search.choose_layers` (its candidates are
    logged to the child run as ``layer_search.json``); the student's key holds the chosen layers, so a
    student with the same layers is trained once whichever way they were picked.
    """
    teacher_layers = count_teacher_layers(teacher_dir)
    name = student_name(spec, teacher_layers)
    run_id = runs.open(name) if runs else None
    layers = plan_layers(teacher_layers, spec)
    search: LayerChoice | None = None
    if layers is None:  # layers: auto
        assert spec.num_layers is not None
        load = {"max_seq_length": max_seq_length, "trust_remote_code": trust_remote_code, "device": device}
        search = _search_layers(
            teacher_dir, spec.num_layers, data, corpus_embeddings, training, artifacts, **load
        )
        layers = search.layers
        if run_id:
            log_layer_search(run_id, search)
    precision = mixed_precision(device, training.mixed_precision)
    matryoshka = training.matryoshka_dims if spec.loss == "mse+matryoshka" else ()
    inputs = {
        "kind": "layer-reduced",
        "teacher": fingerprint_model_dir(Path(teacher_dir), max_seq_length),
        "layers": list(layers),
        "loss": spec.loss,
        **training_inputs(data, corpus_embeddings, training, precision),
    }
    if matryoshka:
        inputs["matryoshka"] = {"dims": list(matryoshka), "rotation_sentences": ROTATION_SENTENCES}
    key = stage_key(STAGE, STAGE_VERSION, inputs)

    def build(out_dir: Path, work_dir: Path) -> dict:
        from sentence_transformers.sentence_transformer import losses

        start = time.perf_counter()
        model = load_sentence_transformer(
            teacher_dir, max_seq_length=max_seq_length, trust_remote_code=trust_remote_code, device=device
        )
        reduce_layers(model, layers)
        log.info("student %s keeps teacher layers %s of %d", name, list(layers), teacher_layers)
        blocks: Blocks = corpus_blocks(data.corpus_file, corpus_embeddings)
        if spec.loss == "mse+hidden":
            teacher = load_sentence_transformer(
                teacher_dir, max_seq_length=max_seq_length, trust_remote_code=trust_remote_code, device=device
            )
            loss: object = HiddenStateMSELoss(model, teacher, layers, training.hidden_loss_weight)
        elif matryoshka:
            rotation = principal_rotation(_rotation_targets(data, corpus_embeddings))
            append_rotation(model, rotation)
            blocks = _rotated(blocks, rotation)  # the targets in the student's rotated space
            loss = MatryoshkaDistillLoss(model, matryoshka)
        else:
            loss = losses.MSELoss(model)
        dataset = _distillation_dataset(blocks, corpus_embeddings.dim, work_dir / DATASET_FILE)
        train_dataset, loss = _losses(model, spec.loss, data, dataset, loss)
        best = _fit(
            model, name, train_dataset, loss, data, training, out_dir, work_dir, run_id, device, matryoshka
        )
        seconds = time.perf_counter() - start
        _log_done(name, len(dataset), seconds, best)
        params = {
            "layers": ",".join(map(str, layers)),
            "num_layers": str(len(layers)),
            "teacher_layers": str(teacher_layers),
        }
        if spec.loss == "mse+hidden":
            params["hidden_loss_weight"] = str(training.hidden_loss_weight)
        if matryoshka:
            params["matryoshka_dims"] = ",".join(map(str, matryoshka))
            params["dev_selection"] = "mean sts-dev Spearman over the full dimension and matryoshka_dims"
        return _result(best, seconds, len(dataset), spec.loss, params | trained_on(device, precision))

    entry = ArtifactStore(artifacts).build(STAGE, key, build, f"student {name}")
    student = _stored(TrainedStudent.from_entry(name, "layer-reduced", entry, run_id))
    if search is None:
        return student
    # The same layers may be a stored student of another spec: say here how this one chose them.
    choice = {"layer_choice": "auto", "layer_search_mse": f"{search.mse:.6g}", "layer_search_key": search.key}
    return replace(student, params={**student.params, **choice})


def _rotation_targets(data: PreparedData, corpus_embeddings: CachedEmbeddings) -> np.ndarray:
    """Evenly strided cached teacher embeddings of the corpus (training data only) to fit the rotation on."""
    blocks = corpus_blocks(data.corpus_file, corpus_embeddings)
    return probe_rows(blocks, corpus_embeddings.rows, ROTATION_SENTENCES)[1]


def _search_layers(
    teacher_dir: Path,
    budget: int,
    data: PreparedData,
    corpus_embeddings: CachedEmbeddings,
    training: TrainingConfig,
    artifacts: Path,
    **load: object,
) -> LayerChoice:
    """``layers: auto``: the greedy search on evenly strided corpus sentences and their cached targets;
    ``load`` holds ``max_seq_length``, ``trust_remote_code`` and ``device``."""
    count = training.layer_search_sentences

    def probe() -> Probe:
        return probe_rows(corpus_blocks(data.corpus_file, corpus_embeddings), corpus_embeddings.rows, count)

    key = f"{corpus_embeddings.key}:{count}"
    return choose_layers(teacher_dir, budget, probe, key, artifacts, batch_size=training.batch_size, **load)


def _stored(student: TrainedStudent) -> TrainedStudent:
    """A student reused from the store replays its stored curves into this run's child run."""
    if student.reused and student.run_id and student.history_file:
        points = log_history(student.run_id, read_history(student.history_file))
        log.info("student %s: %d stored training-curve points logged to its MLflow run", student.name, points)
    return student


def trained_on(device: str, precision: str) -> dict[str, str]:
    """Params saying where a student was trained (a stored student keeps where it was first trained)."""
    return {"train_device": device_label(device), "mixed_precision": precision}


def _result(best: float | None, seconds: float, sentences: int, loss: str, params: dict[str, str]) -> dict:
    return {
        "best_dev_spearman": best,
        "train_seconds": seconds,
        "train_sentences": sentences,
        "loss": loss,
        "params": params,
    }


def project_student(
    model: SentenceTransformer, targets: np.ndarray, projection: str, seed: int = 42
) -> tuple[np.ndarray, dict[str, str], object | None]:
    """Match a light student's output to the teacher's dimension; returns the (new) targets, params, PCA.

    ``pca``: teacher targets reduced to the student's dimension (re-normalized when the student normalizes).
    ``dense``: a trainable Dense layer (student dim -> teacher dim) before the student's Normalize, if any.
    """
    transform, params, pca = projection_of(model, targets, projection, seed)
    return (transform(targets) if transform else targets), params, pca


def projection_of(
    model: SentenceTransformer, targets: np.ndarray, projection: str, seed: int = 42
) -> tuple[Callable[[np.ndarray], np.ndarray] | None, dict[str, str], object | None]:
    """What :func:`project_student` does, with the target mapping returned as a function of a block of rows
    (None: targets unchanged), so the targets can be projected shard by shard.

    ``targets`` may be a lazy view (:meth:`CachedEmbeddings.load`): only the PCA fit reads all its rows.
    """
    from sentence_transformers.sentence_transformer.modules import Dense, Normalize

    student_dim = model.get_embedding_dimension()
    teacher_dim = targets.shape[1]
    params = {"student_dim": str(student_dim), "teacher_dim": str(teacher_dim), "projection": projection}
    if student_dim == teacher_dim:
        params["projection"] = "none"
        return None, params, None
    normalizes = isinstance(model[-1], Normalize)
    if projection == "pca":
        pca = fit_pca(targets, student_dim, seed)

        def reduce(block: np.ndarray) -> np.ndarray:
            reduced = pca.transform(np.asarray(block, dtype=np.float32)).astype(np.float32)
            if normalizes:
                reduced /= np.maximum(np.linalg.norm(reduced, axis=1, keepdims=True), 1e-12)
            return reduced

        params["pca_explained_variance"] = f"{pca.explained_variance_ratio_.sum():.4f}"
        return reduce, params, pca
    torch.manual_seed(seed)
    dense = Dense(student_dim, teacher_dim, bias=True, activation_function=torch.nn.Identity())
    if normalizes:
        del model[len(model) - 1]
    model.append(dense)
    if normalizes:
        model.append(Normalize())
    return None, params, None


def save_teacher_projection(pca: object, model_dir: Path) -> Path:
    """PCA of the teacher space the student was trained into: ``teacher_pca.npz`` (components, mean), so
    existing teacher vectors can be projected into the student's space (load with ``allow_pickle=False``)."""
    path = Path(model_dir) / "teacher_pca.npz"
    np.savez(path, components=pca.components_.astype(np.float32), mean=pca.mean_.astype(np.float32))
    return path


def train_light(
    spec: LightStudentSpec,
    data: PreparedData,
    corpus_embeddings: CachedEmbeddings,
    training: TrainingConfig,
    artifacts: Path,
    runs: ChildRuns | None = None,
    device: str = "cpu",
) -> TrainedStudent:
    """A smaller pretrained model trained against the teacher's (projected) embeddings, or reused.

    With ``runs``, the student's MLflow child run is opened first and gets its training curves.
    """
    name = light_student_name(spec)
    precision = mixed_precision(device, training.mixed_precision)
    model_dir = resolve_model_dir(spec.model, "light_students[].model")
    if spec.learning_rate is not None:
        training = training.model_copy(update={"learning_rate": spec.learning_rate})
    inputs = {
        "kind": "light",
        "base": fingerprint_model_dir(model_dir, spec.max_seq_length),
        "projection": spec.projection,
        "loss": spec.loss,
        **training_inputs(data, corpus_embeddings, training, precision),
    }
    key = stage_key(STAGE, STAGE_VERSION, inputs)
    run_id = runs.open(name) if runs else None

    def build(out_dir: Path, work_dir: Path) -> dict:
        from sentence_transformers.sentence_transformer import losses

        start = time.perf_counter()
        model = load_sentence_transformer(
            model_dir,
            max_seq_length=spec.max_seq_length,
            trust_remote_code=spec.trust_remote_code,
            device=device,
        )
        transform, params, pca = projection_of(
            model, corpus_embeddings.load(), spec.projection, training.seed
        )
        log.info("light student %s from %s: %s", name, model_dir, params)
        loss = losses.MSELoss(model)
        blocks = corpus_blocks(data.corpus_file, corpus_embeddings)
        if transform is not None:
            blocks = ((texts, transform(targets)) for texts, targets in blocks)
        dim = model.get_embedding_dimension() if transform is not None else corpus_embeddings.dim
        dataset = _distillation_dataset(blocks, dim, work_dir / DATASET_FILE)
        train_dataset, loss = _losses(model, spec.loss, data, dataset, loss)
        params["learning_rate"] = str(training.learning_rate)
        best = _fit(model, name, train_dataset, loss, data, training, out_dir, work_dir, run_id, device)
        if pca is not None:
            save_teacher_projection(pca, out_dir / "model")
        seconds = time.perf_counter() - start
        _log_done(name, len(dataset), seconds, best)
        params["base_model"] = spec.model
        return _result(best, seconds, len(dataset), spec.loss, params | trained_on(device, precision))

    entry = ArtifactStore(artifacts).build(STAGE, key, build, f"light student {name}")
    return _stored(TrainedStudent.from_entry(name, "light", entry, run_id))


# Prefect tasks; their logic stays callable as plain functions (``task.fn`` is the function itself).
train_student = task(train_layer_reduced, name="train-layer-reduced-student", log_prints=False)
train_light_student = task(train_light, name="train-light-student", log_prints=False)
