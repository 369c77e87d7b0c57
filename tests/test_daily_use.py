"""Daily use: sampling from a checkpoint, loss plots, progress display, TensorBoard."""
import fcntl, json, os, pty, struct, subprocess, sys, termios

import pytest

TINY = ['--set', 'n_layer=2', '--set', 'n_head=2', '--set', 'n_embd=48', '--set', 'block_size=32',
        '--set', 'batch_size=16', '--set', 'eval_batches=2', '--set', 'sample_length=40', '--set', 'log_cadence=10',
        '--set', 'device=cpu', '--set', 'threads=1', '--set', 'eval_cadence=50', '--set', 'learning_rate=0.003',
        '--set', 'warmup_steps=10', '--set', 'lr_decay_steps=300']
ENV = {**os.environ, 'OMP_NUM_THREADS': '1'}


def run(*args, timeout=300, **kw):
    return subprocess.run(list(args), capture_output=True, text=True, env=ENV, timeout=timeout, **kw)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A short run on the bundled corpus, resumed once, so the log has two segments."
    out = tmp_path_factory.mktemp('daily') / 'out'
    r = run('tinylm_train', '--max-steps', '150', '--out-dir', str(out), *TINY)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run('tinylm_train', '--resume', str(out), '--max-steps', '200')
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_sample_is_deterministic_and_uses_only_the_vocabulary(trained):
    import torch
    vocab = set(torch.load(trained / 'checkpoints' / 'step_000200.pt', weights_only=True)['tokenizer']['chars'])
    args = ['tinylm_sample', '--checkpoint', str(trained), '--prompt', 'ROMEO:', '--max-new-tokens', '200',
            '--seed', '1']
    a, b = run(*args), run(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout
    text = a.stdout
    assert text.startswith('ROMEO:')
    assert len(text.rstrip('\n')) >= 200
    assert set(text) - {'\n'} <= vocab
    c = run(*args[:-1], '2')
    assert c.returncode == 0 and c.stdout != a.stdout


def test_sample_errors(trained, tmp_path):
    r = run('tinylm_sample', '--checkpoint', str(trained), '--prompt', 'Zoë')
    assert r.returncode == 1 and r.stderr.startswith('error:') and "'ë'" in r.stderr and 'Traceback' not in r.stderr
    r = run('tinylm_sample', '--checkpoint', str(trained), '--temperature', '0')
    assert r.returncode == 1 and 'error:' in r.stderr and 'temperature' in r.stderr
    bad = tmp_path / 'bad.pt'; bad.write_bytes(b'not a checkpoint')
    r = run('tinylm_sample', '--checkpoint', str(bad))
    assert r.returncode == 1 and r.stderr.startswith('error:') and 'Traceback' not in r.stderr


def test_plot_writes_a_png_with_both_curves(trained, tmp_path):
    from matplotlib.image import imread
    png = tmp_path / 'loss.png'
    r = run('tinylm_plot', str(trained), '-o', str(png))
    assert r.returncode == 0, r.stderr
    img = imread(png)
    assert img.shape[:2] == (450, 800)
    assert img[..., :3].std() > 0.05       # not a blank canvas
    from tinylm.plot import read_log, loss_curves
    curves = loss_curves(read_log(trained / 'train.jsonl'))
    steps = list(curves.train_steps)
    assert steps == sorted(set(steps)) and steps[0] == 10 and steps[-1] == 200   # one continuous curve
    assert len(curves.val_steps) >= 4
    r = run('tinylm_plot', str(tmp_path / 'nothing'))
    assert r.returncode == 1 and r.stderr.startswith('error:')


def test_the_model_learned_something(trained):
    recs = [json.loads(l) for l in (trained / 'train.jsonl').read_text().splitlines()]
    vals = [r['val_loss'] for r in recs if r['event'] == 'eval']
    assert vals[-1] < vals[0] < 4.2


def test_progress_bar_on_a_terminal_plain_lines_otherwise(tmp_path):
    args = ['tinylm_train', '--max-steps', '30', *TINY, '--set', 'eval_cadence=15', '--set', 'sampling_cadence=0']
    piped = run(*args, '--out-dir', str(tmp_path / 'a'))
    assert piped.returncode == 0
    assert '\r' not in piped.stdout and 'step 30/30' in piped.stdout
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack('HHHH', 24, 100, 0, 0))   # a 100x24 terminal
    p = subprocess.Popen([*args, '--out-dir', str(tmp_path / 'b')], stdout=slave, stderr=slave, env=ENV)
    os.close(slave)
    chunks = []
    while True:
        try: data = os.read(master, 65536)
        except OSError: break
        if not data: break
        chunks.append(data)
    assert p.wait(timeout=120) == 0
    tty = b''.join(chunks).decode(errors='replace')
    assert '\r' in tty and '30/30' in tty and 'val_loss' in tty     # a live tqdm bar with its postfix
    assert 'done: step 30' in tty
    # the machine log is the same either way
    ev = lambda d: [json.loads(l)['event'] for l in (tmp_path / d / 'train.jsonl').read_text().splitlines()]
    assert ev('a') == ev('b')


def test_tensorboard_optional(tmp_path, monkeypatch, capsys):
    import tensorboard  # noqa: F401  (the dev extra installs it: a missing extra fails here, never skips)
    from tinylm.main import main
    out = tmp_path / 'tb'
    assert main(['--max-steps', '10', '--out-dir', str(out), *TINY, '--set', 'tensorboard=true']) == 0
    assert any(p.name.startswith('events.out.tfevents') for p in (out / 'tensorboard').iterdir())
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)    # as if the extra were not installed
    capsys.readouterr()
    assert main(['--max-steps', '10', '--out-dir', str(tmp_path / 'no'), *TINY, '--set', 'tensorboard=true']) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: tensorboard: true needs the optional tensorboard package')
    assert not (tmp_path / 'no').exists()     # refused before any work
