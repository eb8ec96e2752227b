"""The C++ CPU kernels on a machine without a compiler: the prebuilt copies that
``deploy/precompile_kernels.py --cpu`` leaves in the cache (the CPU image builds them in its build
stage; its runtime stage has no compiler). Each case runs in a fresh interpreter whose ``PATH`` has
no compiler, against its own cache folder.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kivi_serve.config import cache_dir
from kivi_serve.kernels.cpu import loader

pytestmark = pytest.mark.skipif(loader.find_compiler() is None, reason="no C++ compiler to precompile with")

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import json
from kivi_serve.kernels.cpu import loader
isa = loader.selected_isa()
lib = loader.library(isa)  # None after one RuntimeWarning where it cannot be had
print(json.dumps({
    "compiler": loader.find_compiler(),
    "isa": isa,
    "reason": loader.unavailable_reason(isa),
    "scalar": loader.unavailable_reason("scalar"),
    "library": None if lib is None else str(loader.build(isa)),
    "kivi_isa": None if lib is None else lib.kivi_isa().decode(),
    "binding": loader.binding() is not None,
}))
"""


def _python(code: str, cache: Path, no_compiler: bool, tmp_path: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("CXX", loader.ENV_CXX)}
    env["KIVI_SERVE_CACHE"] = str(cache)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH"))))
    if no_compiler:
        empty = tmp_path / "bin-without-compilers"
        empty.mkdir(exist_ok=True)
        env["PATH"] = str(empty)
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path
    )


def test_a_machine_without_a_compiler_loads_the_prebuilt_kernels(tmp_path):
    isas = tuple(dict.fromkeys((loader.selected_isa(), "scalar")))
    cache = tmp_path / "cache"
    # Seed the new cache with the libraries this machine has already built (other tests build them),
    # so that precompile mostly copies; anything missing it builds.
    built = cache_dir() / "kernels" / "cpu"
    if built.is_dir():
        shutil.copytree(built, cache / "kernels" / "cpu", ignore=shutil.ignore_patterns("*.tmp", "tmp*"))
    code = f"from kivi_serve.kernels.cpu import loader; print(*loader.precompile({isas!r}), sep='\\n')"
    pre = _python(
        code,
        cache,
        no_compiler=False,
        tmp_path=tmp_path,
    )
    assert pre.returncode == 0, pre.stderr
    prebuilt = [Path(line) for line in pre.stdout.split()]
    assert len(prebuilt) == len(isas) + 1
    assert all(p.is_file() and p.parent == cache / "kernels" / "cpu" for p in prebuilt)

    run = _python(PROBE, cache, no_compiler=True, tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.splitlines()[-1])
    assert got["compiler"] is None, "the probe must run where no compiler can be found"
    assert got["reason"] is None and got["scalar"] is None, got
    assert got["kivi_isa"] == got["isa"], "the prebuilt library of the selected ISA is loaded and answers"
    assert got["binding"] is True, "the prebuilt torch binding is loaded"
    library = Path(got["library"])
    assert library in prebuilt
    # The prebuilt copy is byte for byte the library the compiler built (same sources and flags).
    compiled = [p for p in library.parent.glob(f"kivi_cpu-{got['isa']}-*.so") if p != library]
    assert any(filecmp.cmp(library, p, shallow=False) for p in compiled)


def test_without_a_compiler_or_a_prebuilt_copy_the_reason_says_so(tmp_path):
    run = _python(PROBE, tmp_path / "empty-cache", no_compiler=True, tmp_path=tmp_path)
    assert run.returncode == 0, run.stderr
    got = json.loads(run.stdout.splitlines()[-1])
    assert got["compiler"] is None and got["binding"] is False and got["library"] is None
    assert "no C++ compiler found" in got["reason"] and "no prebuilt" in got["reason"]
    assert "RuntimeWarning" in run.stderr and "PyTorch reference" in run.stderr
