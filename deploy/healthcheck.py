#!/usr/bin/env python3
"""Container health probe for kivi-serve: exit 0 when ``GET /health`` answers 200, else 1.

    python deploy/healthcheck.py [PATH]        (default PATH: /health)

Used by the Dockerfiles' ``HEALTHCHECK`` and by ``deploy/compose.yaml``, so the images need
neither curl nor wget. It asks the server on 127.0.0.1 at ``$KIVI_SERVE_PORT`` (default 8000);
``$KIVI_SERVE_HEALTHCHECK_URL`` overrides the whole URL. Standard library only.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 4.0


def probe_url(path: str = "/health") -> str:
    url = os.environ.get("KIVI_SERVE_HEALTHCHECK_URL")
    if url:
        return url
    port = os.environ.get("KIVI_SERVE_PORT", "8000")
    return f"http://127.0.0.1:{port}{path}"


def main(argv: list[str]) -> int:
    url = probe_url(argv[0] if argv else "/health")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ValueError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"healthcheck: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
