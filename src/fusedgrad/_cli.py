"""Helpers shared by the command lines (``python -m fusedgrad`` and ``fusedgrad.demo``)."""
from __future__ import annotations

import argparse
import os


def check_output_path(parser: argparse.ArgumentParser, option: str, path: str | None) -> None:
    """Exit with status 2 now, not after minutes of work, if ``path`` can't be written."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"{option}: {path!r} is a directory; expected a file path")
    if not os.path.isdir(folder):
        parser.error(f"{option}: folder {folder!r} does not exist")
    if not os.access(folder, os.W_OK):
        parser.error(f"{option}: folder {folder!r} is not writable")
