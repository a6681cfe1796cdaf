"""launch/train.py with the tests' fault injection and tracing (tests/helpers/faults.py: ``EnvFaultHooks``, driven
by DDPM_FAULT_* / DDPM_TRACE_BATCHES_DIR / DDPM_CUDA_SYNC_CHECK). Run exactly like launch/train.py, with the same
arguments, by ``python`` or ``accelerate launch``; tests/helpers/trainer.py's ``train_cmd`` launches it.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
    sys.path.pop(0)  # tests/helpers/ itself: its data.py, evaluation.py, ... would shadow packages of those names
sys.path.insert(0, str(HERE.parents[1]))  # the repository root, as launch/train.py does

from launch.train import main  # noqa: E402
from tests.helpers.faults import EnvFaultHooks  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(hooks=EnvFaultHooks()))
