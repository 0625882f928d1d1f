"""Command-line tools around the training library; run each from the repository root as
``python -m tools.NAME --help``."""
