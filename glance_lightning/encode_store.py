"""The on-disk cache of encoded prompts and latents, so a second run on the same data never loads a text encoder.

An entry is one safetensors file named by the SHA-256 of what determines it: the model's identity (its name, hub
commit and the encoder/VAE files' names, sizes and times), the family and its encoding options (e.g.
``max_sequence_length``, control resolutions), the dtype, the kind of entry ("latents" or "condition") and its
content (the prompt text, the SHA-256 of the image and control pixels). The key is stored in the file too and
checked on reading: a stale, truncated or corrupt entry is reported, deleted and rebuilt, never used. Writes go to
a temporary file in the same folder, then a rename; the temporary files of a run killed while writing are removed
when the cache is next opened (``glance_lightning.atomic.remove_leftovers``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from glance_lightning.atomic import remove_leftovers
from glance_lightning.lora_io import atomic_save_safetensors

log = logging.getLogger(__name__)
KEY_METADATA = "glance_encode_key"


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
        remove_leftovers(self.root)  # entries a killed run was writing (a read-only cache is left as it is)

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
            log.warning("glance_lightning: encode cache entry %s is unusable (%s); rebuilding it", path, err)
            path.unlink(missing_ok=True)
            self.rebuilt += 1
            return None
        self.hits += 1
        return tensors

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        atomic_save_safetensors(tensors, self._path(key), {KEY_METADATA: key})
