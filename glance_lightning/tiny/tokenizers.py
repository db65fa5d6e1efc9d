"""The tiny models' tokenizers, generated here rather than downloaded: CLIP and T5 (FLUX, SD3), Qwen2 and the
Qwen2-VL processor (the Qwen-Image families).

Prompts: CLIP 77 tokens, T5 up to 512, Qwen up to 1024 after the system prompt, which the tiny Qwen tokenizer
splits into exactly the 34/64 tokens the pipelines drop (byte-level BPE trained here on the system prompts).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from functools import lru_cache

from tokenizers import AddedToken
from transformers import CLIPTokenizer, Qwen2Tokenizer, Qwen2VLImageProcessorPil, Qwen2VLProcessor, T5TokenizerFast

from glance_lightning.compat import allow_qwen2vl_processor_without_torchvision

CLIP_MAX_LENGTH = 77  # the FLUX/SD3 pipelines pad CLIP prompts to tokenizer.model_max_length
T5_MAX_LENGTH = 512  # the pipelines' upper bound for max_sequence_length
QWEN_MIN_PIXELS = 56 * 56  # the real Qwen2-VL image processor minimum
QWEN_MAX_PIXELS = 112 * 112  # tiny budget: a control image becomes at most 8x8 patches = 16 vision tokens

# The system prompts of the Qwen-Image pipelines (diffusers 0.42). The tiny tokenizer has one token per word
# of these, like the real one, so `prompt_template_encode_start_idx` (34 for Qwen-Image, 64 for the edit
# pipelines) drops exactly the system prompt, as with the real checkpoints.
_QWEN_TEMPLATE_TEXTS = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:",
    "system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a "
    "new image that meets the user's requirements while maintaining consistency with the original input "
    "where appropriate.",
    "\nuser\nPicture 1: \nassistant\n",
)
_QWEN_SPECIAL_TOKENS = (  # Qwen2-VL's added tokens, in their real order
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)


@lru_cache(maxsize=1)
def _byte_symbols() -> tuple[str, ...]:
    """The printable characters byte-level BPE uses for the bytes 0..255 (GPT-2's ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]
    by_byte = {b: b for b in printable} | {b: 256 + i for i, b in enumerate(others)}
    return tuple(chr(by_byte[b]) for b in range(256))


def clip_tokenizer() -> CLIPTokenizer:
    """CLIP byte-level BPE without merges: the 256 byte symbols, their ``</w>`` forms, then BOS and EOS."""
    symbols = list(_byte_symbols())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def t5_tokenizer() -> T5TokenizerFast:
    """T5 Unigram over printable ASCII: each character alone and after the word-start marker."""
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _train_bpe(words: Iterable[str]) -> list[tuple[str, str]]:
    """Deterministic BPE merges after which each of ``words`` (byte-level symbols) is a single token."""
    counts = Counter(words)
    splits = {word: list(word) for word in counts}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, parts in splits.items():
            for pair in zip(parts, parts[1:], strict=False):
                pairs[pair] += counts[word]
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for parts in splits.values():
            i = 0
            while i < len(parts) - 1:
                if (parts[i], parts[i + 1]) == best:
                    parts[i : i + 2] = [parts[i] + parts[i + 1]]
                i += 1


def qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen2 byte-level BPE: byte symbols, a token per word of the pipelines' system prompts, then the
    Qwen2-VL special tokens (so ``<|image_pad|>`` etc. are single tokens the processor can expand)."""
    pretokenizer = Qwen2Tokenizer().backend_tokenizer.pre_tokenizer
    words = [word for text in _QWEN_TEMPLATE_TEXTS for word, _ in pretokenizer.pre_tokenize_str(text)]
    merges = _train_bpe(words)
    tokens = [*_byte_symbols(), *(left + right for left, right in merges), *_QWEN_SPECIAL_TOKENS]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", model_max_length=32768)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN_SPECIAL_TOKENS])
    return tokenizer


def qwen_processor(tokenizer: Qwen2Tokenizer) -> Qwen2VLProcessor:
    """Qwen2-VL processor: the tokenizer plus the (torchvision-free) Qwen2-VL image processor."""
    allow_qwen2vl_processor_without_torchvision()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)
