"""The studio guard's pure parts: whose cache folder is whose, what counts as a cross-site request, and log lines
without secrets."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from frontend.guard import Account, UploadOwners, _local_paths, foreign_origin
from vopd.redact import RedactSecrets, redact

ALICE, BOB = Account(1, "alice"), Account(2, "bob")


def test_a_cache_folder_is_readable_only_by_the_accounts_it_was_shown_to(tmp_path: Path) -> None:
    cache = tmp_path / "gradio"
    folder = "a" * 64
    (cache / folder).mkdir(parents=True)
    (cache / folder / "x.png").write_bytes(b"x")
    owners = UploadOwners(str(cache))
    path = str(cache / folder / "x.png")
    assert not owners.may_read(path, ALICE), "nothing recorded: refused"
    owners.record(f'["{path}"]', ALICE)
    assert owners.may_read(path, ALICE) and not owners.may_read(path, BOB)
    for variant in (f"{cache}//{folder}/x.png", f"{cache}/{folder}/../{folder}/x.png", f"{cache}/./{folder}/x.png"):
        assert owners.may_read(variant, ALICE) and not owners.may_read(variant, BOB), variant
    link = tmp_path / "link"
    os.symlink(cache / folder, link)
    assert not owners.may_read(str(link / "x.png"), BOB), "a link into the cache is the cache"
    assert owners.may_read(str(tmp_path / "elsewhere.txt"), BOB), "outside the cache Gradio's own rules decide"
    assert not owners.may_read(str(cache), BOB)


def test_a_mention_split_between_two_chunks_is_still_recorded(tmp_path: Path) -> None:
    owners = UploadOwners(str(tmp_path))
    text = f'data: {{"path": "{tmp_path}/{"b" * 64}/out.webp"}}\n\n'
    first, second = text[:30], text[30:]
    tail = first[-owners.tail_chars :]
    owners.record(first, ALICE)
    owners.record(tail + second, ALICE)
    assert owners.may_read(f"{tmp_path}/{'b' * 64}/out.webp", ALICE)


def test_paths_a_callback_body_names_are_found() -> None:
    body = (
        '{"data": [{"path": "/tmp/gradio/x/y.png", "url": "http://h/ui/gradio_api/file=/tmp/gradio/z/w.png"}, "a/b"]}'
    )
    assert set(_local_paths(body)) == {"/tmp/gradio/x/y.png", "/tmp/gradio/z/w.png", "a/b"}
    assert list(_local_paths("not json")) == []


def test_cross_site_requests_are_recognised() -> None:
    host = {"host": "127.0.0.1:8000"}
    assert not foreign_origin(host), "no Origin: a script, not a browser's cross-site request"
    assert not foreign_origin({**host, "origin": "http://127.0.0.1:8000"})
    assert foreign_origin({**host, "origin": "https://evil.example"})
    assert foreign_origin({**host, "origin": "null"})
    assert foreign_origin({**host, "origin": "http://127.0.0.1:9000"}), "another port is another origin"
    assert foreign_origin({**host, "sec-fetch-site": "cross-site"})
    assert foreign_origin({**host, "sec-fetch-site": "same-site"})
    assert not foreign_origin({**host, "sec-fetch-site": "same-origin", "origin": "http://127.0.0.1:8000"})
    behind_proxy = {"host": "127.0.0.1:8000", "x-forwarded-host": "studio.example.org"}
    assert not foreign_origin({**behind_proxy, "origin": "https://studio.example.org"})
    assert foreign_origin({**behind_proxy, "origin": "https://evil.example"})


def test_log_lines_lose_keys_codes_and_sessions() -> None:
    key = "vopd_" + "K" * 43
    line = f'127.0.0.1:1 - "GET /signin?key={key}&next=%2Fui%2F HTTP/1.1" 303'
    assert redact(line) == '127.0.0.1:1 - "GET /signin?key=[redacted]&next=%2Fui%2F HTTP/1.1" 303'
    assert "abc" not in redact("GET /signin?code=abc HTTP/1.1")
    assert redact(f"Bearer vopds_{'s' * 40} and vopdc_{'c' * 40}") == "Bearer vopds_[redacted] and vopdc_[redacted]"
    # Through uvicorn's own access formatter, which unpacks the record's five arguments.
    from uvicorn.logging import AccessFormatter

    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("1.2.3.4:5", "GET", f"/signin?key={key}", "1.1", 303),
        None,
    )
    assert RedactSecrets().filter(record)
    written = AccessFormatter('%(client_addr)s - "%(request_line)s" %(status_code)s').format(record)
    assert written == '1.2.3.4:5 - "GET /signin?key=[redacted] HTTP/1.1" 303 See Other', written
