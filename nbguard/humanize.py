"""Numbers in the words people read: sizes, durations, times."""

from __future__ import annotations

import time
import unicodedata
from datetime import datetime


def size(nbytes: int | float) -> str:
    """'1.5 GiB' for 1610612736."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def duration(seconds: float) -> str:
    """'3 min 20 s', '2.4 s', '1 h 05 min'."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s" if secs else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def ago(timestamp: float, now: float | None = None) -> str:
    """'just now', '5 min ago', '3 h ago', '2 days ago'."""
    delta = max(0.0, (now if now is not None else time.time()) - timestamp)
    if delta < 45:
        return "just now"
    if delta < 3600:
        return f"{int(delta // 60) or 1} min ago"
    if delta < 86400:
        return f"{int(delta // 3600)} h ago"
    days = int(delta // 86400)
    return f"{days} day{'s' if days != 1 else ''} ago"


def clock(timestamp: float) -> str:
    """Local date and time, to the second ('invalid time' for what no calendar holds)."""
    try:
        return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")
    except (ValueError, OverflowError, OSError):
        return "invalid time"


def printable(text: object) -> str:
    """``text`` safe to print on one terminal line: control, format and other invisible characters
    (ESC sequences, newlines, bidi overrides) shown as escapes instead of acting."""
    out = []
    for char in str(text):
        if unicodedata.category(char)[0] in "CZ" and char != " ":
            code = ord(char)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(char)
    return "".join(out)


def position_label(position: object) -> str:
    """'epoch 3, batch 120' from a loop position; '' when there is nothing to say."""
    if not isinstance(position, dict) or not position:
        return ""
    if isinstance(position.get("label"), str):  # written by the saver in words: "in epoch 3, after batch 27 of 48"
        return position["label"]
    parts = [f"{key} {position[key]}" for key in ("epoch", "batch", "step", "iteration")
             if type(position.get(key)) in (int, float)]
    if not parts:
        parts = [f"{k} {v}" for k, v in position.items() if type(v) in (int, float, str) and not k.startswith("_")][:3]
    if position.get("completed") is True:
        parts.append("finished")
    return ", ".join(parts)
