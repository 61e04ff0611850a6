"""The DiffKT3D MONAI Label app: `monailabel start_server --app monailabel_app --studies DIR`."""
