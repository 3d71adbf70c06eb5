"""Fetching a published data-set archive and checking it: MD5 digest, atomic download, safe
extraction.

Only the standard library is used (``urllib``, ``hashlib``, ``tarfile``). A failed or corrupt
download never leaves a file under the final archive name: the bytes go to ``<archive>.part`` and
are renamed only after the digest matched.
"""
from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.error
import urllib.request
from pathlib import Path


def md5_file(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex MD5 digest of a file, read in chunks."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_archive(url: str, archive: Path, md5: str, *, layout_hint: str) -> Path:
    """Make sure ``archive`` exists with the given MD5, downloading it from ``url`` if needed.

    An existing archive with the right digest is reused. A download that fails (no network, HTTP
    error) raises ``FileNotFoundError`` whose message contains ``layout_hint`` (how to place the
    files by hand); a digest mismatch raises ``ValueError`` naming the file and both digests.
    """
    archive = Path(archive)
    if archive.is_file():
        got = md5_file(archive)
        if got == md5:
            return archive
        raise ValueError(f"{archive}: MD5 {got} does not match the published {md5}; the archive is "
                         f"corrupt or incomplete. Delete it and download again.\n{layout_hint}")
    archive.parent.mkdir(parents=True, exist_ok=True)
    part = archive.with_name(archive.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as out:
            while chunk := response.read(1 << 20):
                out.write(chunk)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        part.unlink(missing_ok=True)
        raise FileNotFoundError(f"could not download {url} ({exc}).\n{layout_hint}") from None
    got = md5_file(part)
    if got != md5:
        part.unlink(missing_ok=True)
        raise ValueError(f"downloaded {url}: MD5 {got} does not match the published {md5}; "
                         f"the transfer was corrupted. Try again.\n{layout_hint}")
    os.replace(part, archive)
    return archive


def extract_tar(archive: Path, dest: Path) -> None:
    """Extract a .tar/.tar.gz into ``dest``, refusing members that would land outside it."""
    dest = Path(dest)
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # Python < 3.11.4: check member paths ourselves
                root = dest.resolve()
                for member in tar.getmembers():
                    target = (dest / member.name).resolve()
                    if root != target and root not in target.parents:
                        raise ValueError(f"{archive}: member {member.name!r} escapes {dest}")
                    if member.issym() or member.islnk():
                        raise ValueError(f"{archive}: member {member.name!r} is a link")
                tar.extractall(dest)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise ValueError(f"{archive}: cannot extract ({exc}); the archive is corrupt. "
                         "Delete it and download again.") from None
