"""Tests for ``auxot_common.textparse``: think tags and tool calls written as plain text.

Streams are fed the way llama-server delivers them (one fragment per token, tags split anywhere);
what a client would see is what is asserted: the text streamed at once, the text that arrives
only at the end, and the tool calls.
"""

from __future__ import annotations

import itertools
import random
import re
from typing import Any

import orjson
import pytest

from auxot_common.textparse import (
    CONTENT,
    REASONING,
    TextParser,
    extract_tool_calls,
)

Tools = list[dict[str, Any]]


def fn(name: str, properties: dict[str, Any] | None = None) -> dict[str, Any]:
    """An OpenAI function tool with the given parameter schemas."""
    parameters: dict[str, Any] = {"type": "object", "properties": properties or {}}
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


WEATHER: Tools = [fn("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"}})]


class Run:
    """The result of feeding a stream: segments streamed during feeding and at the end."""

    def __init__(
        self, pieces: list[str], tools: Tools | None = None, *, reasoning: list[str] | None = None, **options: Any
    ) -> None:
        self.parser = TextParser(tools, **options)
        self.streamed: list[tuple[str, str]] = []
        self.per_feed: list[list[tuple[str, str]]] = []
        for text in reasoning or []:
            out = self.parser.feed(text, reasoning=True)
            self.per_feed.append(out)
            self.streamed += out
        for piece in pieces:
            out = self.parser.feed(piece)
            self.per_feed.append(out)
            self.streamed += out
        self.late, self.calls = self.parser.finish()

    def text(self, kind: str, *, late: bool = True) -> str:
        return "".join(t for k, t in self.streamed + (self.late if late else []) if k == kind)

    @property
    def content(self) -> str:
        return self.text(CONTENT)

    @property
    def reasoning(self) -> str:
        return self.text(REASONING)

    def arguments(self) -> list[Any]:
        return [orjson.loads(c["function"]["arguments"]) for c in self.calls]

    def names(self) -> list[str]:
        return [c["function"]["name"] for c in self.calls]


def chunkings(text: str, rng: random.Random, count: int) -> list[list[str]]:
    """Every split in two, and ``count`` random splits into many pieces."""
    out = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    for _ in range(count):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 12)))) if len(text) > 1 else []
        bounds = [0, *cuts, len(text)]
        out.append([text[a:b] for a, b in itertools.pairwise(bounds)])
    return out


# --- plain text ------------------------------------------------------------------------------


def test_plain_text_passes_through_unchanged_and_at_once() -> None:
    pieces = ["Hello", ",", " world", "!", " 1 < 2", " and", " [x]", " done"]
    run = Run(pieces)
    # nothing ends in markup or whitespace, so every piece is streamed as it arrives
    assert [out for out in run.per_feed] == [[(CONTENT, p)] for p in pieces]
    assert run.late == [] and run.calls == []
    assert run.parser.content == "".join(pieces)


def test_a_lone_angle_bracket_is_held_only_until_it_cannot_be_a_tag() -> None:
    run = Run(["x <", "y", " z<th", "at"])
    assert run.per_feed == [[(CONTENT, "x")], [(CONTENT, " <y")], [(CONTENT, " z")], [(CONTENT, "<that")]]
    assert run.content == "x <y z<that"


def test_trailing_whitespace_is_held_until_more_text_and_kept_at_the_end() -> None:
    run = Run(["a ", "\n", "b\n\n"])
    assert run.per_feed == [[(CONTENT, "a")], [], [(CONTENT, " \nb")]]
    assert run.late == [(CONTENT, "\n\n")]
    assert run.content == "a \nb\n\n"


@pytest.mark.parametrize("text", ["", "<", "<thi", "</thin", "<tool_ca", "[Calling to"])
def test_a_stream_ending_in_a_tag_prefix_gives_it_back_as_text(text: str) -> None:
    run = Run(["before ", text], WEATHER)
    assert run.content == "before " + text if text else run.content == "before "
    assert run.calls == []


# --- think tags -------------------------------------------------------------------------------

THINK = "<think>\nLet me think.\n</think>\n\nThe answer is 4."


def test_think_tags_become_reasoning_as_the_fake_server_sends_them() -> None:
    pieces = ["<think>", "\nLet me", " think", ".", "\n", "</think>", "\n\n", "The answer", " is", " 4."]
    run = Run(pieces)
    assert run.reasoning == "Let me think."
    assert run.content == "The answer is 4."
    assert run.late == []
    kinds = [k for k, _ in run.streamed]
    assert kinds == [REASONING] * 3 + [CONTENT] * 3  # reasoning streams first, token by token
    assert run.parser.reasoning == "Let me think." and run.parser.content == "The answer is 4."


def test_think_tags_split_at_every_position_give_the_same_result() -> None:
    rng = random.Random(7)
    for pieces in chunkings(THINK, rng, 200):
        run = Run(pieces)
        assert (run.reasoning, run.content) == ("Let me think.", "The answer is 4."), pieces
        assert all("<" not in t and ">" not in t for _, t in run.streamed + run.late), pieces


def test_a_split_tag_delays_only_the_characters_that_could_start_it() -> None:
    run = Run(["Hi <thi", "nk>deep</th", "ink>ok"])
    assert run.per_feed[0] == [(CONTENT, "Hi")]  # "<thi" (and the space before it) wait
    assert run.per_feed[1] == [(REASONING, "deep")]
    assert run.per_feed[2] == [(CONTENT, " ok")]
    assert (run.content, run.reasoning) == ("Hi ok", "deep")


def test_reasoning_and_answer_in_one_fragment_keep_their_order() -> None:
    run = Run(["<think>a</think>b<think>c</think>d"])
    assert run.streamed == [(REASONING, "a"), (CONTENT, "b"), (REASONING, "\n\nc"), (CONTENT, "\n\nd")]


def test_unterminated_think_is_all_reasoning() -> None:
    run = Run(["<think>", "still ", "thinking", " when cut"])
    assert run.reasoning == "still thinking when cut"
    assert run.content == ""


def test_nested_think_tag_is_dropped_and_first_close_ends_the_block() -> None:
    run = Run(["<think>outer <think>inner</think>answer"])
    assert run.reasoning == "outer inner"
    assert run.content == "answer"


def test_stray_close_tag_is_removed() -> None:
    # templates that open the think block in the prompt: the model only writes the close tag
    run = Run(["reasoning text", "</think>", "\n\nanswer"])
    assert run.content == "reasoning text\n\nanswer"
    assert run.reasoning == ""


def test_think_splitting_can_be_turned_off() -> None:
    run = Run(["<think>x</think>y"], split_think=False)
    assert run.content == "<think>x</think>y" and run.reasoning == ""


def test_reasoning_fragments_from_llama_server_pass_through() -> None:
    run = Run(["Answer."], reasoning=["The user", " wants", " a", " greeting", "."])
    assert run.reasoning == "The user wants a greeting."
    assert run.content == "Answer."
    assert run.per_feed[0] == [(REASONING, "The user")]


# --- tool calls in content ------------------------------------------------------------------

XML_CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"


def test_qwen_xml_call_as_the_fake_server_sends_it() -> None:
    run = Run(XML_CALL.splitlines(keepends=True), WEATHER)
    assert run.streamed == [] and run.late == []  # no text reaches the client
    assert run.names() == ["get_weather"]
    assert run.arguments() == [{"city": "Paris"}]
    call = run.calls[0]
    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"])
    assert call["type"] == "function"
    assert call["function"]["arguments"] == '{"city":"Paris"}'  # compact JSON


def test_tool_call_markers_split_at_every_position() -> None:
    text = "Checking.\n" + XML_CALL + '\n[Calling tool: get_weather({"city": "Rome"})]'
    rng = random.Random(11)
    for pieces in chunkings(text, rng, 150):
        run = Run(pieces, WEATHER)
        assert run.text(CONTENT, late=False) == "Checking.", pieces
        assert run.content == "Checking.", pieces
        assert run.arguments() == [{"city": "Paris"}, {"city": "Rome"}], pieces


def test_text_before_a_call_streams_and_text_after_it_comes_at_the_end() -> None:
    pieces = [
        "Let me",
        " check",
        ".\n\n",
        "<tool",
        "_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>",
        "\nDone",
        ".",
    ]
    run = Run(pieces, WEATHER)
    assert run.text(CONTENT, late=False) == "Let me check."  # the blank line before the call is dropped
    assert run.late == [(CONTENT, "\n\nDone.")]
    assert run.content == run.parser.content == "Let me check.\n\nDone."
    assert run.arguments() == [{"city": "Oslo"}]


def test_several_calls_in_order_with_distinct_ids() -> None:
    text = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>\n"
        "<tool_call>\n<function=get_time>\n<parameter=timezone>\nEurope/Paris\n</parameter>\n</function>\n</tool_call>"
    )
    run = Run([text], WEATHER)
    assert run.names() == ["get_weather", "get_time"]
    assert run.arguments() == [{"city": "Paris"}, {"timezone": "Europe/Paris"}]
    assert len({c["id"] for c in run.calls}) == 2
    assert run.content == ""


def test_multi_line_values_keep_their_lines_and_indentation() -> None:
    code = "def f():\n    return 1\n"
    text = (
        "<tool_call>\n<function=write>\n<parameter=path>\na.py\n</parameter>\n"
        f"<parameter=content>\n{code}\n</parameter>\n</function>\n</tool_call>"
    )
    run = Run([text], [fn("write", {"path": {"type": "string"}, "content": {"type": "string"}})])
    assert run.arguments() == [{"path": "a.py", "content": code}]


def test_values_are_typed_by_the_schema() -> None:
    properties = {
        "count": {"type": "integer"},
        "ratio": {"type": "number"},
        "flag": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "options": {"type": "object"},
        "maybe": {"type": ["integer", "null"]},
        "choice": {"anyOf": [{"type": "integer"}, {"type": "string"}]},
        "json_text": {"type": "string"},
        "label": {"type": "string"},
        "py": {"type": "object"},
        "bad_int": {"type": "integer"},
    }
    params = {
        "count": "42", "ratio": "0.5", "flag": "True", "tags": '["a", "b"]', "options": '{"x": {"y": 1}}',
        "maybe": "null", "choice": "7", "json_text": '{"keep": "as text"}', "label": "123",
        "py": "{'a': True, 'b': None}", "bad_int": "many",
    }  # fmt: skip
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params.items())
    run = Run([f"<tool_call>\n<function=t>\n{body}</function>\n</tool_call>"], [fn("t", properties)])
    assert run.arguments() == [
        {
            "count": 42, "ratio": 0.5, "flag": True, "tags": ["a", "b"], "options": {"x": {"y": 1}},
            "maybe": None, "choice": 7, "json_text": '{"keep": "as text"}', "label": "123",
            "py": {"a": True, "b": None}, "bad_int": "many",
        }
    ]  # fmt: skip


def test_without_a_schema_json_objects_and_arrays_are_embedded_and_the_rest_are_strings() -> None:
    text = (
        '<tool_call>\n<function=unknown_tool>\n<parameter=obj>\n{"a": [1, 2]}\n</parameter>\n'
        '<parameter=arr>\n[1, "x"]\n</parameter>\n<parameter=num>\n5\n</parameter>\n'
        "<parameter=flag>\ntrue\n</parameter>\n<parameter=broken>\n{not json\n</parameter>\n</function>\n</tool_call>"
    )
    run = Run([text], WEATHER)  # a tool that was not offered: no schema
    assert run.arguments() == [
        {"obj": {"a": [1, 2]}, "arr": [1, "x"], "num": "5", "flag": "true", "broken": "{not json"}
    ]


def test_repeated_parameter_last_wins_and_missing_close_tag_is_tolerated() -> None:
    text = (
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nA\n</parameter>\n"
        "<parameter=city>\nB\n<parameter=days>\n3\n</function>\n</tool_call>"
    )
    run = Run([text], WEATHER)
    assert run.arguments() == [{"city": "B", "days": 3}]


def test_hermes_json_calls() -> None:
    text = (
        'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>\n'
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Rome\\"}"}</tool_call>'
    )
    run = Run([text], WEATHER)
    assert run.arguments() == [{"city": "Paris", "days": 2}, {"city": "Rome"}]
    assert run.content == "Sure."


def test_calling_tool_inline_form() -> None:
    run = Run(['I will look. [Calling tool: get_weather({"city": "a)]b", "n": {"k": [1]}})] ok'], WEATHER)
    assert run.arguments() == [{"city": "a)]b", "n": {"k": [1]}}]
    assert run.text(CONTENT, late=False) == "I will look."
    assert run.content == "I will look.\n\nok"


def test_incomplete_calls_are_given_back_as_text() -> None:
    cut = "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar"
    run = Run(["Text ", cut], WEATHER)  # cut off by max_tokens
    assert run.calls == []
    assert run.content == "Text " + cut
    assert run.text(CONTENT, late=False) == "Text"

    for text in (
        "<tool_call>no function here</tool_call>",
        '<tool_call>{"name": "x", "arguments": [1]}</tool_call>',
        "[Calling tool: f(not json)]",
    ):
        run = Run([text], WEATHER)
        assert run.calls == [] and run.content == text, text


def test_unterminated_block_with_a_complete_body_counts() -> None:
    body = "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>"
    assert Run([body], WEATHER).arguments() == [{"city": "Paris"}]
    hermes = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    assert Run([hermes], WEATHER).arguments() == [{"city": "Oslo"}]


def test_a_repeated_opening_tag_is_absorbed() -> None:
    run = Run(["<tool_call>\n<tool_call>\n" + XML_CALL[len("<tool_call>\n") :]], WEATHER)
    assert run.arguments() == [{"city": "Paris"}]
    assert run.content == ""


def test_a_bad_block_stays_while_a_good_one_is_extracted() -> None:
    text = "<tool_call>junk</tool_call>\n" + XML_CALL
    run = Run([text], WEATHER)
    assert run.arguments() == [{"city": "Paris"}]
    assert run.content == "<tool_call>junk</tool_call>"


def test_tool_calls_inside_reasoning_are_extracted_and_not_streamed() -> None:
    run = Run(["<think>I should call it.\n", XML_CALL, "</think>", "Calling now."], WEATHER)
    assert run.arguments() == [{"city": "Paris"}]
    assert run.text(REASONING, late=False) == "I should call it."
    assert run.reasoning == "I should call it."
    assert run.content == "Calling now."


def test_reasoning_calls_come_before_content_calls() -> None:
    second = XML_CALL.replace("get_weather", "get_time")
    run = Run([second], WEATHER, reasoning=["think ", XML_CALL])
    assert run.names() == ["get_weather", "get_time"]


def test_no_tools_offered_means_no_extraction() -> None:
    run = Run([XML_CALL])
    assert run.calls == [] and run.content == XML_CALL
    forced = Run([XML_CALL], extract_tools=True)
    assert forced.names() == ["get_weather"] and forced.arguments() == [{"city": "Paris"}]  # untyped: strings


def test_anthropic_shaped_tools_give_schemas_too() -> None:
    tools = [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"days": {"type": "integer"}}}}]
    run = Run(
        ["<tool_call>\n<function=get_weather>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"], tools
    )
    assert run.arguments() == [{"days": 3}]


def test_streamed_and_final_content_agree_with_the_totals() -> None:
    rng = random.Random(3)
    text = "<think>plan</think>Intro text.\n" + XML_CALL + "\nOutro."
    for pieces in chunkings(text, rng, 100):
        run = Run(pieces, WEATHER)
        assert run.content == run.parser.content == "Intro text.\n\nOutro.", pieces
        assert run.reasoning == run.parser.reasoning == "plan", pieces


# --- extract_tool_calls (reference §8.9 cases) ---------------------------------------------------


def test_extract_single_call() -> None:
    remaining, calls = extract_tool_calls(XML_CALL)
    assert remaining == ""
    assert [(c["function"]["name"], orjson.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]


def test_extract_no_tag() -> None:
    assert extract_tool_calls("just text, <b>bold</b>") == ("just text, <b>bold</b>", [])


def test_extract_keeps_thinking_text_around_a_call() -> None:
    remaining, calls = extract_tool_calls("I need the weather.\n" + XML_CALL + "\nThen I answer.")
    assert remaining == "I need the weather.\n\nThen I answer."
    assert len(calls) == 1


def test_extract_json_object_parameter_embedded_raw() -> None:
    text = (
        '<tool_call>\n<function=f>\n<parameter=filter>\n{"a": {"b": [1, 2]}}\n</parameter>\n</function>\n</tool_call>'
    )
    _, calls = extract_tool_calls(text)
    assert calls[0]["function"]["arguments"] == '{"filter":{"a":{"b":[1,2]}}}'


def test_extract_block_without_a_name_is_left_in_the_text() -> None:
    text = "<tool_call>\n<function=>\n</function>\n</tool_call>"
    assert extract_tool_calls(text) == (text, [])
