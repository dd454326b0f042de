"""Pictures: per-token rewards of a response (HTML and PNG, like TPO's Figure 1) and training curves (PNG).

Token values are drawn on a diverging scale around ``center``: TPO's calibrated reward ``c = a + σ(±s)`` is 1 where
the token's logit does not depend on the image (``s = 0``), above 1 for visually anchored chosen tokens; Cat-PO's
weight ``w = λ_ref + T`` is 1 at ``T = 0.5`` with the default ``λ_ref = 0.5``. So ``center = 1`` suits both: tokens
above it are blue, below it red, at it white. The scale is symmetric around ``center`` (half-width = the largest
``|value - center|``) unless ``vmin`` / ``vmax`` are given; values outside are clipped to the end colors; a non-finite
value is drawn gray.

Several responses (e.g. the chosen and the rejected one, or before and after training) go into one picture: pass a
list of token lists, a list of value lists and ``labels``. ``image`` (a PIL image or a path) puts the image the
responses are about into the picture, and ``notes`` (lines such as ``"* = hallucinated word"``) go into the legend;
the HTML page and the PNG show the same image and the same legend (:func:`legend_text`).

Matplotlib (the ``Agg`` backend, no display needed) is imported only by the PNG functions.

Example:
    >>> from vpo.visualize import token_rewards_html
    >>> page = token_rewards_html(["a", "red", "<circle>"], [1.2, 0.7, 1.0], title="c")
    >>> "&lt;circle&gt;" in page
    True
"""
from __future__ import annotations

import glob
import html
import json
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

# The diverging scale: low -> center -> high (ColorBrewer RdBu ends).
_LOW = (178, 24, 43)
_MID = (247, 247, 247)
_HIGH = (33, 102, 172)
_NAN = (190, 190, 190)

Tokens = Union[Sequence[str], Sequence[Sequence[str]]]
Values = Union[Sequence[float], Sequence[Sequence[float]]]


def _as_rows(tokens: Tokens, values: Values, labels: Optional[Sequence[str]]):
    """Normalize one sequence or several to ``[(label, tokens, values)]``, checking lengths."""
    if hasattr(values, "tolist"):  # a tensor or array
        values = values.tolist()
    if len(tokens) and not isinstance(tokens[0], str):
        rows_t, rows_v = [list(t) for t in tokens], [list(v.tolist() if hasattr(v, "tolist") else v) for v in values]
    else:
        rows_t, rows_v = [list(tokens)], [list(values)]
    if len(rows_t) != len(rows_v):
        raise ValueError(f"tokens has {len(rows_t)} sequences but values has {len(rows_v)}: expected the same number")
    for i, (t, v) in enumerate(zip(rows_t, rows_v)):
        if len(t) != len(v):
            raise ValueError(f"sequence {i}: tokens has {len(t)} items but values has {len(v)}: expected one value "
                             f"per token")
        if not all(isinstance(x, str) for x in t):
            raise ValueError(f"sequence {i}: tokens must be strings")
    if labels is None:
        labels = [None] * len(rows_t)
    elif len(labels) != len(rows_t):
        raise ValueError(f"labels has {len(labels)} items but there are {len(rows_t)} sequences")
    return [(lab, t, [float(x) for x in v]) for lab, t, v in zip(labels, rows_t, rows_v)]


def value_range(values: Sequence[float], center: float = 1.0, vmin: Optional[float] = None,
                vmax: Optional[float] = None) -> Tuple[float, float]:
    """``(vmin, vmax)`` of the color scale: the given ends, else symmetric around ``center`` covering every finite
    value (half-width at least 1e-6)."""
    finite = [v for v in values if math.isfinite(v)]
    half = max([abs(v - center) for v in finite] + [1e-6])
    lo = center - half if vmin is None else float(vmin)
    hi = center + half if vmax is None else float(vmax)
    if not lo < hi:
        raise ValueError(f"vmin must be < vmax, got vmin={lo}, vmax={hi}")
    return lo, hi


def _unit(v: float, lo: float, center: float, hi: float) -> float:
    """Position of ``v`` on the scale in [0, 1]: piecewise linear, ``center`` at 0.5 when it lies inside."""
    if not lo < center < hi:
        return min(1.0, max(0.0, (v - lo) / (hi - lo)))
    if v < center:
        return max(0.0, 0.5 * (v - lo) / (center - lo))
    return min(1.0, 0.5 + 0.5 * (v - center) / (hi - center))


def value_color(v: float, lo: float, center: float, hi: float) -> Tuple[int, int, int]:
    """The RGB color of value ``v`` on the diverging scale."""
    if not math.isfinite(v):
        return _NAN
    u = _unit(v, lo, center, hi)
    a, b, t = (_LOW, _MID, u / 0.5) if u < 0.5 else (_MID, _HIGH, (u - 0.5) / 0.5)
    return tuple(round(x + (y - x) * t) for x, y in zip(a, b))


def _text_color(rgb: Tuple[int, int, int]) -> str:
    lum = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    return "#000000" if lum > 140 else "#ffffff"


def _hex(rgb) -> str:
    return "#%02x%02x%02x" % tuple(rgb)


def legend_text(value_name: str, lo: float, hi: float, center: float) -> Tuple[str, str, str]:
    """The legend both pictures print around the color bar: ``("c = 0.5", "1.5", "(white = 1)")``."""
    return f"{value_name} = {lo:.3g}", f"{hi:.3g}", f"(white = {center:.3g})"


def _load_image(image):
    """``image`` (a PIL image or a path) as an RGB PIL image; None stays None."""
    if image is None:
        return None
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    if not isinstance(image, Image.Image):
        raise ValueError(f"image must be a PIL.Image or a path, got {type(image).__name__}")
    return image.convert("RGB")


def _check_notes(notes) -> List[str]:
    if notes is None:
        return []
    if isinstance(notes, str) or not all(isinstance(n, str) for n in notes):
        raise ValueError(f"notes must be a sequence of strings (legend lines), got {notes!r}")
    return list(notes)


def token_rewards_html(
    tokens: Tokens,
    values: Values,
    *,
    title: Optional[str] = None,
    labels: Optional[Sequence[str]] = None,
    center: float = 1.0,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    value_name: str = "c",
    image=None,
    notes: Optional[Sequence[str]] = None,
) -> str:
    """A self-contained HTML page showing each token on a background colored by its value, with a legend.

    Args:
        tokens: the response's tokens as displayed strings (one sequence, or a list of sequences).
        values: one number per token (same nesting), e.g. TPO's ``token_rewards`` row restricted to the response.
        title: page heading. labels: a heading per sequence.
        center, vmin, vmax: the color scale (module docstring).
        value_name: the name shown in each token's tooltip and the legend.
        image: the image the responses describe (a PIL image or a path), embedded as a PNG data URI, drawn
            pixelated at up to 4x. notes: extra legend lines (e.g. ``"* = hallucinated word"``).

    Every token, label, note and title is HTML-escaped; whitespace inside tokens is kept (``white-space: pre``).
    """
    rows = _as_rows(tokens, values, labels)
    notes = _check_notes(notes)
    img = _load_image(image)
    lo, hi = value_range([v for _, _, vs in rows for v in vs], center, vmin, vmax)
    esc = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{esc(title or 'token values')}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:60em}"
        ".seq{font-family:monospace;font-size:15px;line-height:2.0;margin:0.3em 0 1em 0}"
        ".tok{white-space:pre;padding:2px 1px;margin:0 1px;border-radius:3px}"
        ".legend{display:flex;align-items:center;gap:0.5em;font-size:13px}"
        ".bar{width:16em;height:0.9em;border:1px solid #999}.note{font-size:13px;margin:0.2em 0}"
        ".img{image-rendering:pixelated;border:1px solid #999}</style></head><body>",
    ]
    if title:
        parts.append(f"<h2>{esc(title)}</h2>")
    if img is not None:
        import base64
        import io

        buf = io.BytesIO()
        img.save(buf, format="PNG")
        scale = max(1, min(4, 256 // max(img.size)))
        parts.append(f'<img class="img" alt="the image" width="{img.width * scale}" height="{img.height * scale}" '
                     f'src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode("ascii")}">')
    for label, toks, vals in rows:
        if label is not None:
            parts.append(f"<h4>{esc(label)}</h4>")
        spans = []
        for t, v in zip(toks, vals):
            rgb = value_color(v, lo, center, hi)
            tip = esc(f"{t!r}: {value_name} = {v:.4f}", quote=True)
            spans.append(f'<span class="tok" style="background:{_hex(rgb)};color:{_text_color(rgb)}" '
                         f'title="{tip}">{esc(t)}</span>')
        parts.append('<div class="seq">' + "".join(spans) + "</div>")
    stops = ",".join(_hex(value_color(lo + (hi - lo) * i / 8, lo, center, hi)) for i in range(9))
    left, right, white = legend_text(value_name, lo, hi, center)
    parts.append(
        f'<div class="legend"><span>{esc(left)}</span>'
        f'<span class="bar" style="background:linear-gradient(to right,{stops})"></span>'
        f"<span>{esc(right)}</span><span>{esc(white)}</span></div>"
    )
    parts.extend(f'<p class="note">{esc(n)}</p>' for n in notes)
    parts.append("</body></html>")
    return "\n".join(parts)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# Monospace advance width of DejaVu Sans Mono (matplotlib's bundled monospace font), in em.
_MONO_ADVANCE = 0.602


def _wrap(tokens: Sequence[str], width_chars: int) -> List[List[Tuple[int, int, str]]]:
    """Greedy line wrap: ``[[(token index, column, text)]]``; tokens are separated by one column; a token longer
    than a line gets a line of its own (drawn past the margin)."""
    lines: List[List[Tuple[int, int, str]]] = [[]]
    col = 0
    for i, t in enumerate(tokens):
        text = t.replace("\n", "\\n").replace("\t", " ")
        if lines[-1] and col + len(text) > width_chars:
            lines.append([])
            col = 0
        lines[-1].append((i, col, text))
        col += len(text) + 1
    return lines


def token_rewards_png(
    tokens: Tokens,
    values: Values,
    path: str,
    *,
    title: Optional[str] = None,
    labels: Optional[Sequence[str]] = None,
    center: float = 1.0,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    value_name: str = "c",
    width_chars: int = 60,
    fontsize: float = 11.0,
    dpi: int = 120,
    image=None,
    notes: Optional[Sequence[str]] = None,
) -> str:
    """A PNG of the tokens on colored boxes, wrapped at ``width_chars`` characters per line, with the image on the
    left (when given) and the HTML page's legend below: the color bar between ``value_name = lo`` and ``hi``,
    ``(white = center)`` and the ``notes`` (TPO's Figure 1 style). Arguments as :func:`token_rewards_html`. Returns
    ``path``."""
    if width_chars < 8:
        raise ValueError(f"width_chars must be >= 8, got {width_chars}")
    rows = _as_rows(tokens, values, labels)
    notes = _check_notes(notes)
    img = _load_image(image)
    lo, hi = value_range([v for _, _, vs in rows for v in vs], center, vmin, vmax)
    plt = _pyplot()
    from matplotlib.colors import LinearSegmentedColormap, Normalize, TwoSlopeNorm
    from matplotlib.patches import Rectangle

    # Layout in "cells": x in characters, y in lines (a label takes one line, a gap of half a line between rows).
    items, y = [], 0.0
    for label, toks, vals in rows:
        if label is not None:
            items.append(("label", y, label))
            y += 1.0
        for line in _wrap(toks, width_chars):
            for i, col, text in line:
                items.append(("tok", y, (col, text, vals[i])))
            y += 1.0
        y += 0.5
    n_lines = max(y - 0.5, 1.0)
    char_w = fontsize / 72 * _MONO_ADVANCE  # inches per character
    line_h = fontsize / 72 * 1.9  # inches per line
    note_h = fontsize / 72 * 1.5  # inches per note line
    head, foot, margin = (0.45 if title else 0.1), 0.85 + note_h * len(notes), 0.25
    img_w = 1.6 if img is not None else 0.0  # inches of the image panel (plus a margin)
    fig_w = width_chars * char_w + 2 * margin + (img_w + margin if img is not None else 0.0)
    fig_h = max(n_lines * line_h, img_w if img is not None else 0.0) + head + foot
    fig = plt.figure(figsize=(fig_w, fig_h), dpi=dpi)
    x0 = margin + (img_w + margin if img is not None else 0.0)
    body_h = fig_h - head - foot
    ax = fig.add_axes([x0 / fig_w, (foot + body_h - n_lines * line_h) / fig_h, 1 - (x0 + margin) / fig_w,
                       n_lines * line_h / fig_h])
    if img is not None:
        iax = fig.add_axes([margin / fig_w, (foot + body_h - img_w) / fig_h, img_w / fig_w, img_w / fig_h])
        iax.imshow(img, interpolation="nearest")
        iax.set_xticks([])
        iax.set_yticks([])
    ax.set_xlim(0, width_chars)
    ax.set_ylim(n_lines, 0)
    ax.axis("off")
    for kind, yy, payload in items:
        if kind == "label":
            ax.text(0, yy + 0.5, payload, ha="left", va="center", fontsize=fontsize, fontweight="bold")
            continue
        col, text, v = payload
        rgb = value_color(v, lo, center, hi)
        ax.add_patch(Rectangle((col - 0.15, yy + 0.12), len(text) + 0.3, 0.76, facecolor=_hex(rgb),
                               edgecolor="none"))
        ax.text(col, yy + 0.5, text, ha="left", va="center", family="monospace", fontsize=fontsize,
                color=_text_color(rgb))
    if title:
        fig.suptitle(title, y=1 - 0.05 / fig_h * 2, va="top", fontsize=fontsize + 1)
    cmap = LinearSegmentedColormap.from_list("vpo_div", [tuple(c / 255 for c in x) for x in (_LOW, _MID, _HIGH)])
    norm = TwoSlopeNorm(vcenter=center, vmin=lo, vmax=hi) if lo < center < hi else Normalize(lo, hi)
    bar_y = (0.42 + note_h * len(notes)) / fig_h
    cax = fig.add_axes([0.3, bar_y, 0.4, 0.14 / fig_h])
    cb = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
    cb.ax.tick_params(labelsize=fontsize - 3)
    left, right, white = legend_text(value_name, lo, hi, center)
    fig.text(0.3 - 0.01, bar_y + 0.07 / fig_h, left, ha="right", va="center", fontsize=fontsize - 2)
    fig.text(0.7 + 0.01, bar_y + 0.07 / fig_h, f"{right}  {white}", ha="left", va="center", fontsize=fontsize - 2)
    for k, note in enumerate(notes):
        fig.text(margin / fig_w, (0.12 + note_h * (len(notes) - 1 - k)) / fig_h, note, ha="left", va="bottom",
                 fontsize=fontsize - 2)
    _makedirs_for(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _makedirs_for(path: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)


def read_log_history(source: Union[str, Sequence[Mapping[str, Any]]]) -> List[Dict[str, Any]]:
    """The Trainer's ``log_history`` from: the list itself; a ``trainer_state.json`` path; or a run folder holding
    ``trainer_state.json`` (else its newest ``checkpoint-*/trainer_state.json``)."""
    if not isinstance(source, (str, os.PathLike)):
        return [dict(x) for x in source]
    path = os.fspath(source)
    if os.path.isdir(path):
        direct = os.path.join(path, "trainer_state.json")
        if os.path.exists(direct):
            path = direct
        else:
            ckpts = glob.glob(os.path.join(path, "checkpoint-*", "trainer_state.json"))
            step = lambda p: int(re.sub(r"\D", "", os.path.basename(os.path.dirname(p))) or -1)  # noqa: E731
            ckpts.sort(key=step)
            if not ckpts:
                raise ValueError(f"{source!r} has no trainer_state.json (nor checkpoint-*/trainer_state.json)")
            path = ckpts[-1]
    with open(path, encoding="utf-8") as f:
        state = json.load(f)
    if not isinstance(state, Mapping) or not isinstance(state.get("log_history"), list):
        raise ValueError(f"{path!r} has no 'log_history' list: expected a transformers trainer_state.json")
    return state["log_history"]


def _series(history: Sequence[Mapping[str, Any]], key: str) -> Tuple[List[float], List[float]]:
    xs, ys = [], []
    for i, entry in enumerate(history):
        v = entry.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(entry.get("step", i)))
            ys.append(float(v))
    return xs, ys


def training_curves_png(
    source: Union[str, Sequence[Mapping[str, Any]]],
    path: str,
    keys: Sequence[str] = ("loss", "rewards/margins"),
    *,
    title: Optional[str] = None,
    dpi: int = 110,
) -> str:
    """Plot training curves from the Trainer's ``log_history`` (see :func:`read_log_history` for ``source``): one
    panel per key against ``step``, the training entries as a line and the ``eval_<key>`` entries, if any, as
    markers. Keys absent from the logs are left out; if none is present, raises ``ValueError`` naming the keys the
    logs have. Returns ``path``."""
    history = read_log_history(source)
    found = []
    for k in keys:
        train, ev = _series(history, k), _series(history, f"eval_{k}")
        if train[0] or ev[0]:
            found.append((k, train, ev))
    if not found:
        have = sorted({k for e in history for k, v in e.items() if isinstance(v, (int, float)) and k != "step"})
        raise ValueError(f"none of keys {list(keys)} is in the log history; it has {have}")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(found), figsize=(4.2 * len(found), 3.2), dpi=dpi, squeeze=False)
    for ax, (k, (tx, ty), (ex, ey)) in zip(axes[0], found):
        if tx:
            ax.plot(tx, ty, color="#2166ac", lw=1.5, label="train")
        if ex:
            ax.plot(ex, ey, "o--", color="#b2182b", ms=4, lw=1, label="eval")
        ax.set_title(k)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if tx and ex:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    _makedirs_for(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path
