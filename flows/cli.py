"""The ``shoprank`` command line: the parser of every sub-command, logging and exit codes.

The sub-commands themselves are :mod:`flows.commands`; heavy libraries are imported inside each
so that ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Sequence

from flows.commands import (
    cmd_catalogue,
    cmd_demo_data,
    cmd_deploy,
    cmd_monitor,
    cmd_promote,
    cmd_recommend,
    cmd_serve,
    cmd_team,
    cmd_train,
    cmd_validate,
)

DEFAULT_ENV = {
    # no telemetry leaves the machine
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    # the temporary local Prefect API can take longer than 20 s to start on a busy laptop
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # progress of long steps (epochs, trials, chunks) reaches the run's log in the Prefect UI
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tasks,models",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}
FORMATS_HELP = (
    "taobao, rees46, diginetica, hm, s3rec, uci-retail, rechorus, csv (generic, with --map), "
    "parquet (canonical tables, e.g. a demo-data folder)"
)

logger = logging.getLogger("shoprank")


def _add_data_flags(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--data", required=required, metavar="PATH",
                        help="file or folder of raw data (default: the built-in demo shop)")
    parser.add_argument("--format", metavar="NAME", help=f"format of --data: {FORMATS_HELP}")
    parser.add_argument("--map", action="append", metavar="CANONICAL=SOURCE",
                        help="column mapping for csv/parquet, e.g. --map user_id=visitorid")
    parser.add_argument("--event-map", action="append", metavar="SOURCE=CANONICAL",
                        help="event name mapping, e.g. --event-map addtocart=cart")


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
              shoprank demo-data --out shop/ --events 1000000
              shoprank promote --version 2                     # promote if it beats @champion
              shoprank monitor --data shop/ --format parquet   # decay and drift since its data
              shoprank catalogue update --items items.csv      # new items, no retraining
              shoprank recommend --k 20 --out recs.parquet     # batch lists of the champion
              shoprank serve --port 5001                       # HTTP /invocations on localhost
              shoprank deploy --cron "0 3 * * *"               # Prefect deployments, served"""),
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo-data", help="write the built-in demo shop as Parquet",
                          description="Generate a realistic synthetic shop (events.parquet, "
                          "items.parquet) with a fixed seed, over 60 days. With --shards N the "
                          "events are generated a batch of users at a time (memory bounded by "
                          "the batch) and written to events/shard-00000.parquet ... partitioned "
                          "by user (a keyed hash of user_id modulo N); the same events, seed and N "
                          "give identical files. With --shift-day D the shop changes regime at "
                          "the start of day D (day 0 is the shop's first day): a new top-level "
                          "category (c8, wearables) launches and most shoppers adopt it within "
                          "a day or two, and tastes move between the existing categories and "
                          "items, so a model trained before D loses quality after it. The "
                          "events before D are those of the same shop without the shift. Train "
                          "on either with --format parquet.")
    demo.add_argument("--out", required=True, metavar="DIR", help="output folder")
    demo.add_argument("--events", type=int, default=200_000, help="number of events (200000)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (0)")
    demo.add_argument("--shards", type=int, metavar="N",
                      help="write the events as N Parquet shards by user (default: one file)")
    demo.add_argument("--shift-day", type=int, metavar="D",
                      help="regime change from day D on, 1 to 59 (default: none; the shop is "
                      "then exactly as without this flag)")
    demo.set_defaults(func=cmd_demo_data)

    val = sub.add_parser("validate", help="check data against the expectation suites only",
                         description="Load data and run the Great Expectations suites; exit 1 "
                         "with a report when any expectation fails.")
    _add_data_flags(val, required=True)
    val.set_defaults(func=cmd_validate)

    tr = sub.add_parser("train", help="run the training flow (load, validate, split, evaluate)",
                        description="Run the Prefect flow `train` and record it in MLflow: "
                        "load, validate, split, the baselines, the sequential transformer "
                        "(Optuna), the LightGBM ranker (Optuna; the transformer is one of its "
                        "candidate sources), then register the best model on validation and "
                        "release the winner of the gate refitted on every event. Without "
                        "--data it trains on the built-in demo shop.")
    _add_data_flags(tr)
    tr.add_argument("--config", metavar="FILE", help="YAML file of settings (flags override it)")
    tr.add_argument("--name", help="dataset name, used as the MLflow experiment")
    tr.add_argument("--events", type=int, help="events in the demo shop (200000)")
    tr.add_argument("--demo-seed", type=int, help="seed of the demo shop (0)")
    tr.add_argument("--protocol", choices=["auto", "time", "leave_one_out"],
                    help="evaluation protocol (auto: leave-one-out for ordered data)")
    tr.add_argument("--seed", type=int, help="seed of every stochastic step (42)")
    tr.add_argument("--output-dir", metavar="DIR", help="folder for tables and models (outputs)")
    tr.add_argument("--trials", type=int, metavar="N",
                    help="Optuna trials of the LightGBM ranker (4; a re-run resumes the study)")
    tr.add_argument("--no-ranker", action="store_true",
                    help="skip the LightGBM ranker")
    tr.add_argument("--transformer-trials", type=int, metavar="N",
                    help="Optuna trials of the sequential transformer (3; a re-run resumes it)")
    tr.add_argument("--no-transformer", action="store_true",
                    help="skip the sequential transformer (model and candidate source)")
    tr.add_argument("--no-content", action="store_true",
                    help="skip the catalogue's item vectors (the content model and its "
                    "candidates for the ranker)")
    tr.add_argument("--engine", choices=["local", "dask"],
                    help="local (default): one process; dask: the events as user shards, "
                    "per-shard tasks on a Dask cluster, the release too")
    tr.add_argument("--dask-address", metavar="tcp://HOST:8786",
                    help="scheduler of a running Dask cluster (default: a LocalCluster here)")
    tr.add_argument("--dask-workers", type=int, metavar="N",
                    help="LocalCluster worker processes (one per CPU core)")
    tr.add_argument("--shards", type=int, metavar="N",
                    help="user shards of the events (default: sized to the cluster, as few "
                    "as fit half a worker's memory, a multiple of the workers)")
    tr.add_argument("--test-user-share", type=float, metavar="SHARE",
                    help="score a seeded sample of this share of the test users (1: all of "
                    "them); for a shop of millions, e.g. 0.1: the figures are the sample's, each "
                    "with its standard error")
    tr.add_argument("--model-name", metavar="NAME",
                    help="registered model of this shop (shoprank; one per shop)")
    tr.add_argument("--resume", action="store_true",
                    help="continue the newest unfinished run (killed, failed, or left running) "
                    "made with the same settings: its MLflow run and run folder are reused, "
                    "and the stages it finished are read from Prefect's result storage "
                    "($PREFECT_HOME/storage; PREFECT_LOCAL_STORAGE_PATH moves it) instead of "
                    "being run again (engine local; the release always runs). Fails if the "
                    "data changed since. Without such a run, a fresh run starts. Do not resume "
                    "a run that is still going")
    tr.set_defaults(func=cmd_train)

    tracking_help = "MLflow tracking URI (default: MLFLOW_TRACKING_URI, else ./mlruns)"
    cluster_help = ("a version the Dask engine made runs its tasks on its training run's "
                    "cluster; this scheduler instead, or 'local' for a LocalCluster here")
    pro = sub.add_parser(
        "promote", help="promote a registered version if it beats the champion",
        description="Run the Prefect flow `promote`: score the version (default: the one with "
        "alias challenger) and the champion's recipe refitted on the version's split, on its "
        "test window; the challenger wins only if the primary metric wins by registry.margin "
        "and coverage@10 and p99 latency stay within their guardrails. The winning recipe is "
        "refitted on every event and registered with alias champion (a refresh when the "
        "champion's recipe wins). The decision is written on the version.")
    pro.add_argument("--version", metavar="N", help="model version (default: @challenger)")
    pro.add_argument("--model-name", metavar="NAME", help="registered model (shoprank)")
    pro.add_argument("--split", metavar="DIR",
                     help="test split folder (default: the one recorded on the version)")
    pro.add_argument("--force", action="store_true",
                     help="decide again on a decided version and promote it whatever the gate "
                     "says (never to data older than the champion's)")
    pro.add_argument("--config", metavar="FILE",
                     help="YAML file whose registry settings (margin, tolerances) replace those "
                     "of the version's training run")
    pro.add_argument("--tracking-uri", metavar="URI", help=tracking_help)
    pro.add_argument("--dask-address", metavar="tcp://HOST:8786", help=cluster_help)
    pro.set_defaults(func=cmd_promote)

    mon = sub.add_parser(
        "monitor", help="measure the champion on the events since its data; flag decay and drift",
        description="Run the Prefect flow `monitor` on the shop's events (the same --data, "
        "--format and --name as train) that arrived after the champion's last event: its "
        "realised quality per day (the served lists, each active user's first event of the day "
        "as the live session, scored on what the user did next that day) against the figure "
        "the gate recorded, and drift against its training window (event-type mix, unknown "
        "users and items, top items, category mix, price). Prints one line per check, logs "
        "the series to the MLflow run monitor-vN of the shop's experiment, and sends "
        "shoprank.model.decayed when anything is flagged (a `shoprank deploy` retrains on "
        "it). Exit 0: nothing flagged; 3: decay or drift flagged; 2: an error.")
    _add_data_flags(mon)
    mon.add_argument("--config", metavar="FILE",
                     help="YAML file of settings (monitor: thresholds; data, registry, ...)")
    mon.add_argument("--name", help="shop name, as given to train")
    mon.add_argument("--events", type=int, help="events in the demo shop (200000)")
    mon.add_argument("--demo-seed", type=int, help="seed of the demo shop (0)")
    mon.add_argument("--output-dir", metavar="DIR", help="folder of the training outputs")
    mon.add_argument("--model-name", metavar="NAME", help="registered model (shoprank)")
    mon.add_argument("--tracking-uri", metavar="URI", help=tracking_help)
    mon.set_defaults(func=cmd_monitor)

    cat = sub.add_parser(
        "catalogue", help="update the champion for today's catalogue (new items, unavailable "
        "ones) without retraining",
        description="catalogue update: run the Prefect flow `catalogue-update`. Reads the "
        "shop's current catalogue, encodes its text (cached by content), and registers the "
        "champion with its serving bundle updated for it, without retraining: items the model "
        "does not know (launched since its training) join each known user's list when their "
        "text is near the user's items, join live sessions through their nearest items, and "
        "give a session on a new item its nearest known items; items with available=false are "
        "never returned. The new version keeps the champion's recipe and tags, and the alias "
        "champion moves to it. Running it again on the same catalogue changes nothing.")
    cat_sub = cat.add_subparsers(dest="action", required=True, metavar="ACTION")
    upd = cat_sub.add_parser(
        "update", help="register the champion updated for a catalogue file",
        description=cat.description)
    upd.add_argument("--items", required=True, metavar="FILE",
                     help="the whole current catalogue: CSV or Parquet with item_id and text "
                     "(title, description, category_id, brand, attributes); optional available "
                     "(true/false)")
    upd.add_argument("--map", action="append", metavar="CANONICAL=SOURCE",
                     help="column mapping, e.g. --map item_id=article_id --map title=prod_name")
    upd.add_argument("--config", metavar="FILE",
                     help="YAML file of settings (registry.model_name, content.encoder, "
                     "content.new_item_weight, output_dir for the vector cache)")
    upd.add_argument("--model-name", metavar="NAME", help="registered model (shoprank)")
    upd.add_argument("--new-item-weight", type=float, metavar="W",
                     help="weight of the new items against the model's list, 0-1 (0.4)")
    upd.add_argument("--tracking-uri", metavar="URI", help=tracking_help)
    upd.set_defaults(func=cmd_catalogue)

    rec = sub.add_parser(
        "recommend", help="write batch top-K recommendations to Parquet",
        description="Run the Prefect flow `recommend`: top-K items for every user the model "
        "knows (or those in --users) from the champion, written to Parquet with a "
        "model_version column and the model in the file's metadata. A version the Dask "
        "engine made is answered on that run's cluster, its users in parts.")
    rec.add_argument("--users", metavar="FILE",
                     help="user ids: Parquet/CSV with a user_id column or a text file, one a line")
    rec.add_argument("--k", type=int, default=10, help="items per user (10)")
    rec.add_argument("--out", metavar="PATH",
                     help="output file (outputs/recommendations/shoprank-vN.parquet)")
    rec.add_argument("--model-uri", metavar="URI", default="models:/shoprank@champion",
                     help="registered model to use (models:/shoprank@champion)")
    rec.add_argument("--tracking-uri", metavar="URI", help=tracking_help)
    rec.add_argument("--dask-address", metavar="tcp://HOST:8786", help=cluster_help)
    rec.set_defaults(func=cmd_recommend)

    srv = sub.add_parser(
        "serve", help="serve the champion over HTTP (MLflow /invocations format)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=textwrap.dedent("""\
            Serve a registered model over HTTP with MLflow's /invocations format (uvicorn,
            one worker per CPU core, localhost by default). Ask it for recommendations:

              curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
                -d '{"dataframe_records": [{"user_id": "u000036", "k": 5},
                     {"user_id": "new", "recent_items": ["i00010", "i00042"], "exclude": []}]}'

            Each record: user_id, optional k (10, at most serve.max_k = 200), recent_items
            (the live session, newest last) and exclude. Known users get their precomputed
            list, blended with the session's neighbours when recent_items are given; unknown
            users get the neighbours of their recent items, else trending items; malformed
            records get HTTP 400 naming the field."""))
    srv.add_argument("--host", help="address to bind (127.0.0.1)")
    srv.add_argument("--port", type=int, help="port (5001)")
    srv.add_argument("--model-uri", metavar="URI",
                     help="registered model to serve (models:/shoprank@champion)")
    srv.add_argument("--workers", type=int,
                     help="server worker processes (one per CPU core); each maps the same "
                     "precomputed lists, so memory grows little per worker")
    srv.add_argument("--mlflow-server", action="store_true",
                     help="run MLflow's own scoring server (same answers, about 10 ms more CPU "
                     "per request for its pandas conversions)")
    srv.add_argument("--config", metavar="FILE", help="YAML file of settings (serve: ...)")
    srv.add_argument("--tracking-uri", metavar="URI", help=tracking_help)
    srv.set_defaults(func=cmd_serve)

    dep = sub.add_parser(
        "deploy", help="create and serve the Prefect deployments (nightly train, triggers)",
        description="On the Prefect API (PREFECT_API_URL, e.g. a `prefect server start`): "
        "create `train/train` on a cron schedule (and triggered by shoprank.model.decayed), "
        "`promote/promote` triggered by the event shoprank.model.evaluated, "
        "`recommend/recommend` triggered by shoprank.model.promoted and `monitor/monitor` on "
        "its own schedule, then serve them from this process until Ctrl-C.")
    _add_data_flags(dep)
    dep.add_argument("--config", metavar="FILE", help="YAML file of the nightly training run")
    dep.add_argument("--cron", default="0 3 * * *", help="schedule of train ('0 3 * * *')")
    dep.add_argument("--timezone", default="UTC", help="timezone of the schedules (UTC)")
    dep.add_argument("--monitor-cron", default="15 * * * *",
                     help="schedule of monitor ('15 * * * *': hourly)")
    dep.add_argument("--promote-in-train", action="store_true",
                     help="promote inside train instead of in the promote deployment")
    dep.add_argument("--k", type=int, default=10, help="items per user of recommend (10)")
    dep.add_argument("--out", metavar="PATH", help="output file of recommend")
    dep.add_argument("--output-dir", metavar="DIR", help="folder of the training outputs")
    dep.add_argument("--limit", type=int, help="most flow runs at once (no limit)")
    dep.add_argument("--no-serve", action="store_true",
                     help="only create the deployments; a later `shoprank deploy` serves them")
    dep.add_argument("--pool", metavar="NAME",
                     help="create the deployments on this process work pool of a Prefect server "
                     "(e.g. `shoprank team up`'s 'shoprank'); workers started with `prefect "
                     "worker start --pool NAME` run them (train on the work queue 'train', "
                     "promote and recommend on 'release'); nothing is served from here")
    dep.add_argument("--tracking-uri", metavar="URI", help=tracking_help)
    dep.set_defaults(func=cmd_deploy)

    team = sub.add_parser(
        "team", help="start or stop PostgreSQL, a Prefect server and an MLflow server",
        description="The team setup on this machine: PostgreSQL (Debian's package) holding the "
        "databases of a Prefect server, of an MLflow tracking server (artifacts under "
        "DIR/artifacts, standing for object storage) and of the Optuna studies; a process "
        "work pool. Every server binds 127.0.0.1 unless --host says otherwise. `up` writes "
        "DIR/env (mode 600: the generated database password) to source before running "
        "shoprank or `prefect worker start`; `down` stops them, keeping their data.")
    team.add_argument("action", choices=("up", "down"))
    team.add_argument("--dir", default=".team", help="folder of the servers' data (.team)")
    team.add_argument("--host", default="127.0.0.1",
                      help="address the servers bind (127.0.0.1; put a TLS proxy with "
                      "authentication in front of any other)")
    team.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL port (5433)")
    team.add_argument("--prefect-port", type=int, default=4200, help="Prefect server port (4200)")
    team.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server port (5000)")
    team.add_argument("--pool", default="shoprank", help="process work pool (shoprank)")
    team.set_defaults(func=cmd_team)
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


if __name__ == "__main__":
    main()
