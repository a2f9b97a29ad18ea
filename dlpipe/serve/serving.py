"""A registered model behind MLflow's REST scoring server (`mlflow models serve`), on 127.0.0.1.

For checking that what the batch job predicts is what a served model answers, and for trying a model by
hand:

    python -m dlpipe.serve.serving models:/tabular_example-classifier@candidate [--port 5001]

The server runs in the project's environment (`--env-manager local`), in its own process group, and is
stopped by process id.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

from dlpipe.ops.processes import free_ports, stop_group


class ServingError(RuntimeError):
    """The scoring server did not come up (the message holds its log tail)."""


class ModelServer:
    def __init__(self, model_uri: str, tracking_uri: str, log_path: Path, host: str = "127.0.0.1", port: int = 0):
        self.model_uri, self.tracking_uri, self.log_path = model_uri, tracking_uri, Path(log_path)
        self.host, self.port = host, port or free_ports(1, host)[0]
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 120.0) -> ModelServer:
        # the server execs `uvicorn` by name: this environment's bin first on PATH
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri, "PATH": path}
        argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", self.model_uri, "--env-manager", "local"]
        argv += ["-h", self.host, "-p", str(self.port), "-w", "1"]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                time.sleep(0.5)
        tail = self.log_path.read_text(errors="replace")[-3000:] if self.log_path.exists() else ""
        self.stop()
        raise ServingError(f"scoring server for {self.model_uri} not ready on {self.url}\n{tail}")

    def invoke(self, payload: dict) -> tuple[int, dict]:
        """POST /invocations; the HTTP status and the JSON answer (an error's too)."""
        req = urllib.request.Request(
            f"{self.url}/invocations",
            data=json.dumps(payload).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, json.load(resp)
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def predict(self, records: pd.DataFrame) -> pd.DataFrame:
        """The model's answers for raw records (a tabular model: class index, name and probabilities, or a
        value); raises ServingError with the server's message for a refused request."""
        payload = {"dataframe_split": json.loads(records.to_json(orient="split", index=False))}
        status, body = self.invoke(payload)
        if status != 200:
            raise ServingError(f"{self.url} answered {status}: {body.get('message', body)}")
        return pd.DataFrame(body["predictions"])

    def predict_tensors(self, x: np.ndarray) -> np.ndarray:
        """An image model's answers for a batch of tensors (probabilities per class)."""
        status, body = self.invoke({"inputs": x.tolist()})
        if status != 200:
            raise ServingError(f"{self.url} answered {status}: {body.get('message', body)}")
        return np.asarray(body["predictions"], dtype=np.float32)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None:
            stop_group(self.proc, timeout)

    def __enter__(self) -> ModelServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dlpipe.serve.serving", description=__doc__.split("\n\n")[0])
    p.add_argument("model_uri")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlruns/mlflow.db"))
    args = p.parse_args(argv)
    server = ModelServer(args.model_uri, args.tracking_uri, Path("mlruns/serving.log"), port=args.port).start()
    print(f"serving {args.model_uri} at {server.url}/invocations (pid {server.proc.pid}); Ctrl-C stops it")
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
