"""Wall time and peak memory of every pipeline stage on the built-in shop, and Prefect's share.

    nice -n 10 .venv/bin/python benchmarks/speed.py --events 100000 1000000 --prefect
    nice -n 10 .venv/bin/python benchmarks/speed.py --events 10000000 --workdir /tmp/speed \\
        --stages generate load validate split candidates_features
    .venv/bin/python benchmarks/speed.py --plot-only                  # table + docs/speed.png

Each stage runs in a fresh Python process (``--run-stage``) that reads its inputs from the Parquet
files of the stages before it, so each memory figure is that stage's own: ``peak RSS`` is the
process's maximum resident set (imports and inputs included), ``stage RSS`` the part added while
the stage function ran (peak minus the resident set just before it). Times exclude imports and
reading inputs. Stages, in order:

* ``generate``: :func:`tasks.data.demo_data.write_demo_shop` (60 days);
* ``load``: :func:`tasks.data.adapters.load_raw` of the Parquet shop, written back as canonical
  tables;
* ``validate``: :func:`tasks.checks.validate.validate_tables` (events and items suites);
* ``split``: :func:`tasks.splitting.split.cut_times` + :func:`tasks.splitting.split.time_split` +
  :func:`tasks.data.prepare.write_split`;
* ``candidates_features``: :class:`models.baselines.CoVisitation` fitted on train +
  :func:`tasks.ranking.features.candidate_features` for every validation user (candidates, features
  and labels, ``--user-chunk`` users at a time), written to one Parquet file;
* ``lgbm_fit``: :class:`models.lgbm_ranker.LightGBMRanker`, 100 rounds, one thread, no early
  stopping, on the groups with a positive (one Optuna trial costs about this);
* ``transformer_epoch``: one CPU epoch (one thread) of
  :class:`models.transformer.SequentialTransformer` on train, on the ``--transformer-users``
  most recent users when there are more (recorded);
* ``packaging``: :func:`tasks.release.packaging.build_bundle` +
  :func:`tasks.release.packaging.save_pyfunc` of the co-visitation model fitted on the test history,
  then loading the pyfunc back;
* ``recommend``: :func:`flows.recommend.recommend_all`, top-10 for every known user.

``--user-chunk N`` is the ``user_chunk`` of :func:`tasks.ranking.features.candidate_features`
(default its ``USER_CHUNK``, 10,000; 0: all users in one chunk); the table marks figures of more
than one chunk with a dagger. The returned frame holds every pair, so its size still grows with the
shop.

Results are kept in ``benchmarks/results/speed.json`` (one row per stage and size; a rerun
replaces its rows, the others stay; rows of stages not listed above, such as ``candidates`` and
``features`` timed as two separate calls, stay in the file but not in the table);
``--plot-only`` rebuilds the table and ``docs/speed.png`` from it. ``--workdir`` keeps the stage
files, so later stages can run on their own.

``--prefect`` also runs the ``train`` flow once on the 100k shop and compares its wall time with
the same stages called directly, reading the task run durations from the Prefect API.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STAGES = ("generate", "load", "validate", "split", "candidates_features", "lgbm_fit",
          "transformer_epoch", "packaging", "recommend")
RESULTS = ROOT / "benchmarks" / "results" / "speed.json"
PLOT = ROOT / "docs" / "speed.png"
SEED = 0


def _status_mib(field: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (peak since the last reset) of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _reset_peak() -> None:
    """Reset ``VmHWM`` to the current resident set (Linux ``clear_refs`` value 5)."""
    Path("/proc/self/clear_refs").write_text("5")


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------- stages (run in a child process)
# Each ``prepare_<stage>`` reads inputs (untimed) and returns the timed call.

def prepare_generate(work: Path, n: int) -> Callable[[], dict[str, Any]]:
    from tasks.data.demo_data import write_demo_shop

    def run() -> dict[str, Any]:
        shop = write_demo_shop(work / "shop", n_events=n, seed=SEED)
        import polars as pl

        return {"events": pl.scan_parquet(shop.events).select(pl.len()).collect().item()}

    return run


def prepare_load(work: Path, n: int) -> Callable[[], dict[str, Any]]:
    from tasks.data.adapters import load_raw

    def run() -> dict[str, Any]:
        raw = load_raw(work / "shop", "parquet")
        (work / "data").mkdir(exist_ok=True)
        raw.events.write_parquet(work / "data" / "events.parquet")
        raw.items.write_parquet(work / "data" / "items.parquet")
        return {"events": raw.events.height, "items": raw.items.height}

    return run


def _tables(work: Path) -> tuple[Any, Any]:
    import polars as pl

    return (pl.read_parquet(work / "data" / "events.parquet"),
            pl.read_parquet(work / "data" / "items.parquet"))


def prepare_validate(work: Path, n: int) -> Callable[[], dict[str, Any]]:
    import great_expectations  # noqa: F401  (its import, 3-5 s, is not the stage's cost)

    from tasks.checks.validate import validate_tables

    events, items = _tables(work)

    def run() -> dict[str, Any]:
        report, clean = validate_tables(events, items)
        if not report.success:
            raise SystemExit(report.to_markdown())
        clean.write_parquet(work / "data" / "events.parquet")
        return {"events": clean.height, "checks": report.evaluated}

    return run


def prepare_split(work: Path, n: int) -> Callable[[], dict[str, Any]]:
    from tasks.data.prepare import write_split
    from tasks.splitting.split import cut_times, time_split

    events, _ = _tables(work)

    def run() -> dict[str, Any]:
        split = time_split(events, *cut_times(events))
        write_split(split, work / "data" / "split")
        return split.summary()

    return run


def _split(work: Path) -> Any:
    from tasks.data.prepare import read_split

    return read_split(work / "data" / "split")


def _user_chunk() -> int:
    """Users per chunk of :func:`~tasks.ranking.features.candidate_features` (0: one chunk)."""
    from tasks.ranking.features import USER_CHUNK

    return int(os.environ.get("SHOPRANK_BENCH_USER_CHUNK", USER_CHUNK))


def prepare_candidates_features(work: Path, n: int) -> Callable[[], dict[str, Any]]:
    import polars as pl

    from models.baselines import CoVisitation
    from models.columns import USER
    from tasks.ranking.candidates import candidate_recall
    from tasks.ranking.features import candidate_features

    split, items = _split(work), pl.read_parquet(work / "data" / "items.parquet")
    users = split.valid_targets[USER].unique()
    chunk = _user_chunk() or max(users.len(), 1)

    def run() -> dict[str, Any]:
        cpu, start = _cpu_s(), time.perf_counter()
        covis = CoVisitation().fit(split.train)
        fit = {"covis_fit_s": time.perf_counter() - start, "covis_fit_cpu_s": _cpu_s() - cpu}
        frame = candidate_features(split.train, users, covis, items=items,
                                   targets=split.valid_targets, user_chunk=chunk)
        frame.write_parquet(work / "features.parquet")
        recall = candidate_recall(frame, split.valid_targets)["all"]
        return {"pairs": frame.height, "columns": frame.width, "users": users.len(),
                "recall": recall, "user_chunk": chunk, "chunks": -(-users.len() // chunk),
                **fit}

    return run


def prepare_lgbm_fit(work: Path, n: int) -> Callable[[], dict[str, Any]]:
    import polars as pl

    from models.lgbm_ranker import LightGBMRanker

    frame = pl.read_parquet(work / "features.parquet")

    def run() -> dict[str, Any]:
        ranker = LightGBMRanker(num_boost_round=100, seed=SEED, num_threads=1).fit(frame)
        return {"rows": frame.height, "rounds": ranker.best_iteration_}

    return run


def prepare_transformer_epoch(work: Path, n: int, max_users: int = 20_000
                              ) -> Callable[[], dict[str, Any]]:
    import polars as pl

    from models.columns import TIMESTAMP, USER
    from models.transformer import SequentialTransformer, TransformerConfig

    train = _split(work).train
    last = train.group_by(USER).agg(pl.col(TIMESTAMP).max()).sort(TIMESTAMP, descending=True)
    users = last.head(max_users)[USER]
    sample = train.filter(pl.col(USER).is_in(users.implode()))
    _, items = _tables(work)

    def run() -> dict[str, Any]:
        model = SequentialTransformer(TransformerConfig(epochs=1, device="cpu", num_threads=1))
        model.fit(sample, items=items)
        return {"users": users.len(), "of_users": train[USER].n_unique(),
                "events": sample.height, "epoch_s": model.history_[0]["epoch_s"]}

    return run


def prepare_packaging(work: Path, n: int) -> Callable[[], dict[str, Any]]:
    import mlflow

    from models.baselines import CoVisitation, Popularity
    from tasks.release.packaging import build_bundle, folder_bytes, input_example, save_pyfunc

    split_dir = work / "data" / "split"
    history = _split(work).test_history
    models = work / "models"
    fit_start = time.perf_counter()
    CoVisitation().fit(history).save(models / "covisitation")
    Popularity(window_days=7.0).fit(history).save(models / "recent_popularity")
    fit_s = time.perf_counter() - fit_start

    def run() -> dict[str, Any]:
        bundle = build_bundle(work / "bundle", family="covisitation",
                              model_dir=models / "covisitation", model_root=models,
                              split_dir=split_dir, config={}, exclude_seen=False)
        target = work / "pyfunc"
        save_pyfunc(bundle, target, "covisitation", input_example(split_dir))
        start = time.perf_counter()
        mlflow.pyfunc.load_model(str(target))
        return {"bytes": folder_bytes(target), "load_s": time.perf_counter() - start,
                "untimed_fit_s": fit_s}

    return run


def prepare_recommend(work: Path, n: int) -> Callable[[], dict[str, Any]]:
    from flows.recommend import recommend_all
    from models.serving import ServingModel

    serving = ServingModel.load(work / "bundle")

    def run() -> dict[str, Any]:
        frame = recommend_all(serving, serving.users, 10)
        return {"users": serving.users.len(), "rows": frame.height}

    return run


def run_stage(stage: str, work: Path, n: int, transformer_users: int) -> dict[str, Any]:
    """Child process: prepare, time the stage, print one JSON line of results."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    prepare = globals()[f"prepare_{stage}"]
    call = (prepare(work, n, transformer_users) if stage == "transformer_epoch"
            else prepare(work, n))
    _reset_peak()
    before = _status_mib("VmRSS")
    cpu_start, start = _cpu_s(), time.perf_counter()
    info = call()
    seconds, cpu = time.perf_counter() - start, _cpu_s() - cpu_start
    peak = _status_mib("VmHWM")
    return {"stage": stage, "events": n, "seconds": seconds, "cpu_s": cpu, "peak_rss_mib": peak,
            "stage_rss_mib": max(peak - before, 0.0), "process_peak_mib": _peak_mib(),
            "info": info}


# ---------------------------------------------------------------- Prefect's share (child process)

def _direct_train(shop: Path, out: Path) -> float:
    """The ``train`` flow's stages called as plain functions; returns their total seconds."""
    from tasks.checks.validate import validate_tables
    from tasks.data.adapters import load_raw
    from tasks.data.prepare import write_split
    from tasks.evaluation.evaluate import baseline_factories, score_model
    from tasks.splitting.split import cut_times, time_split

    start = time.perf_counter()
    raw = load_raw(shop, "parquet")
    out.mkdir(parents=True, exist_ok=True)
    raw.events.write_parquet(out / "events.parquet")
    raw.items.write_parquet(out / "items.parquet")
    _, events = validate_tables(raw.events, raw.items)
    split = time_split(events, *cut_times(events))
    write_split(split, out / "split")
    n_items = raw.items["item_id"].n_unique()
    for name, factory in baseline_factories(7.0).items():
        _, model = score_model(factory, split, [10, 20], n_items, False)
        model.save(out / "models" / name)
    return time.perf_counter() - start


def _flow_run_times(flow_run_id: Any) -> dict[str, float]:
    """Durations the Prefect API recorded for a flow run and the sum of its task runs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {"flow_run_s": flow_run.total_run_time.total_seconds(),
            "task_runs_s": sum(t.total_run_time.total_seconds() for t in tasks),
            "task_runs": len(tasks),
            **{f"task.{t.name}": t.total_run_time.total_seconds() for t in tasks}}


def prefect_share(work: Path, n: int) -> dict[str, Any]:
    """Run ``train`` twice (the first starts Prefect's temporary server) and the stages directly.

    The flow's registry step is off, so both do the same work: load, validate, split, the four
    baselines fitted and scored twice each; the flow also logs to MLflow.
    """
    os.environ.update(PREFECT_HOME=str(work / "prefect"), MLFLOW_DISABLE_TELEMETRY="true",
                      PREFECT_SERVER_ANALYTICS_ENABLED="false",
                      PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="300")
    from flows.config import load_config
    from flows.train import train
    from tasks.data.demo_data import write_demo_shop

    write_demo_shop(work / "shop", n_events=n, seed=SEED)
    config = load_config(None, data__path=str(work / "shop"), data__format="parquet",
                         data__name="speed", registry__enabled=False,
                         output_dir=str(work / "out"), tracking_uri=f"sqlite:///{work}/mlflow.db")
    walls, states = [], []
    for _ in range(2):
        start = time.perf_counter()
        states.append(train(config, return_state=True))
        walls.append(time.perf_counter() - start)
    direct = _direct_train(work / "shop", work / "direct")
    api = _flow_run_times(states[-1].state_details.flow_run_id)
    return {"stage": "prefect", "events": n, "first_flow_s": walls[0], "flow_s": walls[1],
            "direct_s": direct, **api,
            "prefect_share": (walls[1] - direct) / walls[1]}


# ---------------------------------------------------------------- the parent: run, record, plot

def _rss_of(pid: int) -> float:
    """Resident set of process ``pid`` in MiB (0 once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def spawn(stage: str, work: Path, n: int, transformer_users: int, timeout: float,
          max_rss_mib: float = 14_336) -> dict[str, Any]:
    """Run one stage in a fresh process; returns its results (``error`` when it failed).

    The process is killed when it runs past ``timeout`` or its resident set passes
    ``max_rss_mib`` (the machine is shared: an out-of-memory kill could hit someone else).
    """
    command = [sys.executable, __file__, "--run-stage", stage, "--work", str(work),
               "--events", str(n), "--transformer-users", str(transformer_users)]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(command, stdout=out, stderr=err, text=True)
        error = None
        while proc.poll() is None:
            time.sleep(0.5)
            if time.perf_counter() - start > timeout:
                error = f"stopped after {timeout:.0f} s"
            elif _rss_of(proc.pid) > max_rss_mib:
                error = f"stopped at {max_rss_mib / 1024:.0f} GiB resident"
            if error:
                proc.kill()
                proc.wait()
                return {"stage": stage, "events": n, "error": error}
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        tail = (stderr or stdout).strip().splitlines()[-3:]
        return {"stage": stage, "events": n, "error": " | ".join(tail)}
    result = json.loads(lines[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def load_results(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else []


def record(path: Path, result: dict[str, Any]) -> None:
    """Replace the (stage, events) entry of the results file with ``result``."""
    rows = [r for r in load_results(path)
            if (r.get("stage"), r.get("events")) != (result["stage"], result["events"])]
    path.write_text(json.dumps([*rows, result], indent=1, default=str))


def run_sizes(args: argparse.Namespace) -> None:
    """Every requested stage at every requested size; stage files under ``--workdir``."""
    if args.workdir:
        run_in(Path(args.workdir), args)
        return
    with tempfile.TemporaryDirectory(prefix="shoprank-speed-") as tmp:
        run_in(Path(tmp), args)


def run_in(root: Path, args: argparse.Namespace) -> None:
    """Run the stages in order, each in its own process, files under ``root``."""
    for n in args.events:
        work = root / f"shop-{n}"
        work.mkdir(parents=True, exist_ok=True)
        for stage in args.stages:
            result = spawn(stage, work, n, args.transformer_users, args.timeout)
            record(args.results, result)
            shown = (f"failed: {result['error']}" if "error" in result else
                     f"{result['seconds']:.1f} s, peak {result['peak_rss_mib']:.0f} MiB")
            print(f"{n:>10,} {stage:<18} {shown}", flush=True)
            if "error" in result:
                break


def slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) on log(x): 1 is linear growth."""
    import numpy as np

    pairs = [(x, y) for x, y in zip(xs, ys, strict=True) if x > 0 and y > 0]
    if len(pairs) < 2:
        return None
    x, y = np.log([p[0] for p in pairs]), np.log([p[1] for p in pairs])
    return float(np.polyfit(x, y, 1)[0])


def _by_stage(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for row in sorted(rows, key=lambda r: r["events"]):
        if row["stage"] in STAGES and "error" not in row:
            out.setdefault(row["stage"], []).append(row)
    return {s: out[s] for s in STAGES if s in out}


def _size(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"


def tables(rows: list[dict[str, Any]]) -> str:
    """Markdown: seconds and peak RSS per stage and size, log-log slopes, events per second."""
    stages = _by_stage(rows)
    sizes = sorted({r["events"] for r in rows if r["stage"] in STAGES})
    head = ("| stage | " + " | ".join(f"{_size(n)} wall s (CPU s)" for n in sizes)
            + " | time slope (CPU) | " + " | ".join(f"{_size(n)} peak MiB" for n in sizes)
            + " | memory slope | events/s (wall) at largest |")
    lines = [head, "|---|" + "---:|" * (2 * len(sizes) + 3)]
    for stage, runs in stages.items():
        at = {r["events"]: r for r in runs}
        secs = [_seconds(at[n]) if n in at else "not run" for n in sizes]
        mem = [f"{at[n]['peak_rss_mib']:,.0f} (+{at[n]['stage_rss_mib']:,.0f})" if n in at
               else "not run" for n in sizes]
        t_slope = slope([r["events"] for r in runs], [_time(r) for r in runs])
        m_slope = slope([r["events"] for r in runs], [r["peak_rss_mib"] for r in runs])
        top = runs[-1]
        done = (top.get("info") or {}).get("events", top["events"])  # the sample, if one
        rate = done / top["seconds"] if top["seconds"] else float("nan")
        lines.append(f"| {stage} | " + " | ".join(secs) + f" | {_fmt(t_slope)} | "
                     + " | ".join(mem) + f" | {_fmt(m_slope)} | {rate:,.0f} |")
    for row in rows:
        if row["stage"] == "prefect" and "error" not in row:
            lines.append("\n" + prefect_table(row))
    return "\n".join(lines)


def _time(row: dict[str, Any]) -> float:
    """CPU seconds when recorded (steadier than wall time on a shared machine), else wall."""
    return row.get("cpu_s") or row["seconds"]


def _seconds(row: dict[str, Any]) -> str:
    """Wall seconds, CPU seconds in brackets when recorded, a dagger for several user chunks."""
    cpu = row.get("cpu_s")
    mark = " †" if (row.get("info") or {}).get("chunks", 1) > 1 else ""
    return f"{row['seconds']:.1f}" + ("" if cpu is None else f" ({cpu:.1f})") + mark


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def prefect_table(row: dict[str, Any]) -> str:
    """Markdown of the ``train`` flow against the same stages called directly."""
    items = [("first `train` call (starts the temporary Prefect server)", row["first_flow_s"]),
             ("second `train` call (server running)", row["flow_s"]),
             ("flow run duration recorded by Prefect", row["flow_run_s"]),
             (f"sum of its {row['task_runs']} task run durations", row["task_runs_s"]),
             ("the same stages called directly (no Prefect, no MLflow)", row["direct_s"])]
    lines = [f"| {_size(row['events'])} events, `train` flow | seconds |", "|---|---:|"]
    lines += [f"| {name} | {value:.1f} |" for name, value in items]
    orchestration = row["flow_s"] - row["task_runs_s"]
    logging_s = row["task_runs_s"] - row["direct_s"]
    lines += [f"| Prefect orchestration: second call minus its task runs | {orchestration:.1f} "
              f"({100 * orchestration / row['flow_s']:.0f}%) |",
              f"| inside the tasks, beyond the stages (mostly MLflow logging) | {logging_s:.1f} "
              f"({100 * logging_s / row['flow_s']:.0f}%) |"]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Time and peak memory against events, log-log, one line per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5))
    for stage, runs in _by_stage(rows).items():
        xs = [r["events"] for r in runs]
        left.plot(xs, [_time(r) for r in runs], marker="o", label=stage)
        right.plot(xs, [r["peak_rss_mib"] for r in runs], marker="o", label=stage)
    labels = ((left, "CPU time of the stage (s)"),
              (right, "peak RSS of the stage process (MiB)"))
    for axes, label in labels:
        axes.set_xscale("log")
        axes.set_yscale("log")
        axes.set_xlabel("events in the shop")
        axes.set_ylabel(label)
        axes.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    figure.suptitle("shoprank stages on the built-in shop (2 shared vCPU)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--stages", nargs="*", choices=STAGES, default=list(STAGES))
    parser.add_argument("--transformer-users", type=int, default=20_000,
                        help="users of the transformer epoch (most recent first)")
    parser.add_argument("--user-chunk", type=int, default=None,
                        help="user_chunk of candidate_features (default 10000; 0: one chunk)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per stage")
    parser.add_argument("--workdir", help="keep the stage files here (default: a temp folder)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--prefect", action="store_true", help="also time the train flow")
    parser.add_argument("--plot", type=Path, default=PLOT, help="where the PNG is written")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--run-stage", choices=[*STAGES, "prefect"], help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.user_chunk is not None:
        os.environ["SHOPRANK_BENCH_USER_CHUNK"] = str(args.user_chunk)
    if args.run_stage == "prefect":
        print(json.dumps(prefect_share(args.work, args.events[0]), default=str))
        return
    if args.run_stage:
        print(json.dumps(run_stage(args.run_stage, args.work, args.events[0],
                                   args.transformer_users), default=str))
        return
    if not args.plot_only:
        run_sizes(args)
        if args.prefect:
            with tempfile.TemporaryDirectory(prefix="shoprank-prefect-") as tmp:
                record(args.results, spawn("prefect", Path(tmp), 100_000, 0, args.timeout))
    rows = load_results(args.results)
    print(tables(rows))
    plot(rows, args.plot)
    print(f"\nplot written to {args.plot}")


if __name__ == "__main__":
    main()
