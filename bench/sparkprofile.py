"""Where a Spark application's time went, per stage of ours and per Spark job, from Spark's event log.

A benchmark turns the event log on (`event_log_conf`) and prints `profile_lines` at the end: every job's
wall time, its tasks' summed run and CPU time, GC, rows read and written, and what it was (the job
description the stage gave it with dlpipe.session.job_description, else Spark's call site).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


def event_log_conf(folder: Path) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return ["spark.conf.spark.eventLog.enabled=true", f"spark.conf.spark.eventLog.dir={folder.resolve().as_uri()}"]


@dataclass
class Job:
    id: int
    label: str
    call_site: str
    seconds: float
    properties: dict
    task_seconds: float = 0.0
    cpu_seconds: float = 0.0
    gc_seconds: float = 0.0
    rows_read: int = 0
    rows_written: int = 0


def jobs(event_log: Path) -> list[Job]:
    out: dict[int, Job] = {}
    stage_of: dict[int, int] = {}
    with event_log.open() as f:
        for line in f:
            e = json.loads(line)
            kind = e["Event"]
            if kind == "SparkListenerJobStart":
                props = e.get("Properties") or {}
                job = Job(
                    e["Job ID"], props.get("spark.job.description") or "", props.get("callSite.short", ""), 0.0, props
                )
                job.seconds = -e["Submission Time"] / 1000
                out[job.id] = job
                stage_of.update({s: job.id for s in e["Stage IDs"]})
            elif kind == "SparkListenerJobEnd":
                out[e["Job ID"]].seconds += e["Completion Time"] / 1000
            elif kind == "SparkListenerStageCompleted":
                info = e["Stage Info"]
                job = out.get(stage_of.get(info["Stage ID"], -1))
                if job is None:
                    continue
                acc = {a["Name"]: a.get("Value") or 0 for a in info.get("Accumulables", [])}
                job.task_seconds += acc.get("internal.metrics.executorRunTime", 0) / 1000
                job.cpu_seconds += acc.get("internal.metrics.executorCpuTime", 0) / 1e9
                job.gc_seconds += acc.get("internal.metrics.jvmGCTime", 0) / 1000
                job.rows_read += int(acc.get("internal.metrics.input.recordsRead", 0))
                job.rows_written += int(acc.get("internal.metrics.output.recordsWritten", 0))
    return [j for _, j in sorted(out.items())]


def latest_log(folder: Path) -> Path:
    logs = [p for p in folder.iterdir() if p.is_file() and not p.name.endswith(".inprogress")]
    return max(logs, key=lambda p: p.stat().st_mtime)


def profile_lines(event_log: Path, labels: tuple[str, ...], where: dict[str, str] | None = None) -> list[str]:
    """One line per job whose label starts with one of labels (and whose local properties hold `where`),
    then the seconds per label."""
    lines, per_label = [], dict.fromkeys(labels, 0.0)
    for j in jobs(event_log):
        label = next((lb for lb in labels if j.label.startswith(lb)), None)
        if label is None or any(j.properties.get(k) != v for k, v in (where or {}).items()):
            continue
        per_label[label] += j.seconds
        lines.append(
            f"# profile {j.label:<14} job {j.id:>3} {j.seconds:7.2f}s wall, tasks {j.task_seconds:6.2f}s "
            f"(cpu {j.cpu_seconds:6.2f}s, gc {j.gc_seconds:5.2f}s), rows read {j.rows_read:>9}, "
            f"written {j.rows_written:>9}: {j.call_site}"
        )
    lines += [f"# profile {label}: {seconds:.2f}s in Spark jobs" for label, seconds in per_label.items()]
    return lines
