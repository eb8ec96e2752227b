"""A real ``kivi-serve serve`` in a subprocess on 127.0.0.1, and the client side of it: HTTP and /metrics.

    with ServerProcess(["--max-num-seqs", "8"]) as srv:     # python -m kivi_serve.server on a free port
        srv.wait_ready(600)
        status, headers, body = srv.post("/v1/completions", {"prompt": "Hi", "max_tokens": 4})
        srv.metrics()["kivi_kv_compression_ratio"]

Used by ``kivi-serve bench serve`` and by the tests (tests/server_harness.py). Loopback only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(
    method: str,
    url: str,
    body=None,
    headers: dict | None = None,
    timeout: float = 120.0,
    raw: bytes | None = None,
) -> tuple[int, dict, bytes]:
    """One request (JSON ``body``, or ``raw`` bytes); returns (status, headers, body) for any status."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def metric_samples(text: str) -> list[Sample]:
    """Every sample of a Prometheus text exposition (prometheus-client's own parser)."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → ``{'name{label="value",...}': value}`` (labels in exposition order)."""
    out = {}
    for s in metric_samples(text):
        labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
        out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


@dataclass
class ServerProcess:
    """``python -m kivi_serve.server ARGS`` on a free loopback port, its log in a temp file.

    ``env`` is added to this process's environment; with ``clean_env`` the ``KIVI_SERVE_*``
    variables (but the cache's) are left out first, so that only ``args`` configure the server.
    ``module`` is what runs (the tests' stand-in server takes the same flags).
    """

    args: list[str]
    module: str = "kivi_serve.server"
    env: dict[str, str] = field(default_factory=dict)
    clean_env: bool = False
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    #: /ready statuses seen while waiting (the tests check it answered 503 while loading).
    ready_statuses: list[int] = field(default_factory=list)
    start_seconds: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        env = dict(os.environ)
        if self.clean_env:
            env = {k: v for k, v in env.items() if not k.startswith("KIVI_SERVE_") or k == "KIVI_SERVE_CACHE"}
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        env.update(self.env)
        fd, name = tempfile.mkstemp(prefix="kivi-server-", suffix=".log")
        self.log_path = Path(name)
        cmd = [sys.executable, "-m", self.module, "--host", "127.0.0.1", "--port", str(self.port)]
        with os.fdopen(fd, "wb") as out:
            self.proc = subprocess.Popen([*cmd, *self.args], stdout=out, stderr=subprocess.STDOUT, env=env)
        return self

    def log(self, lines: int = 60) -> str:
        """The last ``lines`` lines of the server's log."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout: float) -> float:
        """Wait until /ready answers 200; returns the seconds it took (raises if it exits or times out)."""
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before /ready:\n{self.log()}")
            try:
                status = http("GET", self.url + "/ready", timeout=10)[0]
                self.ready_statuses.append(status)
                if status == 200:
                    self.start_seconds = time.monotonic() - t0
                    return self.start_seconds
            except OSError:
                pass
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"/ready not 200 within {timeout:.0f} s:\n{self.log()}")
            time.sleep(0.5)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        """Send ``sig`` and wait (then kill); returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- conveniences
    def get(self, path: str, **kw) -> tuple[int, dict, bytes]:
        return http("GET", self.url + path, **kw)

    def post(self, path: str, body=None, **kw) -> tuple[int, dict, bytes]:
        return http("POST", self.url + path, body, **kw)

    def metrics(self) -> dict[str, float]:
        status, _, body = self.get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}: {body[:300]!r}")
        return parse_metrics(body.decode())
