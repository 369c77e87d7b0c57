"""The GPU check: what tinylm promises beyond one CPU process, run on a GPU machine in a few minutes.

    python3 .ci/gpu_check.py                   # on a machine with one or more CUDA GPUs, in a clone, after the install
    python3 .ci/gpu_check.py --json out.json   # also keep every figure as JSON (commit it as a results file)

It runs, each in its own folder under a temporary directory:
  1. bf16:     the modern recipe in bfloat16 autocast with torch.compile, 300 steps: the loss must fall, finite;
  2. fp16:     the same in float16 with the GradScaler: finite, falling, the scaler's state in the checkpoint;
  3. resume:   40 steps straight against 20 + resume + 20, dropout on: bit-identical losses;
  4. bench:    tinylm_bench: tokens/s, MFU, peak memory;
  5. ddp:      with two or more GPUs, 2 processes under torchrun, dropout on, stopped at 20 and resumed to 40:
               bit-identical to the straight 2-process run;
  6. sample:   tinylm_sample from the bf16 run, twice with one seed: the same text.
Then it prints one summary that a person can paste, and exits 1 if any check failed.

`--device cpu --quick` runs the same logic on a CPU with a tiny model (tests/test_gpu_check.py does): the script is
tested where there is no GPU, and only the device changes when there is one."""
from __future__ import annotations
import argparse, json, math, os, platform, shutil, subprocess, sys, tempfile, time
from pathlib import Path

TINY = {'n_layer': 1, 'n_head': 2, 'n_embd': 32, 'block_size': 32, 'batch_size': 8, 'eval_batches': 2,
        'sample_length': 20}


def sets(d: dict) -> list[str]:
    return [x for k, v in d.items() for x in ('--set', f'{k}={v}')]


class Check:
    def __init__(self, root: Path, device: str, quick: bool):
        self.root, self.device, self.quick, self.results = root, device, quick, []
        self.env = {**os.environ, 'PYTHONUNBUFFERED': '1'}

    def run(self, args, timeout=900, env=None) -> subprocess.CompletedProcess:
        exe = shutil.which(args[0]) or args[0]
        return subprocess.run([exe, *map(str, args[1:])], capture_output=True, text=True, timeout=timeout,
                              env=env or self.env)

    def train(self, name, steps, extra=(), resume=False, torchrun=0) -> tuple[subprocess.CompletedProcess, Path]:
        out = self.root / name
        base = ['--device', self.device, '--max-steps', steps, '--set', 'progress=plain']
        args = ['--resume', out, *base] if resume else ['--config', 'modern', '--out-dir', out, *base,
                                                         *(sets(TINY) if self.quick else []), *extra]
        if resume: args += list(extra)
        if torchrun:
            cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={torchrun}',
                   '-m', 'tinylm.main', *args]
            return self.run(cmd), out
        return self.run(['tinylm_train', *args]), out

    def record(self, name: str, ok: bool, detail: str, **figures):
        self.results.append(dict(check=name, ok=bool(ok), detail=detail, **figures))
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)


def losses(out: Path) -> dict[int, float]:
    recs = [json.loads(l) for l in (out / 'train.jsonl').read_text().splitlines()]
    return {r['step']: r['loss'] for r in recs if r['event'] == 'step'}


def tail(p: subprocess.CompletedProcess) -> str:
    lines = (p.stderr.strip() or p.stdout.strip()).splitlines()
    return lines[-1][:200] if lines else f'exit {p.returncode}'


def falls(L: dict) -> bool:
    vals = [L[s] for s in sorted(L)]
    return bool(vals) and all(math.isfinite(v) for v in vals) and vals[-1] < vals[0]


def check_precision(c: Check, name: str, precision: str, extra=()):
    steps = 30 if c.quick else 300
    p, out = c.train(name, steps, ['--set', f'precision={precision}', '--set', 'log_cadence=1', *extra])
    if p.returncode != 0: return c.record(name, False, tail(p)), None
    L = losses(out)
    import torch
    ck = torch.load(sorted((out / 'checkpoints').glob('step_*.pt'))[-1], weights_only=True)
    scaler = ck.get('scaler')
    ok = falls(L) and (precision != 'float16' or (scaler is not None and scaler['scale'] > 0))
    detail = f"loss {L[min(L)]:.4f} -> {L[max(L)]:.4f} in {max(L)} steps" + (
        f", loss scale {scaler['scale']:g}" if scaler else '')
    c.record(name, ok, detail, first_loss=L[min(L)], last_loss=L[max(L)], steps=max(L))
    return out


def check_resume(c: Check, name='resume', torchrun=0):
    drop = ['--set', 'dropout=0.1', '--set', 'log_cadence=1', '--set', 'checkpoint_cadence=10']
    p, straight = c.train(f'{name}-straight', 40, drop, torchrun=torchrun)
    if p.returncode != 0: return c.record(name, False, tail(p))
    p, half = c.train(f'{name}-half', 20, drop, torchrun=torchrun)
    if p.returncode != 0: return c.record(name, False, tail(p))
    p, _ = c.train(f'{name}-half', 40, resume=True, torchrun=torchrun)
    if p.returncode != 0: return c.record(name, False, tail(p))
    a, b = losses(straight), losses(half)
    diff = [s for s in a if a[s] != b.get(s)]
    c.record(name, not diff and sorted(b) == sorted(a),
             'steps 21..40 bit-identical to the straight run' if not diff else
             f"{len(diff)} steps differ, first {diff[0]}: {b.get(diff[0])!r} != {a[diff[0]]!r}")


def check_bench(c: Check):
    js = c.root / 'bench.json'
    args = ['tinylm_bench', '--device', c.device, '--skip-big-corpus', '--skip-startup', '--json', js, '--quiet']
    if c.quick: args += ['--steps', 3, '--warmup', 1, '--breakdown-steps', 2, '--matmul-n', 256, *sets(TINY)]
    p = c.run(args)
    if p.returncode != 0: return c.record('bench', False, tail(p))
    r = json.loads(js.read_text())
    t = r['training']
    c.record('bench', t['tokens_per_s'] > 0 and 0 < r['mfu']['mfu'] < 1,
             f"{t['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']['mfu']:.1%} of {r['mfu']['ceiling']} "
             f"({r['mfu']['ceiling_gflops']:,.0f} GFLOP/s), step {t['step_median_s'] * 1000:.1f} ms",
             tokens_per_s=t['tokens_per_s'], mfu=r['mfu']['mfu'], step_ms=t['step_median_s'] * 1000)


def check_sample(c: Check, run: Path | None):
    if run is None: return c.record('sample', False, 'no checkpoint: the bf16 run failed')
    args = ['tinylm_sample', '--checkpoint', run, '--prompt', 'ROMEO:', '--max-new-tokens', 40, '--seed', 7,
            '--device', c.device]
    a, b = c.run(args), c.run(args)
    ok = a.returncode == 0 and a.stdout == b.stdout and a.stdout.startswith('ROMEO:')
    c.record('sample', ok, 'the same text twice with one seed' if ok else tail(a if a.returncode else b))


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
        c = Check(Path(d), args.device, args.quick)
        bf16 = check_precision(c, 'bf16+compile', 'bfloat16', ['--set', 'compile=true'])
        check_precision(c, 'fp16+scaler', 'float16')
        check_resume(c)
        check_bench(c)
        if gpus >= 2: check_resume(c, 'ddp', torchrun=2)
        else: c.record('ddp', True, f"skipped: {gpus or 'no'} GPU(s) visible, 2 needed")
        check_sample(c, bf16)
    failed = [r for r in c.results if not r['ok']]
    print(f"\nsummary: {len(c.results) - len(failed)} passed, {len(failed)} failed ({time.time() - t0:.0f} s)")
    for r in c.results: print(f"  {'PASS' if r['ok'] else 'FAIL'}  {r['check']:14} {r['detail']}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=name, gpus=gpus, torch=torch.__version__,
                                                   cuda=torch.version.cuda, results=c.results), indent=1) + '\n')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
