"""Automatic model choice: constraints, rules, classify with its fallback, profiles, config errors."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import pytest

from auxot_common.autoroute import (
    AutoConfig,
    AutoRouteError,
    Candidate,
    Choice,
    ClassifierPrompt,
    ConfigError,
    ModelProfile,
    ProfileBook,
    RequestTraits,
    Rule,
    choose,
    classifier_prompt,
    parse_auto_config,
    parse_classifier_answer,
    qualify,
    traits_from,
)

SMALL = Candidate("small", context=2048, capabilities=frozenset({"chat", "tools"}))
BIG = Candidate("big", context=32768, capabilities=frozenset({"chat", "tools", "reasoning"}))
EYES = Candidate("eyes", context=8192, capabilities=frozenset({"chat", "vision"}))
NAMES = ["small", "big", "eyes"]


def user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def run(coro: Coroutine[Any, Any, Choice]) -> Choice:
    return asyncio.run(coro)


def test_traits_estimate_prompt_tools_images_and_thinking() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {}}]},
    ]
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    traits = traits_from(messages, tools, max_tokens=100, reasoning_effort="high", key_name="ci")
    assert traits.images and traits.tools and traits.reasoning
    assert traits.text == "what is this"
    assert traits.prompt_tokens > 1000  # an image counts as about a thousand tokens
    assert traits.needed_context == traits.prompt_tokens + 100
    plain = traits_from(user("hello there"), params={"chat_template_kwargs": {"enable_thinking": False}})
    assert not plain.images and not plain.tools and not plain.reasoning
    assert 2 <= plain.prompt_tokens < 20
    # the Messages API translation marks "thinking disabled" as effort "none"
    assert not traits_from(user("hi"), reasoning_effort="none").reasoning
    assert traits_from(user("hi"), params={"chat_template_kwargs": {"enable_thinking": True}}).reasoning


def test_prompt_longer_than_small_context_goes_to_the_big_model() -> None:
    long_text = "word " * 3000
    config = AutoConfig(rules=[Rule(model="small")])  # the rule would send everything to small
    choice = run(choose(config, traits_from(user(long_text)), [SMALL, BIG]))
    assert choice.model == "big"
    assert "excludes small" in choice.reason and "only model that qualifies" in choice.reason
    choice = run(choose(config, traits_from(user(long_text)), [SMALL, BIG, EYES]))
    assert choice.model == "big"
    assert "rule(s) 1" in choice.reason  # the matching rule was skipped, and the reason says so


def test_max_tokens_counts_against_the_context() -> None:
    traits = traits_from(user("short"), max_tokens=4000)
    assert [c.name for c in qualify(traits, [SMALL, BIG]).models] == ["big"]


def test_nothing_fits_is_a_400_naming_the_largest_context() -> None:
    with pytest.raises(AutoRouteError) as caught:
        qualify(RequestTraits(prompt_tokens=100_000), [SMALL, BIG])
    assert caught.value.status == 400 and "32768" in caught.value.message


def test_images_need_vision_or_400() -> None:
    traits = RequestTraits(prompt_tokens=1100, images=True)
    assert [c.name for c in qualify(traits, [SMALL, BIG, EYES]).models] == ["eyes"]
    with pytest.raises(AutoRouteError, match="images"):
        qualify(traits, [SMALL, BIG])


def test_tools_need_tool_calling() -> None:
    traits = RequestTraits(prompt_tokens=10, tools=True)
    assert [c.name for c in qualify(traits, [EYES, SMALL]).models] == ["small"]
    with pytest.raises(AutoRouteError, match="tools"):
        qualify(traits, [EYES])


def test_served_models_preferred_but_unserved_still_qualify_alone() -> None:
    idle_small = Candidate("small", context=2048, capabilities=SMALL.capabilities, serving=False)
    shortlist = qualify(RequestTraits(prompt_tokens=10), [idle_small, BIG])
    assert [c.name for c in shortlist.models] == ["big"]
    assert any("not served now: small" in note for note in shortlist.notes)
    # nothing is served: the request may still wait for a worker
    assert [c.name for c in qualify(RequestTraits(prompt_tokens=10), [idle_small]).models] == ["small"]


def test_thinking_prefers_reasoning_models() -> None:
    assert [c.name for c in qualify(RequestTraits(10, reasoning=True), [SMALL, BIG]).models] == ["big"]
    # no reasoning model qualifies: thinking is a preference, not a constraint
    assert [c.name for c in qualify(RequestTraits(10, reasoning=True), [SMALL]).models] == ["small"]


def test_rules_route_in_order_first_match_wins() -> None:
    config = parse_auto_config(
        {
            "rules": [
                {"model": "big", "tools": True},
                {"model": "big", "regex": r"(?i)\bprove\b"},
                {"model": "big", "keywords": ["refactor"]},
                {"model": "small", "keys": ["cheap"]},
                {"model": "small", "max_prompt_tokens": 50},
            ],
            "default": "big",
        },
        NAMES,
    )
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    cases = [
        (traits_from(user("hi"), [tool]), "big", "rule 1"),
        (traits_from(user("Prove that 2+2=4")), "big", "rule 2"),
        (traits_from(user("please REFACTOR this")), "big", "rule 3"),
        (traits_from(user("x " * 200), key_name="cheap"), "small", "rule 4"),
        (traits_from(user("hello")), "small", "rule 5"),
        (traits_from(user("tell me a long story " * 30)), "big", "default"),
    ]
    for traits, model, reason in cases:
        choice = run(choose(config, traits, [SMALL, BIG]))
        assert (choice.model, reason in choice.reason) == (model, True), choice


def test_no_rule_and_no_default_prefers_the_fastest_measured_model() -> None:
    fast = Candidate("small", context=2048, prefill_tps=2000, decode_tps=120)
    slow = Candidate("big", context=32768, prefill_tps=400, decode_tps=20)
    unmeasured = Candidate("eyes", context=8192)
    choice = run(choose(AutoConfig(), RequestTraits(prompt_tokens=50, max_tokens=100), [unmeasured, slow, fast]))
    assert choice.model == "small" and "fastest measured" in choice.reason
    # none measured yet: catalog order
    choice = run(choose(AutoConfig(), RequestTraits(prompt_tokens=50), [Candidate("a"), Candidate("b")]))
    assert choice.model == "a" and "first configured" in choice.reason


def test_classifier_prompt_has_a_grammar_of_the_names() -> None:
    prompt = classifier_prompt(RequestTraits(10, text="sum these numbers"), [SMALL, BIG])
    assert prompt.params["grammar"] == 'root ::= "small" | "big"'
    assert "sum these numbers" in prompt.messages[-1]["content"]
    assert prompt.max_tokens >= len("small")
    quoted = classifier_prompt(RequestTraits(10), [Candidate('we"ird\\')])
    assert quoted.params["grammar"] == 'root ::= "we\\"ird\\\\"'


def test_parse_classifier_answer() -> None:
    assert parse_classifier_answer(" Big\n", [SMALL, BIG]) == "big"
    assert parse_classifier_answer('"small".', [SMALL, BIG]) == "small"
    assert parse_classifier_answer("small model, because", [SMALL, BIG]) == "small"
    assert parse_classifier_answer("medium", [SMALL, BIG]) is None


def test_classify_uses_the_classifier_answer() -> None:
    config = AutoConfig(policy="classify", classifier="small", rules=[Rule(model="small")])
    seen: list[ClassifierPrompt] = []

    async def classifier(prompt: ClassifierPrompt) -> str:
        seen.append(prompt)
        return "big"

    choice = run(choose(config, RequestTraits(10, text="hello"), [SMALL, BIG], classifier))
    assert choice.model == "big" and "classifier small chose it" in choice.reason
    assert seen and "grammar" in seen[0].params


def test_classify_falls_back_to_rules_on_timeout_error_and_nonsense() -> None:
    config = AutoConfig(policy="classify", classifier="small", rules=[Rule(model="small")], classify_timeout=0.05)

    async def slow(prompt: ClassifierPrompt) -> str:
        await asyncio.sleep(5)
        return "big"

    async def broken(prompt: ClassifierPrompt) -> str:
        raise ConnectionError("worker gone")

    async def nonsense(prompt: ClassifierPrompt) -> str:
        return "banana"

    for classifier, said in ((slow, "timed out after 50 ms"), (broken, "ConnectionError"), (nonsense, "no model")):
        choice = run(choose(config, RequestTraits(10), [SMALL, BIG], classifier))
        assert choice.model == "small" and said in choice.reason and "rule 1" in choice.reason


def test_header_reason_is_one_printable_bounded_line() -> None:
    reason = Choice("m", "a\nb—c" + "x" * 1000).header_reason
    assert "\n" not in reason and reason.isascii() and len(reason) <= 300


def test_is_auto_by_name_and_alias_globs() -> None:
    config = parse_auto_config({"name": "Router", "aliases": ["gpt-*", "best"]}, NAMES)
    assert config.is_auto("router") and config.is_auto("GPT-4o") and config.is_auto("best")
    assert not config.is_auto("small") and not config.is_auto("")
    assert AutoConfig().is_auto("auto")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"rules": [{"model": "medium"}]}, "'medium' is not a configured model"),
        ({"rules": [{"model": "small", "regex": "("}]}, "regex"),
        ({"rules": [{"model": "small", "length": 3}]}, "unknown condition 'length'"),
        ({"policy": "vote"}, "policy must be"),
        ({"policy": "classify"}, "classifier"),
        ({"name": "small"}, "also the name of a configured model"),
        ({"classify_timeout_ms": 0}, "positive"),
        ({"colour": "red"}, "unknown setting 'colour'"),
    ],
)
def test_config_errors_are_one_line(raw: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_auto_config(raw, NAMES)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_profiles_measure_fresh_prefill_and_decode() -> None:
    profile = ModelProfile()
    profile.observe(prompt_tokens=1100, cached_tokens=100, prefill_s=0.5, output_tokens=101, decode_s=2.0)
    assert profile.prefill_tps == 2000 and profile.decode_tps == 50
    profile.observe(prompt_tokens=1100, cached_tokens=100, prefill_s=1.0, output_tokens=101, decode_s=1.0)
    assert 1000 < profile.prefill_tps < 2000 and 50 < profile.decode_tps < 100
    profile.observe(prompt_tokens=500, cached_tokens=495, prefill_s=0.01, output_tokens=2, decode_s=0.01)
    assert 1000 < profile.prefill_tps < 2000  # a cached prompt and a two-token answer measure nothing
    assert profile.fields()["measured_jobs"] == 3
    book = ProfileBook(["a"])
    book.observe("unknown", prompt_tokens=100, cached_tokens=0, prefill_s=1, output_tokens=10, decode_s=1)
    assert book.get("unknown") is None
    book.reset_names(["a", "b"])
    assert book.get("b") is not None
