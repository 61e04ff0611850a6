"""Plain-Python logic of the DiffKT3D Slicer module.

No import of the `diffkt3d` core package (Slicer's Python does not have it). Modules that need
MRML (scene, scene_inputs, scene_nodes, selftest, workflow) import `slicer`; panel imports `qt`
(Slicer only); the others (client, worker, roles, dvh, scorecard, candidates, preview, constants)
are pure Python.
"""
