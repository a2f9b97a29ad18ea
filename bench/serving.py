"""Serving group: how many requests `python -m dlpipe.serving` answers on loopback, and how fast.

A model of the built-in example is trained (20,000 rows, train's defaults) and made @production. Then, for 1
and 2 server workers, a small asyncio client (keep-alive HTTP/1.1 connections, one per concurrent user) sends
a fixed number of requests (BENCH_SERVING_REQUESTS, default 2,000; 400 of 100 records), within a time limit
per cell (BENCH_SERVING_SECONDS, 30), at concurrency 1, 8 and 32, each request holding 1 or 100 raw records.
Each cell is warmed up first (50 requests, not counted).

Printed per cell: serving_rps_w<W>_r<R>_c<C> (requests/s), serving_p50_ms_..., serving_p99_ms_...; then
serving_workers_speedup (2 workers over 1, single records, concurrency 8; goal >= 1.6),
serving_workers_speedup_r100 (the same with 100 records), serving_p99_ms_c8 (2 workers, single records,
concurrency 8; goal < 50) and serving_failed_requests (every cell; goal 0). The client runs on the same two
cores as the server: what it spends is taken from the server.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from bench.tune import run_dlpipe

ROOT = Path("data/bench/serving-root").resolve()
CONCURRENCY = (1, 8, 32)
RECORDS = (1, 100)
WORKERS = (1, 2)


def _request(body: bytes) -> bytes:
    head = (
        "POST /invocations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _user(port: int, request: bytes, left: list[int], deadline: float, latencies: list, failures: list) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while left[0] > 0 and time.perf_counter() < deadline:
            left[0] -= 1
            started = time.perf_counter()
            try:
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head.split(b" ", 2)[1])
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
            except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration) as exc:
                failures.append(repr(exc))
                writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                continue
            latencies.append(time.perf_counter() - started)
            if status != 200:
                failures.append(status)
    finally:
        writer.close()


async def _load(port: int, request: bytes, n: int, concurrency: int, seconds: float) -> tuple[list, list, float]:
    latencies: list[float] = []
    failures: list = []
    left = [n]
    started = time.perf_counter()
    deadline = started + seconds
    await asyncio.gather(*(_user(port, request, left, deadline, latencies, failures) for _ in range(concurrency)))
    return latencies, failures, time.perf_counter() - started


def _records(n: int) -> dict:
    """n raw records of the built-in example (ingest's clean rows), as a client would send them."""
    import pyarrow.dataset as ds

    features = [*(f"x{i}" for i in range(8)), "segment"]
    clean = ds.dataset(next(ROOT.rglob("clean")), format="parquet").head(n, columns=features).to_pandas()
    return {"dataframe_split": json.loads(clean.to_json(orient="split", index=False))}


def run() -> dict[str, float]:
    import mlflow

    from dlpipe.serve.server import Server

    shutil.rmtree(ROOT, ignore_errors=True)
    ROOT.mkdir(parents=True)
    run_dlpipe(ROOT, "--to", "train", "dataset.generator.rows=20000", "quantize.enabled=false")
    client = mlflow.MlflowClient(f"sqlite:///{ROOT}/mlruns/mlflow.db")
    name = "tabular_example-classifier"
    client.set_registered_model_alias(name, "production", client.get_model_version_by_alias(name, "candidate").version)
    total = int(os.environ.get("BENCH_SERVING_REQUESTS", "2000"))
    seconds = float(os.environ.get("BENCH_SERVING_SECONDS", "30"))
    bodies = {r: _request(json.dumps(_records(r)).encode()) for r in RECORDS}
    figures: dict[str, float] = {}
    failed = 0
    for workers in WORKERS:
        with Server([f"project.root={ROOT}"], ROOT / f"serve-{workers}.log", workers=workers) as server:
            for records in RECORDS:
                n = total if records == 1 else total // 5
                for c in CONCURRENCY:
                    asyncio.run(_load(server.port, bodies[records], 50, c, seconds))  # warm-up
                    latencies, failures, took = asyncio.run(_load(server.port, bodies[records], n, c, seconds))
                    cell = f"w{workers}_r{records}_c{c}"
                    ms = np.array(latencies) * 1000
                    figures[f"serving_rps_{cell}"] = len(latencies) / took
                    figures[f"serving_p50_ms_{cell}"] = float(np.percentile(ms, 50)) if len(ms) else float("nan")
                    figures[f"serving_p99_ms_{cell}"] = float(np.percentile(ms, 99)) if len(ms) else float("nan")
                    failed += len(failures)
                    print(
                        f"# {cell}: {len(latencies)} answered in {took:.1f}s, {len(failures)} failed "
                        f"{failures[:3] if failures else ''}",
                        flush=True,
                    )
    figures["serving_workers_speedup"] = figures["serving_rps_w2_r1_c8"] / figures["serving_rps_w1_r1_c8"]
    figures["serving_workers_speedup_r100"] = figures["serving_rps_w2_r100_c8"] / figures["serving_rps_w1_r100_c8"]
    figures["serving_p99_ms_c8"] = figures["serving_p99_ms_w2_r1_c8"]
    figures["serving_failed_requests"] = float(failed)
    return figures
