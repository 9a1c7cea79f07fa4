"""Boolean settings read from the environment: LOWBIT_*=0 or 1.

Every such switch is read once, at import, through `env_flag`, so a mistyped value (`yes`, `true`,
`on`) is an error naming it and the valid choices rather than being read silently as off.
"""

from __future__ import annotations

import os


def env_flag(name: str, default: bool) -> bool:
    """The environment variable `name` as a bool: "1" on, "0" off, unset `default`; else ValueError."""
    value = os.environ.get(name, "1" if default else "0")
    if value not in ("0", "1"):
        raise ValueError(f"{name}={value!r}; valid choices: 0, 1")
    return value == "1"
