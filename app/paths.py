"""Server paths out of what clients read: the API answers with paths relative to ``$VOPD_HOME``.

A job's ``resolved_config`` holds the absolute paths the worker runs (models, datasets, the output folder), and some
refusals name a folder; a client needs neither the server's directory layout nor its user name. Paths under the
home become ``$VOPD_HOME/...`` (still telling which model or folder was meant); any other absolute path becomes
``<server path>``.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

HOME = "$VOPD_HOME"
SERVER_PATH = "<server path>"


def public_text(text: str, home: PurePosixPath | str) -> str:
    """``text`` with every mention of the home folder written as $VOPD_HOME."""
    root = str(home).rstrip("/")
    return re.sub(re.escape(root) + r"(?=/|\b|$)", lambda _: HOME, text) if root else text


def public_value(value: Any, home: PurePosixPath | str) -> Any:
    """A JSON value (a config) with absolute paths made relative to the home, or hidden when outside it."""
    if isinstance(value, dict):
        return {key: public_value(item, home) for key, item in value.items()}
    if isinstance(value, list):
        return [public_value(item, home) for item in value]
    if isinstance(value, str) and value.startswith("/"):
        root = str(home).rstrip("/")
        if value == root or value.startswith(root + "/"):
            return HOME + value[len(root) :]
        return SERVER_PATH
    return value
