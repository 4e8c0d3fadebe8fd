"""The ``shoprank`` sub-commands: each reads its parsed arguments and runs one flow or tool.

Heavy libraries are imported inside each command so that ``--help`` answers at once; the parser
is :func:`flows.cli.build_parser`.
"""

from __future__ import annotations

import argparse
import logging
import textwrap
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger("shoprank")


def parse_pairs(values: Sequence[str] | None, flag: str) -> dict[str, str] | None:
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


def cmd_demo_data(args: argparse.Namespace) -> int:
    """Write the built-in demo shop."""
    from tasks.data.demo_data import write_demo_shop

    shop = write_demo_shop(Path(args.out), n_events=args.events, seed=args.seed,
                           shards=args.shards, shift_day=args.shift_day)
    print(f"wrote {shop.events} and {shop.items}")  # noqa: T201
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """Run only the data validation suites and print the report."""
    from tasks.checks.validate import validate_tables
    from tasks.data.adapters import load_raw

    raw = load_raw(args.data, args.format or "parquet", column_map=parse_pairs(args.map, "--map"),
                   event_map=parse_pairs(args.event_map, "--event-map"))
    for note in raw.notes:
        logger.warning(note)
    report, _ = validate_tables(raw.events, raw.items,
                                dropped_item_duplicates=raw.dropped_item_duplicates)
    print(report.to_markdown())  # noqa: T201
    return 0 if report.success else 1


def cmd_train(args: argparse.Namespace) -> int:
    """Run the training flow."""
    from flows.config import load_config
    from flows.train import train

    config = load_config(
        args.config,
        data__path=args.data, data__format=args.format, data__name=args.name,
        data__column_map=parse_pairs(args.map, "--map"),
        data__event_map=parse_pairs(args.event_map, "--event-map"),
        data__demo_events=args.events, data__demo_seed=args.demo_seed,
        split__protocol=args.protocol, seed=args.seed, output_dir=args.output_dir,
        ranker__n_trials=args.trials, ranker__enabled=False if args.no_ranker else None,
        transformer__n_trials=args.transformer_trials,
        transformer__enabled=False if args.no_transformer else None,
        content__enabled=False if args.no_content else None,
        engine=args.engine, dask__address=args.dask_address, dask__workers=args.dask_workers,
        dask__shards=args.shards, registry__model_name=args.model_name,
        evaluation__test_user_share=args.test_user_share,
    )
    result = train(config, resume=args.resume)
    print(  # noqa: T201
        f"\nMLflow run {result['run_id']} ({result['tracking_uri']}); outputs in "
        f"{result['workdir']}.\nSee it with: mlflow ui --backend-store-uri {result['tracking_uri']}"
    )
    release = result.get("release")
    if release:
        outcome = release["decision"] or "promotion left to the promote flow"
        if release.get("reason"):
            outcome += f": {release['reason']}"
        served = release.get("champion")
        print(f"Registered {release['model']} version {release['version']} "  # noqa: T201
              f"({release['family']}, the evaluated copy), {outcome}."
              + (f"\nServed: models:/{release['model']}@champion = version {served}"
                 f"{' (refitted on every event)' if release.get('released_version') else ''}."
                 if served else ""))
    return 0


def tracking_uri_of(args: argparse.Namespace, config: object) -> str:
    """``--tracking-uri``, else MLFLOW_TRACKING_URI, else the config's, else ``./mlruns``."""
    from tasks.tracking import tracking_uri

    return args.tracking_uri or tracking_uri(getattr(config, "tracking_uri", None))


def cmd_promote(args: argparse.Namespace) -> int:
    """Run the promotion flow for one registered version."""
    from flows.config import load_config
    from flows.promote import promote

    config = load_config(args.config)
    result = promote(version=args.version, model_name=args.model_name or
                     config.registry.model_name,
                     registry=config.registry if args.config else None,  # else the run's own
                     tracking_uri=tracking_uri_of(args, config), split_dir=args.split,
                     force=args.force, dask_address=args.dask_address)
    print(f"\n{result['model']} version {result['version']}: {result['decision']} "  # noqa: T201
          f"({result['reason']})")
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    """Run the monitoring flow; exit 3 when decay or drift is flagged."""
    from flows.config import load_config
    from flows.monitor import monitor

    config = load_config(
        args.config, data__path=args.data, data__format=args.format, data__name=args.name,
        data__column_map=parse_pairs(args.map, "--map"),
        data__event_map=parse_pairs(args.event_map, "--event-map"),
        data__demo_events=args.events, data__demo_seed=args.demo_seed,
        output_dir=args.output_dir, registry__model_name=args.model_name)
    config.tracking_uri = tracking_uri_of(args, config)
    result = monitor(config)
    print(f"\n{config.registry.model_name} v{result['champion']}: "  # noqa: T201
          f"{result['new_events']:,} new events over {len(result['days'])} days "
          f"(MLflow run {result['run_id']})")
    for line in result["lines"]:
        print(line)  # noqa: T201
    if result["flagged"]:
        print("FLAGGED: the event shoprank.model.decayed was sent")  # noqa: T201
    return 3 if result["flagged"] else 0


def cmd_catalogue(args: argparse.Namespace) -> int:
    """Register the champion updated for a catalogue file (``catalogue update``)."""
    from flows.catalogue import catalogue_update
    from flows.config import load_config

    config = load_config(args.config, registry__model_name=args.model_name)
    config.tracking_uri = tracking_uri_of(args, config)
    result = catalogue_update(config, args.items, parse_pairs(args.map, "--map"),
                              args.new_item_weight)
    counts = result["catalogue"]
    print(f"\n{config.registry.model_name} v{result['version']} (the catalogue of "  # noqa: T201
          f"{args.items} on v{result['base']}): {counts.get('new_items')} new items, "
          f"{counts.get('unavailable')} unavailable, {counts.get('users_reached')} users with a "
          f"new item in their top 10" + ("" if not result["reused"] else "; already registered"))
    if not result["moved"]:
        print(f"champion not moved: {result['reason']}")  # noqa: T201
        return 3
    print(f"champion -> v{result['version']}")  # noqa: T201
    return 0


def cmd_recommend(args: argparse.Namespace) -> int:
    """Run the batch recommendation flow."""
    from flows.recommend import recommend

    result = recommend(users_file=args.users, k=args.k, out=args.out, model_uri=args.model_uri,
                       tracking_uri=args.tracking_uri, dask_address=args.dask_address)
    print(f"\nwrote {result['rows']} rows for {result['users']} users from "  # noqa: T201
          f"{result['model']} version {result['version']} to {result['path']}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve a registered model over HTTP (replaces this process with the MLflow server)."""
    from flows.config import load_config
    from flows.serve import serve

    config = load_config(args.config)
    serve(model_uri=args.model_uri or config.serve.model_uri, host=args.host or config.serve.host,
          port=args.port or config.serve.port, tracking_uri=tracking_uri_of(args, config),
          workers=args.workers or config.serve.workers, mlflow_server=args.mlflow_server)
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    """Create the Prefect deployments and serve them."""
    from flows.config import load_config
    from flows.deploy import deploy

    config = load_config(
        args.config, data__path=args.data, data__format=args.format,
        data__column_map=parse_pairs(args.map, "--map"),
        data__event_map=parse_pairs(args.event_map, "--event-map"), output_dir=args.output_dir,
    )
    config.tracking_uri = tracking_uri_of(args, config)
    names = deploy(config, cron=args.cron, timezone=args.timezone,
                   promote_in_train=args.promote_in_train, recommend_k=args.k,
                   recommend_out=args.out, serve_them=not args.no_serve, limit=args.limit,
                   pool=args.pool, monitor_cron=args.monitor_cron)
    print(f"\ndeployments: {', '.join(names)}")  # noqa: T201
    if args.pool:
        print(f"start workers: prefect worker start --pool {args.pool}")  # noqa: T201
    return 0


def cmd_team(args: argparse.Namespace) -> int:
    """Start or stop the team servers (PostgreSQL, Prefect server, MLflow server)."""
    from flows.team import Team

    team = Team(Path(args.dir), host=args.host, pg_port=args.pg_port,
                prefect_port=args.prefect_port, mlflow_port=args.mlflow_port, pool=args.pool)
    if args.action == "down":
        team.down()
        print(f"stopped the team servers of {team.folder} (their data stays)")  # noqa: T201
        return 0
    env = team.up()
    print(textwrap.dedent(f"""\
        PostgreSQL :{team.pg_port} (databases prefect, mlflow, optuna), Prefect server
        {team.env()["PREFECT_API_URL"]}, MLflow server {team.env()["MLFLOW_TRACKING_URI"]}
        (artifacts in {team.folder / "artifacts"}), work pool {team.pool!r}.
        Next, in each shell that runs shoprank or a worker:
          source {env}
          shoprank deploy --pool {team.pool}
          prefect worker start --pool {team.pool}
        Stop them with: shoprank team down --dir {args.dir}"""))  # noqa: T201
    return 0
