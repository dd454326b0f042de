"""TRL's vision preference layout and the chat messages a prompt is rendered from.

TRL's ``DPOTrainer`` reads vision preference data as ``images`` (a list; ``image`` for one) plus ``prompt`` /
``chosen`` / ``rejected`` that are either plain strings or conversations (lists of ``{"role", "content"}`` messages
whose ``content`` is a string or a list of ``{"type": "image"}`` / ``{"type": "text", "text": ...}`` parts)::

    {"images": [<PIL>], "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "..."}]}],
     "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "..."}]}],
     "rejected": [{"role": "assistant", "content": "..."}]}

A record of this layout keeps a conversational prompt as its messages (``PreferenceRecord.prompt`` is then a list,
system turns and earlier turns included) and the responses as their text. :func:`prompt_messages` builds the user
turn(s) the collator renders with the processor's chat template: one ``{"type": "image"}`` part per image, placed
where the conversation has its image parts, or at the start of the first user turn when it has none.
"""
from __future__ import annotations

import copy
from typing import Any, List, Mapping, Optional, Sequence

from vpo.data.records import BAD_FIELD, MISSING_FIELD, SkipRecord


def is_conversation(value: Any) -> bool:
    """Whether ``value`` looks like a list of chat messages (``[{"role": ..., "content": ...}, ...]``)."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(m, Mapping) and "role" in m for m in value)


def _parts(content: Any, where: str) -> List[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, (list, tuple)):
        raise SkipRecord(BAD_FIELD, f"{where}: content must be a string or a list of parts, got "
                                    f"{type(content).__name__}")
    out = []
    for k, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") not in ("text", "image"):
            raise SkipRecord(BAD_FIELD, f"{where}: content[{k}] must be {{'type': 'text', 'text': ...}} or "
                                        f"{{'type': 'image'}}, got {part!r:.80}")
        if part["type"] == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise SkipRecord(BAD_FIELD, f"{where}: content[{k}]['text'] must be a string")
            out.append({"type": "text", "text": text})
        else:
            out.append({"type": "image"})
    return out


def normalize_messages(messages: Sequence[Mapping], name: str) -> List[dict]:
    """``[{"role", "content": [parts]}]`` with string contents turned into one text part; bad shapes skip the
    record (``bad_field``)."""
    out = []
    for i, m in enumerate(messages):
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise SkipRecord(BAD_FIELD, f"{name}[{i}]: role must be system, user or assistant, got {role!r}")
        out.append({"role": role, "content": _parts(m.get("content"), f"{name}[{i}]")})
    return out


def message_text(messages: List[dict]) -> str:
    """The text parts of ``messages`` joined (what a conversational response says)."""
    return "".join(p["text"] for m in messages for p in m["content"] if p["type"] == "text")


def response_text(value: Any, name: str) -> str:
    """A response given as a string or as assistant message(s) -> its text."""
    if isinstance(value, str):
        text = value
    elif is_conversation(value):
        msgs = normalize_messages(value, name)
        if any(m["role"] != "assistant" for m in msgs):
            raise SkipRecord(BAD_FIELD, f"field {name!r}: a conversational response holds assistant messages only")
        text = message_text(msgs)
    elif value is None:
        raise SkipRecord(MISSING_FIELD, f"missing field {name!r}")
    else:
        raise SkipRecord(BAD_FIELD, f"field {name!r} must be a string or assistant messages, got "
                                    f"{type(value).__name__}")
    if not text.strip():
        raise SkipRecord(MISSING_FIELD, f"missing field {name!r} (empty)")
    return text


def prompt_value(value: Any) -> Any:
    """A prompt as a string or as normalized messages (the last one a user turn)."""
    if isinstance(value, str):
        if not value.strip():
            raise SkipRecord(MISSING_FIELD, "missing field 'prompt' (empty)")
        return value
    if value is None:
        raise SkipRecord(MISSING_FIELD, "missing field 'prompt'")
    if not is_conversation(value):
        raise SkipRecord(BAD_FIELD, f"field 'prompt' must be a string or a list of messages, got "
                                    f"{type(value).__name__}")
    msgs = normalize_messages(value, "prompt")
    if msgs[-1]["role"] != "user":
        raise SkipRecord(BAD_FIELD, "field 'prompt': the conversation must end with a user turn")
    return msgs


def images_of(row: Mapping) -> Any:
    """``images`` (a list) or ``image`` of a TRL row: one image, or a list of two or more."""
    value = row.get("images")
    if value is None:
        value = row.get("image")
    elif not isinstance(value, (list, tuple)):
        raise SkipRecord(BAD_FIELD, f"field 'images' must be a list, got {type(value).__name__}")
    else:
        value = list(value)
        if any(_empty(v) for v in value):
            raise SkipRecord(MISSING_FIELD, "field 'images' holds an empty image")
        if len(value) == 1:
            value = value[0]
    if value is None or (isinstance(value, list) and not value) or _empty(value):
        raise SkipRecord(MISSING_FIELD, "missing field 'images' (or 'image')")
    return value


def _empty(v: Any) -> bool:
    if v is None or (isinstance(v, str) and not v.strip()):
        return True
    return isinstance(v, Mapping) and v.get("bytes") is None and not v.get("path")


def prompt_messages(prompt: Any, num_images: int, *, scrub=None) -> List[dict]:
    """The conversation to render for ``prompt`` with ``num_images`` images (0: the image-free pass).

    Args:
        prompt: a string (-> one user turn: the image parts, then the text) or normalized messages.
        num_images: image parts the conversation must hold; a conversation with image parts must hold exactly
            this many (else ``bad_field``); one without gets them at the start of its first user turn. With 0,
            every image part is removed.
        scrub: a function applied to every text part (the collator removes special-token strings with it).
    """
    if isinstance(prompt, str):
        msgs = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    else:
        msgs = copy.deepcopy(list(prompt))
    if scrub is not None:
        for m in msgs:
            for p in m["content"]:
                if p["type"] == "text":
                    p["text"] = scrub(p["text"])
    have = sum(p["type"] == "image" for m in msgs for p in m["content"])
    if num_images == 0:
        for m in msgs:
            m["content"] = [p for p in m["content"] if p["type"] != "image"]
        return msgs
    if have == 0:
        first = next(m for m in msgs if m["role"] == "user")
        first["content"] = [{"type": "image"} for _ in range(num_images)] + first["content"]
    elif have != num_images:
        raise SkipRecord(BAD_FIELD, f"the prompt has {have} image parts but the example has {num_images} images")
    return msgs


def with_response(msgs: List[dict], response: Optional[str]) -> List[dict]:
    """``msgs`` plus the assistant turn ``response`` (unchanged when None)."""
    if response is None:
        return msgs
    return msgs + [{"role": "assistant", "content": [{"type": "text", "text": response}]}]


_TRL_FIELDS = ("id", "images", "image", "prompt", "chosen", "rejected")


def record_trl(row: Mapping, default_id: str, base_dir: Optional[str]):
    """A :class:`~vpo.data.PreferenceRecord` from a row of TRL's vision preference layout (module docstring).

    Several images become a list in ``record.image``; a conversational prompt stays messages in ``record.prompt``;
    every other column goes to ``record.extra``.
    """
    from vpo.data.records import PreferenceRecord, resolve_image

    image = images_of(row)
    prompt = prompt_value(row.get("prompt"))
    chosen = response_text(row.get("chosen"), "chosen")
    rejected = response_text(row.get("rejected"), "rejected")
    if isinstance(image, list):
        image = [resolve_image(x, base_dir) for x in image]
        if not isinstance(prompt, str):
            prompt_messages(prompt, len(image))  # the image-part count must match: skip now, not in the collator
    else:
        image = resolve_image(image, base_dir)
    rid = row.get("id")
    return PreferenceRecord(
        id=str(rid) if rid is not None and rid != "" else default_id,
        image=image, prompt=prompt, chosen=chosen, rejected=rejected,
        extra={k: v for k, v in row.items() if k not in _TRL_FIELDS},
    )
