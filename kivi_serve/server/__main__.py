"""``python -m kivi_serve.server [serve flags]`` — the same as ``kivi-serve serve``."""

import sys

from kivi_serve.server.app import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(sys.argv[1:]))
