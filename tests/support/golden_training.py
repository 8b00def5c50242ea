"""The official training-step records (``tests/data/official/golden/train``, README there) and how the two
training-golden tests compare with them: the record files, the dtypes of the two runs, the ``Checker`` and the
``dn`` fixture (import it into the test module to use it)."""
import json
from pathlib import Path

import pytest
import torch

GOLD = Path(__file__).resolve().parents[1] / "data" / "official" / "golden" / "train"
DTYPES = {"fp64": torch.float64, "fp32": torch.float32}


def golden_json(name):
    return json.loads((GOLD / name).read_text())


class Checker:
    """Compares our values with one records file and keeps the worst relative / absolute error per kind."""

    def __init__(self, records):
        self.records = records
        self.phase = ""  # appended to the kind of error in the summary
        self.seen = set()
        self.worst = {}

    def rel(self, key, ours, tol, kind):
        ref = self.records[key].double()
        ours = (ours.detach() if torch.is_tensor(ours) else torch.tensor(ours, dtype=torch.float64)).double().cpu()
        ours = ours.reshape(ref.shape)
        err = ((ours - ref).abs() / ref.abs().clamp_min(1e-12)).max().item()
        self._done(key, kind, err)
        assert err <= tol, f"{key}: ours {ours.item():.10g}, official {ref.item():.10g}, rel error {err:.3g} > {tol:g}"

    def abs(self, key, ours, ref, tol, kind):
        err = (ours.detach().double().cpu() - ref.double()).abs().max().item()
        self._done(key, kind, err)
        assert err <= tol, f"{key}: max abs error {err:.3g} > {tol:g}"

    def exact(self, key, ours):
        self._done(key, "exact", 0.0)
        assert torch.equal(torch.as_tensor(ours).cpu(), self.records[key]), f"{key}: {ours} != {self.records[key]}"

    def excuse(self, key):
        self.seen.add(key)

    def _done(self, key, kind, err):
        assert key not in self.seen, f"{key} checked twice"
        self.seen.add(key)
        kind += self.phase
        self.worst[kind] = max(self.worst.get(kind, 0.0), err)

    def all_checked(self):
        left = sorted(set(self.records) - self.seen)
        assert not left, f"{len(left)} records not checked, e.g. {left[:5]}"


@pytest.fixture(params=["fp64", "fp32"])
def dn(request, monkeypatch):
    """The run to compare with: "fp64" or "fp32". For float64, ``Tensor.float()`` leaves float64 tensors
    alone, as when the official float64 records were made: our code casts to float32 where autocast may have
    produced half precision (losses, LFQ, AdaGN statistics); these casts are no-ops in a float32 run and would
    only truncate a float64 one."""
    if request.param == "fp64":
        original = torch.Tensor.float
        monkeypatch.setattr(torch.Tensor, "float",
                            lambda self, *a, **k: self if self.dtype == torch.float64 else original(self, *a, **k))
    return request.param
