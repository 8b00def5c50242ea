"""shared.progress: a tqdm bar on a terminal; in a log (not a TTY) bounded plain lines with an ETA, no '\\r'."""
import io

import pytest
from tqdm import tqdm

from shared import progress as pg
from shared import runlog


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(pg.time, "monotonic", c)
    for name in (pg.MODE_ENV, pg.INTERVAL_ENV, pg.PERCENT_ENV):
        monkeypatch.delenv(name, raising=False)
    return c


def test_log_mode_prints_a_line_every_interval_with_an_eta(clock):
    out = io.StringIO()
    bar = pg.progress(desc="features", total=100, unit="img", file=out)
    assert isinstance(bar, pg.LineProgress)
    for _ in range(100):  # 100 updates, one second each: a line every 30 s and one at the end
        clock.t += 1
        bar.update(1)
    bar.close()
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines == ["features: 30/100 (30%) img elapsed 0:00:30, ETA 0:01:10",
                     "features: 60/100 (60%) img elapsed 0:01:00, ETA 0:00:40",
                     "features: 90/100 (90%) img elapsed 0:01:30, ETA 0:00:10",
                     "features: 100/100 (100%) img done in 0:01:40"]


def test_log_mode_line_count_is_bounded_by_time_and_percent(clock, monkeypatch):
    out = io.StringIO()
    for _ in pg.progress(range(100_000), desc="verify", file=out):  # under 5 s: nothing at all
        clock.t += 1e-6
    assert out.getvalue() == ""
    for _ in pg.progress(range(100_000), desc="verify", file=out):  # under the interval: only the final line
        clock.t += 1e-4
    assert out.getvalue().splitlines() == ["verify: 100000/100000 (100%) it done in 0:00:10"]
    monkeypatch.setenv(pg.PERCENT_ENV, "25")
    out = io.StringIO()
    bar = pg.progress(desc="upload", total=1000, file=out, unit="file")
    for _ in range(1000):
        clock.t += 0.01
        bar.update(1)
    bar.set_postfix(rate="fast")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 5 and all("ETA" in line for line in lines[:4]) and lines[0].startswith("upload: 250/1000")
    assert lines[-1] == "upload: 1000/1000 (100%) file done in 0:00:10, rate=fast"
    monkeypatch.setenv(pg.INTERVAL_ENV, "soon")  # a bad knob: one warning, the default
    out = io.StringIO()
    pg.progress(desc="x", total=1, file=out)
    assert out.getvalue().splitlines()[0] == "warning: PROGRESS_INTERVAL='soon' is not a number >= 0; using 30"


def test_unit_scale_writes_counts_with_si_prefixes(clock):
    assert [pg.scaled(n) for n in (0, 999, 999.4, 1000, 1234, 6.04e9, 12_345_678, 3e15)] == [
        "0", "999", "999.4", "1k", "1.23k", "6.04G", "12.3M", "3e+03T"]
    out = io.StringIO()
    bar = pg.progress(desc="reading AR_XL.ckpt", total=6_040_000_000, unit="B", unit_scale=True, file=out, interval=0)
    clock.t += 10
    bar.update(1_510_000_000)
    clock.t += 1
    bar.set_postfix()
    bar.total = None  # unknown (yet): a rate
    bar.update(0)
    assert out.getvalue().splitlines() == ["reading AR_XL.ckpt: 1.51G/6.04G (25%) B elapsed 0:00:10, ETA 0:00:30",
                                           "reading AR_XL.ckpt: 1.51G B elapsed 0:00:11, 137M B/s"]


def test_unknown_total_reports_a_rate(clock):
    out = io.StringIO()
    bar = pg.progress(desc="chunks", file=out, interval=0)
    clock.t += 4
    bar.update(2)
    assert out.getvalue().splitlines() == ["chunks: 2 it elapsed 0:00:04, 0.5 it/s"]


def test_terminal_gets_a_tqdm_bar_and_other_ranks_nothing(clock, monkeypatch):
    term = Terminal()
    bar = pg.progress(range(3), desc="sample", file=term)
    assert isinstance(bar, tqdm)
    assert list(bar) == [0, 1, 2] and "\r" in term.getvalue()
    monkeypatch.setenv(pg.MODE_ENV, "lines")  # forced: lines even on a terminal
    assert isinstance(pg.progress(total=3, file=term), pg.LineProgress)
    monkeypatch.setenv(pg.MODE_ENV, "bar")
    assert isinstance(pg.progress(total=3, file=io.StringIO()), tqdm)
    monkeypatch.delenv(pg.MODE_ENV)
    quiet = io.StringIO()
    bar = runlog.progress(None, rank=1, total=5, desc="train", file=quiet)
    bar.update(5)
    bar.close()
    assert bar.disable and quiet.getvalue() == ""
