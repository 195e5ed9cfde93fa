"""How a published suite's answer is judged right or wrong: rule-based scorers, and an optional LLM judge.

The paper's evaluation cleans each reply the same way before scoring (the text after a closed reasoning block, the
inside of ``<answer>...</answer>``, or the text from "Answer:" on), then grades it by rules per kind of question and
sends what the rules do not accept to a judge model that answers Yes or No. Here the rules are the default (no model,
no network, the same verdict on every run); the judge is optional and talks to any OpenAI-compatible
``/chat/completions`` endpoint over plain HTTP (httpx), so no vendor client is needed.

Kinds of question (``BenchmarkItem.scoring`` in ``vopd.benchmarks``):

* ``choice``: lettered multiple choice. The option is read by ``vopd.answering.parse_choice`` (a letter, "Answer: B",
  "(B)" or the option's text); when that names none, the first option letter found as the official grader finds it.
* ``yesno``: POPE. "yes"/"no" at the start of the cleaned reply, else as its last word.
* ``ab``: MMVP's lower-case ``(a)``/``(b)`` options (a bare "a" counts only when it is the whole reply, so the article
  in "a dog" is not read as option (a)), else an option's text.
* ``open``: free-form (ZoomBench, VisualProbe). Normalised exact match (case, punctuation, articles and spaces
  ignored); a one-letter reference is compared with the first option letter of the reply, a number with the first
  number in it.

This module sits below ``vopd.benchmarks`` and imports only ``vopd.answering`` from the library.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from vopd.answering import normalize_answer, parse_choice

SCORING_KINDS = ("choice", "yesno", "ab", "open")
JUDGE_KEY_ENV = "VOPD_JUDGE_API_KEY"  # the judge's API key is read from here, never from a config or a job row

# The question the official judge is asked, in our words with the same three slots and the same Yes/No contract.
JUDGE_PROMPT = (
    "Your task is to judge whether the response expresses the same meaning as the answer of a question.\n"
    "The question is: {question}\n"
    "The answer is: {reference}\n"
    "The response is: {response}\n"
    "Please check and compare them and then judge. If the response is correct, your output should be Yes. "
    "Otherwise, your output should be No. Directly give me your output."
)

_PAREN_LETTER = re.compile(r"\(([A-Z])\)")
_MARKED_LETTER = re.compile(r"([A-Z])[.)\s]")
_ANY_CAPITAL = re.compile(r"[A-Z]")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_AB_PAREN = re.compile(r"\(([ab])\)")
_AB_ALONE = re.compile(r"^\(?([ab])\)?[.:]?$")


def clean_reply(text: str) -> str:
    """The part of a reply that is scored: after the last ``</think>``, inside the last ``<answer>...</answer>``,
    else from the first "Answer:" on (the official inference script's order), stripped."""
    text = text.rsplit("</think>", 1)[-1]
    start = text.rfind("<answer>")
    if start != -1:
        end = text.find("</answer>", start)
        if end != -1:
            return text[start + len("<answer>") : end].strip()
    if "Answer:" in text:
        return text[text.find("Answer:") :].strip()
    return text.strip()


def first_option_letter(text: str, count: int) -> int | None:
    """The option index the official grader's first-letter rule reads: a parenthesised letter, else a capital
    followed by '.', ')' or a space, else any capital; only letters within the ``count`` options count."""
    for pattern in (_PAREN_LETTER, _MARKED_LETTER, _ANY_CAPITAL):
        for match in pattern.finditer(text):
            index = ord(match.group(match.lastindex or 0)) - ord("A")
            if 0 <= index < count:
                return index
            break  # the official rule takes the first match of each pattern only
    return None


def choose_option(text: str, options: Sequence[str]) -> int | None:
    """The option a reply names: our lenient parser first, the official first-letter rule when it finds none."""
    cleaned = clean_reply(text)
    choice = parse_choice(cleaned, options)
    return choice if choice is not None else first_option_letter(cleaned, len(options))


def yes_no(text: str) -> str | None:
    """'yes' or 'no' from a POPE reply (markdown stars and an "Answer:" prefix ignored), None when it says neither."""
    reply = clean_reply(text).strip().lstrip("*").strip()
    if reply.lower().startswith("answer"):
        reply = reply[len("answer") :].lstrip(":").lstrip("*").strip()
    lowered = reply.lower()
    for word in ("yes", "no"):
        if re.match(rf"{word}\b", lowered):
            return word
    words = lowered.rstrip(".!*").split()
    last = words[-1].strip("*.,!") if words else ""
    return last if last in ("yes", "no") else None


def ab_option(text: str, options: Sequence[str]) -> int | None:
    """MMVP's option (0 for (a), 1 for (b)) from a reply, None when it names neither."""
    reply = clean_reply(text).strip().lower()
    if match := _AB_PAREN.search(reply):
        return "ab".index(match.group(1))
    if match := _AB_ALONE.match(reply):
        return "ab".index(match.group(1))
    lowered = reply
    named = [i for i, option in enumerate(options) if re.search(rf"(?<!\w){re.escape(option.lower())}(?!\w)", lowered)]
    return named[0] if len(named) == 1 else None


def open_match(text: str, reference: str) -> bool:
    """Whether a free-form reply gives the reference answer (see the module docstring for the rules)."""
    reply = clean_reply(text)
    expected = clean_reply(reference)
    if normalize_answer(reply.removeprefix("Answer:")) == normalize_answer(expected):
        return True
    stripped = expected.strip().strip("()").strip()
    if len(stripped) == 1 and stripped.isalpha() and stripped.isupper():
        return first_option_letter(reply.removeprefix("Answer:"), 26) == ord(stripped) - ord("A")
    if _NUMBER.fullmatch(stripped):
        found = _NUMBER.search(reply)
        return found is not None and float(found.group()) == float(stripped)
    return False


@dataclass(frozen=True)
class RuleVerdict:
    """What the rules read from a reply (an option index, 'yes'/'no', or the cleaned text) and whether it is right."""

    prediction: str | None
    choice: int | None
    correct: bool


def score_reply(kind: str, text: str, *, options: Sequence[str] | None, reference: str) -> RuleVerdict:
    """The rule-based verdict on one reply. ``reference`` is the correct option's letter for ``choice`` and ``ab``,
    'yes'/'no' for ``yesno`` and the answer text for ``open``."""
    if kind in ("choice", "ab"):
        if not options:
            raise ValueError(f"a {kind!r} question needs its options")
        choice = choose_option(text, options) if kind == "choice" else ab_option(text, options)
        expected = ord(reference.strip().strip("()").upper()) - ord("A")
        letter = None if choice is None else chr(ord("A") + choice)
        return RuleVerdict(letter, choice, choice is not None and choice == expected)
    if kind == "yesno":
        said = yes_no(text)
        return RuleVerdict(said, None, said is not None and said == reference.strip().lower())
    if kind == "open":
        cleaned = clean_reply(text)
        return RuleVerdict(cleaned or None, None, open_match(text, reference))
    raise ValueError(f"unknown scoring kind {kind!r}; known kinds: {', '.join(SCORING_KINDS)}")


# --------------------------------------------------------------------------- the optional LLM judge
def judge_says_yes(reply: str) -> bool | None:
    """The judge's verdict: True for Yes, False for No, None when it answers neither (counted as No, as officially)."""
    words = re.findall(r"[a-z]+", clean_reply(reply).lower())
    if not words:
        return None
    if words[0] in ("yes", "no"):
        return words[0] == "yes"
    said = {word for word in words if word in ("yes", "no")}
    return said.pop() == "yes" if len(said) == 1 else None


@dataclass
class JudgeClient:
    """Asks an OpenAI-compatible endpoint (``{url}/chat/completions``) the official Yes/No question, greedily.

    The key is taken from ``api_key`` or else the ``VOPD_JUDGE_API_KEY`` environment variable, so it never has to be
    written into a config file or a job row. Failed calls are retried ``retries`` times and then recorded as None
    (no verdict), which the summary counts as No and reports as ``errors``.
    """

    url: str
    model: str
    api_key: str | None = None
    max_tokens: int = 256
    timeout_s: float = 60.0
    retries: int = 2
    workers: int = 8
    transport: httpx.BaseTransport | None = None  # tests may route requests without a socket

    def _headers(self) -> dict[str, str]:
        key = self.api_key if self.api_key is not None else os.environ.get(JUDGE_KEY_ENV)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def ask(self, client: httpx.Client, prompt: str) -> str | None:
        """The judge's raw reply to one prompt, or None when every try failed."""
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": self.max_tokens,
        }
        for _ in range(self.retries + 1):
            try:
                response = client.post(f"{self.url.rstrip('/')}/chat/completions", json=body, headers=self._headers())
                response.raise_for_status()
                return str(response.json()["choices"][0]["message"].get("content") or "")
            except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError):
                continue
        return None

    def judge(self, questions: Sequence[str], references: Sequence[str], replies: Sequence[str]) -> list[bool | None]:
        """One verdict per (question, reference, reply): True, False, or None when the judge gave no usable answer."""
        prompts = [
            JUDGE_PROMPT.format(question=q, reference=r, response=clean_reply(a))
            for q, r, a in zip(questions, references, replies, strict=True)
        ]
        with (
            httpx.Client(timeout=self.timeout_s, transport=self.transport) as client,
            ThreadPoolExecutor(max_workers=max(1, self.workers)) as pool,
        ):
            raw = list(pool.map(lambda prompt: self.ask(client, prompt), prompts))
        return [None if reply is None else judge_says_yes(reply) for reply in raw]


def agreement(first: Sequence[bool | None], second: Sequence[bool | None]) -> float:
    """The share of items on which two scorers give the same verdict (an item either leaves unscored is skipped)."""
    pairs = [(a, b) for a, b in zip(first, second, strict=True) if a is not None and b is not None]
    return sum(a == b for a, b in pairs) / len(pairs) if pairs else float("nan")
