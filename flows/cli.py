"""Command line: ``distill run`` runs the flow on a profile / config file / overrides.

Examples::

    distill run                                   # quick profile, DISTILL_DATA_DIR data
    distill run --profile smoke                   # the whole DAG in about 2 minutes
    distill run --profile full
    distill run --config my.yaml --set data.corpus_wiki_sentences=5000 --set training.epochs=2
    distill show-config --profile full            # the resolved, validated config as YAML
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import get_args

from tasks.config import ProfileName

# Prefect reads these at import: a temporary local server needs more than the default 20 s to start on
# small machines, and analytics only add "database is locked" noise.
_PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks,flows",
    "TOKENIZERS_PARALLELISM": "false",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("run", "run the distillation flow"),
        ("show-config", "print the resolved config"),
    ):
        cmd = sub.add_parser(name, help=help_text)
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for key, value in _PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)

    import yaml

    from tasks.config import ConfigError, read_overrides, resolve_config

    try:
        overrides = read_overrides(args.config, args.overrides)
        config = resolve_config(args.profile, overrides)
    except ConfigError as exc:
        print(f"distill: {exc}", file=sys.stderr)
        return 2
    if args.command == "show-config":
        print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
        return 0

    from tasks.preflight import check_inputs

    try:
        check_inputs(config)  # seconds, before a Prefect server starts; the flow checks again
    except (ValueError, FileNotFoundError) as exc:  # every input error names the field or file and the fix
        print(f"distill: {exc}", file=sys.stderr)
        return 2
    from flows.distill import distill

    # The flow gets what was asked for (profile + overrides), as a deployment run would, and resolves it
    # the same way; the Prefect UI shows these as the flow run's parameters.
    distill(profile=config.profile, overrides=overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
