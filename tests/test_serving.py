"""python -m dlpipe.serving (dlpipe.serve.server): several workers behind one port, health naming the model,
4xx with reasons for bad records, a dead worker replaced, a clean stop by process id, and a model change
under load without one failed request."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import threading
import time

import mlflow
import numpy as np
import pytest

from bench import serving as load_bench
from dlpipe.data.ingest import read_clean
from dlpipe.ops.processes import pid_alive
from dlpipe.pipeline import run_pipeline
from dlpipe.serve.server import Server
from dlpipe.tracking import tracking_uri
from tests.conftest import cfg_overrides, prepare

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def production(spark, tmp_path_factory):
    """A trained model, its candidate made @production; (config, its overrides, raw records to send)."""
    root = tmp_path_factory.mktemp("serving")
    cfg = prepare(spark, root, rows=1500)
    run_pipeline(spark, cfg, stages=("train",))
    client = mlflow.MlflowClient(tracking_uri(cfg))
    candidate = client.get_model_version_by_alias(cfg.model_name, "candidate")
    client.set_registered_model_alias(cfg.model_name, "production", candidate.version)
    records = read_clean(spark, cfg).limit(30).toPandas()[[c.name for c in cfg.dataset.features]]
    return cfg, cfg_overrides(root, rows=1500), records


def _post(conn: http.client.HTTPConnection, payload) -> tuple[int, dict, str | None]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read() or b"{}"), resp.getheader("X-Model-Version")


def _health(port: int) -> dict:
    """GET /health on a new connection (a refused one, while a worker is replaced, is retried)."""
    for _ in range(50):
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/health")
            return json.loads(conn.getresponse().read())
        except OSError:
            time.sleep(0.1)
        finally:
            conn.close()
    raise AssertionError(f"no answer from /health on port {port}")


def _split(records) -> dict:
    return {"dataframe_split": json.loads(records.to_json(orient="split", index=False))}


def test_workers_answer_like_the_registered_model_refuse_bad_records_and_stop_cleanly(production, tmp_path):
    cfg, overrides, records = production
    expected = mlflow.pyfunc.load_model(f"models:/{cfg.model_name}@production").predict(records)
    version = mlflow.MlflowClient().get_model_version_by_alias(cfg.model_name, "production").version
    with Server(overrides, tmp_path / "serve.log", workers=2) as server:
        pids = set()
        for _ in range(60):  # a new connection each time: the kernel hands them to either worker
            health = _health(server.port)
            pids.add(health["pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2, "one worker answered every connection"
        assert (health["model_name"], health["model_version"], health["alias"]) == (
            cfg.model_name,
            str(version),
            "production",
        )
        running = server.processes()
        assert pids <= set(running)

        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        status, body, served_version = _post(conn, _split(records))
        assert status == 200 and served_version == str(version)
        answers = body["predictions"]
        assert [a["predicted_class"] for a in answers] == list(expected["predicted_class"])
        assert np.allclose([a["probabilities"] for a in answers], np.stack(expected["probabilities"]), atol=1e-6)

        bad = records.head(3).copy()
        bad.loc[1, "x0"] = 999.0  # out of the declared range [-50, 50]
        status, body, _ = _post(conn, _split(bad))
        assert status == 400 and "record 1" in body["message"] and "x0=999" in body["message"], body
        wrong_type = records.head(2).astype({"x3": object})
        wrong_type.loc[0, "x3"] = "abc"
        refusals = {
            "not JSON": b"{not json",
            "no records key": {"rows": []},
            "no records": {"dataframe_records": []},
            "a wrong type": _split(wrong_type),
            "a missing column": _split(records.drop(columns=["segment"]).head(2)),
        }
        for what, payload in refusals.items():
            status, body, _ = _post(conn, payload)
            assert status == 400 and body["message"], (what, status, body)
        status, _, _ = _post(conn, _split(records.head(1)))  # still serving after the refusals
        assert status == 200
        conn.close()

        # the load bench's client (bench/serving.py), a small run: every request answered and timed
        body = json.dumps(_split(records.head(1))).encode()
        latencies, failures, _ = asyncio.run(load_bench._load(server.port, load_bench._request(body), 60, 4, 30))
        assert (len(latencies), failures) == (60, []) and min(latencies) > 0
        bad_body = load_bench._request(b"{not json")
        latencies, failures, _ = asyncio.run(load_bench._load(server.port, bad_body, 10, 2, 30))
        assert failures == [400] * 10  # a refused request counts as failed

        os.kill(health["pid"], signal.SIGKILL)  # a worker dies: the other answers, and it is replaced
        deadline, now = time.monotonic() + 60, set()
        while time.monotonic() < deadline and len(now) < 2:
            now.add(_health(server.port)["pid"])
        assert health["pid"] not in now and len(now) == 2, now
        running = server.processes()
    assert not [pid for pid in running if pid_alive(pid)], "processes left after the stop"


def test_moving_the_alias_under_load_swaps_the_model_without_a_failed_request(production, tmp_path):
    cfg, overrides, records = production
    client = mlflow.MlflowClient()
    old = client.get_model_version_by_alias(cfg.model_name, "production")
    one = _split(records.head(1))
    answers: list[tuple[int, str | None, float]] = []
    stop = threading.Event()

    def load(port: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        while not stop.is_set():
            try:
                status, _, version = _post(conn, one)
            except (OSError, http.client.HTTPException) as exc:  # a dropped connection is a failed request
                status, version = 0, repr(exc)
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            answers.append((status, version, time.monotonic()))

    with Server(overrides, tmp_path / "serve.log", workers=2, poll=0.5) as server:
        threads = [threading.Thread(target=load, args=(server.port,)) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(2)
        new = client.create_model_version(old.name, old.source, old.run_id)
        client.set_registered_model_alias(cfg.model_name, "production", new.version)
        moved = time.monotonic()
        deadline = moved + 60
        while time.monotonic() < deadline:
            time.sleep(0.5)
            recent = [v for _, v, t in answers[-40:] if t > moved]
            if len(recent) >= 40 and set(recent) == {str(new.version)}:
                break
        time.sleep(1)
        stop.set()
        for t in threads:
            t.join(30)
    failed = [a for a in answers if a[0] != 200]
    assert not failed, failed[:5]
    versions = [v for _, v, _ in answers]
    assert versions[0] == str(old.version) and versions[-1] == str(new.version), (versions[0], versions[-1])
    assert set(versions) == {str(old.version), str(new.version)}
    assert len(answers) > 100
