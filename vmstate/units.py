"""Human-friendly sizes: "64M", "1G", "4096" (binary multiples)."""

from .errors import VmstateError, shorten

_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    cleaned = text.strip().upper().removesuffix("IB").removesuffix("B")
    number, suffix = (cleaned[:-1], cleaned[-1]) if cleaned[-1:] in "KMGT" else (cleaned, "")
    try:
        value = int(number, 0) * _SUFFIXES[suffix]
    except (ValueError, KeyError):
        raise VmstateError(f"bad size {shorten(text)!r} (examples: 64M, 1G, 268435456)") from None
    if value <= 0:
        raise VmstateError(f"bad size {shorten(text)!r}: must be positive")
    return value


def format_size(value: int) -> str:
    """1536 -> '1.5 KiB', 67108864 -> '64 MiB'."""
    for suffix in ("T", "G", "M", "K"):
        unit = _SUFFIXES[suffix]
        if value >= unit:
            amount = value / unit
            return f"{amount:.0f} {suffix}iB" if amount == int(amount) else f"{amount:.1f} {suffix}iB"
    return f"{value} bytes"
