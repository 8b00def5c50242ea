"""Run a trainer's command line and record, on each rank, how many parallel-wrapped models (DDP, FSDP) are
still alive when the process group is destroyed: ``python -m support.teardown_probe OUT_DIR MODULE ARGS...``.

A wrapped model holds the group: alive then, it keeps the C++ group alive into interpreter shutdown, where
gloo's teardown can abort the process after a run that succeeded."""
import gc
import importlib
import sys
from pathlib import Path

import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.nn.parallel import DistributedDataParallel


def main() -> int:
    out, module, argv = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    destroy = dist.destroy_process_group

    def counting_destroy(*a, **k):
        live = sum(isinstance(o, (DistributedDataParallel, FSDPModule)) for o in gc.get_objects())
        (out / f"live-at-teardown.rank{dist.get_rank()}").write_text(str(live))
        destroy(*a, **k)

    dist.destroy_process_group = counting_destroy
    trainer = importlib.import_module(module)
    return trainer.main(argv)


if __name__ == "__main__":
    sys.exit(main())
