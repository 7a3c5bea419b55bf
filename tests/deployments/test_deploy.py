"""Deployment settings and the run form's schema, without a server (the stack test applies them for real)."""

import pytest
from prefect.utilities.callables import parameter_schema

from deployments.deploy import DeploymentSettings, as_form, main
from flows.benchmark import benchmark_models
from flows.distill import distill
from flows.teacher_cache import warm_teacher_cache


def test_optional_fields_become_plain_inputs_that_start_empty() -> None:
    form = as_form(parameter_schema(distill.fn).model_dump_for_openapi())
    corpus = form["properties"]["corpus_wiki_sentences"]
    assert corpus["type"] == "integer" and corpus["minimum"] == 0
    assert "default" not in corpus and "anyOf" not in corpus
    assert form["properties"]["students"]["items"] == {"$ref": "#/definitions/StudentSpec"}
    assert form["properties"]["compressions"]["items"]["enum"][0] == "pca"
    assert form["properties"]["profile"]["default"] == "quick"  # a real default stays
    assert all(p.get("description") for p in form["properties"].values())


@pytest.mark.parametrize("flow", [benchmark_models, warm_teacher_cache], ids=["benchmark", "warm-cache"])
def test_the_other_flows_forms_start_on_the_profile(flow) -> None:
    form = as_form(parameter_schema(flow.fn).model_dump_for_openapi())
    assert form["properties"]["profile"]["default"] == "quick"
    assert all(p.get("description") for p in form["properties"].values())
    empty = {name: f for name, f in form["properties"].items() if name != "profile"}
    assert all("default" not in f and "anyOf" not in f for f in empty.values())


def test_benchmark_form_takes_a_list_of_references() -> None:
    form = as_form(parameter_schema(benchmark_models.fn).model_dump_for_openapi())
    assert form["properties"]["models"] == {
        "type": "array",
        "items": {"type": "string"},
        "title": "models",
        "description": form["properties"]["models"]["description"],
        "position": 0,
    }
    assert "champion" in form["properties"]["models"]["description"]


def test_settings_come_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("DISTILL_NIGHTLY_CRON", "30 4 * * 1-5")
    monkeypatch.setenv("DISTILL_NIGHTLY_TIMEZONE", "Europe/Berlin")
    monkeypatch.setenv("DISTILL_POOL_CONCURRENCY_LIMIT", "2")
    settings = DeploymentSettings()
    assert (
        settings.nightly_cron,
        settings.nightly_timezone,
        settings.work_pool,
        settings.pool_concurrency_limit,
    ) == ("30 4 * * 1-5", "Europe/Berlin", "distill-cpu", 2)
    assert DeploymentSettings.model_fields["pool_concurrency_limit"].default == 1  # one run at a time


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "DISTILL_NIGHTLY_CRON",
            "every night",
            "DISTILL_NIGHTLY_CRON: 'every night' is not a cron expression",
        ),
        ("DISTILL_CACHE_CRON", "at one", "DISTILL_CACHE_CRON: 'at one' is not a cron expression"),
        (
            "DISTILL_NIGHTLY_TIMEZONE",
            "Mars/Olympus",
            "DISTILL_NIGHTLY_TIMEZONE: 'Mars/Olympus' is not an IANA",
        ),
        (
            "DISTILL_NIGHTLY_PROFILE",
            "huge",
            "DISTILL_NIGHTLY_PROFILE: Input should be 'smoke', 'quick', 'standard' or 'full'",
        ),
        (
            "DISTILL_POOL_CONCURRENCY_LIMIT",
            "0",
            "DISTILL_POOL_CONCURRENCY_LIMIT: Input should be greater than or equal to 1",
        ),
        (
            "DISTILL_UNRESPONSIVE_AFTER_S",
            "30",
            "DISTILL_UNRESPONSIVE_AFTER_S: Input should be greater than or equal to 60",
        ),
    ],
)
def test_bad_settings_are_named_before_contacting_the_server(
    monkeypatch, capsys, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")  # nothing listens: never reached
    monkeypatch.setenv(variable, value)
    assert main() == 2
    assert message in capsys.readouterr().err


def test_no_server_named_is_a_clear_error(monkeypatch, capsys) -> None:
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    assert main() == 2
    assert "PREFECT_API_URL is not set" in capsys.readouterr().err
