"""The `meterhouse` command: the only place that composes the planes."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from meterhouse import __version__
from meterhouse.core.config import Config, ConfigError, load_config
from meterhouse.core.log import setup_logging


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per configuration option, with the option's own help text and default."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="YAML file with options (keys as below, snake_case); overridden by MH_* variables and flags.",
    )
    defaults = Config()
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        typ = {"int": int, "float": float}.get(str(f.type), str)  # bools arrive as text: true/false
        parser.add_argument(
            flag,
            dest=f.name,
            default=None,
            type=typ,
            metavar=f.name.split("_")[-1].upper(),
            help=f"{f.metadata['help']} [default: {getattr(defaults, f.name)}; env MH_{f.name.upper()}]",
        )


def _config_from(args: argparse.Namespace) -> Config:
    flags = {f.name: getattr(args, f.name) for f in fields(Config)}
    return load_config(flags, config_file=args.config)


def cmd_up(args: argparse.Namespace) -> int:
    config = _config_from(args)
    setup_logging(config.log_level, config.log_format)
    from meterhouse.runtime import run_up

    return run_up(config)


def cmd_demo(args: argparse.Namespace) -> int:
    from meterhouse.demo import run_demo

    return run_demo(
        orgs=args.orgs, seconds=args.seconds, endpoint=args.endpoint, api=args.api, seed=args.seed
    )


def cmd_config(args: argparse.Namespace) -> int:
    config = _config_from(args)
    for f in fields(Config):
        print(f"{f.name}: {getattr(config, f.name)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meterhouse",
        description="Exact per-organization usage metrics: OTLP in, ClickHouse inside, "
        "bounded Prometheus out.",
    )
    parser.add_argument("--version", action="version", version=f"meterhouse {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="Run receivers, writer, exporter and API in one process.")
    _add_config_flags(up)
    up.set_defaults(func=cmd_up)

    cfg = sub.add_parser("config", help="Print the effective configuration and exit.")
    _add_config_flags(cfg)
    cfg.set_defaults(func=cmd_config)

    demo = sub.add_parser(
        "demo",
        help="Send realistic usage for N orgs with the OpenTelemetry SDK "
        "and check the totals read back from the API.",
    )
    demo.add_argument("--orgs", type=int, default=50, help="Number of orgs [default: 50].")
    demo.add_argument("--seconds", type=float, default=10.0, help="How long to send [default: 10].")
    demo.add_argument(
        "--endpoint",
        default="http://127.0.0.1:4318",
        help="OTLP/HTTP base URL [default: http://127.0.0.1:4318].",
    )
    demo.add_argument(
        "--api",
        default="http://127.0.0.1:9464",
        help="meterhouse HTTP base URL, to read totals back [default: http://127.0.0.1:9464].",
    )
    demo.add_argument("--seed", type=int, default=None, help="Random seed, for repeatable runs.")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"meterhouse: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
