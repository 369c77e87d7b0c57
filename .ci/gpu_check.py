"""The GPU check: what tinylm promises beyond one CPU process, run on a GPU machine in about five minutes.

    python3 .ci/gpu_check.py                   # on a machine with one or more CUDA GPUs, in a clone, after the install
    python3 .ci/gpu_check.py --json out.json   # also keep every figure as JSON (commit it as a results file)

Each check runs in its own folder under a temporary directory and ends PASS, FAIL or SKIP (it could not run here,
and says why; a SKIP is never counted as a pass):
  1. bf16+compile:  the modern recipe in bfloat16 autocast with torch.compile, 300 steps: a falling, finite loss,
                    and the run records that it computed in bfloat16;
  2. fp16+scaler:   the same in float16 with the GradScaler: a falling, finite loss, a loss scale in the checkpoint,
                    and a resume from the middle that continues with that scale (the same losses, bit for bit);
  3. resume:        block_size 256, dropout on, deterministic kernels: 40 steps straight against 20 + resume + 20,
                    bit-identical losses;
  4. deterministic: what deterministic kernels cost: tokens/s with and without them (PASS when both run);
  5. bench:         tinylm_bench at depth 12 (GPT-2 small's shape) in bfloat16 with compile: its MFU against the
                    GPU's datasheet peak must reach MIN_MFU (SKIP where the datasheet peak is not known);
  6. budget:        a 30 s time budget in one process: training time within 5% of it;
  7. ddp:           two processes under torchrun (two GPUs, NCCL): stopped at 20 and resumed to 40, bit-identical to
                    the straight two-process run;
  8. ddp+budget:    a time budget under torchrun: every collective of the plan on NCCL, one end for both ranks;
  9. fewer-gpus:    the two-process checkpoint resumed in one process with one GPU visible;
 10. sample:        tinylm_sample from the bf16 run: one seed twice gives one text, another seed another text.
Checks 7 to 9 need two GPUs and are SKIPs with one. Then it prints one summary that a person can paste, and exits 1 if
any check failed.

`--device cpu --quick` runs the same logic on a CPU with a tiny model, the two-process checks on gloo (tests/
test_gpu_check.py does): the script is tested where there is no GPU, and only the device changes when there is one."""
from __future__ import annotations
import argparse, json, math, os, platform, shutil, subprocess, sys, tempfile, time
from pathlib import Path

TINY = {'n_layer': 1, 'n_head': 2, 'n_embd': 32, 'block_size': 32, 'batch_size': 8, 'eval_batches': 2,
        'sample_length': 20}
MIN_MFU = 0.10          # GPT-2 small's shape in bfloat16 with compile below a tenth of the datasheet: a problem
BUDGET_TOLERANCE = 0.05
DATASHEET_BF16_TFLOPS = (   # dense bfloat16 tensor-core peaks, by a part of the name torch reports; first match wins
    ('H200', 989.4), ('H100 PCIe', 756.5), ('H100 NVL', 835.0), ('H100', 989.4), ('A100', 312.0), ('L40S', 362.1),
    ('L4', 121.0), ('RTX 4090', 165.2))


def sets(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in ('--set', f'{k}={v}')]


def datasheet_tflops(name: str) -> float | None:
    "The datasheet's dense bfloat16 peak of the GPU called `name`, or None where this script does not know it."
    return next((tflops for part, tflops in DATASHEET_BF16_TFLOPS if part in name), None)


class Check:
    "The checks' shared state: where they run, on which device, and what each found."
    def __init__(self, root: Path, device: str, quick: bool, processes: int):
        self.root = root
        self.device = device
        self.quick = quick
        self.processes = processes      # how many processes the two-process checks can have (GPUs, or 2 on a CPU)
        self.results = []
        self.env = {**os.environ, 'PYTHONUNBUFFERED': '1'}

    def run(self, args, timeout=900, env=None) -> subprocess.CompletedProcess:
        exe = shutil.which(args[0]) or args[0]
        return subprocess.run([exe, *map(str, args[1:])], capture_output=True, text=True, timeout=timeout,
                              env=env or self.env)

    def train(self, name, steps, extra=(), resume=False, torchrun=0, env=None) -> tuple[subprocess.CompletedProcess,
                                                                                      Path]:
        out = self.root / name
        base = ['--device', self.device, '--set', 'progress=plain'] + (['--max-steps', steps] if steps else [])
        if resume:
            args = ['--resume', out, *base, *extra]
        else:
            args = ['--config', 'modern', '--out-dir', out, *base, *(sets(TINY) if self.quick else []), *extra]
        if torchrun:
            cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}',
                   '-m', 'tinylm.main', *args]
            return self.run(cmd, env=env), out
        return self.run(['tinylm_train', *args], env=env), out

    def record(self, name: str, status: str, detail: str, **figures):
        "Keep one check's status (PASS, FAIL or SKIP), what it found, and its figures."
        self.results.append(dict(check=name, status=status, ok=status != 'FAIL', detail=detail, **figures))
        print(f"{status} {name}: {detail}", flush=True)

    def verdict(self, name: str, ok: bool, detail: str, **figures):
        self.record(name, 'PASS' if ok else 'FAIL', detail, **figures)

    def failed_run(self, name: str, p: subprocess.CompletedProcess) -> bool:
        "Record a FAIL for a command that failed; whether it did."
        if p.returncode == 0:
            return False
        self.record(name, 'FAIL', tail(p))
        return True


def records(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / 'train.jsonl').read_text().splitlines()]


def losses(out: Path) -> dict[int, float]:
    return {r['step']: r['loss'] for r in records(out) if r['event'] == 'step'}


def tail(p: subprocess.CompletedProcess) -> str:
    lines = (p.stderr.strip() or p.stdout.strip()).splitlines()
    return lines[-1][:200] if lines else f'exit {p.returncode}'


def falls(L: dict) -> bool:
    vals = [L[s] for s in sorted(L)]
    return bool(vals) and all(math.isfinite(v) for v in vals) and vals[-1] < 0.95 * vals[0]


def same_losses(a: dict, b: dict) -> tuple[bool, str]:
    "Whether two runs' losses are bit-identical on every step of `a`, and a line that says so (or where not)."
    diff = [s for s in sorted(a) if a[s] != b.get(s)]
    if not diff:
        return True, f"steps {min(a)}..{max(a)} bit-identical"
    return False, f"{len(diff)} steps differ, first {diff[0]}: {b.get(diff[0])!r} != {a[diff[0]]!r}"


def check_precision(c: Check, name: str, precision: str, extra=()) -> Path | None:
    "A run in `precision`: falling and finite, and recorded as computed in it; its folder, or None if it failed."
    steps = 60 if c.quick else 300
    p, out = c.train(name, steps, ['--set', f'precision={precision}', '--set', 'log_cadence=1',
                                   '--set', f'checkpoint_cadence={steps // 2}', *extra])
    if c.failed_run(name, p):
        return None
    L = losses(out)
    start = records(out)[0]
    ok = falls(L) and start.get('precision') == precision
    detail = f"{start.get('precision')}: loss {L[min(L)]:.4f} -> {L[max(L)]:.4f} in {max(L)} steps"
    c.verdict(name, ok, detail, first_loss=L[min(L)], last_loss=L[max(L)], steps=max(L))
    return out


def check_fp16(c: Check):
    "float16: a falling loss, a loss scale in the checkpoint, and a resume from the middle that continues exactly."
    out = check_precision(c, 'fp16+scaler', 'float16', ['--set', 'deterministic=true'])
    if out is None:
        return
    import torch
    steps = sorted((out / 'checkpoints').glob('step_*.pt'))
    scaler = torch.load(steps[0], weights_only=True).get('scaler')
    if not scaler or not 1 <= scaler['scale'] <= 2 ** 24 or math.log2(scaler['scale']) % 1:
        return c.record('fp16+resume', 'FAIL', f"the checkpoint's loss scale is {scaler and scaler['scale']!r}")
    before = losses(out)
    resumed = c.root / 'fp16-resumed'
    p = c.run(['tinylm_train', '--resume', steps[0], '--out-dir', resumed, '--device', c.device])
    if c.failed_run('fp16+resume', p):
        return
    ok, detail = same_losses(losses(resumed), before)
    c.verdict('fp16+resume', ok, f"loss scale {scaler['scale']:g} restored; {detail}", loss_scale=scaler['scale'])


def resume_args(c: Check) -> list[str]:
    return ['--set', 'dropout=0.1', '--set', 'log_cadence=1', '--set', 'checkpoint_cadence=10',
            '--set', 'deterministic=true', *([] if c.quick else ['--set', 'block_size=256'])]


def check_resume(c: Check, name='resume', torchrun=0):
    "40 steps straight against 20, a resume, and 20 more: bit-identical."
    drop = resume_args(c)
    p, straight = c.train(f'{name}-straight', 40, drop, torchrun=torchrun)
    if c.failed_run(name, p):
        return
    p, half = c.train(f'{name}-half', 20, drop, torchrun=torchrun)
    if c.failed_run(name, p):
        return
    p, _ = c.train(f'{name}-half', 40, resume=True, torchrun=torchrun)
    if c.failed_run(name, p):
        return
    ok, detail = same_losses(losses(straight), losses(half))
    c.verdict(name, ok and sorted(losses(half)) == list(range(1, 41)), detail)


def bench(c: Check, name: str, extra=()) -> dict | None:
    "One tinylm_bench run's results, or None (and a FAIL) if it failed."
    js = c.root / f'{name}.json'
    args = ['tinylm_bench', '--device', c.device, '--skip-big-corpus', '--skip-startup', '--generation', 'none',
            '--json', js, '--quiet', *extra]
    if c.quick:
        args += ['--steps', 3, '--warmup', 1, '--breakdown-steps', 2, '--matmul-n', 256, *sets(TINY)]
    else:
        args += ['--steps', 20, '--warmup', 5, '--breakdown-steps', 5]
    p = c.run(args)
    return None if c.failed_run(name, p) else json.loads(js.read_text())


def check_deterministic_cost(c: Check):
    "What deterministic kernels cost: tokens per second with and without them."
    fast = bench(c, 'deterministic', ['--set', 'precision=bfloat16'])
    slow = bench(c, 'deterministic', ['--set', 'precision=bfloat16', '--set', 'deterministic=true'])
    if fast is None or slow is None:
        return
    a, b = fast['training']['tokens_per_s'], slow['training']['tokens_per_s']
    c.verdict('deterministic', a > 0 and b > 0, f"{a:,.0f} tokens/s, {b:,.0f} with deterministic kernels "
              f"({b / a:.2f}x)", tokens_per_s=a, deterministic_tokens_per_s=b)


def check_mfu(c: Check, gpu: str):
    "bfloat16 at depth 12 with compile: its MFU against the datasheet's peak of this GPU."
    r = bench(c, 'bench', ['--set', 'precision=bfloat16', '--compile'] + ([] if c.quick else ['--set', 'depth=12']))
    if r is None:
        return
    t = r['training']
    peak = datasheet_tflops(gpu)
    step_ms = t['step_median_s'] * 1000
    line = f"{t['tokens_per_s']:,.0f} tokens/s, {t['model_gflops']:,.0f} GFLOP/s, step {step_ms:.1f} ms"
    if peak is None:
        return c.record('bench', 'SKIP', f"{line}; no datasheet peak known for {gpu!r}",
                        tokens_per_s=t['tokens_per_s'], model_gflops=t['model_gflops'])
    mfu = t['model_gflops'] / (peak * 1000)
    c.verdict('bench', mfu >= MIN_MFU, f"{line}; MFU {mfu:.1%} of the datasheet's {peak:g} TFLOP/s "
              f"(at least {MIN_MFU:.0%})", tokens_per_s=t['tokens_per_s'], model_gflops=t['model_gflops'], mfu=mfu)


def check_budget(c: Check, name='budget', torchrun=0):
    "A time budget: its training time within BUDGET_TOLERANCE of it; under torchrun, one end for every rank."
    seconds = 10 if c.quick else 30
    p, out = c.train(name, 0, ['--time-budget', f'{seconds}s', '--set', 'eval_cadence=0', '--set', 'sample_length=0',
                               '--set', 'log_cadence=1'], torchrun=torchrun)
    if c.failed_run(name, p):
        return
    recs = records(out)
    steps = [r for r in recs if r['event'] == 'step']
    trained = sum(r['step_time_s'] for r in steps)
    ends = [r['status'] for r in recs if r['event'] == 'run_end']
    ok = abs(trained - seconds) <= BUDGET_TOLERANCE * seconds and ends == ['completed']
    c.verdict(name, ok, f"trained {trained:.1f} s of a {seconds} s budget in {len(steps)} steps", trained_s=trained)


def check_fewer_devices(c: Check):
    "The two-process checkpoint resumed in one process, with one GPU visible."
    run = c.root / 'ddp-half'
    if not (run / 'checkpoints').is_dir():
        return c.record('fewer-gpus', 'SKIP', 'the two-process run left no checkpoint')
    env = {**c.env, 'CUDA_VISIBLE_DEVICES': '0'}
    out = c.root / 'fewer'
    p = c.run(['tinylm_train', '--resume', run / 'checkpoints' / 'step_000020.pt', '--out-dir', out, '--device',
               c.device, '--max-steps', 30], env=env)
    if c.failed_run('fewer-gpus', p):
        return
    c.verdict('fewer-gpus', sorted(losses(out)) == list(range(21, 31)), "resumed at step 21 with one GPU visible")


def check_sample(c: Check, run: Path | None):
    "One seed twice: one text; another seed: another text; each the prompt and more."
    if run is None:
        return c.record('sample', 'FAIL', 'no checkpoint: the bf16 run failed')
    args = ['tinylm_sample', '--checkpoint', run, '--prompt', 'ROMEO:', '--max-new-tokens', 40, '--device', c.device]
    a, b, other = c.run([*args, '--seed', 7]), c.run([*args, '--seed', 7]), c.run([*args, '--seed', 8])
    if any(c.failed_run('sample', p) for p in (a, b, other)):
        return
    ok = a.stdout == b.stdout != other.stdout and a.stdout.startswith('ROMEO:') and len(a.stdout) > len('ROMEO:') + 20
    c.verdict('sample', ok, 'one seed, one text; another seed, another' if ok else
              f"texts: {a.stdout[:60]!r} / {b.stdout[:60]!r} / {other.stdout[:60]!r}")


def two_processes(c: Check):
    "The checks that need two processes on two devices; SKIPs where there is one GPU."
    names = ('ddp', 'ddp+budget', 'fewer-gpus')
    if c.processes < 2:
        for name in names:
            c.record(name, 'SKIP', f"{c.processes or 'no'} GPU(s) visible, 2 needed")
        return
    check_resume(c, 'ddp', torchrun=2)
    check_budget(c, 'ddp+budget', torchrun=2)
    check_fewer_devices(c)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='cuda', help='cuda (default), or cpu to test this script itself')
    ap.add_argument('--quick', action='store_true', help='a tiny model and few steps (for the script\'s own test)')
    ap.add_argument('--json', metavar='PATH', help='also write the summary as JSON to PATH')
    args = ap.parse_args(argv)
    import torch
    if args.device.startswith('cuda') and not torch.cuda.is_available():
        print("error: no CUDA device here: run this on a GPU machine (or --device cpu to test the script)",
              file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count() if args.device.startswith('cuda') else 0
    name = torch.cuda.get_device_name(0) if gpus else platform.processor() or platform.machine()
    print(f"tinylm GPU check: {name} x{gpus or 1}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"bf16 {'supported' if gpus and torch.cuda.is_bf16_supported() else 'n/a'}", flush=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix='tinylm_gpu_check_') as d:
        c = Check(Path(d), args.device, args.quick, processes=gpus if gpus else 2)
        bf16 = check_precision(c, 'bf16+compile', 'bfloat16', ['--set', 'compile=true'])
        check_fp16(c)
        check_resume(c)
        check_deterministic_cost(c)
        check_mfu(c, name)
        check_budget(c)
        two_processes(c)
        check_sample(c, bf16)
    counts = {s: sum(r['status'] == s for r in c.results) for s in ('PASS', 'FAIL', 'SKIP')}
    print(f"\nsummary: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
          f"({time.time() - t0:.0f} s)")
    for r in c.results:
        print(f"  {r['status']}  {r['check']:14} {r['detail']}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=name, gpus=gpus, torch=torch.__version__,
                                                   cuda=torch.version.cuda, results=c.results), indent=1) + '\n')
    return 1 if counts['FAIL'] else 0


if __name__ == '__main__':
    sys.exit(main())
