"""Builders of hostile files (bytes) for the image-guard, archive and server upload tests.

Each builder makes the smallest file that shows one attack: a NIfTI header that lies about its
size, a non-real data type, an archive member that climbs out of its folder, a compression bomb.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zipfile

import nibabel as nib
import numpy as np


# -- NIfTI ---------------------------------------------------------------------------------------------
def nifti_bytes(array: np.ndarray, gz: bool = True) -> bytes:
    data = nib.Nifti1Image(array, np.eye(4)).to_bytes()
    return gzip.compress(data) if gz else data


def nifti_header_only(shape: tuple[int, ...], dtype: str | np.dtype = "int16", gz: bool = False,
                      payload: int = 1024) -> bytes:
    """A header claiming `shape` x `dtype`, followed by only `payload` zero bytes (1.4 kB for a .nii;
    under 100 bytes gzipped)."""
    header = nib.Nifti1Header()
    header.set_data_dtype(dtype)
    header.set_data_shape(shape)
    header.set_qform(np.eye(4), code=1)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4 + b"\0" * payload
    return gzip.compress(raw) if gz else raw


def rgb_nifti(gz: bool = True) -> bytes:
    """A 4x4x4 RGB24 volume (NIfTI datatype 128): three bytes per voxel, not a number."""
    raw = nifti_header_only((4, 4, 4), "RGB", payload=4 * 4 * 4 * 3)
    return gzip.compress(raw) if gz else raw


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


# -- archives ------------------------------------------------------------------------------------------
def tar_bytes(members: list[tarfile.TarInfo | tuple[str, bytes]], mode: str = "w") -> bytes:
    """A tar archive of (name, data) files and ready-made TarInfo entries (links, devices ...)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tf.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def tar_entry(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    """A tar entry of `kind` (tarfile.SYMTYPE, LNKTYPE, CHRTYPE, FIFOTYPE ...) with no data."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def zip_bytes(members: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)  # S_IFLNK: a symbolic link, as Info-ZIP stores one
            zf.writestr(info, target)
    return buf.getvalue()


def zip_bomb(expanded_bytes: int, name: str = "ct.nii") -> bytes:
    """A zip of one member of `expanded_bytes` zeros (about 1000:1), written in 1 MiB pieces."""
    buf = io.BytesIO()
    chunk = b"\0" * 2**20
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo(name)
        info.compress_type = zipfile.ZIP_DEFLATED
        with zf.open(info, "w", force_zip64=True) as member:
            left = expanded_bytes
            while left > 0:
                member.write(chunk[: min(left, len(chunk))])
                left -= len(chunk)
    return buf.getvalue()


def tar_gz_bomb(expanded_bytes: int, name: str = "ct.nii") -> bytes:
    """A tar.gz of one member of `expanded_bytes` zeros, streamed (never held in memory)."""

    class Zeros:
        def __init__(self, n: int):
            self.left = n

        def read(self, size: int = -1) -> bytes:
            n = self.left if size < 0 else min(size, self.left)
            self.left -= n
            return b"\0" * n

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo(name)
        info.size = expanded_bytes
        tf.addfile(info, Zeros(expanded_bytes))  # type: ignore[arg-type]
    return buf.getvalue()


def zip_with_lying_size(real_bytes: int, declared_bytes: int, name: str = "ct.nii") -> bytes:
    """A zip whose headers declare `declared_bytes` for a member that inflates to `real_bytes`."""
    data = bytearray(zip_bytes({name: b"\0" * real_bytes}))
    for signature, size_offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):  # local header, central directory
        at = data.find(signature)
        struct.pack_into("<I", data, at + size_offset, declared_bytes)
    return bytes(data)
