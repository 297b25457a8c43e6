"""train.py under the project's FSDP strategy on CPU processes (gloo), for tests/test_fsdp_runs.py.

Lightning's FSDPStrategy refuses a CPU, and torch's FSDP needs the CPU named as its device; this
subclass does both and nothing else, so the run is the project's FSDP run as a GPU would make it.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

import timerefine.pipeline.strategy
from callbacks.lightning_compat import KeptRootFSDPStrategy


class CPUFSDPStrategy(KeptRootFSDPStrategy):
    def _setup_model(self, model: nn.Module) -> nn.Module:
        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                model, sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"), **self.kwargs
            )
        return super()._setup_model(model)


if __name__ == "__main__":
    timerefine.pipeline.strategy.KeptRootFSDPStrategy = CPUFSDPStrategy
    from timerefine.train import main

    sys.exit(main(sys.argv[1:]))
