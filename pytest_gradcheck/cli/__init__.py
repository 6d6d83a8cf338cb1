"""The ``gradcheck`` command line: probe one model named by TARGET and report its gradient health."""

from pytest_gradcheck.cli.command import main

__all__ = ["main"]
