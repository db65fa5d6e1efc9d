"""User errors: mistakes the user can fix, reported in a few lines and never with a traceback.

A ``UserError`` carries a message that names the setting or file, what is wrong and what to do. Each kind also
derives from the built-in exception it refines (``ConfigError`` is a ``ValueError``...), so library callers
can keep catching the built-in ones. The command line prints a user error as ``glance_lightning: error: ...``
and exits 2 (``report``); any other exception is a bug and keeps its traceback. ``--debug`` or
``GLANCE_LIGHTNING_DEBUG=1`` shows the traceback of user errors too.

``parse_error_message`` turns jsonargparse's nested "Does not validate against any of the Union subtypes"
dump into the one line that matters: the full setting name and the failed restriction.
"""

from __future__ import annotations

import os
import re
import sys

DEBUG_ENV = "GLANCE_LIGHTNING_DEBUG"
DEBUG_FLAG = "--debug"
EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the user's settings, files or machine; the message says what to do."""


class ConfigError(UserError, ValueError):
    """A setting's value is unusable."""


class SetupError(UserError, RuntimeError):
    """A setting needs something this machine or installation lacks (a GPU, a package, a kernel)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class ExistingFileError(UserError, FileExistsError):
    """A write would replace something the user made."""


class UnwritableError(UserError, PermissionError):
    """A destination cannot be created or written."""


class DiskSpaceError(UserError, OSError):
    """Not enough free space for what a run will write."""


class MissingPackageError(UserError, ModuleNotFoundError):
    """A setting needs an optional package."""


def is_debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def pop_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether it was there."""
    return [a for a in argv if a != DEBUG_FLAG], DEBUG_FLAG in argv


def find_user_error(exc: BaseException | None) -> UserError | None:
    """``exc`` or the user error it was raised from or while handling (libraries sometimes wrap ours)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, UserError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def report(message: str, command: str = "", traceback_hint: bool = True) -> int:
    """Print a user error in the project's form and return the exit status for it."""
    where = f"{command}: " if command else ""
    print(f"glance_lightning: {where}error: {message}", file=sys.stderr)
    if traceback_hint and not is_debug():
        print(f"(the traceback: add {DEBUG_FLAG} or set {DEBUG_ENV}=1)", file=sys.stderr)
    return EXIT_USER_ERROR


_RESTRICTION = re.compile(r"Not of type (\w+): (.*) does not conform to restriction (.*)$")
_RESTRICTIONS = {"v>0": "must be > 0", "v>=0": "must be >= 0", "v<0": "must be < 0", "v<=0": "must be <= 0",
                 "v>=0 and v<1": "must be in [0, 1)"}
_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Errors:", "Given value",
          "- Expected a <class 'NoneType'>", "Problem with given class_path")


def parse_error_message(message: str) -> str:
    """The setting and reason of a jsonargparse error: ``model.init_args.lora.rank=0: must be > 0``."""
    keys: list[tuple[int, str]] = []  # (indent, key) of the "Parser key" lines above the current line
    reason, path = "", ""
    for line in message.splitlines():
        indent, text = len(line) - len(line.lstrip()), line.strip().lstrip("- ")
        match = re.match(r'(?:error: )?Parser key "([^"]+)":\s*(.*)$', text)
        if match:
            keys = [k for k in keys if k[0] < indent] + [(indent, match.group(1))]
            text = match.group(2)
        if not text or any(line.strip().startswith(n) or text.startswith(n.lstrip("- ")) for n in _NOISE):
            continue
        if not reason:
            reason, path = text, _setting([k for _, k in keys])
    if not reason:
        return message.strip().splitlines()[-1] if message.strip() else "invalid arguments"
    unknown = re.match(r"Option '([^']+)' is not accepted", reason)
    if unknown:
        group = path in ("model", "data")
        hint = f"`fit --{path}.help CLASS_PATH` lists its settings" if group else "check the spelling"
        return f"{path}{'.init_args' if group else ''}.{unknown.group(1)}: no such setting; {hint}"
    choices = re.match(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)$", reason)
    if choices:
        return f"{path}={choices.group(2)}: use one of {choices.group(1).replace(chr(39), '')}"
    if reason.startswith("Unexpected config"):
        return f"--config: {reason}; give a YAML file of fit settings (see configs/)"
    restricted = _RESTRICTION.search(reason)
    if restricted:
        kind, value, rule = restricted.groups()
        return f"{path}={value}: {_RESTRICTIONS.get(rule.strip(), f'must satisfy {rule}')} ({kind})"
    return f"{path}: {reason}" if path else reason


def explain_restriction(detail: str) -> str:
    """jsonargparse's "3 does not conform to restriction v>0" as "must be > 0"."""
    match = re.search(r"does not conform to restriction (.*)$", detail)
    return _RESTRICTIONS.get(match.group(1).strip(), detail) if match else detail


def _setting(keys: list[str]) -> str:
    """Parser keys of nested class groups as the dotted name a user writes (``model.init_args.lora.rank``)."""
    parts: list[str] = []
    for index, key in enumerate(keys):
        parts.append(key)
        if index == 0 and key in ("model", "data") and len(keys) > 1:
            parts.append("init_args")
    return ".".join(parts)
