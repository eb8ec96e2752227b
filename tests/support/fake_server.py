"""``python -m support.fake_server FLAGS`` (with tests/ on the path): kivi-serve's real server process
(uvicorn, our HTTP protocol, signals, drain, exit codes) over the tests' FakeEngine, which starts at
once. ``KIVI_FAKE_DELAY``: seconds per generated token (default 0.05); ``KIVI_FAKE_VOCAB``: its
vocabulary size (default 1000).
"""

from __future__ import annotations

import os
import sys

from server_harness import FakeEngine

from kivi_serve.server.app import configure_logging, create_app, serve
from kivi_serve.server.settings import parse_args


def main() -> int:
    settings = parse_args(sys.argv[1:])
    configure_logging(settings)
    engine = FakeEngine(delay=float(os.environ.get("KIVI_FAKE_DELAY", "0.05")), max_model_len=4096)
    engine.vocab_size = int(os.environ.get("KIVI_FAKE_VOCAB", "1000"))
    return serve(create_app(settings, engine=engine), settings)


if __name__ == "__main__":
    sys.exit(main())
