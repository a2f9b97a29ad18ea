"""Command-line entry points shared by jobs/ and pipelines/: arguments, config, logging, exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dlpipe import redact
from dlpipe.config import Config, ConfigError, load_config
from dlpipe.runtime import tune_gc


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("py4j", "urllib3", "alembic", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    redact.install()  # secrets masked in every line logged


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    return add_common(argparse.ArgumentParser(prog=prog, description=description))


def add_common(p: argparse.ArgumentParser, force: bool = True) -> argparse.ArgumentParser:
    p.add_argument("--env", help="environment file conf/<ENV>.yaml over conf/base.yaml (default: $DLPIPE_ENV or local)")
    p.add_argument("--conf-dir", help="configuration folder (default: ./conf)")
    if force:
        p.add_argument("--force", action="store_true", help="redo stages even when inputs and config are unchanged")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. train.epochs=5")
    return p


def parse(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """p's arguments, with key.path=value overrides allowed before, between and after the options. argparse
    fills a positional list once: in `stage train --force train.epochs=2` the overrides came after it had
    taken none, and were refused as unrecognized. Anything else it does not know still is."""
    args, extra = p.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    args.overrides = [*args.overrides, *extra]  # extras come after what argparse took: the order is kept
    return args


SECRET_OVERRIDES = "DLPIPE_SECRET_OVERRIDES"  # a JSON list of key.path=value: secrets kept off command lines


def load_or_exit(args: argparse.Namespace) -> Config:
    """The validated config, or exit 2 with the message before any Spark starts. Overrides come from the
    command line and, for secrets (the Airflow DAG passes them so), from $DLPIPE_SECRET_OVERRIDES."""
    try:
        try:
            hidden = json.loads(os.environ.get(SECRET_OVERRIDES) or "[]")
        except json.JSONDecodeError:
            hidden = None
        if not isinstance(hidden, list):
            raise ConfigError(f"${SECRET_OVERRIDES} must be a JSON list of key.path=value strings")
        return load_config(args.env, [*map(str, hidden), *args.overrides], args.conf_dir)
    except ConfigError as exc:
        print(f"dlpipe: config error: {redact.text(str(exc))}", file=sys.stderr)
        raise SystemExit(2) from None


PREFLIGHT_EXIT = 3  # a service the run needs is down or refuses it: nothing was started


def preflight_or_exit(cfg: Config, stages: tuple[str, ...] | list[str]) -> None:
    """dlpipe.ops.preflight for these stages, or exit 3 with its lines before any Spark starts."""
    from dlpipe.ops.preflight import PreflightError, check

    try:
        check(cfg, stages)
    except PreflightError as exc:
        print(f"dlpipe: {exc}", file=sys.stderr)
        raise SystemExit(PREFLIGHT_EXIT) from None


STAGE_FAILED_EXIT = 1


@contextmanager
def clear_failures() -> Iterator[None]:
    """A failure whose message already says what happened and what to do (out of memory or disk, another run
    holding the dataset, too many bad rows, a schema that does not match) ends the command with that message
    alone; its traceback goes to the debug log. Any other error keeps its traceback."""
    from dlpipe.data.ingest import BadDataError, SchemaMismatchError
    from dlpipe.session import StageResourceError
    from dlpipe.storage.runlock import RunLockedError

    try:
        yield
    except (StageResourceError, RunLockedError, BadDataError, SchemaMismatchError) as exc:
        logging.getLogger("dlpipe").debug("the failure in full", exc_info=True)
        print(f"dlpipe: {redact.text(str(exc))}", file=sys.stderr)
        raise SystemExit(STAGE_FAILED_EXIT) from None


def run_job(stage: str, argv: list[str]) -> int:
    """A spark-submit entry point for one stage: config, session, stage, stop."""
    from dlpipe.pipeline import run_stage
    from dlpipe.session import build_spark, stop_spark

    tune_gc()
    p = parser(f"jobs/{stage}.py", f"Run the dlpipe '{stage}' stage.")
    p.add_argument("--parent-run-id", help="MLflow run id of the pipeline run this stage belongs to")
    args = parse(p, argv)
    cfg = load_or_exit(args)
    setup_logging()
    preflight_or_exit(cfg, [stage])
    spark = build_spark(cfg)
    try:
        with clear_failures():
            run_stage(spark, cfg, stage, parent_run_id=args.parent_run_id, force=args.force)
    finally:
        stop_spark(spark)
    return 0


def spark_submit_argv(cfg: Config, stage: str, args: argparse.Namespace) -> list[str]:
    """The spark-submit command of one stage's job (jobs/<stage>.py) for a config already loaded: its master
    is `args.master` or the config's spark.master (under spark-submit, spark-submit's --master wins over the
    config, so it must be resolved here). spark-submit is $DLPIPE_SPARK_SUBMIT, else the one beside this
    Python. Only the command line's overrides are passed on: those from $DLPIPE_SECRET_OVERRIDES reach the
    job through the same environment, never a command line."""
    spark_submit = os.environ.get("DLPIPE_SPARK_SUBMIT") or str(Path(sys.executable).parent / "spark-submit")
    job = Path(__file__).resolve().parent.parent / "jobs" / f"{stage}.py"
    argv = [spark_submit, "--master", args.master or cfg.spark.master, str(job)]
    if args.env:
        argv += ["--env", args.env]
    if args.conf_dir:
        argv += ["--conf-dir", args.conf_dir]
    if args.force:
        argv.append("--force")
    if args.parent_run_id:
        argv += ["--parent-run-id", args.parent_run_id]
    return [*argv, *args.overrides]
