"""Unpack an uploaded case archive (zip, tar, tar.gz/bz2/xz) into one folder, and nothing else.

`shutil.unpack_archive` trusts the archive: members named `../x` or `/x` land outside the target,
symbolic and hard links are created and later followed (another case's files read through them),
device files are made, and a zip is fully written out before anyone can compare its size with a
limit. Here an archive is read twice:

1. the catalogue: every member is checked (path inside the folder, regular file or folder only,
   no nested archives, declared sizes within the byte budget) before anything is written;
2. the data: each regular file is streamed into the folder in 1 MiB pieces, counting the bytes
   actually produced against the same budget, since a declared size is only a claim.

Any refusal removes the folder, so a refused archive leaves nothing behind. The checks need no
external tool and nothing beyond the standard library's `zipfile` and `tarfile` readers.
"""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from diffkt3d.errors import DiffKT3DError

_CHUNK = 1 << 20
# Members with these endings are archives themselves: they are refused, not unpacked in turn.
NESTED_ARCHIVE_SUFFIXES = (".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".7z", ".rar")
_MAX_NAME_BYTES, _MAX_PATH_CHARS, _MAX_DEPTH = 255, 1024, 32


class ArchiveError(DiffKT3DError):
    """An archive is refused; `kind` says why in one word (no file names), for audit trails.

    Kinds: "not_archive", "corrupt", "unsafe_member" (absolute path, `..`, link, device ...),
    "nested", "empty", "too_large", "too_many_members".
    """

    def __init__(self, message: str, kind: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ArchiveLimits:
    """What an archive may expand to.

    Args:
        max_bytes: total bytes of all unpacked files (declared and actually produced).
        max_members: number of members (files and folders); default 10000, enough for a DICOM
            series of a few thousand slices.
    """

    max_bytes: int
    max_members: int = 10_000


@dataclass(frozen=True)
class _Member:
    """One checked catalogue entry: where it goes and how large it says it is."""

    path: PurePosixPath
    is_dir: bool
    declared_bytes: int
    source: object  # the ZipInfo / TarInfo to read it from


def archive_format(path: str | Path) -> str | None:
    """"zip" or "tar" by the file's content (never its name), else None."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        return "zip"
    try:
        return "tar" if tarfile.is_tarfile(path) else None
    except (OSError, EOFError, tarfile.TarError):  # e.g. a gzip stream that is not a tar inside
        return None


def unpack_archive(archive: str | Path, dest: str | Path, limits: ArchiveLimits) -> list[Path]:
    """Unpack `archive` into the new folder `dest` (its parent must exist, `dest` itself not yet).

    Returns:
        The regular files written, in archive order.

    Raises:
        ArchiveError: the archive is refused (then `dest` does not exist).
    """
    dest = Path(dest)
    fmt = archive_format(archive)
    if fmt is None:
        raise ArchiveError("the upload is not an archive (expected zip, tar or tar.gz)", "not_archive")
    dest.mkdir()
    try:
        if fmt == "zip":
            return _unpack_zip(Path(archive), dest, limits)
        return _unpack_tar(Path(archive), dest, limits)
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise


# -- zip ----------------------------------------------------------------------------------------------
def _unpack_zip(archive: Path, dest: Path, limits: ArchiveLimits) -> list[Path]:
    try:
        with zipfile.ZipFile(archive) as zf:
            members = _catalogue(_zip_entries(zf), limits)
            return _write_all(members, dest, limits, lambda m: zf.open(m.source))  # type: ignore[arg-type]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError, ValueError) as exc:
        raise ArchiveError(f"corrupt or unsupported zip archive ({type(exc).__name__}: {exc})", "corrupt") from None


def _zip_entries(zf: zipfile.ZipFile) -> Iterator[tuple[str, str | None, bool, int, object]]:
    """(name, refusal or None, is_dir, declared size, source) per zip member."""
    for info in zf.infolist():
        mode = info.external_attr >> 16  # Unix mode when the archiver recorded one
        refusal = None
        if info.flag_bits & 0x1:
            refusal = "is encrypted"
        elif stat.S_ISLNK(mode):
            refusal = "is a symbolic link (links are not unpacked)"
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
            refusal = "is a device, FIFO or socket (only regular files are unpacked)"
        yield info.filename, refusal, info.is_dir(), info.file_size, info


# -- tar ----------------------------------------------------------------------------------------------
def _unpack_tar(archive: Path, dest: Path, limits: ArchiveLimits) -> list[Path]:
    try:
        with tarfile.open(archive, "r:*") as tf:
            members = _catalogue(_tar_entries(tf), limits)
            return _write_all(members, dest, limits, lambda m: _tar_stream(tf, m.source))  # type: ignore[arg-type]
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        raise ArchiveError(f"corrupt or unsupported tar archive ({type(exc).__name__}: {exc})", "corrupt") from None


def _tar_entries(tf: tarfile.TarFile) -> Iterator[tuple[str, str | None, bool, int, object]]:
    # Iterating (not getmembers()) lets the catalogue stop at the first bad or oversized member,
    # before a compressed stream is read any further.
    for info in tf:
        refusal = None
        if info.issym():
            refusal = f"is a symbolic link to {info.linkname!r} (links are not unpacked)"
        elif info.islnk():
            refusal = f"is a hard link to {info.linkname!r} (links are not unpacked)"
        elif info.ischr() or info.isblk() or info.isfifo():
            refusal = "is a device or FIFO (only regular files are unpacked)"
        elif info.issparse() or not (info.isreg() or info.isdir()):
            refusal = "is not a regular file or folder"
        yield info.name, refusal, info.isdir(), info.size, info


def _tar_stream(tf: tarfile.TarFile, info: tarfile.TarInfo) -> IO[bytes]:
    stream = tf.extractfile(info)
    if stream is None:  # cannot happen for a checked regular file
        raise ArchiveError(f"archive member {info.name!r} cannot be read", "corrupt")
    return stream


# -- shared -------------------------------------------------------------------------------------------
def _catalogue(entries: Iterator[tuple[str, str | None, bool, int, object]], limits: ArchiveLimits) -> list[_Member]:
    """Check every member before anything is written (step 1)."""
    members: list[_Member] = []
    seen: set[PurePosixPath] = set()
    declared = 0
    for name, refusal, is_dir, size, source in entries:
        if len(members) >= limits.max_members:
            raise ArchiveError(f"the archive holds more than {limits.max_members} members", "too_many_members")
        if refusal is not None:
            raise ArchiveError(f"archive member {name!r} {refusal}", "unsafe_member")
        path = safe_member_path(name)
        if path in seen:
            raise ArchiveError(f"archive member {name!r} appears twice", "unsafe_member")
        seen.add(path)
        if not is_dir and name.lower().endswith(NESTED_ARCHIVE_SUFFIXES):
            raise ArchiveError(f"archive member {name!r} is an archive itself: nested archives are not unpacked; "
                               "put the case files in one archive", "nested")
        declared += 0 if is_dir else max(int(size), 0)
        if declared > limits.max_bytes:
            raise ArchiveError(f"the archive expands to more than the upload limit of "
                               f"{limits.max_bytes / 2**20:.0f} MB (max_upload_mb)", "too_large")
        members.append(_Member(path, is_dir, int(size), source))
    if not any(not m.is_dir for m in members):
        raise ArchiveError("the archive holds no files", "empty")
    return members


def safe_member_path(name: str) -> PurePosixPath:
    """The relative path a member may take inside the target folder.

    Raises:
        ArchiveError: absolute paths, drive letters, `..`, backslashes, control characters,
            over-long names or too deep nesting.
    """
    def refuse(why: str) -> ArchiveError:
        return ArchiveError(f"archive member {name!r} {why}", "unsafe_member")

    if not name or "\\" in name or any(ord(c) < 32 for c in name):
        raise refuse("has an empty name, a backslash or a control character")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise refuse("has an absolute path (members must stay inside the upload's folder)")
    parts = [p for p in PurePosixPath(name).parts if p != "."]
    if ".." in parts:
        raise refuse("climbs out of the upload's folder with '..'")
    if not parts:
        raise refuse("has no file name")
    if len(name) > _MAX_PATH_CHARS or len(parts) > _MAX_DEPTH or any(len(p.encode()) > _MAX_NAME_BYTES for p in parts):
        raise refuse(f"has a path longer than {_MAX_PATH_CHARS} characters, {_MAX_DEPTH} levels or "
                     f"{_MAX_NAME_BYTES}-byte names")
    return PurePosixPath(*parts)


def _write_all(members: list[_Member], dest: Path, limits: ArchiveLimits, open_member) -> list[Path]:
    """Stream the checked members into `dest`, counting bytes actually produced (step 2)."""
    root = dest.resolve()
    written: list[Path] = []
    budget = limits.max_bytes
    for member in members:
        target = root.joinpath(*member.path.parts)
        if not target.resolve().is_relative_to(root):  # cannot happen after safe_member_path
            raise ArchiveError(f"archive member {str(member.path)!r} resolves outside the folder", "unsafe_member")
        if member.is_dir:
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        produced = 0
        with open_member(member) as src, open(target, "xb") as out:
            while chunk := src.read(_CHUNK):
                produced += len(chunk)
                budget -= len(chunk)
                if budget < 0 or produced > member.declared_bytes:
                    raise ArchiveError(
                        f"archive member {str(member.path)!r} expands beyond its declared size or the upload "
                        f"limit of {limits.max_bytes / 2**20:.0f} MB (max_upload_mb)", "too_large")
                out.write(chunk)
        written.append(target)
    return written
