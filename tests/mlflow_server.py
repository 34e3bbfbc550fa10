"""A local ``mlflow server`` for tests that query MLflow's REST API, bound to 127.0.0.1 on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(store_uri: str, workdir: Path, start_timeout_s: float = 120.0) -> Iterator[str]:
    """Start ``mlflow server --backend-store-uri store_uri`` on 127.0.0.1, wait for ``/health``, yield the REST
    base URL (``http://127.0.0.1:PORT/api/2.0/mlflow``) and stop the server's process group on exit.

    Fails the test (``pytest.fail``, with the server log's tail) when it does not start within ``start_timeout_s``.
    """
    port = _free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri", store_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log_path = workdir / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                start_new_session=True)
    try:
        deadline = time.time() + start_timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail("mlflow server did not start: " + log_path.read_text()[-2000:])
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/api/2.0/mlflow"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
