"""Command line: ``distill run`` runs the flow on a profile / config file / overrides.

Examples::

    distill run                                   # quick profile, DISTILL_DATA_DIR data
    distill run --profile full
    distill run --config my.yaml --set data.corpus_wiki_sentences=5000 --set training.epochs=2
    distill show-config --profile full            # the resolved, validated config as YAML
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

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
        cmd.add_argument("--profile", default="quick", help="named profile: quick (default) or full")
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
    from pydantic import ValidationError

    from tasks.config import load_config

    try:
        config = load_config(args.profile, args.config, args.overrides)
    except (ValidationError, ValueError, FileNotFoundError) as exc:
        print(f"distill: invalid configuration:\n{exc}", file=sys.stderr)
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

    distill(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
