"""Writes that never leave half a file: a temporary file in the destination folder, fsync, rename, fsync the folder.

Every file the project writes (LoRAs, checkpoints, sample PNGs, encode-cache entries, exports) goes through
``atomic_write``: the bytes go to ``.<name>.<random>.tmp`` beside the target (the same filesystem, so the final
``os.replace`` is one atomic rename, never a copy across filesystems), the file is fsynced, renamed over the
target and the folder is fsynced so the rename itself survives a power cut. If anything fails (a full disk, a
Ctrl-C) the temporary file is deleted and the previous file, if any, is left exactly as it was.

**Errors.** The error reported is the one that happened: an ``OSError`` from a write is re-raised even where the
serialiser turned it into something else (``torch.save`` reports a failed write as a ``RuntimeError`` about zip
positions, with the ``OSError`` only as its context). A full disk, an exceeded quota or a folder that cannot be
written becomes a user error (``glance_lightning.errors.DiskSpaceError`` / ``UnwritableError``, both of them
``OSError`` of the same errno) whose message names the file, says "disk full" (or what else it is) and what to do.

**Permissions.** The temporary file is created with ``os.open(..., 0o666)``, so the kernel applies the process
umask (and a folder's default ACL, where one is set) exactly as for any ``open(path, "w")``: umask 022 gives
0644, 077 gives 0600. This avoids reading the umask at all: ``os.umask(0)`` followed by a restore changes it
process-wide for a moment (a race with any thread creating files then, e.g. Lightning's ``AsyncCheckpointIO``
or a DataLoader thread), and ``/proc/self/status`` exists on Linux only. ``tempfile.mkstemp``, used before,
always creates 0600 files.

**Leftovers.** A process killed during a write (SIGKILL, OOM killer, power cut) leaves its temporary file. Its
name carries the writer: ``.<name>.<host>-<pid>-<random>.tmp`` (``host`` a short hash of the host name), and the
writer holds an ``flock`` on it while writing. ``remove_leftovers`` deletes the temporaries whose writer is gone
(on this host: its pid no longer exists and the lock is free; on another host sharing the folder: the lock is free
and the file older than a minute), never one still being written nor a file of another name. A run calls it on
every folder it writes into before writing (``GlanceModule.setup``, the encode cache, ``sample --output``,
``export``). Results are never read from temporaries: their names start with a dot and end in ``.tmp``, which no
result pattern matches.

``AtomicCheckpointIO`` is Lightning's ``TorchCheckpointIO`` writing this way; ``install_checkpoint_io`` puts it in
place of Lightning's default in a strategy (GlanceModule.setup does it for every fit) and leaves any other
plugin alone.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import torch
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO

from glance_lightning.errors import DiskSpaceError, UnwritableError

try:
    import fcntl
except ImportError:  # Windows: no flock; leftovers of other hosts are then kept
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
_BUFFER = 1 << 20
# errno -> (the user error, what it means for the user, what to do)
_EXPLAINED: dict[int, tuple[type[OSError], str, str]] = {
    errno.ENOSPC: (DiskSpaceError, "disk full", "free some space or write to another disk"),
    errno.EDQUOT: (DiskSpaceError, "disk quota exceeded", "free some space or write to another disk"),
    errno.EACCES: (UnwritableError, "permission denied", "choose a folder you can write to"),
    errno.EPERM: (UnwritableError, "operation not permitted", "choose a folder you can write to"),
    errno.EROFS: (UnwritableError, "read-only file system", "choose a folder you can write to"),
}


def explained(err: OSError, path: str | os.PathLike) -> OSError:
    """``err`` as a user error (``DiskSpaceError``, ``UnwritableError``: short message, no traceback) of the same
    errno naming ``path`` when it is a full disk or a permission problem; other errors are returned unchanged."""
    if err.errno not in _EXPLAINED:
        return err
    kind, what, fix = _EXPLAINED[err.errno]
    reported = kind(f"cannot write {path}: {what} ({os.strerror(err.errno)}); {fix}")
    reported.errno = err.errno  # set after, so that the message stays without an "[Errno N]" prefix
    return reported


class _RawFile(io.FileIO):
    """The temporary file: every write goes through ``os.write`` and the first ``OSError`` is remembered, so it
    can be reported even when the caller (``torch.save``) replaces it with an error of its own."""

    error: OSError | None = None
    discard = False  # set once the write failed: closing flushes the buffer into nothing instead of retrying

    def write(self, data: Any) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        if self.discard:
            return len(view)
        done = 0
        try:
            while done < len(view):
                done += os.write(self.fileno(), view[done:])
        except OSError as err:
            if self.error is None:
                self.error = err
            raise
        return done


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


_TEMP_NAME = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}" + re.escape(TEMP_SUFFIX) + "$")
_FOREIGN_GRACE_S = 60.0  # a temporary of another host is stale only once this old (and unlocked)


def _temporary_beside(path: Path) -> tuple[Path, int]:
    """Create ``.<name>.<host>-<pid>-<random>.tmp`` in ``path``'s folder (mode 0o666 less the umask) and lock it
    for as long as it is open; its path and fd."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")
        try:
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        _try_lock(fd)
        return tmp, fd


def _try_lock(fd: int) -> bool:
    """Take an exclusive flock on ``fd`` without waiting; whether it was taken (False where the filesystem has
    no locks)."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: another user's live process
        return True
    return True


def writer_gone(tmp: Path) -> bool:
    """Whether the process that wrote temporary file ``tmp`` is gone, so that the file is a leftover."""
    match = _TEMP_NAME.match(tmp.name)
    if match is None:  # not a name this module writes: never touched
        return False
    if match["host"] == _host_tag():
        # the pid, and the lock too: containers may share a host name but not their process ids
        return not _pid_alive(int(match["pid"])) and (fcntl is None or _lock_free(tmp))
    try:
        if time.time() - tmp.stat().st_mtime <= _FOREIGN_GRACE_S:
            return False
    except OSError:
        return False
    return _lock_free(tmp)


def _lock_free(tmp: Path) -> bool:
    """Whether nobody holds the writer's lock on ``tmp`` (False when it cannot be told)."""
    try:
        fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        return _try_lock(fd)
    finally:
        os.close(fd)


def remove_leftovers(folder: str | os.PathLike, recursive: bool = False, name: str = "*") -> list[Path]:
    """Delete the temporaries of killed writes in ``folder`` (and below it with ``recursive``): the files
    ``.<name>.<host>-<pid>-<random>.tmp`` whose writer is gone (``writer_gone``). Files being written and files
    of other names are kept; a folder that does not exist or cannot be written is left alone. The paths
    removed."""
    root = Path(folder)
    pattern = f".{name}.*{TEMP_SUFFIX}"
    try:
        found = list(root.rglob(pattern) if recursive else root.glob(pattern))
    except OSError:
        return []
    removed = []
    for tmp in found:
        if tmp.is_file() and not tmp.is_symlink() and writer_gone(tmp):
            with suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    for parent in {tmp.parent for tmp in removed}:
        fsync_dir(parent)
    if removed:
        log.info("removed %d temporary file(s) of an interrupted save in %s", len(removed), root)
    return removed


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename or removal in ``directory`` durable (a no-op where folders cannot be opened or fsynced)."""
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write ``path`` all or nothing: yield a file open for writing (``"wb"`` binary, ``"w"`` UTF-8 text) on a
    temporary file beside ``path``, then fsync, rename over ``path`` and fsync the folder. On any failure the
    temporary file is deleted, ``path`` is left as it was and the write's own error is raised (see the module
    docstring)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode {mode!r} is not 'wb' or 'w'")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, fd = _temporary_beside(path)
    except OSError as err:
        raise explained(err, path) from err
    raw = _RawFile(fd, "wb")
    handle: IO[Any] = io.BufferedWriter(raw, _BUFFER)
    if mode == "w":
        handle = io.TextIOWrapper(handle, encoding="utf-8")  # type: ignore[arg-type]
    try:
        yield handle
        handle.flush()
        os.fsync(fd)
        handle.close()
        os.replace(tmp, path)
    except BaseException as exc:
        raw.discard = True
        with suppress(Exception):
            handle.close()
        with suppress(OSError):
            os.unlink(tmp)
        cause = exc if isinstance(exc, OSError) else raw.error
        if cause is None or not isinstance(exc, Exception):  # not a write error, or Ctrl-C: as it is
            raise
        reported = explained(cause, path)
        if reported is exc:
            raise
        if reported is cause:  # the write's own error, hidden by the serialiser's (Python breaks the cycle)
            raise cause  # noqa: B904 (its context is set to the serialiser's error)
        raise reported from exc
    fsync_dir(path.parent)


def write_bytes(path: str | os.PathLike, data: bytes | bytearray | memoryview) -> Path:
    """``path`` holds ``data``, written atomically (``atomic_write``)."""
    with atomic_write(path) as f:
        f.write(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``path`` holds ``text`` (UTF-8), written atomically (``atomic_write``)."""
    with atomic_write(path, "w") as f:
        f.write(text)
    return Path(path)


# ---------------------------------------------------------------------------------------------- checkpoints


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` for local paths, with ``torch.save`` streaming into a temporary file in
    the checkpoint's own folder (fsync, rename): a full disk leaves the previous ``last.ckpt`` loadable, no
    temporary file behind, and the ENOSPC error is the one reported. Lightning's own writes into a
    ``BytesIO`` (the whole checkpoint in host memory once more), then through fsspec into a temporary file in
    the system temp folder that is moved into place, a copy when that is another filesystem. Remote (fsspec
    URL) paths are left to Lightning."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_write(path) as f:
            torch.save(checkpoint, f)

    def remove_checkpoint(self, path: _PATH) -> None:
        """Remove the checkpoint (a file, a link or a folder) and any temporary file a killed save of it left."""
        if not _is_local_file_protocol(path):
            super().remove_checkpoint(path)
            return
        target = Path(path)
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink(missing_ok=True)
        remove_leftovers(target.parent, name=target.name)
        fsync_dir(target.parent)
        log.debug("Removed checkpoint: %s", path)


def install_checkpoint_io(strategy: Any) -> bool:
    """Make ``strategy`` save checkpoints with ``AtomicCheckpointIO`` where it would use Lightning's default
    ``TorchCheckpointIO`` (also inside a wrapper such as ``AsyncCheckpointIO``); a plugin of the user's own is
    kept. Whether it was installed."""
    current = strategy.checkpoint_io  # Lightning creates its default here, inside a wrapper too
    if type(current) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()
        return True
    while isinstance(current, _WrappingCheckpointIO):
        inner = current.checkpoint_io
        if type(inner) is TorchCheckpointIO:
            # The public setter keeps a base plugin once one is configured, so the wrapped one is replaced here.
            current._checkpoint_io = AtomicCheckpointIO()
            current._base_checkpoint_io_configured = True
            return True
        current = inner
    return False
