"""Text files users write (captions, prompt files): decoded as UTF-8 (a BOM is dropped) or, when they start with
a UTF-16 / UTF-32 byte-order mark, as what the mark says. Anything else that is not text raises
``UndecodableText`` saying what and where (the byte offset), for a message naming the file."""

from __future__ import annotations

import codecs
from pathlib import Path

_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
          (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))  # UTF-32 LE starts like UTF-16 LE


class UndecodableText(ValueError):
    """The bytes are not text in the encoding their byte-order mark (or its absence: UTF-8) says."""


def decode_text(data: bytes) -> str:
    """``data`` as text: by its byte-order mark, else UTF-8."""
    encoding = next((name for mark, name in _MARKS if data.startswith(mark)), "utf-8")
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as err:
        bad = err.object[err.start:err.start + 1].hex()
        name = encoding.upper().replace("-SIG", "")
        raise UndecodableText(f"not {name} text (byte 0x{bad} at offset {err.start}: {err.reason}); re-save it as "
                              "UTF-8") from None
    if "\x00" in text:
        raise UndecodableText(f"holds a NUL byte at offset {data.index(0)} (UTF-16 without a byte-order mark?); "
                              "re-save it as UTF-8")
    return text


def read_text(path: str | Path) -> str:
    return decode_text(Path(path).read_bytes())
