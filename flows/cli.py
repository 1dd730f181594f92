"""The `tapeline` command: run the flow, run one stage locally, predict, and list runs."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import threading
import traceback
from collections import Counter
from collections.abc import Iterator, MutableMapping
from pathlib import Path

from stages.graph import STAGE_NAMES
from tapeline.config import PRESETS, PipelineConfig, config_keys, load_config
from tapeline.errors import OutcomeError, TapelineError
from tapeline.hardware import ensure_one_tensorflow, onednn_origin
from tapeline.imaging import IMAGE_FORMATS
from tapeline.interrupts import Interrupted, interruptible
from tapeline.store import normalize_root, open_store

PROMOTION = "promotion"
BUGS = "the tapeline repository's issues"
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class StderrHandler(logging.StreamHandler):
    """Logs to the current sys.stderr (which test runners and notebooks swap), not the one at startup."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _configure_logging() -> None:
    """tapeline's stage logs at INFO on stderr (once); HTTP client chatter only when it matters."""
    logger = logging.getLogger("tapeline")
    logger.setLevel(logging.INFO)
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        handler = StderrHandler()
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)
        logger.propagate = False
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _keys_epilog() -> str:
    """Every config key with its default, for --help."""
    rows = config_keys()
    width = max(len(k) for k, _, _ in rows)
    lines = [f"  {k.ljust(width)}  {d:<22} {text}" for k, d, text in rows]
    return "config keys (--set KEY=VALUE, or a YAML file of sections):\n" + "\n".join(lines)


def _add_global(parser: argparse.ArgumentParser, *, under_command: bool) -> None:
    """The global options, accepted before the subcommand and after it. Only the top-level parser has their
    defaults: a subcommand's copy defaults to "not given" (SUPPRESS), so it never overwrites what the user gave
    before the subcommand (`tapeline --artifacts s3://b run` uses s3://b)."""
    default = argparse.SUPPRESS if under_command else os.environ.get("TAPELINE_ARTIFACTS", "artifacts")
    parser.add_argument("--artifacts", default=default,
                        help="artifacts directory or object-store URL (s3://BUCKET/PREFIX, gs://…, file://DIR); "
                        "default ./artifacts, env TAPELINE_ARTIFACTS")


def _add_config(parser: argparse.ArgumentParser) -> None:
    """--config FILE and repeatable --set KEY=VALUE."""
    parser.add_argument("--config", type=Path, help="YAML config file")
    parser.add_argument("--preset", choices=tuple(PRESETS), help="named bundle of config keys, applied under the "
                        "file's keys and --set (replaces the file's `preset:`)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set train.max_epochs=3 (repeatable)")
    parser.add_argument("--workers", type=int, metavar="N", help="train with N worker processes (train.workers=N; "
                        "the train stage starts them locally unless TF_CONFIG already places this one in a cluster)")
    parser.add_argument("--verify", action="store_true", help="verify cached outputs by checksum, not only size")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    formatter = argparse.RawDescriptionHelpFormatter
    keys = _keys_epilog()
    parser = argparse.ArgumentParser(prog="tapeline", description="Staged TensorFlow training pipeline on Prefect.",
                                     epilog=keys, formatter_class=formatter)
    _add_global(parser, under_command=False)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the whole flow (on PREFECT_API_URL when set, else on the temporary "
                              "Prefect API)", epilog=keys, formatter_class=formatter)
    _add_global(run, under_command=True)
    _add_config(run)
    run.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    sweep = commands.add_parser("sweep", help="hyperparameter search over `sweep.space` (the `sweep` flow): cached, "
                                "resumable, pruned trials; the best one evaluated and promoted", epilog=keys,
                                formatter_class=formatter)
    _add_global(sweep, under_command=True)
    _add_config(sweep)
    sweep.add_argument("--json", action="store_true", help="print the sweep as one JSON object on the last line")
    stage = commands.add_parser("stage", help="run one stage locally, without a Prefect server",
                                epilog=keys, formatter_class=formatter)
    stage.add_argument("name", choices=(*STAGE_NAMES, PROMOTION),
                       help="a stage of the graph, or the promotion step (needs every stage's output)")
    _add_global(stage, under_command=True)
    _add_config(stage)
    stage.add_argument("--json", action="store_true", help="print the stage result as JSON")
    plan = commands.add_parser("plan", help="each stage's fingerprint, whether it is cached, and what `tapeline run` "
                               "would run; runs nothing", epilog=keys, formatter_class=formatter)
    _add_global(plan, under_command=True)
    _add_config(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    score = commands.add_parser("score", help="score a source with the production model (the `batch-scoring` flow): "
                                "per file, by content; drift against the training data", epilog=keys,
                                formatter_class=formatter)
    score.add_argument("source", help="images:DIR (flat or class folders; a directory, file://, s3://… or gs://…), "
                       "idx:DIR or parquet:PATH (on disk)")
    score.add_argument("--model", help="production (default), models/vNNNN, serving/N, or an export directory")
    _add_global(score, under_command=True)
    score.add_argument("--config", type=Path, help="YAML config file")
    score.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key, e.g. --set score.workers=4 (repeatable)")
    score.add_argument("--dask-address", help="a Dask scheduler (tcp://HOST:PORT) to score the shards on "
                       "(score.dask_address)")
    score.add_argument("--json", action="store_true", help="print the run as one JSON object on the last line")
    predict = commands.add_parser("predict", help=f"classify images ({IMAGE_FORMATS}) or .npy arrays with an "
                                 "exported model")
    _add_global(predict, under_command=True)
    predict.add_argument("--model", type=Path, help="exported model directory (default: production)")
    predict.add_argument("images", nargs="+", type=Path)
    runs = commands.add_parser("runs", help="list registered runs, newest first")
    _add_global(runs, under_command=True)
    runs.add_argument("--json", action="store_true", help="print the rows as JSON")
    return parser


def _config_from(args: argparse.Namespace) -> PipelineConfig:
    """The config of --config, --preset, --set and --workers (a shorthand for --set train.workers=N)."""
    workers = [] if args.workers is None else [f"train.workers={args.workers}"]
    return load_config(args.config, [*args.overrides, *workers], args.preset)


def _command_run(args: argparse.Namespace) -> int:
    """Run the Prefect flow and print its summary."""
    from flows.server import start_temporary_api
    from stages.model import check_before_work

    config = _config_from(args)
    check_before_work(config)  # a bad model.builder is one line here, not a failed flow run
    open_store(args.artifacts)  # a missing bucket or an unreachable endpoint fails here, in one line
    os.environ["TAPELINE_ARTIFACTS"] = str(normalize_root(args.artifacts))
    without_server_telemetry()
    start_temporary_api()
    from flows.training import training_pipeline

    summary = training_pipeline(config=config, verify=args.verify)
    if args.json:
        print(json.dumps(summary, default=str))
    else:
        for name, row in summary["stages"].items():
            print(f"{name:<9} {row['fingerprint']}  {'cached' if row['cached'] else 'ran   '}  {row['seconds']:7.1f} s")
        print(f"test accuracy {summary['test_accuracy']:.4f}; {summary['decision']}")
        print(f"model: {summary['model_path']}")
        print(summary["message"])
    return 0


def command_sweep(args: argparse.Namespace) -> int:
    """Run the `sweep` flow (one log line per trial as it ends) and print its table and the winner's gate."""
    from flows.server import start_temporary_api
    from stages.model import check_before_work
    from sweeps.space import check_space
    from sweeps.state import DriverLease, SweepFiles, sweep_name

    config = _config_from(args)
    store = open_store(args.artifacts)  # a missing bucket or an unreachable endpoint fails here, in one line
    DriverLease(SweepFiles(store, sweep_name(config)), config.sweep.lease_seconds).check_free()
    check_space(config)  # every trial checked before any work, and before the temporary Prefect API starts
    check_before_work(config)
    os.environ["TAPELINE_ARTIFACTS"] = str(normalize_root(args.artifacts))
    without_server_telemetry()
    start_temporary_api()
    from flows.sweep import sweep

    summary = sweep(config=config, verify=args.verify)
    print(summary["table"])
    best = summary["best"]
    if best is not None:
        print(f"best: trial {best['number']} ({config.sweep.metric} {best['value']:.4f}); its config: "
              f"tapeline run --config {best['config']}")
        print(f"test accuracy {summary['test_accuracy']:.4f}; {summary['decision']}")
    else:
        print(summary["decision"])
    if args.json:
        print(json.dumps({k: v for k, v in summary.items() if k != "table"}, default=str))
    failure = all_failed(summary["trials"])
    if failure is not None:
        raise OutcomeError(failure)
    return 0


NUMBER = re.compile(r"[-+]?\d[\d.e+-]*")


def _reason_kind(reason: str | None) -> str:
    """A trial's failure reason with its figures blanked, so that reasons differing only in them count as one."""
    return NUMBER.sub("N", reason or "no reason recorded")


def all_failed(trials: list[dict]) -> str | None:
    """When every trial of a sweep failed: one line with how many and the commonest reason; else None."""
    if not trials or any(t["state"] != "failed" for t in trials):
        return None
    kind, count = Counter(_reason_kind(t["reason"]) for t in trials).most_common(1)[0]
    first = next(t for t in trials if _reason_kind(t["reason"]) == kind)
    return (f"every trial of the sweep failed ({len(trials)} of {len(trials)}); the commonest reason ({count} of "
            f"them, e.g. trial {first['number']}): {first['reason']}")


def _command_score(args: argparse.Namespace) -> int:
    """Run the `batch-scoring` flow on SOURCE and print where the predictions are, how many, and the drift."""
    from flows.server import start_temporary_api
    from stages.score.inputs import list_source
    from stages.score.model import load_in_background, model_ref, resolve

    config = load_config(args.config, args.overrides)
    store = open_store(args.artifacts)
    model = resolve(model_ref(args.model, store))  # no model, no such version: one line, before any Prefect API
    list_source(args.source, model.spec.class_names)  # a missing or empty source too
    os.environ["TAPELINE_ARTIFACTS"] = str(normalize_root(args.artifacts))
    without_server_telemetry()
    on_this_machine = not (args.dask_address or config.score.dask_address)
    preload = load_in_background(model.saved_model) if on_this_machine and not os.environ.get("PREFECT_API_URL") \
        else None  # only while a temporary API starts: there is a wait to hide the load in
    start_temporary_api()
    if preload is not None:
        preload.join()  # before Prefect's import: two threads importing at once can deadlock on import locks
    from flows.scoring import batch_scoring

    summary = batch_scoring(source=args.source, model=args.model, config=config, dask_address=args.dask_address)
    drift = summary["drift"]
    print(f"{summary['images']} rows ({summary['scored']} scored now, {len(summary['skipped'])} skipped) by "
          f"{summary['model_version']}: {summary['output']}")
    print("drift detected: " + "; ".join(drift["reasons"]) if drift["detected"] else
          "no drift" + (f" ({drift['reasons'][0]})" if drift["reasons"] else ""))
    if args.json:
        print(json.dumps(summary, default=str))
    return 0


def without_server_telemetry(environ: MutableMapping[str, str] = os.environ) -> None:
    """Turn off the analytics of the temporary Prefect API that a run starts in its own process (no
    PREFECT_API_URL set), unless the user chose: its first heartbeat met the database locked while the server
    started and logged an ERROR traceback ("database is locked"), on a fresh Prefect home and on a used one. A
    server of one's own reads its own environment, so this changes nothing there. Must run before Prefect is
    imported."""
    environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _command_stage(args: argparse.Namespace) -> int:
    """Run one stage (or the promotion step) in this process."""
    from stages.graph import find_output, run_stage
    from stages.model import check_before_work

    config = _config_from(args)
    check_before_work(config)
    artifacts = normalize_root(args.artifacts)
    if args.name == PROMOTION:
        from stages.pipeline import new_run_id, promote_run

        results = {name: find_output(name, config, artifacts, args.verify) for name in STAGE_NAMES}
        promotion = promote_run(config, results, artifacts, new_run_id())
        print(promotion.model_dump_json() if args.json else f"{promotion.decision}; record: {promotion.record}")
        return 0
    result = run_stage(args.name, config, artifacts, verify=args.verify)
    if args.json:
        print(result.model_dump_json())
    else:
        print(f"{result.stage} {result.fingerprint} {'reused from cache' if result.cached else 'built'} "
              f"in {result.seconds:.2f} s: {result.location or result.path}")
    return 0


def _plan_line(name: str, row: dict) -> str:
    """One stage of the plan: fingerprint, cached or to run, where; or which upstream output it waits on."""
    if row["fingerprint"] is None:
        return f"{name:<9} {'-' * 16}  to run  depends on {row['waits_on']}'s new output (cached after all if that " \
               "comes out byte-identical)"
    return f"{name:<9} {row['fingerprint']}  {'cached' if row['cached'] else 'to run'}  {row['path']}"


def _format_plan(plan: dict) -> str:
    """The plan as aligned text: one line per stage, then what would run."""
    lines = [_plan_line(name, row) for name, row in plan["stages"].items()]
    would_run = plan["would_run"]
    if "sweep" in plan:
        lines.append(f"would run: {', '.join(would_run)}" if would_run else "would run: no trial (every one is "
                     "finished and the shared stages are cached)")
        lines.append("the best trial's evaluate, export and the promotion step run on every sweep (cached when the "
                     "best is unchanged)")
    else:
        lines.append(f"would run: {', '.join(would_run)}" if would_run else "would run: nothing (every stage is "
                     "cached)")
        lines.append("the promotion step runs on every run")
    device, precision = plan["auto"]["device"], plan["auto"]["train.precision"]
    lines.append(f"device: {device['value']} {device['name']} ({device['reason']})")
    lines.append(f"train.precision: {precision['value']} ({precision['reason']})")
    onednn = plan["auto"]["onednn"]
    lines.append(f"oneDNN kernels: {onednn['reason']}")
    return "\n".join(lines)


def _command_plan(args: argparse.Namespace) -> int:
    """Print each stage's fingerprint and cache status, and which stages `tapeline run` would run."""
    from stages.graph import plan

    config = _config_from(args)
    result = plan(config, normalize_root(args.artifacts), verify=args.verify)
    if config.sweep.space:  # the base config is not what runs: the shared stages, then each trial
        from sweeps.report import SHARED_STAGES, sweep_plan, sweep_would_run

        section = sweep_plan(config, normalize_root(args.artifacts))
        result = {**result, "stages": {name: result["stages"][name] for name in SHARED_STAGES},
                  "would_run": sweep_would_run(result["stages"], section), "sweep": section}
    text = _format_plan(result)
    if "sweep" in result:
        from sweeps.report import format_sweep_plan

        text += "\n" + format_sweep_plan(result["sweep"])
    print(json.dumps(result) if args.json else text)
    return 0


def _command_predict(args: argparse.Namespace) -> int:
    """Print one line per image: path, class name, probability."""
    from tapeline.predict import iter_predictions

    for row in iter_predictions(args.images, args.model, normalize_root(args.artifacts)):
        print(f"{row.path}\t{row.class_name}\t{row.probability:.4f}")
    return 0


def _command_runs(args: argparse.Namespace) -> int:
    """Print the registry, newest first."""
    from tapeline.registry import format_runs, runs_of

    rows = runs_of(normalize_root(args.artifacts))
    print(json.dumps(rows, default=str) if args.json else format_runs(rows))
    return 0


COMMANDS = {"run": _command_run, "sweep": command_sweep, "stage": _command_stage, "plan": _command_plan,
            "score": _command_score, "predict": _command_predict,
            "runs": _command_runs}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `tapeline` console script."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    onednn_origin()
    args = build_parser().parse_args(argv)
    _configure_logging()
    with interruptible() as interrupts:
        try:
            ensure_one_tensorflow()
            return COMMANDS[args.command](args)
        except Interrupted as exc:  # Ctrl-C or SIGTERM: what is done stays; the same command goes on from there
            interrupts.announce()
            return exc.status
        except TapelineError as exc:
            if interrupts.received is not None:  # an error met while unwinding from the signal is the signal's
                interrupts.announce()
                return 128 + interrupts.received
            print(f"tapeline: error: {exc}", file=sys.stderr)
            return exc.exit_status
        except Exception:  # noqa: BLE001 - anything else is tapeline's own mistake: say so, with the traceback
            if interrupts.received is not None:
                interrupts.announce()
                return 128 + interrupts.received
            traceback.print_exc()
            print(f"tapeline: this is a bug in tapeline, not a problem with your input or config: please report it "
                  f"with the traceback above ({BUGS})", file=sys.stderr)
            return 1


NATIVE_STARTUP_NOISE = (b"All log messages before absl::InitializeLog() is called",
                        b"oneDNN custom operations are on", b"cpu_feature_guard.cc")


@contextlib.contextmanager
def _without_native_startup_noise() -> Iterator[None]:
    """Keep TensorFlow's start-up INFO lines (printed by its C++ runtime straight to file descriptor 2,
    before any log level applies) off the terminal; every other line of stderr passes through."""
    read_fd, write_fd = os.pipe()
    saved = os.dup(2)
    out_fd = os.dup(saved)  # the pump's own copy, made here: `saved` may be closed before the thread runs
    os.dup2(write_fd, 2)
    os.close(write_fd)

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as lines, os.fdopen(out_fd, "wb", buffering=0) as out:
            for line in lines:
                if not any(noise in line for noise in NATIVE_STARTUP_NOISE):
                    out.write(line)

    thread = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    thread.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        thread.join(timeout=5)


def console() -> None:
    """The `tapeline` console script: `main` with TensorFlow's start-up noise filtered out of stderr."""
    with _without_native_startup_noise():
        code = main()
    sys.exit(code)


if __name__ == "__main__":
    console()
