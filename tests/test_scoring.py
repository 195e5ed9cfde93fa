"""The rule-based scorers on replies of the shapes models give, and the judge's verdict parsing."""

from __future__ import annotations

import httpx
import pytest

from vopd.scoring import (
    JudgeClient,
    ab_option,
    agreement,
    choose_option,
    clean_reply,
    first_option_letter,
    judge_says_yes,
    open_match,
    score_reply,
    yes_no,
)


@pytest.mark.parametrize(
    ("reply", "cleaned"),
    [
        ("<think>maybe (A)</think> B", "B"),
        ("I looked closely. <answer> (C) </answer>", "(C)"),
        ("Reasoning... Answer: D", "Answer: D"),
        ("  plain  ", "plain"),
        ("<think>a</think>x<answer>first</answer> then <answer>last</answer>", "last"),
    ],
)
def test_clean_reply_follows_the_official_order(reply, cleaned) -> None:
    assert clean_reply(reply) == cleaned


def test_choice_reads_our_forms_then_the_official_first_letter() -> None:
    options = ["red", "blue", "green", "white"]
    assert choose_option("<think>(A) looks wrong</think>(B)", options) == 1
    assert choose_option("Answer: C", options) == 2
    assert choose_option("green", options) == 2
    assert choose_option("The best answer is: D", options) == 3
    # Our parser finds no single option here; the official rule takes the first capital followed by a space.
    assert choose_option("B and C both fit", options) == 1
    assert first_option_letter("Z) none", 4) is None  # a letter beyond the options counts as no answer
    assert choose_option("", options) is None


@pytest.mark.parametrize(
    ("reply", "said"),
    [
        ("Yes", "yes"),
        ("no.", "no"),
        ("**Yes**, there is a dog.", "yes"),
        ("Answer: No", "no"),
        ("I think the answer is yes.", "yes"),
        ("Nothing like that", None),  # "no" must be a word, not the start of "Nothing"
        ("A cat.", None),
    ],
)
def test_pope_yes_no(reply, said) -> None:
    assert yes_no(reply) == said


def test_mmvp_ab_ignores_the_article_a() -> None:
    options = ["Open", "Closed"]
    assert ab_option("(b)", options) == 1
    assert ab_option("a", options) == 0
    assert ab_option("(a) Open", options) == 0
    assert ab_option("A door that is closed", options) == 1  # the article is not option (a); the text names (b)
    assert ab_option("a cat", options) is None


def test_open_answers_match_after_normalising() -> None:
    assert open_match("The Red car.", "red car")
    assert open_match("Answer: 42", "42")
    assert open_match("There are 7 birds", "7")
    assert open_match("(B)", "B")
    assert not open_match("blue", "red")
    assert not open_match("7.5", "7")


def test_score_reply_for_each_kind() -> None:
    assert score_reply("choice", "B", options=["x", "y"], reference="B").correct
    assert not score_reply("choice", "A", options=["x", "y"], reference="B").correct
    assert score_reply("ab", "(b)", options=["x", "y"], reference="(b)").prediction == "B"
    assert score_reply("yesno", "Yes.", options=None, reference="yes").correct
    verdict = score_reply("open", "<answer>Blue</answer>", options=None, reference="blue")
    assert verdict.correct and verdict.prediction == "Blue"
    with pytest.raises(ValueError, match="unknown scoring kind"):
        score_reply("fuzzy", "x", options=None, reference="x")


def test_judge_verdicts_and_agreement() -> None:
    assert judge_says_yes("Yes") is True and judge_says_yes("No.") is False
    assert judge_says_yes("<think>hmm</think>yes") is True
    assert judge_says_yes("The response is correct, so: Yes") is True
    assert judge_says_yes("unsure") is None
    assert agreement([True, False, True, None], [True, True, None, False]) == 0.5


def test_judge_client_through_a_mock_transport() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/chat/completions" and "authorization" not in request.headers
        return httpx.Response(200, json={"choices": [{"message": {"content": "Yes"}}]})

    client = JudgeClient(url="http://judge.invalid/v1/", model="m", transport=httpx.MockTransport(handler))
    assert client.judge(["q"], ["a"], ["a"]) == [True]
