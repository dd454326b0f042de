"""Images of preference records: every form a record may hold (path, data URI, bytes, ``datasets.Image`` cell, PIL)
resolved against an image root and opened as a decoded RGB PIL image."""
from __future__ import annotations

import base64
import binascii
import io
import os
from typing import Any, Mapping, Optional


class UnreadableImageError(OSError):
    """An image could not be opened or decoded (:func:`load_image`)."""


def resolve_image(spec: Any, base_dir: Optional[str]) -> Any:
    """Make a relative image path absolute against ``base_dir`` (other forms are returned unchanged).

    A ``{"bytes": None, "path": p}`` dict (a ``datasets`` Image cell without bytes) is resolved to its path.
    """
    if isinstance(spec, Mapping):
        if spec.get("bytes") is None and isinstance(spec.get("path"), str):
            spec = spec["path"]
        else:
            return spec
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        if s.startswith("data:") or os.path.isabs(s) or base_dir is None:
            return s
        return os.path.join(base_dir, s)
    return spec


def load_image(spec: Any):
    """Open an image given in any of the forms :class:`PreferenceRecord` accepts; returns a decoded RGB PIL image.

    Raises:
        UnreadableImageError: the path does not exist, the bytes are not an image, the file is truncated, ...
    """
    from PIL import Image

    try:
        if isinstance(spec, Image.Image):
            img = spec
        else:
            if isinstance(spec, Mapping):
                data = spec.get("bytes")
                if data is None:
                    spec = spec.get("path")
                elif isinstance(data, str):
                    spec = base64.b64decode(data, validate=True)
                else:
                    spec = data
            if isinstance(spec, (bytes, bytearray, memoryview)):
                img = Image.open(io.BytesIO(bytes(spec)))
            elif isinstance(spec, (str, os.PathLike)):
                s = os.fspath(spec)
                if s.startswith("data:"):
                    head, _, payload = s.partition(",")
                    if ";base64" not in head:
                        raise UnreadableImageError(f"only base64 data URIs are supported, got {head!r}")
                    img = Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
                else:
                    img = Image.open(s)
            else:
                raise UnreadableImageError(f"cannot open an image from a {type(spec).__name__}")
        img.load()  # decode now: a truncated or corrupt file fails here, not inside the processor
        return img.convert("RGB")
    except UnreadableImageError:
        raise
    except (OSError, ValueError, binascii.Error, SyntaxError) as e:  # PIL raises these for bad files
        raise UnreadableImageError(f"cannot open image {_describe(spec)}: {e}") from e


def _describe(spec: Any) -> str:
    if isinstance(spec, (str, os.PathLike)):
        s = os.fspath(spec)
        return repr(s if len(s) < 120 else s[:117] + "...")
    return f"<{type(spec).__name__}>"
