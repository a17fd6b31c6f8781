"""Stop sequences matched by the worker, so the caller learns which one ended the text.

llama-server's OpenAI endpoints cut the text at a stop string but never say whether a stop
string or EOS ended it (``finish_reason`` is ``"stop"`` either way, checked with b11434), and
Anthropic's ``stop_reason: "stop_sequence"`` needs the matched string. The worker therefore
does not pass ``stop`` to llama-server: it feeds the streamed content through a
:class:`StopMatcher`, which holds back any tail that could still become a stop string, cuts the
text at the first complete match and names it; the worker then closes the stream, which ends
the generation on llama-server.
"""

from __future__ import annotations

from typing import Any

MAX_STOP_SEQUENCES = 16  # OpenAI allows 4, Anthropic a few; more only costs matching time


def stop_sequences(value: Any) -> list[str]:
    """The stop strings of a request's ``stop`` field (a string or a list), empty ones dropped."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        return []
    return [s for s in value if isinstance(s, str) and s][:MAX_STOP_SEQUENCES]


class StopMatcher:
    """Streaming stop-string matcher.

    :meth:`feed` returns the text that is safe to release and the stop string that matched, if
    one did; after a match everything else is dropped. :meth:`flush` releases what was held
    back when the stream ends without a match.
    """

    __slots__ = ("_held", "_hold", "_stops", "matched")

    def __init__(self, stops: list[str]) -> None:
        self._stops = stops
        self._hold = max((len(s) for s in stops), default=1) - 1  # the longest tail that may still match
        self._held = ""
        self.matched = ""

    def feed(self, text: str) -> tuple[str, str]:
        if self.matched:
            return "", self.matched
        window = self._held + text
        first, first_stop = -1, ""
        for stop in self._stops:
            at = window.find(stop)
            if at >= 0 and (first < 0 or at < first or (at == first and len(stop) > len(first_stop))):
                first, first_stop = at, stop
        if first >= 0:
            self._held = ""
            self.matched = first_stop
            return window[:first], first_stop
        keep = self._pending_tail(window)
        self._held = window[len(window) - keep :] if keep else ""
        return window[: len(window) - keep], ""

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.matched else held

    def _pending_tail(self, window: str) -> int:
        """Length of the longest tail of ``window`` that is a proper prefix of a stop string."""
        for size in range(min(self._hold, len(window)), 0, -1):
            tail = window[-size:]
            if any(stop.startswith(tail) for stop in self._stops):
                return size
        return 0
