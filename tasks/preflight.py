"""Fail fast: check every model reference, layer list and data file before any encoding or training.

The data files are read here as the flow's data step reads them (STS-B and the held-out suites in full, the
Wikipedia file as far as the corpus goes), so a malformed row, a truncated gzip or a corpus too small for
the PCA dimensions is reported in seconds, naming the file, the line and the fix, and never retried.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from tasks.config import (
    BEST_STUDENT,
    CompressStep,
    DistillConfig,
    OnnxInt8Step,
    OnnxStep,
    OpenVinoInt8Step,
    PcaStep,
    StaticStudentConfig,
    TorchInt8Step,
    TruncateStep,
)
from tasks.data import DataCheck, check_data
from tasks.devices import device_label, mixed_precision, resolve_device
from tasks.models import resolve_model_dir
from tasks.onnx_export import check_onnx_installed, pick_kernel
from tasks.openvino_quant import check_openvino_installed
from tasks.pca import PcaConfigError, check_dims, check_pca_dims
from tasks.static_student import check_model2vec_installed, check_training_corpus, static_step
from tasks.students import count_teacher_layers, light_student_name, plan_layers, student_name
from tasks.torch_quant import check_patterns

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    teacher_dir: Path
    teacher_layers: int
    student_layers: dict[str, tuple[int, ...] | str]  # a str for layers: auto (chosen when trained)
    light_students: dict[str, Path]  # name -> resolved model folder
    data: DataCheck | None = None  # the sizes the data step will produce
    device: str = "cpu"  # config.device resolved: cpu or cuda


def check_inputs(config: DistillConfig) -> Plan:
    """Resolve the teacher, plan each student's layers and check the data files; raise on the first problem.

    Every problem is a ``ValueError`` (``DataError``, ``ModelReferenceError``, ``PcaConfigError``, ...)
    whose message names the field or file and the fix. Nothing is written.
    """
    device = resolve_device(config.device)
    mixed_precision(device, config.training.mixed_precision)  # bf16 asked of a GPU without it fails here
    teacher_dir = resolve_model_dir(config.teacher.model, "teacher.model")
    teacher_layers = count_teacher_layers(teacher_dir)
    student_layers: dict[str, tuple[int, ...] | str] = {}
    for spec in config.students:
        layers = plan_layers(teacher_layers, spec)
        name = student_name(spec, teacher_layers)
        if name in student_layers:
            raise ValueError(f"two students are both named {name!r}: give one of them a distinct name")
        student_layers[name] = f"auto ({spec.num_layers})" if layers is None else layers
    if any(spec.loss == "mse+matryoshka" for spec in config.students):
        teacher_dim = _embedding_dim(teacher_dir)
        for dims in config.training.matryoshka_dims:
            check_dims(dims, teacher_dim, "training.matryoshka_dims")
    light = _check_light_students(config, teacher_dir, set(student_layers))
    names = [*student_layers, *light]
    data = check_data(config.data)
    corpus_size = data.corpus_size if config.data.source == "local" else None
    _check_light_pca(config, teacher_dir, light, corpus_size)
    _check_compress(config, teacher_dir, names, corpus_size)
    _check_static(config, teacher_dir, names, corpus_size)
    log.info(
        "teacher %s (%d layers); students %s; light students %s; corpus %d sentences, held-out %d; on %s",
        teacher_dir,
        teacher_layers,
        student_layers,
        {name: str(path) for name, path in light.items()},
        data.corpus_size,
        data.heldout_size,
        device_label(device),
    )
    return Plan(teacher_dir, teacher_layers, student_layers, light, data, device)


def _corpus_source(config: DistillConfig) -> str:
    data = config.data
    stsb = " + the STS-B train sentences" if data.include_stsb_train else ""
    return f"data.corpus_wiki_sentences={data.corpus_wiki_sentences} Wikipedia sentences{stsb}"


@task(name="check-inputs")
def check_inputs_task(config: DistillConfig) -> Plan:
    """Prefect task around :func:`check_inputs`."""
    return check_inputs(config)


def _check_light_students(config: DistillConfig, teacher_dir: Path, taken: set[str]) -> dict[str, Path]:
    """Resolve each light student's model; PCA targets need a student no wider than the teacher."""
    light: dict[str, Path] = {}
    teacher_dim = _embedding_dim(teacher_dir)
    for spec in config.light_students:
        name = light_student_name(spec)
        if name in taken or name in light:
            raise ValueError(f"two students are both named {name!r}: give one of them a distinct name")
        model_dir = resolve_model_dir(spec.model, "light_students[].model")
        dim = _embedding_dim(model_dir)
        if spec.projection == "pca" and dim > teacher_dim:
            raise ValueError(
                f"light_students[{name}].projection=pca: the student's dimension {dim} exceeds the teacher's "
                f"{teacher_dim}, so PCA cannot reduce the targets to it; use projection=dense"
            )
        light[name] = model_dir
    return light


def _check_light_pca(
    config: DistillConfig, teacher_dir: Path, light: dict[str, Path], corpus_size: int | None
) -> None:
    """A ``pca`` light student fits a PCA of the teacher's corpus embeddings: at least one row a dimension."""
    if corpus_size is None:
        return
    teacher_dim = _embedding_dim(teacher_dir)
    for spec, (name, model_dir) in zip(config.light_students, light.items(), strict=True):
        dim = _embedding_dim(model_dir)
        if spec.projection == "pca" and dim != teacher_dim and dim > corpus_size:
            raise ValueError(
                f"light_students[{name}].projection=pca: reducing the teacher's targets to {dim} dimensions "
                f"needs at least {dim} corpus sentences, but the corpus will hold {corpus_size} "
                f"({_corpus_source(config)}); raise data.corpus_wiki_sentences or use projection=dense"
            )


def _check_compress(
    config: DistillConfig, teacher_dir: Path, students: list[str], corpus_size: int | None = None
) -> None:
    """Each active step: its targets name variants, its settings fit the teacher, the corpus and this CPU."""
    compress = config.compress
    known = ["teacher", *students, *([BEST_STUDENT] if students else []), *static_names(config.static)]
    dim = _embedding_dim(teacher_dir)
    chosen = set(compress.techniques) if compress.techniques is not None else None
    for index, step in enumerate(compress.steps):
        if chosen is not None and step.technique not in chosen:
            continue
        field = f"compress.steps[{index}]"
        unknown = [n for n in step.targets if n not in known]
        if unknown:
            raise ValueError(
                f"{field}.targets ({step.technique}): {unknown} name no variant; choose from {known}"
            )
        then = getattr(step, "then", ()) if chosen is None or "chain" in chosen else ()
        for name, each in ((field, step), *((f"{field}.then[{i}]", s) for i, s in enumerate(then))):
            _check_step(config, name, each, dim, corpus_size)


def _check_step(
    config: DistillConfig, field: str, step: CompressStep, dim: int, corpus_size: int | None
) -> None:
    if isinstance(step, TruncateStep):
        for dims in step.dims:
            check_dims(dims, dim, f"{field}.dims")
    if isinstance(step, PcaStep):
        for dims in step.dims:
            check_pca_dims(dims, dim, step.fit_sentences, f"{field}.dims")
            if corpus_size is not None and dims > corpus_size:  # the fit uses the first rows of the corpus
                raise PcaConfigError(
                    f"{field}.dims: {dims} dimensions need at least {dims} fitting sentences, but the "
                    f"corpus will hold only {corpus_size} ({_corpus_source(config)}); raise "
                    f"data.corpus_wiki_sentences or lower the dimensions"
                )
    elif isinstance(step, TorchInt8Step):
        check_patterns(step.exclude, f"{field}.exclude")
    elif isinstance(step, OnnxStep | OnnxInt8Step):
        check_onnx_installed()
        if isinstance(step, OnnxInt8Step):
            pick_kernel(step.kernel, field=f"{field}.kernel")
    elif isinstance(step, OpenVinoInt8Step):
        check_openvino_installed()


def _embedding_dim(model_dir: Path) -> int:
    """Output dimension from the saved config (the last Dense layer's, else the transformer's hidden size)."""
    dim = int(json.loads((model_dir / "config.json").read_text()).get("hidden_size", 0))
    modules = model_dir / "modules.json"
    if modules.is_file():
        for module in json.loads(modules.read_text()):
            dense = model_dir / module.get("path", "") / "config.json"
            if "Dense" in module.get("type", "") and dense.is_file():
                dim = int(json.loads(dense.read_text())["out_features"])
    return dim


def static_names(static: StaticStudentConfig) -> list[str]:
    """Rows the static students add, by source name (``best-student``'s is known only after training)."""
    steps = [
        static_step(static.pca_dims, trained) for trained in ([False, True] if static.train else [False])
    ]
    return [f"{source}-{step}" for source in static.sources if source != BEST_STUDENT for step in steps]


def _check_static(
    config: DistillConfig, teacher_dir: Path, students: list[str], corpus_size: int | None
) -> None:
    static = config.static
    if not static.sources:
        return
    known = ["teacher", BEST_STUDENT, *students]
    unknown = [n for n in static.sources if n not in known]
    if unknown:
        raise ValueError(f"static.sources: {unknown} name no variant; choose from {known}")
    if BEST_STUDENT in static.sources and not students:
        raise ValueError("static.sources names best-student but no students are configured")
    dim = _embedding_dim(teacher_dir)
    if static.pca_dims is not None and static.pca_dims > dim:
        raise ValueError(f"static.pca_dims: {static.pca_dims} exceeds the teacher's dimension {dim}")
    if static.train and corpus_size is not None:
        check_training_corpus(corpus_size)
    check_model2vec_installed(train=static.train)
