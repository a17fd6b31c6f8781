"""Reading configuration: the environment, an optional ``.env`` file, and typed parsers.

Each role file declares its own config dataclass; this module only holds the parsing both share.
Invalid values raise :class:`ConfigError` with a one-line reason, which ``main()`` prints before
exiting non-zero (the Go router silently fell back to defaults, hiding typos).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path


class ConfigError(ValueError):
    """A configuration value that cannot be used; the message is one line for the operator."""


def read_dotenv(path: Path) -> dict[str, str]:
    """Parse ``KEY=value`` lines; ``#`` comments, ``export`` prefixes and quotes are allowed."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.removeprefix("export ").strip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError(f"{path}:{number}: expected KEY=value")
        value = value.strip()
        quoted = re.fullmatch(r"""(['"])(.*?)\1\s*(?:#.*)?""", value)
        value = quoted.group(2) if quoted else value.split(" #", 1)[0].rstrip()
        values[key] = value
    return values


def load_environment(dotenv: Path | None = None) -> dict[str, str]:
    """The process environment over the ``.env`` file (the environment wins)."""
    merged = read_dotenv(dotenv if dotenv is not None else Path.cwd() / ".env")
    merged.update(os.environ)
    return merged


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from Go-style durations (``15s``, ``5m``, ``1h30m``, ``250ms``) or a bare number."""
    value = text.strip()
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(number):
            raise ValueError(f"not a finite duration: {text!r}")
        return number
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(value):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(value) or not value:
        raise ValueError(f"not a duration: {text!r}")
    return total


class EnvReader:
    """Typed access to one environment mapping; every error names the variable."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def raw(self, name: str) -> str | None:
        value = self._env.get(name)
        return value if value not in (None, "") else None

    def text(self, name: str, default: str) -> str:
        return self.raw(name) or default

    def integer(self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not an integer") from None
        return self._bounded(name, value, minimum, maximum)

    def duration(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        raw = self.raw(name)
        if raw is None:
            return default
        try:
            value = parse_duration(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is not a duration (examples: 30s, 5m, 1h30m)") from None
        if value < minimum:
            raise ConfigError(f"{name}={raw!r} must be at least {minimum:g}s")
        return value

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = (self.raw(name) or default).lower()
        if value not in choices:
            raise ConfigError(f"{name}={value!r} must be one of: {', '.join(choices)}")
        return value

    @staticmethod
    def _bounded(name: str, value: int, minimum: int | None, maximum: int | None) -> int:
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name}={value} must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name}={value} must be at most {maximum}")
        return value
