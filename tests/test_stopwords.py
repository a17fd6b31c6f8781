"""The worker's stop-string matcher (pure): text released, held back, cut, and the match named."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from auxot_common.anthropic_api import AnthropicStream, build_message
from auxot_common.protocol import Complete
from auxot_common.stopwords import StopMatcher, stop_sequences


def run(stops: list[str], pieces: list[str]) -> tuple[str, str]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, matched = matcher.feed(piece)
        out.append(text)
        if matched:
            return "".join(out), matched
    return "".join(out) + matcher.flush(), ""


def test_a_stop_string_split_across_pieces_is_found_and_cut() -> None:
    assert run(["END"], ["hello E", "N", "D and more"]) == ("hello ", "END")


def test_a_false_start_is_released_as_text() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("hello EN") == ("hello ", "")  # "EN" may still become "END"
    assert matcher.feed("x") == ("ENx", "")
    assert matcher.flush() == ""


def test_held_text_is_released_when_the_stream_ends() -> None:
    assert run(["END"], ["tail E"]) == ("tail E", "")


def test_the_earliest_match_wins_then_the_longest() -> None:
    assert run(["b", "abc"], ["xxabc"]) == ("xx", "abc")
    assert run(["c", "ab"], ["xabc"]) == ("x", "ab")


def test_nothing_after_a_match() -> None:
    matcher = StopMatcher(["."])
    assert matcher.feed("one. two") == ("one", ".")
    assert matcher.feed("three") == ("", ".")
    assert matcher.flush() == ""


def test_stop_field_shapes() -> None:
    assert stop_sequences("x") == ["x"]
    assert stop_sequences(["a", "", 3, "b"]) == ["a", "b"]
    assert stop_sequences(None) == [] and stop_sequences({"a": 1}) == []


@given(
    text=st.text(alphabet="abcE", max_size=60),
    stops=st.lists(st.text(alphabet="abcE", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(min_value=0, max_value=60), max_size=8),
)
def test_any_split_gives_the_same_answer_as_the_whole_text(text: str, stops: list[str], cuts: list[int]) -> None:
    bounds = sorted({c for c in cuts if c <= len(text)} | {0, len(text)})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    found = [(text.find(s), -len(s), s) for s in stops if s in text]
    expected = (text[: min(found)[0]], min(found)[2]) if found else (text, "")
    assert run(stops, pieces) == expected


def test_anthropic_names_the_workers_match_only_if_the_caller_asked_for_it() -> None:
    matched = Complete("j", full_response="Done", finish_reason="stop", stop_sequence="b")
    message = build_message(matched, message_id="m", model="m", stop_sequences=["a", "b"])
    assert (message["stop_reason"], message["stop_sequence"]) == ("stop_sequence", "b")
    stream = AnthropicStream("m", "m", stop_sequences=["a", "b"])
    assert b'"stop_reason":"stop_sequence","stop_sequence":"b"' in stream.on_complete(matched)
    stranger = Complete("j", full_response="Done", finish_reason="stop", stop_sequence="zz")
    message = build_message(stranger, message_id="m", model="m", stop_sequences=["a", "b"])
    assert (message["stop_reason"], message["stop_sequence"]) == ("end_turn", None)
