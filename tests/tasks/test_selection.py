"""The champion rule on tables, and the registry's alias on a real (SQLite) MLflow store."""

from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tasks.config import SelectionConfig
from tasks.mlflow_models import log_variant_model
from tasks.selection import CHAMPION_ALIAS, choose_champion, register_choice, select_champion, version_tags
from tasks.variants import Variant


def _table(rows: list[tuple], agreement: dict[str, float] | None = None) -> pd.DataFrame:
    """(variant, kind, dev, test retention %, speed-up, bytes/vector, size MB, uses labels, status); agreement
    with the teacher 0.8 unless ``agreement`` names the variant."""
    records = [
        {
            "heldout_agreement_spearman": (agreement or {}).get(name, 0.8),
            "variant": name,
            "kind": kind,
            "lineage": f"teacher > {name}",
            "status": status,
            "uses_sts_labels": labels,
            "sts_dev_spearman": dev,
            "sts_test_spearman": test / 100 * 0.8,
            "sts_test_retention_pct": test,
            "speedup_vs_teacher": speed,
            "sentences_per_second": 100 * speed,
            "bytes_per_vector": bpv,
            "size_mb": size,
        }
        for name, kind, dev, test, speed, bpv, size, labels, status in rows
    ]
    return pd.DataFrame(records)


TEACHER = ("teacher", "teacher", 0.80, 100.0, 1.0, 1536, 90.0, False, "ok")
_ROWS = [
    TEACHER,
    ("layers-3of6", "layer-reduced", 0.79, 98.5, 2.0, 1536, 60.0, False, "ok"),  # 98.75% dev
    ("layers-2of6", "layer-reduced", 0.77, 96.0, 3.0, 1536, 45.0, False, "ok"),  # 96.25% dev
    ("cosent-int8", "quantized", 0.80, 100.5, 7.0, 384, 20.0, True, "ok"),  # saw STS-B labels
    ("layers-3of6-emb-int8", "embedding-quantized", 0.79, 98.4, 1.9, 384, 60.0, False, "ok"),
    ("static", "static", 0.65, 80.0, 90.0, 1024, 30.0, False, "ok"),
    ("broken", "failed", float("nan"), float("nan"), float("nan"), None, None, False, "failed: boom"),
]
TABLE = _table(_ROWS)


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ({}, "layers-3of6"),  # the fastest label-free one keeping >= 98% on dev
        ({"allow_sts_labels": True}, "cosent-int8"),
        ({"max_bytes_per_vector": 512}, "layers-3of6-emb-int8"),
        ({"min_retention_pct": 95}, "layers-2of6"),
        ({"min_retention_pct": 80}, "static"),
        ({"max_size_mb": 50, "min_retention_pct": 96}, "layers-2of6"),
        ({"min_retention_pct": 99.5}, None),
    ],
)
def test_rule_picks_the_fastest_variant_that_keeps_enough_on_dev(rule: dict, expected: str | None) -> None:
    choice = choose_champion(TABLE, SelectionConfig(**rule))
    assert choice.variant == expected, choice.reason
    if expected is None:
        assert "no variant meets the rule" in choice.reason and "lower selection.min_retention_pct" in (
            choice.reason.lower()
        )
    else:
        assert choice.row["variant"] == expected and "dev" in choice.reason


def test_a_variant_that_ranks_pairs_unlike_the_teacher_is_not_chosen() -> None:
    table = _table(_ROWS, {"layers-3of6": 0.6})
    choice = choose_champion(table, SelectionConfig())
    assert choice.variant == "layers-3of6-emb-int8" and "agreement >= 0.7" in choice.reason
    assert choose_champion(table, SelectionConfig(min_agreement=None)).variant == "layers-3of6"
    lenient = SelectionConfig(min_agreement=0.5, min_retention_pct=80)
    assert choose_champion(_table(_ROWS, {"static": 0.4}), lenient).variant == "layers-2of6"
    unmeasured = _table(_ROWS, {"layers-3of6": float("nan"), "layers-3of6-emb-int8": float("nan")})
    assert choose_champion(unmeasured, SelectionConfig()).variant is None  # no figure: does not pass


def test_selection_uses_dev_not_test() -> None:
    # better on test, worse on dev: not chosen
    table = _table([TEACHER, ("test-lucky", "layer-reduced", 0.70, 101.0, 5.0, 1536, 40.0, False, "ok")])
    assert choose_champion(table, SelectionConfig()).variant is None


@pytest.fixture
def logged_model(tiny_model_dir: Path, store) -> tuple[str, str]:
    client, experiment_id, _ = store
    run_id = client.create_run(experiment_id, run_name="child").info.run_id
    uri = log_variant_model(Variant("teacher", "teacher", tiny_model_dir), run_id, 32)
    client.set_terminated(run_id)
    return uri, run_id


def _tags(
    variant: str, speedup: float, key: str, teacher: str = "t1", dev_retention: float = 99.0, agreement=0.8
) -> dict:
    row = {
        "heldout_agreement_spearman": agreement,
        "variant": variant,
        "kind": "layer-reduced",
        "lineage": f"teacher > {variant}",
        "uses_sts_labels": False,
        "sts_dev_retention_pct": dev_retention,
        "sts_test_retention_pct": 98.0,
        "sts_test_spearman": 0.8,
        "speedup_vs_teacher": speedup,
        "sentences_per_second": 100 * speedup,
        "bytes_per_vector": 1536,
        "size_mb": 40.0,
    }
    return version_tags(row, {"teacher_key": teacher, "dev_set": "d1", "artifact_key": key})


def test_alias_moves_only_to_a_better_comparable_variant(logged_model, store) -> None:
    client = MlflowClient()
    uri, run_id = logged_model
    rule = SelectionConfig()

    def register(tags: dict, rule: SelectionConfig = rule):
        return register_choice(client, "exp-student", uri, run_id, tags, rule)

    def champion() -> str:
        return client.get_model_version_by_alias("exp-student", CHAMPION_ALIAS).tags["variant"]

    first = register(_tags("a", 2.0, "k-a"))
    assert first.moved and first.version == "1" and champion() == "a"
    assert "first champion" in first.reason

    same = register(_tags("a", 2.1, "k-a"))  # the same model again: nothing registered
    assert not same.moved and same.version is None and "already the champion" in same.reason

    slower = register(_tags("b", 1.5, "k-b"))
    assert not slower.moved and slower.version == "2" and champion() == "a"
    assert "does not beat" in slower.reason

    noise = register(_tags("c", 2.05, "k-c"))  # 2.5% faster: within min_speedup_gain_pct
    assert not noise.moved and champion() == "a"

    faster = register(_tags("d", 3.0, "k-d"))
    assert faster.moved and champion() == "d" and "3.00x vs the current champion's 2.00x" in faster.reason

    other_teacher = register(_tags("e", 9.0, "k-e", teacher="t2"))
    assert not other_teacher.moved and champion() == "d" and "another teacher" in other_teacher.reason

    stricter = SelectionConfig(min_retention_pct=99.5)  # the champion no longer meets the rule
    better_kept = register(_tags("f", 1.2, "k-f", dev_retention=99.8), stricter)
    assert better_kept.moved and champion() == "f" and "no longer meets the rule" in better_kept.reason

    closer = SelectionConfig(min_agreement=0.85)  # f agrees 0.8 with the teacher: out under this rule
    agreeing = register(_tags("g", 1.1, "k-g", agreement=0.9), closer)
    assert agreeing.moved and champion() == "g" and "agreement 0.80 < 0.85" in agreeing.reason

    version = client.get_model_version_by_alias("exp-student", CHAMPION_ALIAS)
    assert {"speedup_vs_teacher", "sts_test_retention_pct", "heldout_agreement_spearman", "lineage"} <= set(
        version.tags
    )


@pytest.mark.parametrize(
    ("rule", "uris", "champion", "says"),
    [
        ({"min_retention_pct": 99.9}, True, "none", "no variant meets the rule"),
        ({}, False, "layers-3of6", "its model was not logged"),
        ({"registry": False}, True, "layers-3of6", "selection.registry is off"),
    ],
)
def test_outcomes_without_a_registration_are_stated_on_the_parent_run(
    store, rule: dict, uris: bool, champion: str, says: str
) -> None:
    client, experiment_id, _ = store
    parent = client.create_run(experiment_id, run_name="parent").info.run_id
    names = list(TABLE["variant"])
    text = select_champion.fn(
        TABLE,
        dict.fromkeys(names, "key"),
        dict.fromkeys(names, "run"),
        dict.fromkeys(names, "models:/m-x") if uris else {},
        SelectionConfig(**rule),
        "exp-student",
        {},
        parent,
    )
    tags = client.get_run(parent).data.tags
    assert tags["distill.champion"] == champion and says in tags["distill.selection"] and says in text
    assert not client.search_registered_models()  # nothing registered
