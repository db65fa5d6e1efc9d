"""What a dataset scan found and how it is told: the usable samples, every problem with its file and severity,
the report ``validate-data`` prints and the error training raises (``glance_lightning.datamodules.validation``
does the scanning)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path

from glance_lightning.datamodules.images import ImageRules

from glance_lightning.errors import ConfigError

SEVERITIES = ("error", "warning", "info")
PROG = "python -m glance_lightning validate-data"


@dataclass(frozen=True)
class Sample:
    """One usable training sample: target image, its caption text, and its control images (edit only)."""

    image: Path
    caption: str
    controls: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Problem:
    """One finding about one file or folder of the dataset."""

    path: Path
    message: str
    severity: str = "error"

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ConfigError(f"severity must be one of {SEVERITIES}, got {self.severity!r}")


@dataclass
class DatasetReport:
    """Everything :func:`scan_dataset` found: the usable samples and all problems, sorted by path."""

    root: Path
    layout: str
    samples: list[Sample] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def notes(self) -> list[Problem]:
        """Info lines: what training does to a file that needs no action (an EXIF rotation, ...)."""
        return [p for p in self.problems if p.severity == "info"]

    @property
    def ok(self) -> bool:
        """True when there is no error and at least one sample."""
        return not self.errors and bool(self.samples)

    def format(self) -> str:
        """One ``path: severity: message`` line per problem, then a summary line."""
        lines = [f"{p.path}: {p.severity}: {p.message}" for p in self.problems]
        counts = [
            _plural(len(self.samples), "sample"),
            _plural(len(self.errors), "error"),
            _plural(len(self.warnings), "warning"),
        ]
        if self.notes:
            counts.append(_plural(len(self.notes), "note"))
        lines.append(", ".join(counts))
        return "\n".join(lines)


class DatasetError(ConfigError):
    """Raised by :func:`validate_dataset` when the dataset is not usable; ``.report`` has the details."""

    def __init__(self, report: DatasetReport) -> None:
        super().__init__(report)
        self.report = report

    def __str__(self) -> str:
        check = f"{PROG} --path {shlex.quote(str(self.report.root))}"
        return (
            f"dataset {self.report.root} (layout {self.report.layout}) is not usable:\n"
            f"{self.report.format()}\n"
            "Fix the files listed above (dataset layout: see glance_lightning.datamodules.validation), "
            f"then re-check with: {check}"
        )


class Collector:
    """Accumulates problems during one scan; ``rules`` are the image rules the scan checks against."""

    def __init__(self, rules: ImageRules) -> None:
        self.problems: list[Problem] = []
        self.rules = rules

    def error(self, path: Path, message: str) -> None:
        self.problems.append(Problem(path, message, "error"))

    def warning(self, path: Path, message: str) -> None:
        self.problems.append(Problem(path, message, "warning"))

    def add(self, path: Path, severity: str, message: str) -> None:
        self.problems.append(Problem(path, message, severity))

    def sorted(self) -> list[Problem]:
        return sorted(self.problems, key=lambda p: (p.path.parts, SEVERITIES.index(p.severity), p.message))


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"
