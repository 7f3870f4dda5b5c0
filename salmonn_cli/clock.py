"""Times as people read them: the short clock of answers and live lines (`01:02.3`, `1:02:03.4`) and
the subtitle timestamps (`00:01:02,345`), rounded once so that no field ever reads 60."""
from __future__ import annotations


def clock_fields(seconds: float, decimals: int) -> tuple[int, int, int, int]:
    """(hours, minutes, seconds, fraction in units of 10**-decimals s). The rounding is done on the
    whole time first, so that 59.96 s at one decimal is 1 minute 0.0 s, not 0 minutes 60.0 s."""
    if seconds < 0:
        raise ValueError(f"negative time {seconds}")
    scale = 10 ** decimals
    hours, units = divmod(int(round(seconds * scale)), 3600 * scale)
    minutes, units = divmod(units, 60 * scale)
    secs, fraction = divmod(units, scale)
    return hours, minutes, secs, fraction


def format_clock(seconds: float) -> str:
    """12.34 -> '00:12.3'; past an hour '1:02:03.4'."""
    hours, minutes, secs, tenths = clock_fields(seconds, 1)
    clock = f"{minutes:02d}:{secs:02d}.{tenths}"
    return f"{hours}:{clock}" if hours else clock


def format_timestamp(seconds: float, decimal_marker: str = ",") -> str:
    """`HH:MM:SS,mmm` (SRT) or, with decimal_marker ".", `HH:MM:SS.mmm` (WebVTT). Hours grow past 99."""
    hours, minutes, secs, ms = clock_fields(seconds, 3)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_marker}{ms:03d}"
