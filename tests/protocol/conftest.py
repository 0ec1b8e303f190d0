"""Collect every ProtocolError message and fail a test whose errors leak a key."""

from __future__ import annotations

import pytest

from ami.protocol import errors

from . import _util

_original_init = errors.ProtocolError.__init__


@pytest.fixture(autouse=True)
def no_key_in_error_messages(monkeypatch):
    """Record the text of every ProtocolError raised during the test and check
    it against every key the test (or the vectors) registered with
    ``_util.secret``: no error message may carry key material."""
    messages: list[str] = []

    def recording_init(self, detail: str = "") -> None:
        _original_init(self, detail)
        messages.append(f"{self.detail}\n{self}\n{self!r}")

    monkeypatch.setattr(errors.ProtocolError, "__init__", recording_init)
    _util.secret(_util.EK, _util.AK, bytes.fromhex(_util.VECTORS["key_wrap"]["key"]))
    for v in _util.VECTORS["vectors"]:
        if "ek_override" in v:
            _util.secret(bytes.fromhex(v["ek_override"]))
    yield messages
    forms = [form for key in _util.registered_secrets() for form in _util.forms_of(key)]
    leaks = [m for m in messages if any(form in m for form in forms)]
    _util.registered_secrets().clear()
    assert not leaks, f"ProtocolError messages contain key material: {leaks[:3]!r}"
