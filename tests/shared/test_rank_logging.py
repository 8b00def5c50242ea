"""Log lines carry the process's real rank, looked up when a line is logged (not when the logger was made)."""
import logging

import pytest

from shared import runlog


@pytest.fixture
def rank_state():
    saved = runlog._RANK
    yield
    runlog._RANK = saved


def test_rank_is_read_per_line_and_only_rank_0_logs_info(capfd, monkeypatch, rank_state):
    log = runlog.get_logger("tests.rank_logging")  # made before the rank is known, as at import
    runlog._RANK = None
    monkeypatch.setenv("RANK", "1")  # torchrun's environment, before any process group
    log.info("info from rank 1")
    log.warning("warning from rank 1")
    runlog.set_rank(0)
    log.info("info from rank 0")
    err = capfd.readouterr().err
    assert "info from rank 1" not in err
    assert "[rank1] WARNING tests.rank_logging: warning from rank 1" in err
    assert "[rank0] INFO tests.rank_logging: info from rank 0" in err


def test_set_rank_wins_over_the_environment(capfd, monkeypatch, rank_state):
    monkeypatch.setenv("RANK", "0")
    runlog.set_rank(3)
    runlog.get_logger("tests.rank_logging").error("boom")
    assert "[rank3] ERROR tests.rank_logging: boom" in capfd.readouterr().err
    assert runlog.get_logger("tests.rank_logging").level == logging.INFO
