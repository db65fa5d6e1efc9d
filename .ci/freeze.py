"""Write the exact versions of every package installed in this environment as a pip constraints file.

Usage: python .ci/freeze.py OUT  (``.ci/run --refresh-constraints`` calls it). The project itself is left out,
local version labels are dropped (``torch==2.13.0+cpu`` -> ``torch==2.13.0``, which matches every build of that
release), and the file is written to OUT.tmp and renamed, so OUT is never half-written.
"""

from __future__ import annotations

import datetime
import os
import platform
import sys
from importlib.metadata import distributions

from packaging.utils import canonicalize_name
from packaging.version import Version

PROJECT = "glance-lightning"


def pins() -> list[str]:
    found: dict[str, str] = {}
    for dist in distributions():
        name = canonicalize_name(dist.metadata["Name"] or "")
        if name and name != PROJECT:
            found[name] = Version(dist.version).public
    return [f"{name}=={version}" for name, version in sorted(found.items())]


def main(out: str) -> None:
    header = [
        "# Exact versions the test suite passed with: used by README command 1 and .ci/run (pip install -c).",
        "# Refresh: bash .ci/run --refresh-constraints   (docs/training.md, \"Upgrading dependencies\").",
        f"# Written {datetime.date.today()} on Python {platform.python_version()}, {sys.platform} "
        f"{platform.machine()}.",
    ]
    tmp = f"{out}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join([*header, *pins()]) + "\n")
    os.replace(tmp, out)


if __name__ == "__main__":
    main(sys.argv[1])
