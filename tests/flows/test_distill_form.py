"""The flow's parameters as the Prefect UI renders them: a form whose every field is typed, described and
takes effect; bad values fail before any work with the CLI's message."""

import pytest
from prefect.utilities.callables import parameter_schema

from flows.distill import distill
from tasks.config import TECHNIQUES, ConfigError


@pytest.fixture(scope="module")
def schema() -> dict:
    return parameter_schema(distill.fn).model_dump_for_openapi()


def test_profile_is_a_choice_of_the_profiles(schema) -> None:
    profile = schema["properties"]["profile"]
    assert profile["enum"] == ["smoke", "quick", "standard", "full"] and profile["default"] == "quick"


def test_every_field_has_a_description_and_a_default(schema) -> None:
    assert "required" not in schema  # a run can be started without filling anything in
    for name, field in schema["properties"].items():
        assert field.get("description"), f"{name} has no description in the form"
        assert "default" in field, name


def test_typed_choices_render_as_selects(schema) -> None:
    compressions = schema["properties"]["compressions"]["anyOf"][0]
    assert compressions["items"]["enum"] == list(TECHNIQUES)
    student = schema["definitions"]["StudentSpec"]["properties"]
    assert student["loss"]["enum"] == ["mse", "mse+cosent", "mse+hidden", "mse+matryoshka"]
    assert all(field.get("description") for field in student.values())


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"students": [{"num_layers": 2, "layers": [0, 1]}]}, "students.0: a student sets exactly one of"),
        ({"epochs": 0}, "training.epochs: Input should be greater than 0 (got 0)"),
        ({"overrides": {"training": {"batch_size": "big"}}}, "training.batch_size: Input should be a valid"),
        ({"compressions": ["zip"]}, "compressions: ['zip'] are not techniques"),
    ],
)
def test_bad_values_fail_before_any_task(parameters: dict, message: str) -> None:
    # distill.fn is the flow body without Prefect: the error comes before the first task would run
    with pytest.raises(ConfigError) as info:
        distill.fn(profile="smoke", **parameters)
    assert message in str(info.value)
