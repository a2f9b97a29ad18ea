"""The dlpipe command line.

    python -m dlpipe run [--from STAGE] [--to STAGE] [--force] [--env NAME] [key.path=value ...]  the pipeline
    python -m dlpipe stage NAME [--force] [--env NAME] [key.path=value ...]    one stage
    python -m dlpipe status [--env NAME] [key.path=value ...]                  what each stage last did
    python -m dlpipe submit [--master URL] [--force] [--env NAME] NAME [key.path=value ...]
                                          one stage as `spark-submit jobs/NAME.py` (what Airflow's tasks run)

Stages whose inputs and config are unchanged since their last committed output are skipped (--force
redoes them); train always trains a new model version. Progress (stage n/N, rows, epochs, ETA) goes to
the log on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys

from dlpipe import redact
from dlpipe.cli import (
    add_common,
    clear_failures,
    load_or_exit,
    parse,
    preflight_or_exit,
    setup_logging,
    spark_submit_argv,
)
from dlpipe.config import Config
from dlpipe.pipeline import STAGES, stages_for
from dlpipe.runtime import tune_gc


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dlpipe", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = add_common(sub.add_parser("run", help="the whole pipeline, or from one stage on"))
    run.add_argument("--from", dest="start", choices=STAGES, help="start at this stage (its inputs must exist)")
    run.add_argument("--to", dest="end", choices=STAGES, help="stop after this stage")
    stage = sub.add_parser("stage", help="one stage")
    stage.add_argument("name", choices=STAGES)
    add_common(stage)
    add_common(sub.add_parser("status", help="each stage's last output and MLflow run"), force=False)
    submit = sub.add_parser(
        "submit",
        help="one stage as `spark-submit jobs/NAME.py`, with the master from the config (options before NAME)",
    )
    submit.add_argument("--master", help="Spark master; default: spark.master of the config")
    submit.add_argument("--parent-run-id", help="MLflow run id of the pipeline run this stage belongs to")
    submit.add_argument(
        "--skip-exit-code",
        type=int,
        default=0,
        help="exit status when the stage has nothing to do (generate for a dataset without a generator); the "
        "Airflow DAG passes the one that marks its task skipped",
    )
    submit.add_argument("name", choices=STAGES)
    add_common(submit)
    return p


def _submit(cfg: Config, args: argparse.Namespace) -> int:
    """Replace this process with the stage's spark-submit, or return --skip-exit-code when the config leaves
    the stage nothing to do (as `run` would leave it out)."""
    if not stages_for(cfg, [args.name]):
        why = {
            "generate": f"dataset {cfg.dataset.name} has no generator: nothing to generate",
            "tune": "tune.enabled is false: nothing to tune",
            "compress": "no compress.* variant is on (or the model takes images): nothing to compress",
        }
        print(f"dlpipe: {why[args.name]}", file=sys.stderr)
        return args.skip_exit_code
    argv = spark_submit_argv(cfg, args.name, args)
    for name in ("PYSPARK_PYTHON", "PYSPARK_DRIVER_PYTHON"):  # this Python, unless told otherwise
        os.environ.setdefault(name, sys.executable)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)  # the same process: a kill or a timeout of the task reaches spark-submit itself


def main(argv: list[str]) -> int:
    tune_gc()
    args = parse(_parser(), argv)
    cfg = load_or_exit(args)
    if args.command == "submit":
        return _submit(cfg, args)
    setup_logging()
    if args.command == "status":
        from dlpipe.ops.status import drift_verdicts, render, render_drift, stage_status
        from dlpipe.pipeline import stages_for

        text = render(stage_status(cfg, stages_for(cfg)))
        drift = render_drift(drift_verdicts(cfg))
        print(redact.text(f"{text}\n{drift}" if drift else text))
        return 0
    from dlpipe.pipeline import run_pipeline, run_stage, summary
    from dlpipe.session import build_spark, stop_spark

    if args.command == "stage":
        stages = (args.name,)
    else:
        first = STAGES.index(args.start) if args.start else 0
        last = STAGES.index(args.end) if args.end else len(STAGES) - 1
        if last < first:
            print(f"dlpipe: --to {args.end} comes before --from {args.start}", file=sys.stderr)
            return 2
        stages = STAGES[first : last + 1]
    preflight_or_exit(cfg, stages)
    spark = build_spark(cfg)
    try:
        with clear_failures():
            if args.command == "stage":
                metrics = run_stage(spark, cfg, args.name, force=args.force)
                print(" ".join(f"{k}={v}" for k, v in metrics.items()))
                return 0
            result = run_pipeline(spark, cfg, stages, force=args.force)
    finally:
        stop_spark(spark)
    print(redact.text(summary(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
