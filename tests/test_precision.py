"""`precision: auto` on a CPU is measured once and recorded; a resume on the same kind of machine keeps the saved
decision (so it continues bit for bit), and a checkpoint from before the measurement keeps the rule it was made with."""
from __future__ import annotations

import pytest
import torch

import tinylm.device as device
from conftest import losses, read_jsonl, segments, tiny_args
from tinylm.main import main

STEPS, SAVE_AT = 8, 4


def bf16_pays(monkeypatch, pays: bool):
    "Pretend this CPU has native bfloat16 and that a step (of any size) measures 1.5x faster in it (or 1.5x slower)."
    monkeypatch.setattr(device, 'PRECISION_MIN_GFLOP', 0.0)
    monkeypatch.setattr(device, 'bf16_matmul_is_native', lambda d='cpu': True)
    ms = {'float32': 30.0, 'bfloat16': 20.0} if pays else {'float32': 20.0, 'bfloat16': 30.0}
    monkeypatch.setattr(device, 'time_precisions', lambda *a, **k: ms)


def train(out, corpus, steps, *extra):
    args = ['--data', str(corpus), '--out-dir', str(out), '--max-steps', str(steps),
            *tiny_args(checkpoint_cadence=SAVE_AT, sample_length=0), *extra]
    assert main(args) == 0
    return segments(read_jsonl(out / 'train.jsonl'))


def test_auto_is_measured_recorded_and_kept_by_a_resume(monkeypatch, corpus, tmp_path, capsys):
    bf16_pays(monkeypatch, True)
    straight = train(tmp_path / 'straight', corpus, STEPS)[0]
    start = straight[0]
    assert start['precision'] == 'bfloat16'
    assert start['precision_probe'] == {'decided_by': 'measurement', 'bf16_native': True, 'float32_ms': 30.0,
                                        'bfloat16_ms': 20.0, 'speedup': 1.5}
    assert 'precision auto: bfloat16, measured faster than float32' in capsys.readouterr().out
    ck = torch.load(tmp_path / 'straight' / 'checkpoints' / f'step_{SAVE_AT:06d}.pt', weights_only=True)
    assert ck['precision'] == 'bfloat16' and ck['version'] == 4

    # a first leg, then a resume that would measure the other way: it keeps the saved bfloat16
    train(tmp_path / 'legs', corpus, SAVE_AT)
    bf16_pays(monkeypatch, False)
    legs = train(tmp_path / 'legs', corpus, STEPS, '--resume', str(tmp_path / 'legs'))
    assert legs[1][0]['precision'] == 'bfloat16'
    assert legs[1][0]['precision_probe']['decided_by'] == 'checkpoint'
    want = losses(straight)
    got = {**losses(legs[0]), **losses(legs[1])}
    assert got == want, "the resumed run does not continue the bfloat16 run bit for bit"

    # bfloat16 is a real change of the numbers: the float32 run differs (so the check above can fail)
    f32 = train(tmp_path / 'f32', corpus, STEPS, '--set', 'precision=float32')[0]
    assert f32[0]['precision'] == 'float32' and f32[0]['precision_probe'] == {'decided_by': 'config'}
    assert losses(f32) != want


def test_a_small_model_is_float32_without_a_measurement(monkeypatch, corpus, tmp_path):
    "Below 8 GFLOP a step: float32, decided by the size alone, however the machine would measure (no noise)."
    bf16_pays(monkeypatch, True)
    monkeypatch.setattr(device, 'PRECISION_MIN_GFLOP', 8.0)
    start = train(tmp_path / 'small', corpus, 2)[0][0]
    assert start['precision'] == 'float32' and start['precision_probe']['decided_by'] == 'size'


def test_slower_bf16_is_not_chosen_and_an_old_checkpoint_keeps_the_old_rule(monkeypatch, corpus, tmp_path):
    bf16_pays(monkeypatch, False)
    first = train(tmp_path / 'run', corpus, SAVE_AT)[0]
    assert first[0]['precision'] == 'float32' and first[0]['precision_probe']['speedup'] == pytest.approx(2 / 3, 1e-3)
    # the same checkpoint as a version-3 file (no `precision`): resumed in float32, however the CPU measures now
    path = tmp_path / 'run' / 'checkpoints' / f'step_{SAVE_AT:06d}.pt'
    ck = torch.load(path, weights_only=True)
    for k in ('precision', 'precision_probe'): ck.pop(k)
    torch.save({**ck, 'version': 3}, path)
    bf16_pays(monkeypatch, True)
    resumed = train(tmp_path / 'run', corpus, STEPS, '--resume', str(path))[1]
    assert resumed[0]['precision'] == 'float32'
    assert resumed[0]['precision_probe'] == {'decided_by': 'old rule'}
