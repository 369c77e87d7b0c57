"""Shared helpers and fixtures for tinylm's end-to-end tests.

Every run is a tiny model on a tiny corpus (a few ms per step), on the CPU with one thread, so that the
whole suite stays well under a few minutes on a 2-core machine. The expensive straight "reference" run is
made once per session and compared, bit for bit, with runs that are resumed, interrupted or repeated.
"""
from __future__ import annotations
import hashlib, json, os, random, shutil, subprocess, time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

# A tiny model and cadences that exercise every hook within a few dozen steps.
# warmup_steps/lr_decay_steps are short so that the learning rate really moves within the run: a resume that
# got the schedule wrong (e.g. tied it to max_steps) would show up in the losses.
TINY = {
    'n_layer': 1, 'n_head': 2, 'n_embd': 32, 'block_size': 32, 'batch_size': 8, 'eval_batches': 2,
    'sample_length': 30, 'device': 'cpu', 'threads': 1, 'dropout': 0.1, 'log_cadence': 1,
    'eval_cadence': 4, 'sampling_cadence': 4, 'checkpoint_cadence': 8, 'warmup_steps': 2,
    'lr_decay_steps': 30, 'learning_rate': 3e-3, 'min_lr': 3e-4,
}

REF_STEPS = 48          # length of the shared straight reference run
REF_RESUME_FROM = 32    # a checkpoint of the reference run that survives rotation (32, 40, 48 are kept)
SHORT_STEPS = 12        # run A: stop at 12, then resume up to REF_STEPS


def tiny_args(**over) -> list[str]:
    "`--set k=v` flags for the tiny config, with `over` replacing or adding fields."
    d = {**TINY, **over}
    out = []
    for k, v in d.items(): out += ['--set', f'{k}={v}']
    return out


def make_corpus(path: Path, seed: int = 0, n_lines: int = 600) -> Path:
    "A deterministic, varied English-like text of ~20 KB (val split of ~1 KB)."
    rng = random.Random(seed)
    words = ("the quick brown fox jumps over a lazy dog and cat sat on mat while bird sings song of night "
             "day rain wind river stone king queen castle sword shield light dark").split()
    lines = []
    for _ in range(n_lines):
        n = rng.randint(3, 11)
        line = ' '.join(rng.choice(words) for _ in range(n))
        lines.append(line[0].upper() + line[1:] + rng.choice('.!?,;:'))
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return path


def env() -> dict:
    "Environment for subprocesses: one OpenMP thread, no debug tracebacks."
    e = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1')
    e.pop('TINYLM_DEBUG', None)
    return e


def tinylm_train_exe() -> str:
    exe = shutil.which('tinylm_train')
    if exe is None: pytest.fail("the `tinylm_train` console script is not installed (pip install -e .)")
    return exe


def run_cli(args, timeout: float = 120, cwd=None) -> subprocess.CompletedProcess:
    "Run the installed `tinylm_train` with `args`; returns the CompletedProcess (text stdout/stderr)."
    return subprocess.run([tinylm_train_exe(), *map(str, args)], capture_output=True, text=True, env=env(),
                          timeout=timeout, cwd=cwd)


def popen_cli(args, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([tinylm_train_exe(), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(), cwd=cwd)


def read_jsonl(path) -> list[dict]:
    "Every record of a train.jsonl; every line must be complete, valid JSON."
    text = Path(path).read_text(encoding='utf-8')
    assert text.endswith('\n'), f"{path} does not end with a newline (a truncated record?)"
    return [json.loads(line) for line in text.splitlines()]


def segments(records) -> list[list[dict]]:
    "Split the records of a (possibly appended-to) train.jsonl into one list per run (each starts at run_start)."
    segs = []
    for r in records:
        if r['event'] == 'run_start': segs.append([])
        assert segs, "the first record of train.jsonl must be run_start"
        segs[-1].append(r)
    return segs


def losses(records) -> dict[int, float]:
    "step -> loss of the `step` events (a step may appear only once)."
    out = {}
    for r in records:
        if r['event'] == 'step':
            assert r['step'] not in out, f"step {r['step']} logged twice in one run"
            out[r['step']] = r['loss']
    return out


def events(records, name) -> list[dict]: return [r for r in records if r['event'] == name]


def snapshot(folder) -> dict:
    "relative path -> (size, mtime_ns, sha256) of every file under `folder`."
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob('*')):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def wait_for_step(jsonl: Path, proc: subprocess.Popen, min_step: int, timeout: float = 60) -> int:
    "Poll `jsonl` until a `step` event with step >= min_step is written; returns that step."
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training ended (rc={proc.returncode}) before step {min_step}:\n{out[-2000:]}\n{err[-2000:]}")
        if jsonl.exists():
            for line in jsonl.read_text(encoding='utf-8').splitlines():
                try: r = json.loads(line)
                except json.JSONDecodeError: continue   # a line being written right now
                if r.get('event') == 'step' and r['step'] >= min_step: return r['step']
        time.sleep(0.005)
    proc.kill(); proc.communicate()
    pytest.fail(f"no step >= {min_step} appeared in {jsonl} within {timeout} s")


def assert_clean_error(rc, out: str, err: str, code: int = 1, contains: str | tuple = ()):
    "The user-facing error contract: exit `code`, an `error:` line on stderr, no traceback anywhere."
    assert rc == code, f"exit code {rc}, expected {code}\nstdout:\n{out}\nstderr:\n{err}"
    assert 'Traceback' not in err and 'Traceback' not in out, f"a traceback leaked:\n{err}\n{out}"
    lines = [l for l in err.splitlines() if l.startswith('error:')]
    assert lines, f"no line starting with 'error:' on stderr:\n{err}"
    assert 'unexpected' not in err, f"an internal error reached the user:\n{err}"
    for c in ([contains] if isinstance(contains, str) else contains):
        assert c in err, f"{c!r} not in the error message:\n{err}"
    return lines[0]


@dataclass
class Run:
    out: Path
    proc: subprocess.CompletedProcess | None = None
    records: list = field(default_factory=list)
    @property
    def jsonl(self): return self.out / 'train.jsonl'
    @property
    def ckpt_dir(self): return self.out / 'checkpoints'
    def reload(self):
        self.records = read_jsonl(self.jsonl)
        return self
    @property
    def losses(self): return losses(self.records)


def cli_run(out: Path, corpus: Path, max_steps: int, *extra, check: bool = True, **over) -> Run:
    "A fresh tiny CLI run into `out`."
    p = run_cli(['--data', corpus, '--out-dir', out, '--max-steps', max_steps, *tiny_args(**over), *extra])
    if check: assert p.returncode == 0, f"rc={p.returncode}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
    r = Run(out, p)
    if r.jsonl.exists(): r.reload()
    return r


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory) -> Path: return tmp_path_factory.mktemp('data')

@pytest.fixture(scope='session')
def corpus(data_dir) -> Path: return make_corpus(data_dir / 'corpus.txt')


@pytest.fixture(scope='session')
def ref_run(tmp_path_factory, corpus) -> Run:
    "The straight reference run: REF_STEPS steps with seed 1337, dropout 0.1, every step logged."
    return cli_run(tmp_path_factory.mktemp('ref') / 'run', corpus, REF_STEPS)


@pytest.fixture(scope='session')
def run_a(tmp_path_factory, corpus) -> Run:
    "Run A: the reference config stopped at SHORT_STEPS, then resumed in the same out_dir up to REF_STEPS."
    out = tmp_path_factory.mktemp('run_a') / 'run'
    first = cli_run(out, corpus, SHORT_STEPS)
    p = run_cli(['--resume', out, '--max-steps', REF_STEPS])
    assert p.returncode == 0, f"resume failed rc={p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    r = Run(out, p).reload()
    r.first = first.proc
    return r


@pytest.fixture
def saved_run(ref_run, tmp_path) -> Run:
    "A private copy (mtimes preserved) of the reference run, for tests that try to damage it."
    dst = tmp_path / 'saved'
    shutil.copytree(ref_run.out, dst, copy_function=shutil.copy2)
    return Run(dst).reload()


def assert_decay_reached_floor(lr: float, config: dict):
    """The last step's rate is at the floor, give or take a step of the decay: when the clock's last reading finds the
    time spent a step early, the run ends there, a step short of the floor (a budget is a promise about time)."""
    floor, peak = config['min_lr'], config['learning_rate']
    assert floor <= lr <= floor + 0.02 * (peak - floor), (lr, floor, peak)
