"""The ``shoprank`` command line: one sub-command per flow or tool.

Heavy libraries are imported inside each command so that ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path

DEFAULT_ENV = {
    # no telemetry leaves the machine
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    # the temporary local Prefect API can take longer than 20 s to start on a busy laptop
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}
FORMATS_HELP = (
    "taobao, rees46, diginetica, hm, s3rec, uci-retail, rechorus, csv (generic, with --map), "
    "parquet (canonical tables, e.g. a demo-data folder)"
)
logger = logging.getLogger("shoprank")


def _pairs(values: Sequence[str] | None, flag: str) -> dict[str, str] | None:
    """Parse repeated ``KEY=VALUE`` flags into a dict."""
    if not values:
        return None
    pairs = {}
    for value in values:
        key, sep, target = value.partition("=")
        if not sep or not key or not target:
            from models.errors import ConfigError

            raise ConfigError(f"{flag} expects KEY=VALUE, got {value!r}.")
        pairs[key] = target
    return pairs


def _add_data_flags(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--data", required=required, metavar="PATH",
                        help="file or folder of raw data (default: the built-in demo shop)")
    parser.add_argument("--format", metavar="NAME", help=f"format of --data: {FORMATS_HELP}")
    parser.add_argument("--map", action="append", metavar="CANONICAL=SOURCE",
                        help="column mapping for csv/parquet, e.g. --map user_id=visitorid")
    parser.add_argument("--event-map", action="append", metavar="SOURCE=CANONICAL",
                        help="event name mapping, e.g. --event-map addtocart=cart")


def cmd_demo_data(args: argparse.Namespace) -> int:
    """Write the built-in demo shop."""
    from tasks.demo_data import write_demo_shop

    shop = write_demo_shop(Path(args.out), n_events=args.events, seed=args.seed)
    print(f"wrote {shop.events} and {shop.items}")  # noqa: T201
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Run only the data validation suites and print the report."""
    from tasks.adapters import load_raw
    from tasks.validate import validate_tables

    raw = load_raw(args.data, args.format or "parquet", column_map=_pairs(args.map, "--map"),
                   event_map=_pairs(args.event_map, "--event-map"))
    for note in raw.notes:
        logger.warning(note)
    report, _ = validate_tables(raw.events, raw.items)
    print(report.to_markdown())  # noqa: T201
    return 0 if report.success else 1


def cmd_train(args: argparse.Namespace) -> int:
    """Run the training flow."""
    from flows.config import load_config
    from flows.train import train

    config = load_config(
        args.config,
        data__path=args.data, data__format=args.format, data__name=args.name,
        data__column_map=_pairs(args.map, "--map"),
        data__event_map=_pairs(args.event_map, "--event-map"),
        data__demo_events=args.events, data__demo_seed=args.demo_seed,
        split__protocol=args.protocol, seed=args.seed, output_dir=args.output_dir,
    )
    result = train(config)
    print(  # noqa: T201
        f"\nMLflow run {result['run_id']} ({result['tracking_uri']}); outputs in "
        f"{result['workdir']}.\nSee it with: mlflow ui --backend-store-uri {result['tracking_uri']}"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every sub-command."""
    parser = argparse.ArgumentParser(
        prog="shoprank",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            shoprank turns a shop's behaviour log and catalogue into a validated, tracked,
            evaluated top-K recommender. Runs are orchestrated by Prefect and recorded in MLflow
            (a SQLite store in ./mlruns unless MLFLOW_TRACKING_URI is set)."""),
        epilog=textwrap.dedent("""\
            examples:
              shoprank train                                   # the built-in demo shop
              shoprank train --data data/UserBehavior.csv.gz --format taobao
              shoprank validate --data events.csv --format csv --map user_id=visitorid
              shoprank demo-data --out shop/ --events 1000000"""),
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo-data", help="write the built-in demo shop as Parquet",
                          description="Generate a realistic synthetic shop (events.parquet, "
                          "items.parquet) with a fixed seed.")
    demo.add_argument("--out", required=True, metavar="DIR", help="output folder")
    demo.add_argument("--events", type=int, default=200_000, help="number of events (200000)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    demo.set_defaults(func=cmd_demo_data)

    val = sub.add_parser("validate", help="check data against the expectation suites only",
                         description="Load data and run the Great Expectations suites; exit 1 "
                         "with a report when any expectation fails.")
    _add_data_flags(val, required=True)
    val.set_defaults(func=cmd_validate)

    tr = sub.add_parser("train", help="run the training flow (load, validate, split, evaluate)",
                        description="Run the Prefect flow `train` and record it in MLflow. "
                        "Without --data it trains on the built-in demo shop.")
    _add_data_flags(tr)
    tr.add_argument("--config", metavar="FILE", help="YAML file of settings (flags override it)")
    tr.add_argument("--name", help="dataset name, used as the MLflow experiment")
    tr.add_argument("--events", type=int, help="events in the demo shop (200000)")
    tr.add_argument("--demo-seed", type=int, help="seed of the demo shop (0)")
    tr.add_argument("--protocol", choices=["auto", "time", "leave_one_out"],
                    help="evaluation protocol (auto: leave-one-out for ordered data)")
    tr.add_argument("--seed", type=int, help="seed of every stochastic step (42)")
    tr.add_argument("--output-dir", metavar="DIR", help="folder for tables and models (outputs)")
    tr.set_defaults(func=cmd_train)
    return parser


class _CondenseUserErrors(logging.Filter):
    """Keep errors a user caused to one line in run logs: the final message says it all.

    Prefect logs a failing task's exception with its traceback, then the task's and the flow's
    final states, each repeating the whole message. For a :class:`ShoprankError` these are noise.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        from models.errors import ShoprankError

        error = record.exc_info[1] if record.exc_info else None
        message = record.getMessage()
        names = {cls.__name__ for cls in _subclasses(ShoprankError)}
        if isinstance(error, ShoprankError) or (
            record.levelno >= logging.ERROR or "Failed(" in message
        ) and any(name in message for name in names):
            record.msg = message.splitlines()[0][:160] + " ..."
            record.args = ()
            record.exc_info = record.exc_text = None
        return True


def _subclasses(cls: type) -> list[type]:
    found = [cls]
    for sub in cls.__subclasses__():
        found += _subclasses(sub)
    return found


def _configure_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("shoprank", "flows", "tasks", "models"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(_CondenseUserErrors())


def run(argv: Sequence[str] | None, handler: Callable[[argparse.Namespace], int] | None = None
        ) -> int:
    """Parse ``argv`` and run the command; user errors become a message and exit code 2."""
    for key, value in DEFAULT_ENV.items():
        os.environ.setdefault(key, value)
    args = build_parser().parse_args(argv)
    _configure_logging()
    from models.errors import ShoprankError

    try:
        return (handler or args.func)(args)
    except ShoprankError as err:
        if args.debug:
            raise
        print(f"\nshoprank {args.command} failed: {err}", file=sys.stderr)  # noqa: T201
        return 2
    except Exception as err:
        if args.debug:
            raise
        print(  # noqa: T201
            f"\nshoprank {args.command} failed with an unexpected {type(err).__name__}: {err}. "
            "Re-run with --debug for the full traceback.", file=sys.stderr)
        return 1


def main() -> None:
    """Entry point of the ``shoprank`` command."""
    sys.exit(run(sys.argv[1:]))
