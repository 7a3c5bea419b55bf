"""Command line: ``distill run`` runs the flow on a profile / config file / overrides.

Examples::

    distill run                                   # quick profile, DISTILL_DATA_DIR data
    distill run --profile smoke                   # the whole DAG in about 2 minutes
    distill run --profile full
    distill run --config my.yaml --set data.corpus_wiki_sentences=5000 --set training.epochs=2
    distill show-config --profile full            # the resolved, validated config as YAML
    distill warm-cache --profile standard         # encode tonight's corpus with the teacher, train later
    distill benchmark --models champion           # re-time the champion beside the teacher on this machine
    distill benchmark --models champion runs:/<run id>/model ./my-model --profile quick
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn, get_args

from tasks.config import ProfileName

# Prefect reads these at import: a temporary local server needs more than the default 20 s to start on
# small machines, and analytics only add "database is locked" noise.
_PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks,flows",
    # the failure hooks log after the flow run ended: no flow-run id to send those records with
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "TOKENIZERS_PARALLELISM": "false",
}


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors printed as ``distill: <message>`` like every other input error."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("distill").strip()  # "run" for a subcommand's parser
        self.print_usage(sys.stderr)
        self.exit(2, f"distill: {command + ': ' if command else ''}{message}\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distill", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    commands = {}
    for name, help_text in (
        ("run", "run the distillation flow"),
        ("show-config", "print the resolved config"),
        ("warm-cache", "encode the corpus with the teacher ahead of a run (same cache entries)"),
        ("benchmark", "measure models beside the teacher on this machine, as a run measures its variants"),
    ):
        cmd = commands[name] = sub.add_parser(name, help=help_text)
        cmd.add_argument(
            "--profile",
            choices=get_args(ProfileName),
            help="named profile the config starts from (default: the config file's, else quick)",
        )
        cmd.add_argument("--config", type=Path, help="YAML file with overrides of the profile")
        cmd.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override one field, e.g. --set data.corpus_wiki_sentences=5000 (repeatable)",
        )
    commands["benchmark"].add_argument(
        "--models",
        nargs="+",
        default=["champion"],
        metavar="REF",
        help="champion, <registered name>@<alias>, models:/<name>/<version>, runs:/<run id>/model, a model "
        "folder or package (default: champion)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; every input error (config, model reference, data file) exits 2 with a message.

    The config, the model references and the data files are all checked before a Prefect server starts, a
    folder is made or an MLflow run is opened, so a bad input leaves nothing behind.
    """
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # usage error (message printed) or --help
        return exc.code if isinstance(exc.code, int) else 2
    for key, value in _PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)

    import yaml

    from tasks.config import ConfigError, read_overrides, resolve_config

    try:
        overrides = read_overrides(args.config, args.overrides)
        config = resolve_config(args.profile, overrides)
    except ConfigError as exc:
        return _fail(exc)
    except (UnicodeDecodeError, OSError) as exc:  # a config file that exists but cannot be read as text
        return _fail(f"config file {args.config} cannot be read ({exc}); pass a UTF-8 YAML file")
    if args.command == "show-config":
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        return 0

    from flows.runner import check_scheduler
    from tasks.preflight import check_inputs
    from tasks.tracking_store import check_tracking_store, tracking_uri

    try:
        if args.command == "benchmark":
            from flows.benchmark import benchmark_inputs

            benchmark_inputs(config, args.models)  # teacher, references, data and store, in seconds
        else:
            check_inputs(config)  # seconds, before a Prefect server starts; the flow checks again
            check_tracking_store(tracking_uri(config))  # answers (HTTP) or is writable (SQLite, files)
            check_scheduler(config.runner)  # runner.address: a Dask scheduler answers there
    except (ValueError, OSError) as exc:  # every input error names the field or file and the fix
        return _fail(exc)
    # The flow gets what was asked for (profile + overrides), as a deployment run would, and resolves it
    # the same way; the Prefect UI shows these as the flow run's parameters.
    from flows.lifecycle import run_with_clean_exit

    flow, extra = _flow_of(args)
    # A signal ends the run cleanly: flow run marked Crashed, temporary server stopped, exit 130 / 143 / 129.
    return run_with_clean_exit(flow, profile=config.profile, overrides=overrides, **extra)


def _flow_of(args: argparse.Namespace) -> tuple[object, dict[str, object]]:
    """The flow a command runs, and its parameters beyond profile and overrides."""
    if args.command == "benchmark":
        from flows.benchmark import benchmark_models

        return benchmark_models, {"models": args.models}
    if args.command == "warm-cache":
        from flows.teacher_cache import warm_teacher_cache

        return warm_teacher_cache, {}
    from flows.distill import distill

    return distill, {}


def _fail(problem: object) -> int:
    print(f"distill: {problem}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
