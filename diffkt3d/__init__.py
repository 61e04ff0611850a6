"""DiffKT3D: Any2Any 3D diffusion for radiotherapy dose prediction.

The core library knows nothing of MONAI Label or 3D Slicer; those layers import it.
"""

from diffkt3d.errors import CaseError, DiffKT3DError

__version__ = "0.1.0"
__all__ = ["CaseError", "DiffKT3DError", "__version__"]
