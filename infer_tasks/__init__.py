"""MONAI Label infer tasks of the DiffKT3D app (thin wrappers over diffkt3d.inference)."""
