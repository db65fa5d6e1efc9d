"""What ``pretrained_model`` (and a ``transformer`` override) names, and loading a family's pipeline in stages.

A name is a local diffusers folder (with ``model_index.json``), ``tiny:<family>`` (a tiny model built locally
once by ``glance_lightning.tiny``, imported only for such names) or a Hugging Face repo id, ``org/name`` or
``org/name@revision``, resolved through huggingface_hub and its cache (``HF_HOME`` / ``HF_HUB_CACHE``; with
``HF_HUB_OFFLINE=1`` the cache only; tokens as huggingface_hub finds them), downloading only the components the
run needs. Every failure is a ``ModelNotFoundError`` naming the setting, the name and the fix, raised before
anything is loaded.

Loading is staged so host memory holds one large component at a time: ``load_pipeline`` opens the pipeline
without its transformer (and optionally without its text encoders), ``load_transformer`` adds the transformer
later, from the model folder, another diffusers folder, or a single-file checkpoint (ComfyUI / original key
layouts, through diffusers' single-file loaders).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glance_lightning.errors import MissingFileError
from glance_lightning.registry import FamilySpec

TINY_PREFIX = "tiny:"
CACHE_ENV = "GLANCE_LIGHTNING_CACHE"
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
_LARGEST_CHECKED_JSON = 64 * 2**20  # bytes: a component's json files up to this size are parsed before loading


class ModelNotFoundError(MissingFileError):
    """A model name names nothing that can be opened; the message says what to give instead."""


def is_tiny(name: str) -> bool:
    """Whether ``name`` names a tiny model (``tiny:<family>``)."""
    return name.startswith(TINY_PREFIX)


def cache_dir() -> Path:
    """glance_lightning's cache root: ``$GLANCE_LIGHTNING_CACHE``, else ``~/.cache/glance_lightning``."""
    from glance_lightning.run_folder import check_cache_folder

    root = os.environ.get(CACHE_ENV)
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "glance_lightning"
    if root:
        check_cache_folder(path, CACHE_ENV, f"point {CACHE_ENV} at a folder, or unset it for ~/.cache/glance_lightning")
    else:
        check_cache_folder(path, "glance_lightning's cache folder", f"move that file, or set {CACHE_ENV} to a folder")
    return path


@dataclass(frozen=True)
class ResolvedModel:
    """A model name and the local folder ``from_pretrained`` opens for it."""

    name: str
    path: str
    revision: str | None = None  # the hub commit, for hub ids

    def fingerprint(self, components: Iterable[str]) -> str:
        """Identity of the given components' files (names, sizes, modification times; the hub commit), so a
        cache keyed by it goes stale when the weights change."""
        entries = [self.name, self.revision or ""]
        root = Path(self.path)
        for component in sorted(components):
            folder = root / component
            if not folder.is_dir():
                continue
            for file in sorted(folder.rglob("*")):
                if file.is_file():
                    stat = file.stat()
                    entries.append(f"{file.relative_to(root)}:{stat.st_size}:{stat.st_mtime_ns}")
        return hashlib.sha256("\n".join(entries).encode()).hexdigest()[:32]

    def components(self) -> dict[str, tuple[str, str]]:
        """The pipeline's components as ``model_index.json`` declares them: name -> (library, class)."""
        return _declared_components(read_json(Path(self.path) / "model_index.json"))


def _declared_components(index: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """Components a ``model_index.json`` declares (entries like ``[null, null]`` are optional ones left out)."""
    return {k: tuple(v) for k, v in index.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and v[0]}


def read_json(path: Path, setting: str = "model.pretrained_model", fix: str = "") -> dict[str, Any]:
    """A model folder's json file as a dict, or a ``ModelNotFoundError`` naming the file, what is wrong with it
    and ``fix`` (a truncated download, a hand edit)."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        problem = f"is not UTF-8 text (byte {err.start})"
    except json.JSONDecodeError as err:
        problem = f"is not valid JSON ({err.msg}: line {err.lineno} column {err.colno})"
    except OSError as err:
        problem = f"cannot be read ({err.strerror or err})"
    else:
        if isinstance(value, dict):
            return value
        problem = f"holds a JSON {type(value).__name__}, not an object"
    fix = fix or "the download is incomplete or the file was edited; download the model again or restore the file"
    raise ModelNotFoundError(f"{setting}: {path} {problem}; {fix}")


def check_model_files(model: ResolvedModel, setting: str = "model.pretrained_model",
                      skip: Iterable[str] = (), fix: str = "") -> None:
    """Before anything is loaded: ``model_index.json`` and every json file of the declared components (configs,
    scheduler and tokenizer files) parse, and every declared component's folder exists."""
    root = Path(model.path)
    for component in _declared_components(read_json(root / "model_index.json", setting, fix)):
        folder = root / component
        if component in skip:
            continue
        if not folder.is_dir():
            raise ModelNotFoundError(f"{setting}: {root / 'model_index.json'} declares the component {component!r} "
                                     f"but {folder} is missing; {fix or 'download the model completely'}")
        for file in sorted(folder.glob("*.json")):
            if file.is_file() and file.stat().st_size <= _LARGEST_CHECKED_JSON:
                read_json(file, setting, fix)


def is_hub_id(name: str) -> bool:
    return bool(_REPO_ID.match(name)) and not Path(name).expanduser().exists()


def resolve_pretrained(name: str, setting: str = "model.pretrained_model",
                       skip: Iterable[str] = ()) -> ResolvedModel:
    """Resolve ``name`` to a local folder (building a ``tiny:`` model, or fetching a hub id's components but
    those in ``skip``)."""
    if is_tiny(name):
        from glance_lightning.tiny import tiny_model_path

        return ResolvedModel(name, tiny_model_path(name))
    if is_hub_id(name):
        return _resolve_hub(name, setting, tuple(skip))
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{setting}={name!r}: no such directory; give a local diffusers model folder (with "
            "model_index.json), a Hugging Face repo id such as black-forest-labs/FLUX.1-dev, or tiny:<family>"
        )
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"{setting}={name!r}: {path} has no model_index.json; give the diffusers model's root folder"
        )
    resolved = ResolvedModel(name, str(path))
    check_model_files(resolved, setting, skip)
    return resolved


def _redownload(repo: str) -> str:
    return (f"the cached download is incomplete or damaged; download it again (`hf download {repo} "
            "--force-download`) with network access")


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it once, at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE if value is None else value.upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache() -> str | None:
    """HF_HUB_CACHE / HF_HOME as set now (None: huggingface_hub's own default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return str(Path(os.environ["HF_HOME"]) / "hub") if os.environ.get("HF_HOME") else None


def _resolve_hub(name: str, setting: str, skip: tuple[str, ...]) -> ResolvedModel:
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, _, revision = name.partition("@")
    offline, cache = hub_offline(), hub_cache()
    common = {"revision": revision or None, "cache_dir": cache, "local_files_only": offline}
    try:
        index = Path(hf_hub_download(repo, "model_index.json", **common))
        wanted = [c for c in _declared_components(read_json(index, setting, _redownload(repo))) if c not in skip]
        path = Path(snapshot_download(repo, allow_patterns=["model_index.json", *(f"{c}/*" for c in wanted)],
                                      **common))
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{setting}={name!r} is a gated repository: accept its licence on its Hugging Face page, then log in "
            "(`hf auth login`) or set HF_TOKEN"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"{setting}={name!r}: the repository has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"{setting}={name!r}: no such repository on the Hugging Face Hub (or it is private and no token is "
            "set); check the id, or give a local diffusers folder"
        ) from None
    except LocalEntryNotFoundError:
        where = "HF_HUB_OFFLINE=1 and it is not in the cache" if offline else "the Hub cannot be reached"
        raise ModelNotFoundError(
            f"{setting}={name!r}: {where} ({cache or 'the default Hugging Face cache'}); download it first "
            f"(`hf download {repo}`) with network access, or give a local diffusers folder"
        ) from None
    missing = [c for c in wanted if not (path / c).is_dir()]
    if missing:
        raise ModelNotFoundError(
            f"{setting}={name!r}: the cached snapshot {path} lacks {', '.join(missing)}; download it completely "
            f"(`hf download {repo}`) with network access"
        )
    resolved = ResolvedModel(name, str(path), revision=path.name)
    check_model_files(resolved, setting, skip, _redownload(repo))
    return resolved


def _allow_processor_without_torchvision(pipeline_class: type) -> None:
    if "processor" in inspect.signature(pipeline_class.__init__).parameters:
        from glance_lightning.compat import allow_qwen2vl_processor_without_torchvision

        allow_qwen2vl_processor_without_torchvision()  # the edit pipelines' Qwen2-VL processor


def load_pipeline(spec: FamilySpec, model: ResolvedModel, dtype: torch.dtype, skip: Iterable[str] = ()) -> Any:
    """The family's pipeline from ``model`` without the components in ``skip`` (left None), progress bars off."""
    pipeline_class = spec.pipeline_class()
    _allow_processor_without_torchvision(pipeline_class)
    present = model.components()
    pipe = pipeline_class.from_pretrained(model.path, dtype=dtype, **{c: None for c in skip if c in present})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_model_family(model: ResolvedModel, spec: FamilySpec, setting: str = "model.pretrained_model") -> None:
    """Before loading: refuse a model whose ``model_index.json`` declares another family's pipeline or a
    transformer class other than the family's."""
    from glance_lightning.registry import family_names, get_family

    index = read_json(Path(model.path) / "model_index.json", setting)
    declared, own = index.get("_class_name"), spec.pipeline_name
    if declared == own:
        return
    others = [n for n in family_names() if get_family(n).pipeline_name == declared]
    expected = annotated_transformer(spec)
    found = _declared_components(index).get("transformer", (None, None))[1]
    if others or (expected and found and found != expected):
        what = f"a {others[0]} model" if others else f"a {declared} with a {found}"
        module = get_family(others[0]).module if others else None
        hint = f"for it, set model.class_path: {module.replace(':', '.')}; or " if isinstance(module, str) else ""
        raise ModelNotFoundError(f"{setting}={model.name!r} is {what} ({declared}), not {spec.name} ({own}); "
                                 f"{hint}give a {spec.name} model")


def annotated_transformer(spec: FamilySpec) -> str | None:
    """The transformer class the family's pipeline declares in its constructor."""
    parameter = inspect.signature(spec.pipeline_class().__init__).parameters.get("transformer")
    annotation = getattr(parameter, "annotation", None)
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", None)


def transformer_module_names(model: ResolvedModel, override: str | None = None) -> set[str]:
    """Names of the transformer's modules, from its config on the meta device (no weights read)."""
    cls = transformer_class(model)
    folder = Path(override).expanduser() if override and Path(override).expanduser().is_dir() else None
    config = cls.load_config(str(folder)) if folder else cls.load_config(model.path, subfolder="transformer")
    with torch.device("meta"):
        transformer = cls.from_config(config)
    return {name for name, _ in transformer.named_modules() if name}


def transformer_class(model: ResolvedModel) -> type:
    library, class_name = model.components()["transformer"]
    return getattr(importlib.import_module(library), class_name)


def load_transformer(model: ResolvedModel, dtype: torch.dtype, quantization: Any = None,
                     override: str | None = None, device: str | None = None) -> torch.nn.Module:
    """The pipeline's transformer: from ``model``, or ``override`` (a diffusers transformer folder or a single-file
    checkpoint, read with the model's own transformer config). ``device``: a diffusers folder is read straight onto
    it (``device_map``: no full copy in host memory, no second copy to the device)."""
    cls = transformer_class(model)
    placed = {"device_map": device} if device else {}
    if override is None:
        return cls.from_pretrained(model.path, subfolder="transformer", torch_dtype=dtype,
                                   quantization_config=quantization, **placed)
    path = Path(override).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model.transformer={override!r}: {path} has no config.json; give a diffusers "
                                     "transformer folder or a single .safetensors checkpoint")
        return cls.from_pretrained(str(path), torch_dtype=dtype, quantization_config=quantization, **placed)
    if not path.is_file() or path.suffix not in _WEIGHT_SUFFIXES:
        raise ModelNotFoundError(f"model.transformer={override!r}: no such folder or checkpoint file "
                                 f"({', '.join(_WEIGHT_SUFFIXES)}); give a diffusers transformer folder or one file")
    if not hasattr(cls, "from_single_file"):
        raise ModelNotFoundError(f"model.transformer={override!r}: diffusers cannot read {cls.__name__} from a single "
                                 "file; give a diffusers transformer folder")
    return cls.from_single_file(str(path), config=model.path, subfolder="transformer", torch_dtype=dtype,
                                quantization_config=quantization, local_files_only=True)
