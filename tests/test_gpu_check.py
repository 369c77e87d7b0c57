"""The GPU check (.ci/gpu_check.py) is tested where there is no GPU: the same logic on the CPU with a tiny model, the
two-process checks on gloo, so that the first GPU machine lent runs a script that already works; and every check can
fail: a skipped check says SKIP, and a failed run is a FAIL, not a crash."""
import importlib.util, json, os, subprocess, sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent.parent / '.ci' / 'gpu_check.py'
CHECKS = ['bf16+compile', 'fp16+scaler', 'fp16+resume', 'resume', 'deterministic', 'bench', 'budget', 'ddp',
          'ddp+budget', 'fewer-gpus', 'sample']


def load():
    spec = importlib.util.spec_from_file_location('gpu_check', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_gpu_check_runs_every_check_on_the_cpu(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT), '--device', 'cpu', '--quick', '--json', str(tmp_path / 'g.json')],
                       capture_output=True, text=True, timeout=1200, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    res = json.loads((tmp_path / 'g.json').read_text())['results']
    assert [x['check'] for x in res] == CHECKS, r.stdout[-3000:]
    status = {x['check']: x['status'] for x in res}
    assert status['bench'] == 'SKIP', res                     # no datasheet peak for a CPU: said, not passed
    assert all(s == 'PASS' for k, s in status.items() if k != 'bench'), r.stdout[-3000:] + r.stderr[-3000:]
    assert r.returncode == 0, r.stdout[-3000:]
    assert 'bit-identical' in {x['check']: x['detail'] for x in res}['resume']
    assert 'summary: 10 passed, 0 failed, 1 skipped' in r.stdout


def test_with_one_gpu_the_two_process_checks_are_skips_not_passes(tmp_path):
    g = load()
    c = g.Check(tmp_path, 'cuda', quick=True, processes=1)
    g.two_processes(c)
    assert [(x['check'], x['status'], x['ok']) for x in c.results] == [
        ('ddp', 'SKIP', True), ('ddp+budget', 'SKIP', True), ('fewer-gpus', 'SKIP', True)]


def test_a_failed_run_is_a_fail_and_the_sample_check_says_why(tmp_path):
    g = load()
    c = g.Check(tmp_path, 'cpu', quick=True, processes=2)
    failed = subprocess.CompletedProcess(['tinylm_train'], 1, '', 'error: the disk is full\n')
    assert c.failed_run('bf16+compile', failed) and c.results[-1]['status'] == 'FAIL'
    g.check_sample(c, None)                                   # the bf16 run left nothing to sample from
    assert c.results[-1] == dict(check='sample', status='FAIL', ok=False, detail='no checkpoint: the bf16 run failed')
    assert g.datasheet_tflops('NVIDIA H100 80GB HBM3') == 989.4 and g.datasheet_tflops('NVIDIA H100 PCIe') == 756.5
    assert g.datasheet_tflops('Tesla T4') is None
    assert g.same_losses({1: 0.5, 2: 0.25}, {1: 0.5, 2: 0.2500001})[0] is False


def test_without_a_gpu_it_says_so(tmp_path):
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'CUDA_VISIBLE_DEVICES': ''})
    assert r.returncode == 2 and r.stderr.startswith('error: no CUDA device here'), r.stderr
