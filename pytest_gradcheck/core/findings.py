"""What the checks found: findings, their causes, and one probed model's result, as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pytest_gradcheck.core.bounds import Bounds
from pytest_gradcheck.core.profile import GradientProfile

RULES = ("vanishing", "exploding", "nonfinite", "dead", "unused", "dead_relu", "saturation")


@dataclass(frozen=True)
class Cause:
    """One likely cause of a vanishing or exploding finding (``pytest_gradcheck.core.diagnosis``).

    ``evidence`` holds the numbers behind it; its ``log10_factor`` says how many decades
    of the first/last ratio the cause accounts for, and ranks the causes of a finding.
    """

    cause: str
    summary: str
    evidence: dict[str, Any]
    fix: str

    @property
    def log10_factor(self) -> float:
        return float(self.evidence.get("log10_factor", 0.0))

    def to_dict(self) -> dict[str, Any]:
        return {"cause": self.cause, "summary": self.summary, "evidence": dict(self.evidence), "fix": self.fix}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Cause:
        return cls(data["cause"], data.get("summary", ""), dict(data.get("evidence", {})), data.get("fix", ""))


@dataclass(frozen=True)
class Finding:
    """One thing a check found, with the numbers behind it."""

    rule: str
    layers: list[str]
    message: str
    failing: bool
    value: float | None = None
    bound: float | None = None
    causes: tuple[Cause, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "layers": list(self.layers),
            "message": self.message,
            "failing": self.failing,
            "value": self.value,
            "bound": self.bound,
            "causes": [cause.to_dict() for cause in self.causes],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Finding:
        values = dict(data)
        values["causes"] = tuple(Cause.from_dict(cause) for cause in data.get("causes", ()))
        return cls(**values)


def failing(findings: list[Finding]) -> list[Finding]:
    """The findings that fail a test."""
    return [finding for finding in findings if finding.failing]


def verdict(findings: list[Finding]) -> str:
    """'healthy', or the failing rules joined by '+' (e.g. 'vanishing+dead')."""
    rules = list(dict.fromkeys(finding.rule for finding in failing(findings)))
    return "+".join(rules) if rules else "healthy"


@dataclass
class CheckResult:
    """One probed model within a test (or a command-line run): what was measured, under which bounds, what was found."""

    nodeid: str
    name: str | None
    profile: GradientProfile
    bounds: Bounds
    findings: list[Finding]
    expected_failure: bool = False  # the test expected the failure (xfail, or caught it): the report says so

    @property
    def verdict(self) -> str:
        return verdict(self.findings)

    @property
    def title(self) -> str:
        return f"{self.nodeid} [{self.name}]" if self.name else self.nodeid

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodeid": self.nodeid,
            "name": self.name,
            "verdict": self.verdict,
            "expected_failure": self.expected_failure,
            "ratio": self.profile.ratio,
            "bounds": self.bounds.to_dict(),
            "findings": [finding.to_dict() for finding in self.findings],
            "profile": self.profile.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckResult:
        return cls(
            nodeid=data["nodeid"],
            name=data.get("name"),
            profile=GradientProfile.from_dict(data["profile"]),
            bounds=Bounds(**data["bounds"]),
            findings=[Finding.from_dict(item) for item in data["findings"]],
            expected_failure=bool(data.get("expected_failure", False)),
        )
