"""The on-disk cache of encoded prompts and latents, so a second run on the same data never loads a text encoder.

An entry is one safetensors file named by the SHA-256 of what determines it: the model's identity (its name, hub
commit and the encoder/VAE files' names, sizes and times), the family and its encoding options (e.g.
``max_sequence_length``, control resolutions), the dtype, the kind of entry ("latents" or "condition") and its
content (the prompt text, the SHA-256 of the image and control pixels). The key is stored in the file too and
checked on reading: a stale, truncated or corrupt entry is reported, deleted and rebuilt, never used. Writes go to
a temporary file in the same folder, then a rename; the temporary files of a run killed while writing are removed
when the cache is next opened (``glance_lightning.atomic.remove_leftovers``).

A folder that cannot be written (read-only mount, no permission) is still read: valid entries are used, the others
are encoded in memory and not saved, said in one line; a cache path that names a file is a one-line error.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from glance_lightning import console
from glance_lightning.atomic import remove_leftovers
from glance_lightning.lora_io import atomic_save_safetensors
from glance_lightning.run_folder import check_cache_folder, folder_writable

log = logging.getLogger(__name__)
KEY_METADATA = "glance_encode_key"
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's shape, dtype and bytes."""
    data = tensor.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(data.shape)}:{data.dtype}".encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


class EncodeStore:
    """Entries under ``root``, all sharing ``context`` (model identity, family options, dtype)."""

    def __init__(self, root: str | Path, context: dict[str, Any]) -> None:
        self.root = Path(root).expanduser()
        self.context = context
        self.hits = self.misses = self.rebuilt = 0
        check_cache_folder(self.root, "model.encode_cache")
        self.read_only = not folder_writable(self.root)
        if self.read_only:
            self._say_read_only()
        else:
            remove_leftovers(self.root)  # entries a killed run was writing

    def key(self, kind: str, **content: Any) -> str:
        return json.dumps({**self.context, "kind": kind, **content}, sort_keys=True, default=str)

    def _path(self, key: str) -> Path:
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()}.safetensors"

    def has(self, key: str) -> bool:
        """Whether a readable entry for ``key`` exists (its header is parsed and its key compared; a truncated or
        stale file counts as missing, so the encoders that rebuild it get loaded)."""
        path = self._path(key)
        try:
            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}).get(KEY_METADATA) == key
        except Exception:  # missing, truncated or foreign
            return False

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry's tensors, or None if it is missing, stale or unreadable (then it is deleted)."""
        path = self._path(key)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get(KEY_METADATA) != key:
                    raise ValueError("it was written for other inputs")
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no iter)
        except Exception as err:  # a truncated or foreign file: rebuild, never use
            self.rebuilt += 1
            if self.read_only:
                log.info("glance_lightning: encode cache entry %s is unusable (%s); encoded again", path, err)
                return None
            log.warning("glance_lightning: encode cache entry %s is unusable (%s); rebuilding it", path, err)
            try:
                path.unlink(missing_ok=True)
            except OSError as unlink_err:
                self._note_write_failure(unlink_err)
            return None
        self.hits += 1
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        """Save an entry; in a folder that cannot be written, nothing (the caller keeps it in memory)."""
        if self.read_only:
            return
        try:
            atomic_save_safetensors(tensors, self._path(key), {KEY_METADATA: key})
        except OSError as err:
            self._note_write_failure(err)

    def _note_write_failure(self, err: OSError) -> None:
        if err.errno not in _READ_ONLY:
            raise err
        self.read_only = True
        self._say_read_only()

    def _say_read_only(self) -> None:
        console.info(f"encode cache {self.root} is read-only: its valid entries are used, anything else is encoded "
                     "in memory and not saved; make it writable or set model.encode_cache to another folder")
