"""Shared test policy and fixtures.

Real-server tests are marked ``@pytest.mark.real``.  They need root (private Postfix/Dovecot
instances drop privileges themselves and own uid 5000 Maildirs) and the Debian packages that
``make deb`` installs.  Without them they skip with the reason, except under ``CI=true``, where
nothing may skip: the missing piece fails the test instead.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lab import DovecotLab, MailLab, PostfixLab, make_lab_dir, missing_binaries, wait_for

NOT_ROOT_REASON = "needs root to run private Postfix/Dovecot instances"


def real_servers_problem() -> str | None:
    """Why real-server tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return NOT_ROOT_REASON
    missing = missing_binaries()
    if missing:
        return f"missing server binaries {', '.join(missing)} (run `make deb` as root)"
    return None


def require_real_servers() -> None:
    """Skip (or fail under CI=true) the current test when real servers cannot run."""
    problem = real_servers_problem()
    if problem is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true forbids skipping: {problem}", pytrace=False)
    pytest.skip(problem)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before any fixture: a skipped test must not start (or half-start) a server first.
    if item.get_closest_marker("real") is not None:
        require_real_servers()


@pytest.fixture(autouse=True)
def _no_thread_leaks() -> Iterator[None]:
    """Fail any test that leaves a thread running (idea from watchdog's test suite).

    Threads that existed before the test (including those of wider-scoped fixtures, set up
    first) are allowed; new ones get a short grace period to finish.
    """
    before = set(threading.enumerate())
    yield

    def leaked() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t not in before and t.is_alive()]

    try:
        wait_for(lambda: not leaked(), timeout=2.0, interval=0.02, what="test threads to end")
    except TimeoutError:
        names = ", ".join(sorted(t.name for t in leaked()))
        pytest.fail(f"test leaked threads: {names}", pytrace=False)


@pytest.fixture(scope="session")
def lab_base(request: pytest.FixtureRequest) -> Iterator[Path]:
    """This session's directory for lab servers, outside pytest's 0700 temporary tree.

    Removed at the end of a session without failures; kept (logs, Maildirs) otherwise.
    """
    require_real_servers()
    base = make_lab_dir(prefix="sentlink-lab-")
    yield base
    if request.session.testsfailed == 0:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def lab_tmp_path(lab_base: Path, request: pytest.FixtureRequest) -> Path:
    """A fresh directory the lab's servers can reach: put milter sockets and Maildirs here."""
    # Short: unix socket paths below it must stay under 108 bytes.
    return make_lab_dir(lab_base, prefix=re.sub(r"\W", "", request.node.name)[:16] + "-")


@pytest.fixture(scope="module")
def mail_lab(lab_base: Path) -> Iterator[MailLab]:
    """Postfix + Dovecot (SASL, IMAP, POP3), no milter, shared by one test module.

    Tests share its mailboxes: find messages by Message-ID (``wait_message``/``wait_relayed``)
    rather than by counting.
    """
    with MailLab(make_lab_dir(lab_base)) as lab:
        yield lab


@pytest.fixture(scope="module")
def postfix_lab(mail_lab: MailLab) -> PostfixLab:
    return mail_lab.postfix


@pytest.fixture(scope="module")
def dovecot_lab(mail_lab: MailLab) -> DovecotLab:
    assert mail_lab.dovecot is not None
    return mail_lab.dovecot


@pytest.fixture
def mail_lab_factory(lab_tmp_path: Path) -> Iterator[Callable[..., MailLab]]:
    """Start labs with custom settings: ``mail_lab_factory(milter="unix:/x.sock", ...)``.

    Keyword arguments are those of :class:`lab.MailLab`; ``root`` defaults to a new directory
    under ``lab_tmp_path``.  Every lab started is stopped at teardown, also when the test failed.
    """
    labs: list[MailLab] = []

    def start(root: Path | None = None, **kwargs: Any) -> MailLab:
        lab = MailLab(root or make_lab_dir(lab_tmp_path), **kwargs)
        labs.append(lab)
        lab.start()
        return lab

    yield start
    errors: list[BaseException] = []
    for lab in reversed(labs):
        try:
            lab.stop()
        except Exception as exc:  # stop every lab before reporting the first failure
            errors.append(exc)
    if errors:
        raise errors[0]
