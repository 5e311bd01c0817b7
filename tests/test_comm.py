"""The communication edge's pure parts: which device a worker computes on."""
from __future__ import annotations

import pytest
import torch

from hvd_abs.comm import worker_device


def test_each_local_rank_gets_its_own_gpu():
    # horovodrun on a 4-GPU host: every process sees all 4 and must not share GPU 0.
    assert [worker_device("cuda", r, visible=4) for r in range(4)] == [torch.device("cuda", i) for i in range(4)]
    # More slots than GPUs: shared round-robin. A Ray actor with one GPU sees only its own: 0.
    assert worker_device("cuda", 5, visible=4) == torch.device("cuda", 1)
    assert worker_device("cuda", 3, visible=1) == torch.device("cuda", 0)
    assert worker_device("cpu", 3) == torch.device("cpu")


def test_no_visible_gpu_is_an_error_not_gpu_0():
    with pytest.raises(RuntimeError, match="no CUDA device"):
        worker_device("cuda", 0, visible=0)
