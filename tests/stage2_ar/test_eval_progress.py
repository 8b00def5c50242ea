"""``stage2_ar.evaluate`` in a log file (stderr not a terminal): every long phase reports plain lines with an
ETA, no carriage returns (here with PROGRESS_INTERVAL=0, a line per update)."""
import numpy as np

from shared import inception
from stage2_ar import evaluate as ev
from stage2_ar import samples_npz
from support.tiny_features import stand_in


def test_scoring_phases_print_eta_lines_without_carriage_returns(tmp_path, monkeypatch, capfd):
    rng = np.random.default_rng(0)
    samples_npz.write_samples(tmp_path / "s.npz", rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8))
    samples_npz.write_samples(tmp_path / "ref.npz", rng.integers(0, 256, (20, 8, 8, 3), dtype=np.uint8))
    monkeypatch.setattr(inception, "load_inception", stand_in)
    monkeypatch.setenv("PROGRESS_INTERVAL", "0")
    monkeypatch.delenv("PROGRESS_MODE", raising=False)
    assert ev.main(["--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--feature-batch", "10",
                    "--out", str(tmp_path / "e"), "--device", "cpu"]) == 0
    err = capfd.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert [l.split(" img ")[0] for l in lines if l.startswith("features of the samples:")][:3] == \
        ["features of the samples: 10/30 (33%)", "features of the samples: 20/30 (67%)",
         "features of the samples: 30/30 (100%)"]
    assert any(l.startswith("features of the reference: 10/20 (50%) img elapsed") and "ETA" in l for l in lines)
    assert any(l.startswith("precision / recall: ") and "ETA" in l for l in lines)
    assert any(l.startswith("precision / recall: ") and "done in" in l for l in lines)
