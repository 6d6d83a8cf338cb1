"""Parsing what a pytest run printed: the plugin's gradient report section."""

from __future__ import annotations

import re

# From the report's separator line up to the next line pytest or the plugin adds: another
# separator (with CI set, pytest's short summary repeats whole failure messages, tables
# included) or a "gradcheck: wrote ..." line; or to the end of the output.
REPORT_SECTION = re.compile(r"^=+ gradient report =+$\n(.*?)(?=^=|^gradcheck:|\Z)", re.S | re.M)


def report_section(output: str) -> str:
    """The terminal's gradient report, without its separator line and what follows it."""
    match = REPORT_SECTION.search(output)
    assert match, output
    return match.group(1)
