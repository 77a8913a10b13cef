"""Step counts of the state machine: explicit counts > HYPOTHESIS_PROFILE > defaults."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck
from hypothesis import settings as Settings
from hypothesis.errors import InvalidArgument

DEFAULT_MAX_EXAMPLES = 20
DEFAULT_STATEFUL_STEPS = 25
#: Used when HYPOTHESIS_PROFILE names a profile the project did not register.
FALLBACK_PROFILES: dict[str, dict[str, Any]] = {
    "dev": dict(max_examples=10, stateful_step_count=15),
    "ci": dict(max_examples=DEFAULT_MAX_EXAMPLES, stateful_step_count=DEFAULT_STATEFUL_STEPS),
    "long": dict(max_examples=300, stateful_step_count=60),
}


def conformance_settings(
    max_examples: int | None = None, stateful_steps: int | None = None, parent: Settings | None = None
) -> Settings:
    """Settings for the state machine: explicit counts > HYPOTHESIS_PROFILE > defaults."""
    if parent is None:
        name = os.environ.get("HYPOTHESIS_PROFILE")
        if name:
            try:
                parent = Settings.get_profile(name)
            except InvalidArgument:
                if name in FALLBACK_PROFILES:
                    parent = Settings(**FALLBACK_PROFILES[name])
    if parent is None:
        parent = Settings(max_examples=DEFAULT_MAX_EXAMPLES, stateful_step_count=DEFAULT_STATEFUL_STEPS)
    kw: dict[str, Any] = {}
    if max_examples is not None:
        kw["max_examples"] = max_examples
    if stateful_steps is not None:
        kw["stateful_step_count"] = stateful_steps
    suppress = [h for h in (HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much)]
    return Settings(parent, deadline=None, suppress_health_check=suppress, **kw)
