"""lmtune._signals: a signal inside database code is held until that code returns, then raised once."""

from __future__ import annotations

import os
import signal
import time

import pytest

from lmtune import _signals
from lmtune._signals import deferred, in_storage, install, interrupt, restore

_FAKE_QUERY = """
import os, signal, sys, time

def query(seconds, sig=signal.SIGUSR1):
    os.kill(os.getpid(), sig)
    start = time.monotonic()
    while time.monotonic() - start < seconds:  # busy, as a driver mid-fetch is
        pass
    return "rows"

def here():
    return sys._getframe()
"""


def _module(name: str) -> dict:
    ns = {"__name__": name}
    exec(compile(_FAKE_QUERY, f"<{name}>", "exec"), ns)
    return ns


@pytest.fixture
def usr1_interrupts():
    old = signal.signal(signal.SIGUSR1, interrupt)
    yield
    signal.signal(signal.SIGUSR1, old)
    assert _signals._Held.signum is None


@pytest.mark.parametrize("name, inside", [("sqlalchemy.engine.base", True), ("optuna.storages._rdb.storage", True),
                                          ("sqlite3", True), ("optuna.samplers._tpe", False),
                                          ("sqlalchemy_utils", False), ("lmtune.tune.study", False)])
def test_database_code_is_recognised_by_its_module_and_its_callers(name, inside):
    assert in_storage(_module(name)["here"]()) is inside
    assert in_storage(None) is False


def test_a_signal_inside_database_code_is_raised_once_that_code_returns(usr1_interrupts):
    query = _module("sqlalchemy.engine.fake")["query"]
    assert query(0.3) == "rows", "the database call ran to its end"
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="SIGUSR1"):
        time.sleep(5)
    assert time.monotonic() - t0 < 1.0, "raised within a few retries of the call's return"
    time.sleep(0.3)  # a retry copy still in flight is dropped, not raised a second time


def test_a_signal_outside_database_code_is_raised_at_once(usr1_interrupts):
    query = _module("lmtune.fake")["query"]
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="SIGUSR1"):
        query(5)
    assert time.monotonic() - t0 < 1.0


def test_a_database_call_stuck_past_the_limit_is_interrupted_where_it_stands(usr1_interrupts, monkeypatch):
    monkeypatch.setattr(_signals, "_STUCK_S", 0.3)
    query = _module("sqlalchemy.engine.fake")["query"]
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt, match="SIGUSR1"):
        query(5)
    assert 0.3 <= time.monotonic() - t0 < 2.0


def test_restore_puts_the_handlers_back_then_raises_a_signal_still_held():
    before = signal.getsignal(signal.SIGINT)
    old = install(interrupt)
    query = _module("sqlalchemy.engine.fake")["query"]
    query(0.01, signal.SIGINT)  # held; its first retry comes 50 ms later
    with pytest.raises(KeyboardInterrupt, match="SIGINT"):
        restore(old)
    assert signal.getsignal(signal.SIGINT) is before and _signals._Held.signum is None
    time.sleep(0.2)  # nothing held: no copy follows


def test_a_deferred_block_holds_a_signal_until_it_ends(usr1_interrupts):
    with deferred():
        os.kill(os.getpid(), signal.SIGUSR1)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.3:  # ordinary code, yet held: the block is cleanup that must finish
            pass
    with pytest.raises(KeyboardInterrupt, match="SIGUSR1"):
        time.sleep(5)
