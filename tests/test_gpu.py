"""The CUDA paths: a rank's device, fp16 autocast with loss scaling, and scoring on the task's GPU.

Marked gpu (`make test-gpu`); where torch sees no CUDA device, tests/conftest.py skips them with the reason.
Unit-sized: no Spark, a few hundred rows, so the tier runs in one short command on a GPU machine.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from dlpipe.train.comm import optimizer_step
from dlpipe.train.worker import autocast, autocast_dtype, pick_device

pytestmark = pytest.mark.gpu


def _data(n: int = 512, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three linearly separable classes in 8 dimensions."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) + 3 * nn.functional.one_hot(y, 8).float()
    return x, y


def test_a_rank_given_a_gpu_trains_on_cuda():
    device = pick_device(SimpleNamespace(use_gpu=True))  # pick_device reads only use_gpu (and the env)
    assert device.type == "cuda" and torch.cuda.current_device() == device.index


def test_fp16_autocast_with_loss_scaling_runs_in_half_precision_and_learns():
    device = torch.device("cuda", torch.cuda.current_device())
    amp = autocast_dtype("fp16", device)
    assert amp == torch.float16
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda")
    x, y = (t.to(device) for t in _data())
    losses, dtypes = [], set()
    for _ in range(60):
        optimizer.zero_grad()
        with autocast(device, amp):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits.float(), y)
        dtypes.add(logits.dtype)
        scaler.scale(loss).backward()
        optimizer_step(optimizer, scaler)
        scaler.update()
        losses.append(float(loss))
    assert dtypes == {torch.float16}, "autocast did not run the forward pass in fp16"
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_bf16_autocast_runs_in_bfloat16_on_cuda():
    device = torch.device("cuda", torch.cuda.current_device())
    model = nn.Linear(8, 3).to(device)
    with autocast(device, autocast_dtype("bf16", device)):
        out = model(torch.randn(4, 8, device=device))
    assert out.dtype == torch.bfloat16


def test_scoring_on_the_gpu_answers_what_the_cpu_does(tmp_path):
    """A logged model loaded onto the GPU (what a scoring task with a GPU does) gives the CPU's probabilities."""
    import mlflow

    from dlpipe.serve.scoring import load_model, predict_proba
    from dlpipe.train.models import with_probabilities

    torch.manual_seed(0)
    served = with_probabilities(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))).eval()
    mlflow.pytorch.save_model(served, str(tmp_path / "model"), serialization_format="pickle")
    x = _data(300)[0].numpy()
    uri = (tmp_path / "model").as_uri()
    cuda = torch.device("cuda", torch.cuda.current_device())
    on_gpu = load_model(uri, device=cuda)
    assert next(on_gpu.parameters()).device.type == "cuda"
    expected = predict_proba(load_model(uri), x)
    np.testing.assert_allclose(predict_proba(on_gpu, x, cuda), expected, rtol=1e-4, atol=1e-5)
