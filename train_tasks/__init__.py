"""MONAI Label train tasks of the DiffKT3D app (thin wrappers over diffkt3d.training)."""
