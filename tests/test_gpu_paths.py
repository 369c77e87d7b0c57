"""GPU readiness, checked on the CPU by code path: device choice, autocast dtype, pinned memory, TF32."""
import numpy as np
import torch

from tinylm.config import TrainingConfig
from tinylm.data import WindowDataset, make_dataloaders, split_corpus
from tinylm.device import autocast_dtype, pick_device, DeviceError


def test_auto_device_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert pick_device('auto') == torch.device('cuda')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: True)
    assert pick_device('auto') == torch.device('mps')
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    assert pick_device('auto') == torch.device('cpu')


def test_missing_accelerators_are_user_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.backends.mps, 'is_available', lambda: False)
    for name, text in (('cuda', 'CUDA is not available'), ('cuda:1', 'CUDA is not available'),
                       ('mps', 'MPS is not available')):
        try: pick_device(name); raise AssertionError(name)
        except DeviceError as e: assert text in str(e)
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    try: pick_device('cuda:3'); raise AssertionError
    except DeviceError as e: assert 'only 1 CUDA device' in str(e)


def test_bf16_autocast_on_cuda_fp32_elsewhere():
    cuda, cpu = torch.device('cuda'), torch.device('cpu')
    assert autocast_dtype(cuda, 'auto') is torch.bfloat16
    assert autocast_dtype(cuda, 'float32') is None
    assert autocast_dtype(cpu, 'auto') is None
    assert autocast_dtype(cpu, 'bfloat16') is torch.bfloat16


def test_pinned_memory_loaders_for_cuda():
    cfg = TrainingConfig().with_overrides(block_size=8, batch_size=4, eval_batches=2)
    tr, va = split_corpus(np.arange(400) % 50)
    train_dl, val_dl = make_dataloaders(WindowDataset(tr, 8), WindowDataset(va, 8, name='val'), cfg, pin_memory=True)
    assert train_dl.pin_memory and val_dl.pin_memory


def test_bf16_training_step_runs_on_cpu():
    "precision=bfloat16 exercises the autocast path of training_step on the CPU."
    from tinylm.model import Transformer
    from tinylm.optim import create_optimizer
    from tinylm.trainer import Trainer
    cfg = TrainingConfig().with_overrides(n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=4,
                                          precision='bfloat16', device='cpu', log_cadence=1)
    torch.manual_seed(0)
    model = Transformer(20, cfg)
    t = Trainer(model, create_optimizer(model, cfg), cfg, hooks=[])
    x = torch.randint(0, 20, (4, 8))
    loss = t.training_step((x, x.roll(-1, 1)))
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert next(model.parameters()).dtype == torch.float32     # weights stay fp32 under autocast
