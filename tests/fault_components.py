"""A TorchX component for the fault-injection tests: recap.train's role, running tests/fault_injection.py
(`torchx run -s local_cwd tests/fault_components.py:train_with_faults ...`)."""

from typing import Dict, Optional

from torchx import specs

from torchx_components.recap import torchrun_role


def train_with_faults(
    *overrides: str, output: str, j: str = "1x2", max_retries: int = 0, env: Optional[Dict[str, str]] = None
) -> specs.AppDef:
    """recap.train with the faults that FAULT_* in `env` choose (see tests/fault_injection.py).

    Args:
        overrides: dotted config overrides
        output: run URL
        j: {nnodes}x{nproc_per_node}
        max_retries: scheduler retries and torchrun restarts
        env: environment: FAULT_* and a PYTHONPATH holding tests/ (TorchX loads this file without
            its own path, so it cannot add it)
    """
    args = ["--output", output, *overrides]
    role = torchrun_role("trainer", "fault_injection", args, j=j, max_retries=max_retries, env=env)
    return specs.AppDef(name="recap-train-with-faults", roles=[role])
