"""A real ``kivi-serve`` server in a subprocess on 127.0.0.1, for the tests/test_server_*.py modules.

One server is shared by every module of a pytest run (:func:`shared_server`): an engine takes
~30 s (idle machine) to minutes (busy 2 cores) to start, so the modules reuse it; a module that
stops it (the SIGTERM test) leaves the next caller a fresh one. Everything is loopback and bounded.
"""

from __future__ import annotations

import atexit
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

#: Engine start on 2 busy cores can take minutes; on an idle CI machine ~30 s.
READY_TIMEOUT_S = float(os.environ.get("KIVI_TEST_READY_TIMEOUT", "420"))
API_KEY = "test-key-1234"
#: The shared server's limits (tests assert against these numbers).
MAX_MODEL_LEN = 1024
MAX_TOKENS_LIMIT = 256
MAX_N = 4
MAX_NUM_SEQS = 32
MAX_QUEUE = 32  # capacity = MAX_NUM_SEQS + MAX_QUEUE = 64 sequences
MAX_BODY_BYTES = 65536


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kivi_backend_available() -> bool:
    try:
        import kivi_serve.backend as backend
    except ImportError:
        return False
    return callable(getattr(backend, "engine_overrides", None)) and callable(
        getattr(backend, "cache_stats", None)
    )


def server_backend() -> str:
    """The backend the shared server runs: ours when it exists (KIVI_TEST_BACKEND overrides)."""
    return os.environ.get("KIVI_TEST_BACKEND") or ("kivi" if kivi_backend_available() else "default")


def http(
    method: str,
    url: str,
    body=None,
    headers: dict | None = None,
    timeout: float = 120.0,
    raw: bytes | None = None,
) -> tuple[int, dict, bytes]:
    """One request; returns (status, headers, body) for any status."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    hdrs = {"Content-Type": "application/json"}
    hdrs.update(headers or {})
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text → {'name{labels}': value} (labels as written by prometheus-client)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


@dataclass
class ServerProcess:
    """``python -m kivi_serve.server ARGS`` on a free loopback port, its log in a temp file."""

    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    ready_statuses: list[int] = field(default_factory=list)
    start_seconds: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("KIVI_SERVE_") or k == "KIVI_SERVE_CACHE"
        }
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        env.update(self.env)
        fd, name = tempfile.mkstemp(prefix="kivi-server-", suffix=".log")
        self.log_path = Path(name)
        cmd = [
            sys.executable,
            "-m",
            "kivi_serve.server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.args,
        ]
        with os.fdopen(fd, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        return self

    def log(self, lines: int = 60) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> ServerProcess:
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before /ready:\n{self.log()}")
            try:
                status = http("GET", self.url + "/ready", timeout=10)[0]
                self.ready_statuses.append(status)
                if status == 200:
                    self.start_seconds = time.monotonic() - t0
                    return self
            except OSError:
                pass
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"/ready not 200 within {timeout:.0f} s:\n{self.log()}")
            time.sleep(0.5)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
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

    # -- conveniences
    def get(self, path: str, **kw):
        return http("GET", self.url + path, **kw)

    def post(self, path: str, body=None, **kw):
        return http("POST", self.url + path, body, **kw)

    def metrics(self) -> dict[str, float]:
        status, _, body = self.get("/metrics")
        assert status == 200, body
        return parse_metrics(body.decode())


def shared_args() -> list[str]:
    return [
        "--backend",
        server_backend(),
        "--api-key",
        API_KEY,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--max-tokens-limit",
        str(MAX_TOKENS_LIMIT),
        "--max-n",
        str(MAX_N),
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--max-queue",
        str(MAX_QUEUE),
        "--max-body-bytes",
        str(MAX_BODY_BYTES),
        "--kv-cache-space",
        "1",
        "--request-timeout",
        "300",
        "--drain-timeout",
        "120",
    ]


_SHARED: list[ServerProcess] = []


def shared_server() -> ServerProcess:
    """The server shared by this pytest run (started on first use, restarted if it was stopped)."""
    if _SHARED and _SHARED[0].alive:
        return _SHARED[0]
    _SHARED.clear()
    server = ServerProcess(shared_args()).start()
    _SHARED.append(server)
    try:
        server.wait_ready()
    except Exception:
        server.stop(signal.SIGKILL)
        _SHARED.clear()
        raise
    return server


def take_shared_server() -> ServerProcess:
    """The shared server, handed over for good (the caller stops it; the next user starts another)."""
    server = shared_server()
    _SHARED.clear()
    return server


@atexit.register
def _stop_shared() -> None:
    for server in _SHARED:
        server.stop(timeout=60)
    _SHARED.clear()
