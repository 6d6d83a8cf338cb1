"""The --grad-report-json document: every probed model with its profile, bounds and findings."""

from __future__ import annotations

import json
from typing import Any

from pytest_gradcheck._version import __version__
from pytest_gradcheck.core.findings import CheckResult
from pytest_gradcheck.core.jsonable import strict_json

# Version of the --grad-report-json document; bump it when a key changes meaning or goes away.
SCHEMA_VERSION = 1


def json_document(results: list[CheckResult]) -> dict[str, Any]:
    """The --grad-report-json document: every probed model with profile, bounds and findings."""
    return {
        "schema_version": SCHEMA_VERSION,
        "generator": f"pytest-gradcheck {__version__}",
        "results": [strict_json(result.to_dict()) for result in results],
    }


def render_json(results: list[CheckResult]) -> str:
    return json.dumps(json_document(results), indent=2, allow_nan=False) + "\n"
