"""The OpenAI-compatible endpoint, called with the ``openai`` Python client itself (over the test client's transport):
model list, a greedy reply with an inline image, streaming, the API key, limits and which image URLs are accepted."""

from __future__ import annotations

import base64
import io
import json

import openai
import pytest
from PIL import Image

from tests.service.conftest import Service

pytestmark = pytest.mark.services

QUESTION = "What color is the small shape inside the box?\nA. red\nB. green\nC. blue\nD. yellow"


def _client(service: Service, headers: dict[str, str] | None) -> openai.OpenAI:
    key = (headers or {}).get("Authorization", "").removeprefix("Bearer ") or "no-key"
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=service.client, max_retries=0)


def _data_uri(color: tuple[int, int, int] = (0, 0, 255)) -> str:
    image = Image.new("RGB", (112, 112), (240, 240, 240))
    image.paste(color, (50, 50, 62, 62))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _messages(url: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}],
        }
    ]


def test_models_and_a_greedy_reply(service: Service) -> None:
    client = _client(service, service.alice)
    assert "tiny" in [model.id for model in client.models.list()]
    reply = client.chat.completions.create(
        model="tiny",
        messages=_messages(_data_uri()),
        max_tokens=6,
        temperature=0,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert reply.object == "chat.completion" and reply.model == "tiny"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 16 and 1 <= reply.usage.completion_tokens <= 6  # the image's tokens count
    again = client.chat.completions.create(model="tiny", messages=_messages(_data_uri()), max_tokens=6, temperature=0)
    assert again.choices[0].message.content == choice.message.content  # greedy at temperature 0


def test_streaming_sends_the_same_reply_in_pieces(service: Service) -> None:
    client = _client(service, service.alice)
    whole = client.chat.completions.create(model="tiny", messages=_messages(_data_uri()), max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=_messages(_data_uri()), max_tokens=8, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-1])


def test_seeded_sampling_repeats(service: Service) -> None:
    client = _client(service, service.alice)
    replies = {
        client.chat.completions.create(
            model="tiny", messages=_messages(_data_uri()), max_tokens=8, temperature=1.0, seed=11
        )
        .choices[0]
        .message.content
        for _ in range(2)
    }
    assert len(replies) == 1


def test_no_key_or_a_wrong_key_is_refused(service: Service) -> None:
    with pytest.raises(openai.AuthenticationError):
        _client(service, None).models.list()
    with pytest.raises(openai.AuthenticationError):
        _client(service, {"Authorization": "Bearer vopd_wrong"}).chat.completions.create(
            model="tiny", messages=_messages(_data_uri()), max_tokens=2
        )


def test_limits_and_unknown_models(service: Service) -> None:
    client = _client(service, service.alice)
    limit = service.settings.max_inspect_new_tokens
    with pytest.raises(openai.UnprocessableEntityError, match="VOPD_MAX_INSPECT_NEW_TOKENS"):
        client.chat.completions.create(model="tiny", messages=_messages(_data_uri()), max_tokens=limit + 1)
    with pytest.raises(openai.NotFoundError, match="/v1/models"):
        client.chat.completions.create(model="no-such-model", messages=_messages(_data_uri()), max_tokens=2)
    with pytest.raises(openai.UnprocessableEntityError, match="not valid base64"):
        client.chat.completions.create(model="tiny", messages=_messages("data:image/png;base64,@@@"), max_tokens=2)
    too_long = [{"role": "user", "content": "x" * (service.settings.max_question_chars + 1)}]
    with pytest.raises(openai.UnprocessableEntityError, match="VOPD_MAX_QUESTION_CHARS"):
        client.chat.completions.create(model="tiny", messages=too_long, max_tokens=2)


def test_only_this_servers_own_images_are_read(service: Service) -> None:
    client = _client(service, service.alice)
    for url in ("http://169.254.169.254/latest/meta-data", "file:///etc/passwd", "http://example.com/a.png"):
        with pytest.raises(openai.UnprocessableEntityError, match="no other URL is fetched"):
            client.chat.completions.create(model="tiny", messages=_messages(url), max_tokens=2)
    # A sample of a dataset the key may read, by its URL on this server: read from disk, same reply as inline.
    own = "http://testserver/api/datasets/synth-64/samples/2/image"
    image = service.client.get("/api/datasets/synth-64/samples/2/image", headers=service.alice)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    inline = "data:image/png;base64," + base64.b64encode(image.content).decode()
    by_url = client.chat.completions.create(model="tiny", messages=_messages(own), max_tokens=4, temperature=0)
    by_value = client.chat.completions.create(model="tiny", messages=_messages(inline), max_tokens=4, temperature=0)
    assert by_url.choices[0].message.content == by_value.choices[0].message.content
    assert by_url.usage.prompt_tokens == by_value.usage.prompt_tokens
    with pytest.raises(openai.UnprocessableEntityError, match="no sample 9999"):
        client.chat.completions.create(
            model="tiny", messages=_messages("/api/datasets/synth-64/samples/9999/image"), max_tokens=2
        )
    assert service.client.get("/api/datasets/synth-64/samples/2/image").status_code == 401


def test_the_raw_stream_ends_with_done(service: Service) -> None:
    body = {"model": "tiny", "messages": _messages(_data_uri()), "max_tokens": 3, "temperature": 0, "stream": True}
    with service.client.stream("POST", "/v1/chat/completions", headers=service.alice, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all(json.loads(event)["object"] == "chat.completion.chunk" for event in events[:-1])
