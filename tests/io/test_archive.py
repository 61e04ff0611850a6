"""diffkt3d.io.archive: members are checked before anything is written, bytes counted while streaming."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import pytest

from diffkt3d.io.archive import ArchiveError, ArchiveLimits, archive_format, safe_member_path, unpack_archive

sys.path.insert(0, str(Path(__file__).parent))
from hostile_files import (  # noqa: E402
    nifti_bytes,
    tar_bytes,
    tar_entry,
    tar_gz_bomb,
    zip_bomb,
    zip_bytes,
    zip_with_lying_size,
)

MB = 2**20
LIMITS = ArchiveLimits(max_bytes=5 * MB, max_members=50)


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}


@pytest.fixture
def sandbox(tmp_path):
    """(archive path, destination) inside a sandbox folder whose other content must never change."""
    box = tmp_path / "box"
    (box / "outside").mkdir(parents=True)
    (box / "outside" / "audit.jsonl").write_text("keep\n")
    return box / "upload.bin", box / "dest"


def test_a_case_archive_is_unpacked_in_every_format(tmp_path):
    ct = nifti_bytes(__import__("numpy").zeros((4, 4, 4), "int16"))
    files = [("pt_9/ct.nii.gz", ct), ("pt_9/plan.json", b"{}")]
    for i, data in enumerate([zip_bytes(dict(files)), tar_bytes(files), tar_bytes(files, "w:gz"),
                              tar_bytes(files, "w:bz2"), tar_bytes(files, "w:xz")]):
        src = tmp_path / f"a{i}.bin"
        src.write_bytes(data)
        assert archive_format(src) in ("zip", "tar")
        written = unpack_archive(src, tmp_path / f"out{i}", LIMITS)
        assert [p.relative_to(tmp_path / f"out{i}").as_posix() for p in written] == ["pt_9/ct.nii.gz", "pt_9/plan.json"]
        assert (tmp_path / f"out{i}" / "pt_9" / "ct.nii.gz").read_bytes() == ct


HOSTILE = {
    "tar ../": (lambda: tar_bytes([("ok.txt", b"1"), ("../../outside/audit.jsonl", b"owned")]), "unsafe_member", "'..'"),
    "tar absolute": (lambda: tar_bytes([("/tmp/evil.txt", b"x")]), "unsafe_member", "absolute path"),
    "tar symlink": (lambda: tar_bytes([tar_entry("ct.nii.gz", tarfile.SYMTYPE, "../../other/ct.nii.gz")]),
                    "unsafe_member", "symbolic link"),
    "tar hardlink": (lambda: tar_bytes([("a.txt", b"1"), tar_entry("b.txt", tarfile.LNKTYPE, "a.txt")]),
                     "unsafe_member", "hard link"),
    "tar char device": (lambda: tar_bytes([tar_entry("null", tarfile.CHRTYPE)]), "unsafe_member", "device"),
    "tar fifo": (lambda: tar_bytes([tar_entry("pipe", tarfile.FIFOTYPE)]), "unsafe_member", "FIFO"),
    "zip ../": (lambda: zip_bytes({"../outside/audit.jsonl": b"owned"}), "unsafe_member", "'..'"),
    "zip absolute": (lambda: zip_bytes({"/etc/evil": b"x"}), "unsafe_member", "absolute path"),
    "zip backslash": (lambda: zip_bytes({"..\\..\\evil": b"x"}), "unsafe_member", "backslash"),
    "zip symlink": (lambda: zip_bytes({"a.txt": b"1"}, symlinks={"ct.nii.gz": "/etc/passwd"}),
                    "unsafe_member", "symbolic link"),
    "zip bomb": (lambda: zip_bomb(40 * MB), "too_large", "upload limit of 5 MB"),
    "tar.gz bomb": (lambda: tar_gz_bomb(40 * MB), "too_large", "upload limit of 5 MB"),
    "zip size lie": (lambda: zip_with_lying_size(2 * MB, 1000), "corrupt", "CRC"),
    "nested zip": (lambda: zip_bytes({"inner.zip": zip_bytes({"a": b"1"})}), "nested", "nested archives"),
    "nested tar.gz": (lambda: tar_bytes([("case/inner.tar.gz", b"x")]), "nested", "nested archives"),
    "empty zip": (lambda: zip_bytes({}), "empty", "no files"),
    "empty tar": (lambda: tar_bytes([]), "empty", "no files"),
    "only folders": (lambda: zip_bytes({"a/": b""}), "empty", "no files"),
    "duplicate": (lambda: tar_bytes([("a.txt", b"1"), ("./a.txt", b"2")]), "unsafe_member", "twice"),
    "too many members": (lambda: zip_bytes({f"f{i}.txt": b"" for i in range(51)}), "too_many_members", "more than 50"),
    "not an archive": (lambda: b"just text, not an archive", "not_archive", "not an archive"),
    "truncated zip": (lambda: zip_bytes({"a.txt": b"1" * 5000})[:-30], "not_archive", "not an archive"),
}


@pytest.mark.parametrize("row", sorted(HOSTILE))
def test_hostile_archives_are_refused_before_anything_is_written(sandbox, row):
    archive, dest = sandbox
    make, kind, words = HOSTILE[row]
    archive.write_bytes(make())
    before = _tree(archive.parent)
    with pytest.raises(ArchiveError) as err:
        unpack_archive(archive, dest, LIMITS)
    assert err.value.kind == kind and words in str(err.value), str(err.value)
    assert _tree(archive.parent) == before  # no partial folder, nothing beside it
    assert (archive.parent / "outside" / "audit.jsonl").read_text() == "keep\n"


def test_bytes_are_counted_while_streaming_not_only_declared(tmp_path, monkeypatch):
    """Even when the catalogue's declared sizes pass, the bytes produced are counted: here the
    declared sizes are made to lie after the check, as a reader that trusted them would see."""
    import diffkt3d.io.archive as archive_module

    real_catalogue = archive_module._catalogue

    def lying_catalogue(entries, limits):
        return [m.__class__(m.path, m.is_dir, 10, m.source) for m in real_catalogue(entries, limits)]

    monkeypatch.setattr(archive_module, "_catalogue", lying_catalogue)
    src = tmp_path / "a.tar"
    src.write_bytes(tar_bytes([("ct.nii", b"\0" * 3 * MB)]))
    with pytest.raises(ArchiveError, match="expands beyond its declared size") as err:
        unpack_archive(src, tmp_path / "out", LIMITS)
    assert err.value.kind == "too_large" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["", "/a", "C:/a", "a/../../b", "..", "a\x00b", "a/" * 40 + "b", "x" * 300])
def test_member_names_that_could_leave_the_folder_are_refused(name):
    with pytest.raises(ArchiveError, match="archive member"):
        safe_member_path(name)


def test_harmless_member_names_are_normalised():
    assert safe_member_path("./pt_1/./ct.nii.gz").as_posix() == "pt_1/ct.nii.gz"
    assert safe_member_path("a..b/c..").as_posix() == "a..b/c.."
