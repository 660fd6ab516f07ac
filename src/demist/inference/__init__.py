"""Inference: whole-volume synthesis in the T1w's native space, tiled so memory does not grow with the volume."""
