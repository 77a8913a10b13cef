"""coalesce_core.durations: the parser of "90s", "15m", "2h", "1d", "1w"."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coalesce_core.durations import DurationError, format_duration, parse_duration


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("90s", 90.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1w", 604800.0),
        ("7d", 604800.0),
        ("0s", 0.0),
        ("1.5h", 5400.0),
        (" 3 m ", 180.0),
        ("45", 45.0),
        (30, 30.0),
        (2.5, 2.5),
    ],
)
def test_parses_number_and_unit(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    [
        "",
        " ",
        "d",
        "7 days",
        "7D",
        "-1s",
        "1d2h",
        "1.d",
        ".5h",
        "1e3s",
        "7x",
        "inf",
        "nan",
        None,
        True,
        [],
        float("inf"),
        -3,
        float("nan"),
    ],
)
def test_refuses_what_is_not_a_duration(text):
    with pytest.raises(DurationError) as info:
        parse_duration(text)
    assert "duration" in str(info.value)


def test_the_error_says_what_a_duration_looks_like():
    with pytest.raises(DurationError, match=r"s \(seconds\), m \(minutes\), h \(hours\), d \(days\) or w \(weeks\)"):
        parse_duration("7 days")


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from("smhdw"))
def test_format_then_parse_is_the_same_duration(n, unit):
    seconds = parse_duration(f"{n}{unit}")
    assert parse_duration(format_duration(seconds)) == seconds


def test_format_picks_the_largest_whole_unit():
    assert format_duration(604800) == "1w"
    assert format_duration(86400 * 3) == "3d"
    assert format_duration(5400) == "90m"
    assert format_duration(1.5) == "1.5s"
    assert format_duration(1_000_001) == "1000001s"
