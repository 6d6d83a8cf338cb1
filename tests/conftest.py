# torch must be imported before any in-process pytester run: pytester unloads the
# modules a run imported, and torch cannot be imported twice in one process.
import torch  # noqa: F401
