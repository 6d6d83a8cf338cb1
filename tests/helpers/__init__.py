"""Helpers shared by the test modules: model snapshots, models, synthetic profiles and output parsing."""

from __future__ import annotations

import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SEED_NETWORKS = EXAMPLES / "seed_networks.py"
