"""Pick the champion by the configured rule and put it in MLflow's model registry.

The rule (:class:`tasks.config.SelectionConfig`): the fastest variant, by the speed-up measured in the run,
that keeps at least ``min_retention_pct`` of the teacher's STS-B **dev** Spearman and at least
``min_agreement`` agreement with the teacher (label-free: how alike the two rank pairs of Wikipedia sentences
outside the corpus), within the storage limits; variants that saw STS-B train labels only compete when
``allow_sts_labels`` says so. The STS-B test split and the held-out STS suites are never looked at: they are
what the table reports.

The chosen variant is registered (one new version of ``<experiment>-student``) and takes the alias
``champion`` only when it beats the current champion on the same rule: same teacher and same dev set, and
a speed-up at least ``min_speedup_gain_pct`` higher (or the current one no longer meets the rule). Every
outcome, including "nothing meets the rule", is a sentence for the log, the parent run and the summary.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from prefect import task

from tasks.config import SelectionConfig
from tasks.run_states import MAX_TAG_CHARS
from tasks.tracking_store import with_retries

log = logging.getLogger(__name__)

CHAMPION_ALIAS = "champion"
DEV_RETENTION = "sts_dev_retention_pct"
AGREEMENT = "heldout_agreement_spearman"


@dataclass(frozen=True)
class Choice:
    """The variant the rule picks (``None`` when no variant meets it) and why."""

    variant: str | None
    reason: str
    row: dict | None = None  # the chosen row of the table, with its dev retention


@dataclass(frozen=True)
class RegistryOutcome:
    model_name: str
    version: str | None  # the version registered in this run, if any
    champion_version: str | None  # the version holding the alias afterwards
    moved: bool  # the alias now points at this run's choice
    reason: str


def dev_retention(table: pd.DataFrame) -> pd.Series:
    """STS-B dev Spearman of each row, in % of the teacher's (row 0)."""
    teacher = float(table.iloc[0]["sts_dev_spearman"])
    return 100.0 * table["sts_dev_spearman"].astype(float) / teacher


def choose_champion(table: pd.DataFrame, rule: SelectionConfig) -> Choice:
    """The fastest row that meets the rule (ties: the higher dev retention), else why none does."""
    rows = table.assign(**{DEV_RETENTION: dev_retention(table)})
    candidates = rows[(rows["status"] == "ok") & (rows["kind"] != "teacher")]
    if candidates.empty:
        return Choice(None, "no variant besides the teacher was measured")
    checks = [
        (candidates[DEV_RETENTION] >= rule.min_retention_pct, f"keep >= {rule.min_retention_pct:g}% dev"),
    ]
    if rule.min_agreement is not None:
        agreement = candidates.get(AGREEMENT, pd.Series(math.nan, index=candidates.index)).astype(float)
        checks.append((agreement >= rule.min_agreement, f"agreement >= {rule.min_agreement:g}"))
    if not rule.allow_sts_labels:
        checks.append((~candidates["uses_sts_labels"].astype(bool), "label-free (allow_sts_labels off)"))
    if rule.max_bytes_per_vector is not None:
        checks.append(
            (candidates["bytes_per_vector"] <= rule.max_bytes_per_vector, f"<= {rule.max_bytes_per_vector} B")
        )
    if rule.max_size_mb is not None:
        checks.append((candidates["size_mb"] <= rule.max_size_mb, f"<= {rule.max_size_mb:g} MB"))
    meets = pd.Series(True, index=candidates.index)
    for ok, _ in checks:
        meets &= ok.fillna(False)
    rule_text = ", ".join(text for _, text in checks)
    eligible = candidates[meets]
    if eligible.empty:
        best = candidates.sort_values(DEV_RETENTION, ascending=False).iloc[0]
        return Choice(
            None,
            f"no variant meets the rule ({rule_text}); the best dev retention was {best['variant']} "
            f"at {best[DEV_RETENTION]:.1f}%. Lower selection.min_retention_pct (or selection.min_agreement) "
            "or add stronger students",
        )
    best = eligible.sort_values(["speedup_vs_teacher", DEV_RETENTION], ascending=False).iloc[0]
    return Choice(
        str(best["variant"]),
        f"{best['variant']}: the fastest of {len(eligible)} of {len(candidates)} variants that meet the rule "
        f"({rule_text}): {best['speedup_vs_teacher']:.2f}x the teacher's speed, "
        f"{best[DEV_RETENTION]:.1f}% of its STS-B dev Spearman "
        f"({best['sts_test_retention_pct']:.1f}% on test)",
        best.to_dict(),
    )


def version_tags(row: dict, context: dict[str, str]) -> dict[str, str]:
    """What the registry shows beside a version: its figures, lineage and where it was measured."""
    figures = {
        "sts_dev_retention_pct": row[DEV_RETENTION],
        "sts_test_retention_pct": row["sts_test_retention_pct"],
        "sts_test_spearman": row["sts_test_spearman"],
        "speedup_vs_teacher": row["speedup_vs_teacher"],
        AGREEMENT: row.get(AGREEMENT),
        "sentences_per_second": row["sentences_per_second"],
        "bytes_per_vector": row["bytes_per_vector"],
        "size_mb": row["size_mb"],
    }
    return {
        **{k: f"{float(v):.4g}" for k, v in figures.items() if v is not None and not math.isnan(float(v))},
        "variant": str(row["variant"]),
        "kind": str(row["kind"]),
        "lineage": str(row["lineage"]),
        "uses_sts_labels": str(bool(row["uses_sts_labels"])).lower(),
        **context,
    }


def register_choice(
    client: MlflowClient,
    model_name: str,
    model_uri: str,
    run_id: str,
    tags: dict[str, str],
    rule: SelectionConfig,
) -> RegistryOutcome:
    """Register the chosen model and move ``champion`` to it if it beats the current one on the rule.

    ``tags`` are :func:`version_tags`; ``teacher_key``, ``dev_set`` and ``artifact_key`` decide
    comparability and sameness.
    """
    current = _current_champion(client, model_name)
    if current is not None and current.tags.get("artifact_key") == tags["artifact_key"]:
        return RegistryOutcome(
            model_name,
            None,
            current.version,
            False,
            f"{tags['variant']} is already the champion (version {current.version}, the same model); "
            "not registered again",
        )
    version = _register(client, model_name, model_uri, run_id, tags)
    moved, reason = _beats(current, tags, rule)
    if moved:
        client.set_registered_model_alias(model_name, CHAMPION_ALIAS, version)
    verdict = (
        f"version {version} ({tags['variant']}) is the new champion: {reason}"
        if moved
        else f"version {version} ({tags['variant']}) registered without the alias: {reason}"
    )
    return RegistryOutcome(model_name, version, version if moved else current.version, moved, verdict)


def _current_champion(client: MlflowClient, model_name: str):
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException:  # no such model or no alias yet
        return None


def _register(client: MlflowClient, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    try:
        client.create_registered_model(
            name,
            description="Distilled sentence-embedding models; the alias 'champion' marks the one to ship.",
        )
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = client.create_model_version(
        name,
        source=model_uri,
        run_id=run_id,
        tags=tags,
        model_id=model_id,
        description=f"{tags['variant']} ({tags['lineage']})",
    )
    return str(version.version)


def _beats(current, tags: dict[str, str], rule: SelectionConfig) -> tuple[bool, str]:
    if current is None:
        return True, "the first champion of this model"
    theirs = current.tags
    for key, what in (("teacher_key", "teacher"), ("dev_set", "STS-B dev set")):
        if theirs.get(key) != tags.get(key):
            return False, (
                f"the current champion (version {current.version}, {theirs.get('variant')}) was chosen with "
                f"another {what}, so the two are not comparable; move the alias by hand "
                f"(MlflowClient().set_registered_model_alias) or use another selection.model_name"
            )
    failing = _fails_rule(theirs, rule)
    if failing:
        return True, f"the current champion (version {current.version}) no longer meets the rule: {failing}"
    ours, best = float(tags["speedup_vs_teacher"]), float(theirs.get("speedup_vs_teacher", "nan"))
    needed = best * (1 + rule.min_speedup_gain_pct / 100)
    if ours > needed or math.isnan(best):
        return True, f"{ours:.2f}x vs the current champion's {best:.2f}x (version {current.version})"
    return False, (
        f"{ours:.2f}x does not beat the current champion's {best:.2f}x (version {current.version}, "
        f"{theirs.get('variant')}) by {rule.min_speedup_gain_pct:g}% (needs > {needed:.2f}x)"
    )


def _fails_rule(tags: dict[str, str], rule: SelectionConfig) -> str:
    def number(key: str) -> float:
        try:
            return float(tags[key])
        except (KeyError, ValueError):
            return math.nan

    if not number("sts_dev_retention_pct") >= rule.min_retention_pct:
        return f"{number('sts_dev_retention_pct'):.1f}% dev < {rule.min_retention_pct:g}%"
    if rule.min_agreement is not None and not number(AGREEMENT) >= rule.min_agreement:
        return f"agreement {number(AGREEMENT):.2f} < {rule.min_agreement:g}"
    if not rule.allow_sts_labels and tags.get("uses_sts_labels") == "true":
        return "it saw STS-B labels and allow_sts_labels is off"
    if rule.max_bytes_per_vector is not None and not number("bytes_per_vector") <= rule.max_bytes_per_vector:
        return f"{number('bytes_per_vector'):g} B per vector > {rule.max_bytes_per_vector}"
    if rule.max_size_mb is not None and not number("size_mb") <= rule.max_size_mb:
        return f"{number('size_mb'):.1f} MB > {rule.max_size_mb:g} MB"
    return ""


def selection_markdown(choice: Choice, outcome: RegistryOutcome | None, note: str = "") -> str:
    """The champion paragraph of the run summary."""
    lines = [f"**Champion rule:** {choice.reason}."]
    if outcome is not None:
        lines.append(f"**Registry** (`{outcome.model_name}`): {outcome.reason}.")
        if outcome.champion_version:
            lines.append(f'Load it with `mlflow.pyfunc.load_model("models:/{outcome.model_name}@champion")`.')
    if note:
        lines.append(note)
    return "\n\n".join(lines)


def rule_json(rule: SelectionConfig) -> str:
    return json.dumps(rule.model_dump(mode="json"), sort_keys=True)


@task(name="select-champion")
def select_champion(
    table: pd.DataFrame,
    keys: dict[str, str],
    run_ids: dict[str, str],
    model_uris: dict[str, str],
    rule: SelectionConfig,
    model_name: str,
    context: dict[str, str],
    parent_run_id: str,
) -> str:
    """Choose by the rule, register the choice (alias ``champion`` if it beats the current one) and record
    the outcome on the parent run (tags ``distill.champion*``); returns the summary's Markdown paragraph.

    ``keys``: each variant's content key; ``run_ids`` / ``model_uris``: its child run and logged model.
    """
    choice = choose_champion(table, rule)
    client = MlflowClient()
    outcome = None
    note = ""
    if choice.variant is None:
        pass
    elif not rule.registry:
        note = "Not registered: selection.registry is off."
    elif choice.variant not in model_uris:
        note = "Not registered: its model was not logged (tracking.log_models is off)."
    else:
        variant = choice.variant
        tags = version_tags(
            choice.row or {},
            {
                **context,
                "artifact_key": keys[variant],
                "run_id": run_ids[variant],
                "parent_run_id": parent_run_id,
                "rule": rule_json(rule),
            },
        )
        outcome = register_choice(
            MlflowClient(), model_name, model_uris[variant], run_ids[variant], tags, rule
        )
    text = selection_markdown(choice, outcome, note)
    log.info("champion: %s", text.replace("\n\n", " "))
    parent_tags = {
        "distill.champion": choice.variant or "none",
        "distill.selection": text[:MAX_TAG_CHARS],
    }
    if outcome is not None:
        parent_tags["distill.champion_model"] = outcome.model_name
        parent_tags["distill.champion_version"] = outcome.champion_version or ""
        parent_tags["distill.champion_moved"] = str(outcome.moved).lower()
    for key, value in parent_tags.items():
        with_retries(lambda k=key, v=value: client.set_tag(parent_run_id, k, v), what="tagging the champion")
    return text
