"""Fail fast: check every model reference, layer list and data file before any encoding or training."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from prefect import task

from tasks.config import DistillConfig
from tasks.data import STSB_FILES, WIKI_FILES, find_file
from tasks.models import resolve_model_dir
from tasks.students import count_teacher_layers, plan_layers, student_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Plan:
    teacher_dir: Path
    teacher_layers: int
    student_layers: dict[str, tuple[int, ...]]


def check_inputs(config: DistillConfig) -> Plan:
    """Resolve the teacher, plan each student's layers and find the data files; raise on the first problem."""
    teacher_dir = resolve_model_dir(config.teacher.model, "teacher.model")
    teacher_layers = count_teacher_layers(teacher_dir)
    student_layers: dict[str, tuple[int, ...]] = {}
    for spec in config.students:
        layers = plan_layers(teacher_layers, spec)
        name = student_name(spec, layers, teacher_layers)
        if name in student_layers:
            raise ValueError(f"two students are both named {name!r}: give one of them a distinct name")
        student_layers[name] = layers
    if config.data.source == "local":
        find_file(config.data.data_dir, STSB_FILES, "STS benchmark")
        if config.data.corpus_wiki_sentences or config.data.heldout_sentences:
            find_file(config.data.data_dir, WIKI_FILES, "Wikipedia sentence corpus")
    log.info("teacher %s (%d layers); students %s", teacher_dir, teacher_layers, student_layers)
    return Plan(teacher_dir, teacher_layers, student_layers)


@task(name="check-inputs")
def check_inputs_task(config: DistillConfig) -> Plan:
    """Prefect task around :func:`check_inputs`."""
    return check_inputs(config)
