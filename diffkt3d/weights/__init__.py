"""Shipped model weights (package data): `cpu-default.pt`, see docs/model-card.md."""
