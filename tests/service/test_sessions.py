"""Sessions and one-time sign-in codes at the database level (SQLite), and the CLI that prints a sign-in link."""

from __future__ import annotations

import os
import subprocess
from datetime import timedelta
from pathlib import Path

from sqlalchemy import func, select, update

from app.auth import (
    create_api_key,
    create_session,
    create_signin_code,
    end_session,
    find_api_key,
    prune_sessions,
    redeem_signin_code,
    revoke_api_key,
)
from app.db import make_engine, make_session_factory, run_migrations, session_scope
from app.serve import vopd_command
from app.settings import Settings
from app.tables import BrowserSession, SigninCode, utcnow


def _factory(tmp_path: Path):
    settings = Settings(home=tmp_path, database_url_env=f"sqlite:///{tmp_path}/vopd.db")
    engine = make_engine(settings)
    run_migrations(engine, settings)
    return settings, engine, make_session_factory(engine)


def test_a_session_acts_as_its_key_until_it_expires_ends_or_the_key_is_revoked(tmp_path: Path) -> None:
    _, engine, factory = _factory(tmp_path)
    with session_scope(factory) as session:
        key_row, key = create_api_key(session, "alice")
        _, token = create_session(session, key_row, 3600)
        _, expiring = create_session(session, key_row, 3600)
        _, ended = create_session(session, key_row, 3600)
    with session_scope(factory) as session:
        assert find_api_key(session, token).id == key_row.id  # type: ignore[union-attr]
        assert find_api_key(session, token + "x") is None and find_api_key(session, "vopds_") is None
        session.execute(update(BrowserSession).where(BrowserSession.id == 2).values(expires_at=utcnow()))
        assert end_session(session, ended) and not end_session(session, ended)
    with session_scope(factory) as session:
        assert find_api_key(session, expiring) is None and find_api_key(session, ended) is None
        assert find_api_key(session, token) is not None
        revoke_api_key(session, str(key_row.id))
    with session_scope(factory) as session:
        assert find_api_key(session, token) is None and find_api_key(session, key) is None
        assert session.scalar(select(func.count()).where(BrowserSession.ended_at.is_(None))) == 0
    engine.dispose()


def test_a_code_is_spent_once_and_refused_when_expired_or_its_key_is_revoked(tmp_path: Path) -> None:
    _, engine, factory = _factory(tmp_path)
    with session_scope(factory) as session:
        key_row, _ = create_api_key(session, "alice")
        _, code = create_signin_code(session, key_row, 600)
        _, expired = create_signin_code(session, key_row, 600)
        _, revoked_later = create_signin_code(session, key_row, 600)
        session.execute(update(SigninCode).where(SigninCode.id == 2).values(expires_at=utcnow() - timedelta(1)))
    with session_scope(factory) as session:
        opened = redeem_signin_code(session, code, 3600)
        assert opened is not None and find_api_key(session, opened[1]).id == key_row.id  # type: ignore[union-attr]
        assert redeem_signin_code(session, code, 3600) is None, "good once"
        assert redeem_signin_code(session, expired, 3600) is None
        assert redeem_signin_code(session, "vopdc_unknown", 3600) is None
        revoke_api_key(session, str(key_row.id))
        assert redeem_signin_code(session, revoked_later, 3600) is None
    with session_scope(factory) as session:  # dead for over a day: forgotten by the reaper's pass
        session.execute(update(SigninCode).values(expires_at=utcnow() - timedelta(days=2)))
        session.execute(update(BrowserSession).values(ended_at=utcnow() - timedelta(days=2)))
        assert prune_sessions(session) == 4
    engine.dispose()


def test_the_cli_prints_a_one_time_link_for_the_local_key_or_a_named_one(tmp_path: Path) -> None:
    settings, engine, factory = _factory(tmp_path)
    from app.bootstrap import ensure_local_key

    local = ensure_local_key(settings, factory)
    with session_scope(factory) as session:
        _, bob = create_api_key(session, "bob")
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")} | {"VOPD_HOME": str(tmp_path)}

    def link(*args: str) -> str:
        done = subprocess.run(
            vopd_command("apikey", "signin-link", *args), env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    printed = link("--url", "http://studio.example.org:8000/")
    assert printed.startswith("http://studio.example.org:8000/signin?code=vopdc_") and local not in printed
    with session_scope(factory) as session:
        opened = redeem_signin_code(session, printed.split("code=")[1], 60)
        assert opened is not None and find_api_key(session, opened[1]).name == "local"  # type: ignore[union-attr]
    named = link(bob[:10])
    with session_scope(factory) as session:
        opened = redeem_signin_code(session, named.split("code=")[1], 60)
        assert opened is not None and find_api_key(session, opened[1]).name == "bob"  # type: ignore[union-attr]
    engine.dispose()
