"""Checks shared by the tests of command-line tools: one-line errors, and no model loaded before a refusal."""
import re

import pytest


def one_line_error(fn, *args, match: str) -> str:
    """Run a CLI ``main``; it must exit with one line starting with 'error:' that matches ``match``."""
    with pytest.raises(SystemExit) as e:
        fn(*args)
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: "), msg
    assert "\n" not in msg and "Traceback" not in msg, msg
    assert re.search(match, msg), msg
    return msg


def no_model_loading(monkeypatch):
    from stage2_ar.model import FactorizedAR

    def refuse(*a, **k):
        raise AssertionError("bad input must be refused before any model is loaded")

    monkeypatch.setattr(FactorizedAR, "from_checkpoint", refuse)
