"""The Larq Compute Engine side of ``python -m tools.export_lce``: it runs in LCE's own
environment (TensorFlow, numpy < 2, no torch), so nothing here imports torch or ``utils``."""
