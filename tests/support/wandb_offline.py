"""Reading what W&B wrote in offline mode (no server, no account): the history of a run's ``.wandb`` file."""
import time
from pathlib import Path

import pytest


def wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then LevelDB-log
    blocks of 32 KiB whose fragments carry a 7-byte header (crc32, little-endian length, type: 1 full,
    2 first, 3 middle, 4 last)."""
    wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")
    data = path.read_bytes()
    if len(data) < 7:  # the header is not written yet
        return []
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    pos, records, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        if kind == 0 or pos + 7 + length > len(data):  # zero padding, or a fragment still being written
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def finished_records(path: Path, timeout: float = 60.0) -> list:
    """``wandb_records`` once the run's ``exit`` record (written last) is in the file: ``finish()`` can return
    before W&B's service process has written everything out."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path) if path.is_file() else []
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def history(run_dir: Path) -> dict:
    """{step: {key: JSON value}} of every history record of the one offline run under ``run_dir/wandb``."""
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    rows: dict = {}
    for r in finished_records(files[0]):
        if r.WhichOneof("record_type") == "history":
            row = rows.setdefault(r.history.step.num, {})
            for item in r.history.item:
                row[".".join(item.nested_key) or item.key] = item.value_json
    return rows
