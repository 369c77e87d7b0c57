"""Nothing lost, ever: a closed terminal (SIGHUP), two processes aimed at one run folder, a full disk, shared
clusters (file modes), a second run in the same folder (--overwrite), and logs torn by a kill."""
from __future__ import annotations
import errno, fcntl, json, os, pty, shutil, signal, stat, subprocess, termios, time
from pathlib import Path

import pytest
import torch

from conftest import (REF_STEPS, assert_clean_error, env, events, losses, popen_cli, read_jsonl, run_cli, segments,
                      snapshot, tiny_args, tinylm_train_exe, wait_for_step)
from test_resume import assert_matches_reference, check_stopped_run


# ---------------------------------------------------------------- SIGHUP: the terminal goes away
def test_closing_the_terminal_stops_cleanly_and_resumes_exactly(ref_run, corpus, tmp_path):
    """The real case: tinylm_train runs on a terminal (a pty, here) whose other end closes, as when an SSH
    connection drops. The kernel sends SIGHUP; writes to the terminal then fail. The run must still stop at a step
    boundary, save, log run_end, and exit 129 — and the resumed run must be the straight run."""
    out = tmp_path / 'hup'
    master, slave = pty.openpty()
    def controlling_tty():   # after setsid (start_new_session): make the pty this session's terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    proc = subprocess.Popen([tinylm_train_exe(), '--data', str(corpus), '--out-dir', str(out), '--max-steps', '100000',
                             *map(str, tiny_args())], stdin=slave, stdout=slave, stderr=slave, env=env(),
                            start_new_session=True, preexec_fn=controlling_tty)
    os.close(slave)
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 60:      # keep reading the terminal, like a terminal emulator does
            try: os.read(master, 65536)
            except OSError: break
            if (out / 'train.jsonl').exists() and max(losses(read_jsonl_partial(out)), default=0) >= 5: break
        os.close(master)                       # the terminal is gone: SIGHUP to the session
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None: proc.kill(); proc.wait()
    assert rc == 129, f"exit status {rc}"
    recs = read_jsonl(out / 'train.jsonl')
    stop = max(losses(recs))
    assert recs[-1]['event'] == 'run_end' and recs[-1]['status'] == 'interrupted' and recs[-1]['step'] == stop
    assert (out / 'checkpoints' / f'step_{stop:06d}.pt').is_file()
    assert stop + 3 <= REF_STEPS
    p = run_cli(['--resume', out, '--max-steps', stop + 3])
    assert p.returncode == 0, p.stderr[-3000:]
    assert_matches_reference(segments(read_jsonl(out / 'train.jsonl'))[1], ref_run, stop + 1, stop + 3)


def read_jsonl_partial(out):
    "The complete records of a log that is being written."
    recs = []
    for line in (out / 'train.jsonl').read_text(encoding='utf-8').splitlines():
        try: recs.append(json.loads(line))
        except json.JSONDecodeError: pass
    return recs


def test_sighup_without_a_terminal_is_a_graceful_stop(corpus, tmp_path):
    "`kill -HUP` (or a hang-up of nohup-less job) is handled like SIGTERM: status 129, a checkpoint, a resume hint."
    out = tmp_path / 'hup2'
    proc = popen_cli(['--data', corpus, '--out-dir', out, '--max-steps', 100000, *tiny_args()])
    try:
        wait_for_step(out / 'train.jsonl', proc, 3)
        proc.send_signal(signal.SIGHUP)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None: proc.kill(); proc.communicate()
    assert proc.returncode == 129, stderr
    check_stopped_run(out, stdout, stderr, 'SIGHUP')


# ---------------------------------------------------------------- one process per run folder
def start_long_run(corpus, out, min_step=2):
    proc = popen_cli(['--data', corpus, '--out-dir', out, '--max-steps', 100000, *tiny_args(checkpoint_cadence=4)])
    wait_for_step(out / 'train.jsonl', proc, min_step)
    return proc


@pytest.mark.slow
def test_a_second_process_is_refused_while_a_run_trains(corpus, tmp_path):
    out = tmp_path / 'busy'
    holder = start_long_run(corpus, out, min_step=5)   # it has saved a checkpoint at step 4
    try:
        for argv in (['--resume', out, '--max-steps', 100000],                                    # resume the busy run
                     ['--data', corpus, '--out-dir', out, '--max-steps', 10, *tiny_args()],        # a fresh run there
                     ['--data', corpus, '--out-dir', out, '--max-steps', 10, '--overwrite', *tiny_args()]):
            t0 = time.monotonic()
            p = run_cli(argv)
            assert_clean_error(p.returncode, p.stdout, p.stderr, 1, (f"{out} is in use by another tinylm run",
                                                                     f"(pid {holder.pid})"))
            assert time.monotonic() - t0 < 30
        assert holder.poll() is None, "the running run was disturbed"
    finally:
        holder.send_signal(signal.SIGINT); holder.communicate(timeout=60)
    recs = read_jsonl(out / 'train.jsonl')
    assert len(events(recs, 'run_start')) == 1, "a refused process wrote to the log"
    assert len({r['run_id'] for r in recs}) == 1
    steps = [r['step'] for r in events(recs, 'step')]
    assert steps == list(range(1, len(steps) + 1)), "records interleaved"


def test_a_fresh_run_is_refused_before_the_first_run_saved(corpus, tmp_path):
    "The first run has not written a checkpoint yet: a second run into its folder is refused all the same."
    out = tmp_path / 'young'
    holder = popen_cli(['--data', corpus, '--out-dir', out, '--max-steps', 100000,
                        *tiny_args(checkpoint_cadence=0)])
    try:
        wait_for_step(out / 'train.jsonl', holder, 1)
        assert not list(out.glob('checkpoints/step_*.pt'))
        p = run_cli(['--data', corpus, '--out-dir', out, '--max-steps', 10, *tiny_args()])
        assert_clean_error(p.returncode, p.stdout, p.stderr, 1, 'is in use by another tinylm run')
    finally:
        holder.send_signal(signal.SIGINT); holder.communicate(timeout=60)
    assert len(events(read_jsonl(out / 'train.jsonl'), 'run_start')) == 1


def test_a_killed_holder_frees_the_folder_at_once(ref_run, corpus, tmp_path):
    "SIGKILL leaves no stale lock: the OS drops it with the process, and the run resumes right away, exactly."
    out = tmp_path / 'killed'
    holder = start_long_run(corpus, out, min_step=9)     # checkpoints at 4 and 8
    holder.kill(); holder.communicate()
    assert (out / '.lock').exists()
    p = run_cli(['--resume', out, '--max-steps', 12])
    assert p.returncode == 0, p.stderr[-3000:]
    last = segments(read_jsonl(out / 'train.jsonl'))[-1]   # every line parses: a torn one was repaired on resume
    assert last[0]['resumed_from'].endswith('step_000008.pt')
    assert_matches_reference(last, ref_run, 9, 12)


# ---------------------------------------------------------------- a full disk
def _tmpfs(path: Path, size: str):
    path.mkdir()
    if os.geteuid() != 0 or not shutil.which('mount'): pytest.skip("mounting a tmpfs needs root and mount")
    r = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(path)], capture_output=True, text=True)
    if r.returncode != 0: pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")


def test_a_full_disk_names_the_cause_and_the_last_good_checkpoint(corpus, tmp_path):
    disk = tmp_path / 'small_disk'
    _tmpfs(disk, '2m')
    try:
        out = disk / 'run'
        p = run_cli(['--data', corpus, '--out-dir', out, '--max-steps', 4, *tiny_args(checkpoint_cadence=2)])
        assert p.returncode == 0, p.stderr
        size = (out / 'checkpoints' / 'step_000004.pt').stat().st_size
        free = shutil.disk_usage(disk).free
        (disk / 'filler').write_bytes(b'\0' * max(0, free - int(1.5 * size)))   # room for one more checkpoint
        p = run_cli(['--resume', out, '--max-steps', 40])
        line = assert_clean_error(p.returncode, p.stdout, p.stderr, 1, ('no space left on the device',
                                                                        'resume from the last good checkpoint with: '))
        assert len(line) - 2 * len(str(out)) < 250, line
        kept = sorted(x.name for x in (out / 'checkpoints').iterdir())
        assert not [k for k in kept if k.endswith('.tmp') or k.startswith('.')], kept   # no temporary left
        good = line.split('tinylm_train --resume ')[1].strip()
        torch.load(good, weights_only=True)                                              # it is whole
        latest = (out / 'checkpoints' / (out / 'checkpoints' / 'latest').read_text().strip())
        torch.load(latest, weights_only=True)
        recs = read_jsonl(out / 'train.jsonl')
        if recs[-1]['event'] == 'run_end':                                               # if the log had room
            assert recs[-1]['status'] == 'failed' and 'no space left' in recs[-1]['error']
        (disk / 'filler').unlink()
        p = run_cli(['--resume', good, '--max-steps', 42])                                # and it resumes
        assert p.returncode == 0, p.stderr
    finally:
        subprocess.run(['umount', str(disk)], capture_output=True)


def test_a_failing_save_everywhere_is_one_clear_line(corpus, tmp_path, monkeypatch, capsys):
    "ENOSPC simulated inside torch.save (runs on any machine): the message names the file, the cause and the fallback."
    import tinylm.checkpoint as C
    from tinylm.main import main
    real = torch.save
    def save(obj, f, *a, **k):
        if obj.get('step') == 8: raise OSError(errno.ENOSPC, 'No space left on device')
        return real(obj, f, *a, **k)
    monkeypatch.setattr(C.torch, 'save', save)
    out = tmp_path / 'enospc'
    rc = main([str(a) for a in ['--data', corpus, '--out-dir', out, '--max-steps', 12, *tiny_args(checkpoint_cadence=4)]])
    _, err = capsys.readouterr()
    assert_clean_error(rc, '', err, 1, (f"cannot write {out}/checkpoints/step_000008.pt: no space left on the "
                                        "device; resume from the last good checkpoint with: tinylm_train --resume "
                                        f"{out}/checkpoints/step_000004.pt",))
    assert sorted(p.name for p in (out / 'checkpoints').iterdir()) == ['latest', 'step_000004.pt']
    end = read_jsonl(out / 'train.jsonl')[-1]
    assert end['event'] == 'run_end' and end['status'] == 'failed' and 'no space left on the device' in end['error']


# ---------------------------------------------------------------- file modes
@pytest.mark.parametrize('umask,mode', [(0o022, 0o644), (0o077, 0o600)])
def test_files_honour_the_umask(corpus, tmp_path, umask, mode):
    out = tmp_path / f'umask{umask:o}'
    r = subprocess.run(f"umask {umask:03o} && exec {tinylm_train_exe()} " + ' '.join(
        f"'{a}'" for a in ['--data', corpus, '--out-dir', out, '--max-steps', 4, *tiny_args(checkpoint_cadence=2)]),
        shell=True, capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode == 0, r.stderr
    plot = subprocess.run(f"umask {umask:03o} && exec {shutil.which('tinylm_plot') or 'false'} '{out}'", shell=True,
                          capture_output=True, text=True, env=env(), timeout=120)
    assert plot.returncode == 0, plot.stderr
    for f in [*(out / 'checkpoints').iterdir(), out / 'train.jsonl', out / 'loss.png']:
        assert stat.S_IMODE(f.stat().st_mode) == mode, f"{f.name}: {oct(stat.S_IMODE(f.stat().st_mode))}"


# ---------------------------------------------------------------- --overwrite
def test_overwrite_starts_over_only_once_the_new_run_is_sure_to_start(saved_run, corpus, tmp_path):
    before = snapshot(saved_run.out)
    p = run_cli(['--overwrite', '--out-dir', saved_run.out, '--data', tmp_path / 'missing.txt', *tiny_args()])
    assert_clean_error(p.returncode, p.stdout, p.stderr, 1, 'data file not found')
    p = run_cli(['--overwrite', '--out-dir', saved_run.out, '--data', corpus, *tiny_args(n_head=3)])
    assert_clean_error(p.returncode, p.stdout, p.stderr, 1, 'divisible')
    assert snapshot(saved_run.out) == before, "a failed --overwrite touched the earlier run"
    p = run_cli(['--overwrite', '--out-dir', saved_run.out, '--data', corpus, '--max-steps', 4, *tiny_args()])
    assert p.returncode == 0, p.stderr
    assert sorted(x.name for x in (saved_run.out / 'checkpoints').glob('step_*.pt')) == ['step_000004.pt']
    recs = read_jsonl(saved_run.jsonl)
    assert len(events(recs, 'run_start')) == 1 and recs[0]['run_id'] != saved_run.records[0]['run_id']


# ---------------------------------------------------------------- logs that survive a kill
def test_a_torn_log_line_is_repaired_and_the_log_plots(saved_run, tmp_path):
    fragment = '{"event": "step", "ts": "2026-11-2'      # a record cut short by kill -9
    with open(saved_run.jsonl, 'a', encoding='utf-8') as f: f.write(fragment)
    plot = subprocess.run([shutil.which('tinylm_plot'), str(saved_run.out), '-o', str(tmp_path / 'live.png')],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert plot.returncode == 0 and plot.stderr.startswith('warning: ') and 'incomplete' in plot.stderr, plot.stderr
    p = run_cli(['--resume', saved_run.out, '--max-steps', REF_STEPS + 2])
    assert p.returncode == 0, p.stderr
    assert 'torn line' in p.stderr
    recs = read_jsonl(saved_run.jsonl)                     # every line parses again
    start = events(recs, 'run_start')[-1]
    assert start['log_repaired'] == {'dropped_bytes': len(fragment), 'fragment': fragment}
    assert start['resumed_from'].endswith(f'step_{REF_STEPS:06d}.pt') and start['tinylm_version']


def test_a_diverged_model_is_never_saved_and_the_error_names_a_good_checkpoint(corpus, tmp_path):
    "Checkpoints fall between loss checks (cadence 3, checks every 7): every file left is finite, and the error"
    "points at one of them (tried before the fix: the error sent the user to step 6, holding 10 non-finite tensors)."
    out = tmp_path / 'nan'
    p = run_cli(['--data', corpus, '--out-dir', out, '--max-steps', 30,
                 *tiny_args(learning_rate=1e4, log_cadence=7, checkpoint_cadence=3, eval_cadence=0,
                            sampling_cadence=0, warmup_steps=0)])
    assert p.returncode == 1, (p.stdout, p.stderr)
    error = p.stderr.strip().splitlines()[-1]
    assert error.startswith('error: ') and ('NaN' in error or 'nan' in error or 'inf' in error), error
    saved = sorted((out / 'checkpoints').glob('step_*.pt'))
    for f in saved:
        ck = torch.load(f, weights_only=True)
        assert all(torch.isfinite(v).all() for v in ck['model'].values()), f"{f.name} holds non-finite weights"
    if saved: assert f"resume from the last good checkpoint ({saved[-1]})" in error or str(saved[-1]) in error, error
    else: assert 'no checkpoint' in error, error


FLAKY_HOOK = '''
class Flaky:
    def after_step(self, t):
        if t.step == 13: raise ConnectionError("the dashboard went away")
'''


def test_a_hook_that_fails_mid_run_loses_no_steps(corpus, tmp_path):
    "A user's hook raises at step 13 (checkpoints every 8): the run saves step 13 first, says so in one error line"
    "naming the hook, and a resume from there repeats the straight run."
    (tmp_path / 'flaky.py').write_text(FLAKY_HOOK)
    out = tmp_path / 'run'
    e = {**env(), 'PYTHONPATH': f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    p = subprocess.run([tinylm_train_exe(), '--data', str(corpus), '--out-dir', str(out), '--max-steps', '20',
                        '--hook', 'flaky:Flaky', *map(str, tiny_args())], capture_output=True, text=True, env=e,
                       timeout=120)
    assert_clean_error(p.returncode, p.stdout, p.stderr, 1, (
        'the Flaky hook failed at step 13 (ConnectionError: the dashboard went away); the run was saved first',
        f'--resume {out}/checkpoints/step_000013.pt'))
    assert [r['status'] for r in events(read_jsonl(out / 'train.jsonl'), 'run_end')] == ['failed']
    r = run_cli(['--resume', out, '--max-steps', 20])
    assert r.returncode == 0, r.stderr[-3000:]
    straight = run_cli(['--data', corpus, '--out-dir', tmp_path / 'straight', '--max-steps', 20, *tiny_args()])
    assert straight.returncode == 0
    a = losses(read_jsonl(tmp_path / 'straight' / 'train.jsonl'))
    got = losses(segments(read_jsonl(out / 'train.jsonl'))[1])
    assert sorted(got) == list(range(14, 21)) and got == {s: a[s] for s in got}
