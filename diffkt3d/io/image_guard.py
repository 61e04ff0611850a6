"""Check a NIfTI image's header before any of its voxels are read.

A NIfTI header is 348 bytes that say how large the image is; the data reader believes them and
allocates that much. A 1.4 kB `.nii` claiming 2000^3 int16 voxels, or an 83-byte `.nii.gz`
claiming 1000^3, would make the reader allocate gigabytes before it finds out that the data are
not there. So every reader of case images (`diffkt3d.io.case_folder.load_nifti`, hence the CLI
and the server) asks `check_nifti_header` first: shape, data type (real numbers only) and the
memory the loader would need, against `ImageLimits`.

`check_nifti_complete` additionally confirms that the file holds all the voxels its header
promises (streaming through a `.nii.gz` in small chunks, nothing kept); the server runs it on
uploads so a truncated file is refused when it arrives rather than when it is first used.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from diffkt3d.errors import CaseError

MAX_IMAGE_MB_ENV = "DIFFKT3D_MAX_IMAGE_MB"
# A large clinical CT is 512 x 512 x 400 voxels: 400 MiB as float32, the loader's working type.
# The default allows 2.5 times that, so thin-slice scans (up to ~1000 slices) still load.
DEFAULT_MAX_IMAGE_MB = 1024.0
DEFAULT_MAX_DIM = 4096
WORKING_ITEMSIZE = np.dtype(np.float32).itemsize  # loaders hold volumes as float32
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ImageLimits:
    """How large an image may be before its data are read.

    Args:
        max_image_mb: memory (MiB) the loaded volume may take: voxels x 4 bytes (float32, what the
            loaders hold), or x the stored item size when that is wider. Default 1024.
        max_dim: largest number of voxels along any one axis. Default 4096.
    """

    max_image_mb: float = DEFAULT_MAX_IMAGE_MB
    max_dim: int = DEFAULT_MAX_DIM

    def __post_init__(self) -> None:
        if not (self.max_image_mb > 0 and math.isfinite(self.max_image_mb)):
            raise ValueError(f"max_image_mb must be a positive number of MiB, found {self.max_image_mb!r}")
        if self.max_dim < 1:
            raise ValueError(f"max_dim must be a positive number of voxels, found {self.max_dim!r}")

    @property
    def max_bytes(self) -> int:
        return int(self.max_image_mb * 2**20)

    @classmethod
    def from_setting(cls, max_image_mb: str | float | None) -> ImageLimits:
        """Limits from a `max_image_mb` setting (server `--conf`, environment); None or "" = default."""
        if max_image_mb is None or str(max_image_mb).strip() == "":
            return cls()
        try:
            value = float(max_image_mb)
        except ValueError:
            raise ValueError(f"max_image_mb must be a number of MiB, found {max_image_mb!r}") from None
        return cls(max_image_mb=value)

    @classmethod
    def from_env(cls) -> ImageLimits:
        """Limits from `DIFFKT3D_MAX_IMAGE_MB` (unset: the default), for the CLI."""
        return cls.from_setting(os.environ.get(MAX_IMAGE_MB_ENV))


@dataclass(frozen=True)
class ImageHeader:
    """What a checked header promises: the volume shape, stored dtype and data layout on disk."""

    shape: tuple[int, ...]
    dtype: np.dtype
    data_offset: int  # bytes before the first voxel in the (decompressed) file

    @property
    def stored_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def loaded_bytes(self) -> int:
        return math.prod(self.shape) * max(self.dtype.itemsize, WORKING_ITEMSIZE)


def check_nifti_header(path: str | Path, limits: ImageLimits, case: str | None = None) -> ImageHeader:
    """Read only the header of `path` and refuse what the loader must not try to read.

    Refused: non-NIfTI files, shapes that are not a 3D volume (a 4D file with one volume is a
    volume), empty or over-long axes, non-real data types (complex, RGB and other structured
    types, booleans of unknown layout), and volumes whose loaded size exceeds `limits`.

    Raises:
        CaseError: naming the case, the file and expected vs found.
    """
    path = Path(path)
    where = {"case": case, "file": str(path)}
    try:
        img = nib.load(str(path))  # header only: the voxel data stay behind a lazy proxy
        header = img.header
        shape = tuple(int(s) for s in header.get_data_shape())
        dtype = np.dtype(header.get_data_dtype())
        offset = int(img.dataobj.offset)
    except FileNotFoundError:
        raise CaseError("file not found", **where) from None
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile) as exc:
        raise CaseError(f"cannot read NIfTI (truncated or corrupt file: {_bare(exc, path)})", **where) from None
    except Exception as exc:  # nibabel raises several types for non-NIfTI content
        raise CaseError(f"not a readable NIfTI image ({type(exc).__name__}: {_bare(exc, path)})", **where) from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise CaseError(f"not a NIfTI image (found {type(img).__name__})", **where)
    if dtype.kind not in "iuf" or dtype.fields is not None:
        raise CaseError(f"data type {_describe(dtype)} is not supported: images must hold real numbers "
                        "(integer or floating point), not complex, RGB or other compound values", **where)
    volume = shape[:3] if len(shape) == 4 and shape[3] == 1 else shape
    if len(volume) != 3:
        raise CaseError(f"expected a 3D volume, found shape {shape}", **where)
    if min(shape) < 1 or max(shape) > limits.max_dim:
        raise CaseError(f"image shape {shape} is outside 1..{limits.max_dim} voxels per axis", **where)
    checked = ImageHeader(shape=shape, dtype=dtype, data_offset=offset)
    if checked.loaded_bytes > limits.max_bytes:
        raise CaseError(f"image of shape {shape} ({_describe(dtype)}) would take "
                        f"{checked.loaded_bytes / 2**20:.0f} MiB in memory, the limit is "
                        f"{limits.max_image_mb:g} MiB (max_image_mb)", **where)
    return checked


def check_nifti_complete(path: str | Path, header: ImageHeader, case: str | None = None) -> None:
    """Refuse a file that holds fewer voxel bytes than its header promises.

    A `.nii` is checked by its size; a `.nii.gz` is decompressed in 1 MiB pieces that are counted
    and dropped, stopping as soon as enough bytes have been seen.

    Raises:
        CaseError: truncated or corrupt data, naming case and file.
    """
    path = Path(path)
    needed = header.data_offset + header.stored_bytes
    if path.name.endswith(".gz"):
        try:
            found = _gzip_length_up_to(path, needed)
        except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise CaseError(f"cannot read NIfTI (truncated or corrupt file: {exc})", case=case,
                            file=str(path)) from None
    else:
        found = path.stat().st_size
    if found < needed:
        raise CaseError(f"truncated image data: the header promises {needed} bytes, the file holds "
                        f"{found}", case=case, file=str(path))


def _gzip_length_up_to(path: Path, limit: int) -> int:
    """Decompressed length of a gzip file, counted up to `limit` bytes (memory: one chunk)."""
    total = 0
    with open(path, "rb") as f:
        inflater = zlib.decompressobj(wbits=31)
        while total < limit:
            data = inflater.unconsumed_tail or f.read(_CHUNK)
            if not data:
                break
            total += len(inflater.decompress(data, _CHUNK))
            if inflater.eof:  # a concatenated gzip member may follow
                rest = inflater.unused_data
                inflater = zlib.decompressobj(wbits=31)
                if rest:
                    total += len(inflater.decompress(rest, _CHUNK))
    return total


def _bare(exc: Exception, path: Path) -> str:
    """The reader's message with the file's folder left out (it would show server paths)."""
    return str(exc).replace(str(path), path.name)


def _describe(dtype: np.dtype) -> str:
    return f"{dtype.name}" if dtype.fields is None else f"compound {[n for n in dtype.names or ()]}"


def check_dicom_volume(shape: tuple[int, ...], bytes_per_voxel: int, samples_per_pixel: int,
                       limits: ImageLimits, case: str | None = None, file: str | Path | None = None,
                       what: str = "image") -> None:
    """Refuse a DICOM volume from its header values (Rows, Columns, slices or frames,
    SamplesPerPixel) before any pixel data are decoded: a compressed or lying header can claim
    far more voxels than the file holds, and the reader allocates what the header claims.

    Raises:
        CaseError: RGB / multi-sample pixels, an axis outside 1..max_dim, or a volume over the limit.
    """
    where = {"case": case, "file": str(file) if file is not None else None}
    if samples_per_pixel != 1:
        raise CaseError(f"{what} has SamplesPerPixel {samples_per_pixel}: images must hold one real "
                        "number per voxel (greyscale), not RGB or other multi-sample pixels", **where)
    if min(shape) < 1 or max(shape) > limits.max_dim:
        raise CaseError(f"{what} shape {shape} is outside 1..{limits.max_dim} voxels per axis", **where)
    loaded = math.prod(shape) * bytes_per_voxel
    if loaded > limits.max_bytes:
        raise CaseError(f"{what} of shape {shape} would take {loaded / 2**20:.0f} MiB in memory, the limit "
                        f"is {limits.max_image_mb:g} MiB (max_image_mb)", **where)
