"""The parts of ``python -m tools.benchmark``: what is timed, how memory is read, the generated
JPEG folder, and the report."""
