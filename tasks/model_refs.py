"""Model references for the benchmark flow: checked before any work, then fetched as local variants.

A reference is one of:

- ``champion``: the registered model's ``champion`` alias (the project's ``<experiment>-student``, or
  ``selection.model_name``); ``<name>@<alias>`` for any registered model and alias;
- ``models:/<name>/<version>``, ``models:/<name>@<alias>`` or ``models:/<model id>``;
- ``runs:/<run id>/model``: the model a child run of the distillation flow logged;
- a local folder: a SentenceTransformer folder, or an MLflow model folder (one holding ``MLmodel``);
- an installed package that carries a model, or a Hugging Face Hub id (as for ``teacher.model``).

MLflow models are downloaded once per logged model into ``<work_dir>/benchmark-models/<model id>`` (under a
temporary name, renamed when complete). Nothing from them is executed or unpickled: ``MLmodel`` is read
as YAML, a pyfunc variant's ``variant.json`` as JSON, its int8 ranges with ``allow_pickle=False``, and the
variant runs through this package's own :func:`tasks.variants.load_model`. Name, kind and lineage come from
the source child run's params, so rows read as they did in the run that made them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, get_args

import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from tasks.artifacts import stage_key
from tasks.config import DistillConfig
from tasks.files import file_sha256
from tasks.models import ModelReferenceError, resolve_model_dir
from tasks.variants import Kind, Precision, Variant, runtime_spec, variant_files, variant_from_spec

log = logging.getLogger(__name__)

CHAMPION = "champion"
FETCHED_FOLDER = "benchmark-models"
_BACKENDS = ("torch", "onnx", "openvino", "torch-int8")
_ALIAS_REF = re.compile(r"^(?P<name>[^/:%@]+)@(?P<alias>[\w-]+)$")
_MODELS_URI = re.compile(
    r"^models:/(?:(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))|(?P<id>m-\w+))$"
)
_RUNS_URI = re.compile(r"^runs:/(?P<run>[0-9a-f]{32})/(?P<path>.+)$")


class ModelRefError(ValueError):
    """A reference that names nothing this flow can benchmark; the message says which one and the fix."""


@dataclass(frozen=True)
class ModelRef:
    """A checked reference: an MLflow model URI, or a local folder."""

    text: str  # as the user gave it
    uri: str | None = None  # models:/ or runs:/
    path: Path | None = None  # SentenceTransformer folder or MLflow model folder
    registered: str = ""  # "<name> v<version>" when it names a registered version


def registered_model_name(config: DistillConfig) -> str:
    """Where the distillation flow registers its champion (and where ``champion`` is looked up)."""
    return config.selection.model_name or f"{config.tracking.experiment}-student"


def check_model_refs(
    refs: list[str], model_name: str, store_exists: bool = True, client: MlflowClient | None = None
) -> list[ModelRef]:
    """Parse and check every reference (it exists, in the registry / tracking store / on disk); raise
    :class:`ModelRefError` naming the first bad one and the fix. Downloads and loads nothing, and opens
    the tracking store only when a reference points into it (``store_exists=False``: a store not created
    yet, where no such reference can exist)."""
    if not refs:
        raise ModelRefError("models: empty; give at least one reference, e.g. champion or runs:/<id>/model")
    checked = []
    for index, given in enumerate(refs):
        field = f"models[{index}]={given!r}"
        text = str(given).strip()
        if not text:
            raise ModelRefError(f"{field}: empty reference; remove it or name a model")
        uri = _as_uri(text, model_name)
        if uri is None:
            checked.append(_check_local(text, field))
            continue
        if not store_exists:
            raise ModelRefError(
                f"{field}: the MLflow tracking store does not exist yet, so it holds no models; run the "
                "distillation flow first, or point tracking.tracking_uri at the store that has the model"
            )
        client = client or MlflowClient()
        check = _check_run if uri.startswith("runs:/") else _check_registered
        checked.append(check(text, uri, field, client))
    return checked


def _as_uri(text: str, model_name: str) -> str | None:
    """The MLflow URI a reference stands for; None for a folder, package or Hub id."""
    if text == CHAMPION:
        return f"models:/{model_name}@{CHAMPION}"
    if _ALIAS_REF.match(text) and not Path(text).exists():
        return f"models:/{text}"
    return text if text.startswith(("models:/", "runs:/")) else None


def _check_local(text: str, field: str) -> ModelRef:
    path = Path(text).expanduser()
    if (path / "MLmodel").is_file():
        return ModelRef(text, path=path.resolve())
    try:
        return ModelRef(text, path=resolve_model_dir(text, field.split("=")[0]))
    except ModelReferenceError as exc:
        raise ModelRefError(
            f"{exc}. A model reference is also one of: champion, <registered name>@<alias>, "
            "models:/<name>/<version>, runs:/<run id>/model, or an MLflow model folder"
        ) from None


def _check_registered(text: str, uri: str, field: str, client: MlflowClient) -> ModelRef:
    match = _MODELS_URI.match(uri)
    if match is None:
        raise ModelRefError(
            f"{field}: {uri!r} is not a model URI; write models:/<name>/<version>, models:/<name>@<alias> "
            "or models:/<model id>"
        )
    if match["id"]:
        try:
            client.get_logged_model(match["id"])
        except MlflowException:
            raise ModelRefError(f"{field}: no logged model {match['id']} in this tracking store") from None
        return ModelRef(text, uri=uri)
    name = match["name"]
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException as exc:
        raise ModelRefError(f"{field}: the model registry did not answer ({exc})") from None
    if not versions:
        raise ModelRefError(
            f"{field}: no registered model {name!r} (or it has no versions) in this tracking store; run the "
            "distillation flow first (it registers its champion there) or name another registered model"
        )
    if match["alias"]:
        try:
            version = client.get_model_version_by_alias(name, match["alias"])
        except MlflowException:
            aliases = ", ".join(sorted(client.get_registered_model(name).aliases)) or "none"
            numbers = ", ".join(sorted(str(v.version) for v in versions))
            raise ModelRefError(
                f"{field}: registered model {name!r} has no alias {match['alias']!r} (aliases: {aliases}; "
                f"versions: {numbers}); name a version instead: models:/{name}/<version>"
            ) from None
        return ModelRef(text, uri=uri, registered=f"{name} v{version.version}")
    if match["version"] not in {str(v.version) for v in versions}:
        raise ModelRefError(
            f"{field}: registered model {name!r} has no version {match['version']} (versions: "
            f"{', '.join(sorted(str(v.version) for v in versions))})"
        )
    return ModelRef(text, uri=uri, registered=f"{name} v{match['version']}")


def _check_run(text: str, uri: str, field: str, client: MlflowClient) -> ModelRef:
    match = _RUNS_URI.match(uri)
    if match is None:
        raise ModelRefError(f"{field}: {uri!r} is not a run URI; write runs:/<32-character run id>/model")
    try:
        run = client.get_run(match["run"])
    except MlflowException:
        raise ModelRefError(f"{field}: no MLflow run {match['run']} in this tracking store") from None
    models = _logged_models(client, run.info.experiment_id, match["run"])
    if match["path"].strip("/") not in {m.name for m in models}:
        names = ", ".join(sorted({m.name for m in models})) or "none"
        raise ModelRefError(
            f"{field}: run {match['run']} logged no model named {match['path']!r} (its models: {names}); "
            "the distillation flow logs each variant's model as 'model' (tracking.log_models)"
        )
    return ModelRef(text, uri=uri)


def fetch_variant(ref: ModelRef, dest_root: Path, client: MlflowClient | None = None) -> Variant:
    """The reference as a local :class:`Variant`: downloaded (once per logged model) and described by
    its source run's params; its key hashes the files it runs on."""
    client = client or MlflowClient()
    folder = ref.path if ref.path is not None else _download(ref, Path(dest_root), client)
    if (folder / "MLmodel").is_file():
        variant, source_run = _mlflow_variant(ref, folder)
    else:  # a SentenceTransformer folder
        variant, source_run = Variant(_default_name(ref), "light", folder), None
    params = {"model_ref": ref.text}
    if ref.uri:
        params["source_model_uri"] = ref.uri
    if ref.registered:
        params["registered_model"] = ref.registered
    if source_run is not None:
        variant, source_params = _described_by_run(variant, source_run, client)
        params.update(source_params)
    return replace(variant, params={**variant.params, **params}, key=content_key(variant))


def content_key(variant: Variant) -> str:
    """What the variant computes: its files (names and contents), how it runs them, and its int8 ranges."""
    root = Path(variant.model_dir)
    files = {p.relative_to(root).as_posix(): file_sha256(p) for p in variant_files(variant)}
    spec = {k: v for k, v in runtime_spec(variant).items() if k not in ("name", "kind")}
    ranges = file_sha256(variant.calibration_file) if variant.calibration_file else None
    return stage_key("benchmarked-model", 1, {"files": files, "runtime": spec, "ranges": ranges})


def _download(ref: ModelRef, dest_root: Path, client: MlflowClient) -> Path:
    import mlflow

    model_id = _model_id(ref, client)
    target = dest_root / model_id
    if (target / "MLmodel").is_file():
        log.info("%s: using the copy downloaded earlier (%s)", ref.text, target)
        return target
    tmp = dest_root / f".{model_id}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.uri, dst_path=str(tmp)))
        if local != tmp:  # runs:/<id>/model lands in tmp/model
            for item in local.iterdir():
                item.rename(tmp / item.name)
        tmp.rename(target)
    except OSError:
        if not (target / "MLmodel").is_file():  # another run finished the same download first: keep it
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("%s: downloaded to %s", ref.text, target)
    return target


def _model_id(ref: ModelRef, client: MlflowClient) -> str:
    """The logged model's id (a stable folder name for its download)."""
    assert ref.uri is not None
    match = _MODELS_URI.match(ref.uri)
    if match is not None and match["id"]:
        return match["id"]
    if match is not None:
        version = (
            client.get_model_version_by_alias(match["name"], match["alias"])
            if match["alias"]
            else client.get_model_version(match["name"], match["version"])
        )
        if version.model_id:
            return version.model_id
        return f"{match['name']}-v{version.version}"
    run = _RUNS_URI.match(ref.uri)
    assert run is not None
    models = _logged_models(client, client.get_run(run["run"]).info.experiment_id, run["run"])
    named = sorted(
        (m for m in models if m.name == run["path"].strip("/")), key=lambda m: m.creation_timestamp
    )
    return named[-1].model_id if named else hashlib.sha256(ref.uri.encode()).hexdigest()[:16]


def _logged_models(client: MlflowClient, experiment_id: str, run_id: str) -> list:
    """The MLflow models run ``run_id`` logged."""
    return client.search_logged_models(
        experiment_ids=[experiment_id], filter_string=f"source_run_id = '{run_id}'"
    )


def _mlflow_variant(ref: ModelRef, folder: Path) -> tuple[Variant, str | None]:
    """A variant of an MLflow model folder this project logged, and the run that logged it."""
    mlmodel = folder / "MLmodel"
    try:
        meta = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ModelRefError(f"{ref.text}: {mlmodel} is not readable YAML ({exc})") from None
    flavors = meta.get("flavors") or {}
    pyfunc = flavors.get("python_function") or {}
    name = _default_name(ref)
    if "sentence_transformers" in flavors:
        variant = Variant(name, "light", folder / str(pyfunc.get("data", "model.sentence_transformer")))
    elif "variant" in (pyfunc.get("artifacts") or {}):
        variant = _pyfunc_variant(ref, folder, pyfunc["artifacts"], name)
    else:
        raise ModelRefError(
            f"{ref.text}: an MLflow model of flavor(s) {sorted(flavors)} that this project did not log; "
            "benchmark its SentenceTransformer folder instead"
        )
    return variant, meta.get("run_id")


def _pyfunc_variant(ref: ModelRef, folder: Path, artifacts: dict[str, Any], name: str) -> Variant:
    spec_file = folder / artifacts["variant"]["path"]
    try:
        spec = json.loads(spec_file.read_text(encoding="utf-8"))
        backend, precision = spec["backend"], spec["precision"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelRefError(f"{ref.text}: {spec_file} is not a variant spec ({exc})") from None
    if backend not in _BACKENDS or precision not in get_args(Precision):
        raise ModelRefError(
            f"{ref.text}: {spec_file} names backend {backend!r} / precision {precision!r}; this version runs "
            f"{list(_BACKENDS)} / {list(get_args(Precision))}"
        )
    calibration = artifacts.get("calibration")
    spec = {
        "int8_exclude": [],
        "int8_per_channel": True,
        "model_file": None,
        **spec,
        "name": name,
        "kind": spec.get("kind") if spec.get("kind") in get_args(Kind) else "quantized",
    }
    return variant_from_spec(
        spec, folder / artifacts["model"]["path"], folder / calibration["path"] if calibration else None
    )


def _described_by_run(variant: Variant, run_id: str, client: MlflowClient) -> tuple[Variant, dict[str, str]]:
    """Name, kind, lineage and STS-label use as the source child run recorded them, and where it came
    from."""
    try:
        run = client.get_run(run_id)
    except MlflowException:
        log.warning("source run %s of %s is not in this store; kept its own name", run_id, variant.name)
        return variant, {"source_run_id": run_id}
    params, tags = run.data.params, run.data.tags
    kind = params.get("variant_kind")
    described = replace(
        variant,
        name=params.get("variant", variant.name),
        kind=kind if kind in get_args(Kind) and kind != "teacher" else variant.kind,
        parent=params.get("parent") or None,
        uses_sts_labels=params.get("uses_sts_labels") == "true",
    )
    source = {
        "source_run_id": run_id,
        "source_parent_run_id": tags.get("mlflow.parentRunId", ""),
        "lineage": params.get("lineage", described.name),
        **{
            f"source_{k}": params[k]
            for k in ("teacher", "teacher_key", "data_fingerprint", "profile")
            if k in params
        },
    }
    return described, source


def _default_name(ref: ModelRef) -> str:
    if ref.path is not None:
        return ref.path.name
    text = ref.registered or ref.text
    return re.sub(r"[^\w.-]+", "-", text.removeprefix("models:/").removeprefix("runs:/")).strip("-")


def unique_names(variants: list[Variant], taken: set[str]) -> list[Variant]:
    """Rename repeats (``name-2``, ...): two references may name variants of the same name."""
    out = []
    for variant in variants:
        name, n = variant.name, 1
        while name in taken:
            n += 1
            name = f"{variant.name}-{n}"
        taken.add(name)
        out.append(variant if name == variant.name else replace(variant, name=name))
    return out
