"""Durations (`90s`, `15m`, `2h`, `1d`) and sizes (`20G`, `512M`) as users write them."""

import re

from .errors import BadInput

_DURATION = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_duration(text) -> float:
    """Seconds in `text`; a bare number is seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(text).lower())
    if not m:
        raise BadInput(f"'{text}' is not a duration. Write it like 90s, 15m or 2h.")
    return float(m.group(1)) * _DURATION[m.group(2)]


def parse_size(text) -> int:
    """Bytes in `text`; `20G` is 20 GiB; a bare number is bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([bkmgt]?)(?:i?b)?\s*", str(text).lower())
    if not m:
        raise BadInput(f"'{text}' is not a size. Write it like 20G or 500M.")
    return int(float(m.group(1)) * _SIZE[m.group(2)])


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
