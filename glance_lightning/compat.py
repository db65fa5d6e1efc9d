"""Third-party work-arounds, each applied explicitly where needed (never at import time)."""

from __future__ import annotations

__all__ = ["allow_qwen2vl_processor_without_torchvision"]


def allow_qwen2vl_processor_without_torchvision() -> None:
    """Let ``Qwen2VLProcessor`` and ``Qwen3VLProcessor`` be built and loaded without a video processor when
    torchvision is missing.

    transformers 5 makes the video processor a required part of both, and the video processor needs
    torchvision; so without torchvision no Qwen2-VL / Qwen3-VL processor, tiny or real, can be built or loaded,
    although the Qwen-Image-Edit and Qwen-Image 2.x pipelines only pass images. This drops ``video_processor`` from
    the processors' sub-processors in that case only. Idempotent; a no-op when torchvision is installed.
    """
    from transformers import Qwen2VLProcessor, Qwen3VLProcessor
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        return
    for processor in (Qwen2VLProcessor, Qwen3VLProcessor):
        if getattr(processor, "_glance_without_video", False):
            continue
        get_attributes = processor.get_attributes.__func__

        def without_video(cls: type, get_attributes=get_attributes) -> list[str]:
            return [name for name in get_attributes(cls) if name != "video_processor"]

        processor.get_attributes = classmethod(without_video)
        processor._glance_without_video = True
