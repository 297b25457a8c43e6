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
        """Wrap ``model`` as Lightning's ``_setup_model`` wraps it, with the CPU as the device, where
        Lightning would wrap it (not the module of the kept root unit, nor a module already wrapped)."""
        root = getattr(self, "_root", None)
        kept = isinstance(root, FullyShardedDataParallel) and root.module is model
        if not kept and not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            model = FullyShardedDataParallel(
                module=model,
                cpu_offload=self.cpu_offload,
                mixed_precision=self.mixed_precision_config,
                sharding_strategy=self.sharding_strategy,
                device_id=torch.device("cpu"),
                **self.kwargs,
            )
        return super()._setup_model(model)


if __name__ == "__main__":
    timerefine.pipeline.strategy.KeptRootFSDPStrategy = CPUFSDPStrategy
    from timerefine.train import main

    sys.exit(main(sys.argv[1:]))
