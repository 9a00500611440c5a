"""CLI verbs `train` and `evaluate` (kept apart from cli.py so that module stays small)."""

from __future__ import annotations

import argparse

HANDLERS: dict = {}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the training/evaluation verbs (added as the train/evaluate packages land)."""
