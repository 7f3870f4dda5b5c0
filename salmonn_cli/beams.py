"""How many beams this runtime can search with: the one limit that the CLI's options, a manifest's
default decoding, the server's requests and the beam search itself check a beam count against."""
from __future__ import annotations

MAX_BEAMS = 16


def is_beam_count(value) -> bool:
    """A whole number of beams this runtime can search with (1 = greedy)."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_BEAMS
