"""Secrets out of log lines: what a URL's ``key=`` / ``code=`` carries, and anything shaped like a key, session or
sign-in code, is replaced before a line is written.

The service never puts a key in a URL any more, but a user may still paste an old ``/signin?key=...`` link, and
uvicorn's access log writes every request line as it came. Standard library only: the API and the standalone
studio both install it on uvicorn's access logger.
"""

from __future__ import annotations

import logging
import re

REDACTED = "[redacted]"
_QUERY_SECRET = re.compile(r"(?i)([?&;](?:key|code|api_key|token|session)=)[^&;#\s\"']*")
_TOKEN = re.compile(r"\b(vopd[cs]?_)[A-Za-z0-9_-]{6,}")
ACCESS_LOGGER = "uvicorn.access"


def redact(text: str) -> str:
    """``text`` with query secrets and key-, session- and code-shaped tokens replaced."""
    return _TOKEN.sub(rf"\g<1>{REDACTED}", _QUERY_SECRET.sub(rf"\g<1>{REDACTED}", text))


def _redact_value(value: object) -> object:
    return redact(value) if isinstance(value, str) else value


class RedactSecrets(logging.Filter):
    """A logging filter that redacts a record's format string and each of its string arguments (it never drops a
    record). The arguments keep their shape: uvicorn's access formatter unpacks them as (client, method, path,
    version, status)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redact_value(value) for value in record.args)
        elif isinstance(record.args, dict):
            record.args = {name: _redact_value(value) for name, value in record.args.items()}
        return True


def install_access_log_redaction(logger_name: str = ACCESS_LOGGER) -> None:
    """Add ``RedactSecrets`` to a logger once (idempotent; uvicorn's logging set-up keeps a logger's filters)."""
    logger = logging.getLogger(logger_name)
    if not any(isinstance(existing, RedactSecrets) for existing in logger.filters):
        logger.addFilter(RedactSecrets())


class ErrorsOnly(logging.Filter):
    """Lets through only access records of requests answered with ``min_status`` or above: the quiet access log of
    ``vopd serve``, where a polling studio would otherwise write a line several times a second. Records it cannot read
    a status from pass (it never hides what it does not understand)."""

    def __init__(self, min_status: int = 400) -> None:
        super().__init__()
        self.min_status = min_status

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        status = args[4] if isinstance(args, tuple) and len(args) >= 5 else None  # (client, method, path, http, status)
        return not isinstance(status, int) or status >= self.min_status


def install_quiet_access_log(mode: str, logger_name: str = ACCESS_LOGGER) -> None:
    """Redaction always; for ``mode`` "errors" also ``ErrorsOnly`` (for "off" the server writes no access line)."""
    install_access_log_redaction(logger_name)
    logger = logging.getLogger(logger_name)
    if mode == "errors" and not any(isinstance(existing, ErrorsOnly) for existing in logger.filters):
        logger.addFilter(ErrorsOnly())
