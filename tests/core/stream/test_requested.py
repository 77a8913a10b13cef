"""The request check (coalesce_core.stream.requested): a stream passes only if its Begin is the
one asked for and no other Begin follows; the error names what was asked and what came."""

from __future__ import annotations

import pytest

from coalesce_core.errors import StreamError, UnrequestedStream
from coalesce_core.stream.records import Begin, End, MkDir, framed
from coalesce_core.stream.requested import as_requested, check_begin

ASKED = ("q", "s1", "s2")


def test_the_requested_begin_passes_and_is_returned():
    b = Begin(qtree="q", base="s1", target="s2")
    assert check_begin(b, *ASKED) is b
    base = Begin(qtree="q", base=None, target="s2")
    assert check_begin(base, "q", None, "s2") is base


@pytest.mark.parametrize(
    "came, shown",
    [
        (Begin(qtree="other", base="s1", target="s2"), "qtree 'other' from 's1' to 's2'"),
        (Begin(qtree="q", base="s0", target="s2"), "qtree 'q' from 's0' to 's2'"),
        (Begin(qtree="q", base=None, target="s2"), "qtree 'q' from the empty tree to 's2'"),
        (Begin(qtree="q", base="s1", target="s3"), "qtree 'q' from 's1' to 's3'"),
    ],
    ids=["qtree", "base", "baseline for an update", "target"],
)
def test_another_begin_is_refused_naming_what_was_asked_and_what_came(came, shown):
    with pytest.raises(UnrequestedStream) as info:
        check_begin(came, *ASKED)
    assert str(info.value) == (
        f"the source sent the stream of {shown}; the transfer asked for qtree 'q' from 's1' to 's2'"
    )
    assert "nothing of this stream was applied" in info.value.hint
    assert isinstance(info.value, StreamError)  # a failed transfer, rolled back like any other


def test_a_stream_without_its_begin_is_refused():
    with pytest.raises(UnrequestedStream, match="starts with MkDir, not the Begin of qtree 'q'"):
        check_begin(MkDir(path="d"), *ASKED)
    with pytest.raises(UnrequestedStream, match="is empty"):
        list(as_requested([], *ASKED))


def test_peer_fields_are_quoted_so_control_characters_stay_inert():
    with pytest.raises(UnrequestedStream) as info:
        check_begin(Begin(qtree="q", base="s1", target="x\x1b]0;owned\x07\n" + "y" * 500), *ASKED)
    text = str(info.value)
    assert "\x1b" not in text and "\n" not in text and "\\x1b" in text
    assert len(text) < 400  # a long peer field is cut


def test_as_requested_refuses_at_the_first_record_and_pulls_nothing_more():
    pulled = []

    def source():
        for rec in framed("other", "s1", "s2", [MkDir(path="d"), MkDir(path="e")]):
            pulled.append(rec)
            yield rec

    it = as_requested(source(), *ASKED)
    with pytest.raises(UnrequestedStream):
        next(it)
    assert len(pulled) == 1


def test_as_requested_passes_the_whole_stream_and_refuses_a_second_begin():
    good = list(framed("q", "s1", "s2", [MkDir(path="d")]))
    assert list(as_requested(good, *ASKED)) == good
    second = [good[0], MkDir(path="d"), Begin(qtree="other", base="s1", target="s2"), End(records=1)]
    got = []
    with pytest.raises(UnrequestedStream, match="holds a second Begin, of qtree 'other'"):
        for rec in as_requested(second, *ASKED):
            got.append(rec)
    assert got == second[:2]


def test_close_closes_the_wrapped_stream_before_the_first_record():
    closed = []

    def source():
        try:
            yield Begin(qtree="q", base="s1", target="s2")
        finally:
            closed.append(True)

    gen = source()
    next(gen)  # started: close() has something to finish
    as_requested(gen, *ASKED).close()
    assert closed == [True]
