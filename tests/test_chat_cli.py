"""`tinylm_chat` end to end: a tiny chat model trained by `tinylm_train` on conversations, then talked to through a
pipe (one reply per line, deterministic, history cut with a note) and at a terminal (Ctrl+D, Ctrl+C); and its errors."""
from __future__ import annotations
import fcntl, io, json, os, pty, random, select, shutil, subprocess, sys, termios, time

import pytest

from conftest import assert_clean_error, env, make_corpus, run_cli, tiny_args

from tinylm.chat import main, unescape_reply
from tinylm.main import main as train_main

COLOURS = 'red green blue yellow black white pink brown'.split()
MARKERS = ('<|endoftext|>', '<|system|>', '<|user|>', '<|assistant|>', '<|end|>')
CHAT = tiny_args(block_size=64, batch_size=16, learning_rate=0.01, warmup_steps=3, eval_cadence=40,
                 sampling_cadence=40, checkpoint_cadence=40, dropout=0.0)


def write_chats(path, n=120, seed=0):
    "Conversations of a user asking for colours; a third go on to a second question, answered on two lines."
    rng = random.Random(seed)
    lines = []
    for i in range(n):
        first, second = rng.choice(COLOURS), rng.choice(COLOURS)
        turns = [{'role': 'user', 'content': f'say {first}'}, {'role': 'assistant', 'content': f'{first}!'}]
        if i % 3 == 0:
            turns += [{'role': 'user', 'content': f'and {second}?'},
                      {'role': 'assistant', 'content': f'{second}\n{second}!'}]
        lines.append(json.dumps({'messages': turns}))
    path.write_text('\n'.join(lines) + '\n', encoding='utf-8')
    return path


@pytest.fixture(scope='module')
def chat_model(tmp_path_factory):
    "A tiny chat model trained from scratch on conversations through the installed `tinylm_train`."
    folder = tmp_path_factory.mktemp('chat')
    p = run_cli(['--data', write_chats(folder / 'chats.jsonl'), '--out-dir', folder / 'out', '--max-steps', 40, *CHAT])
    assert p.returncode == 0, p.stderr[-3000:]
    return folder / 'out'


def chat(*args, stdin: str = '', timeout: float = 120) -> subprocess.CompletedProcess:
    exe = shutil.which('tinylm_chat')
    if exe is None:
        pytest.fail("the `tinylm_chat` console script is not installed (pip install -e .)")
    return subprocess.run([exe, *map(str, args)], input=stdin, capture_output=True, text=True, env=env(),
                          timeout=timeout)


def replies(p: subprocess.CompletedProcess, n: int) -> list[str]:
    "The `n` replies a successful piped run printed: exactly `n` lines, nothing else, no error."
    assert p.returncode == 0, f"rc={p.returncode}\n{p.stdout}\n{p.stderr}"
    assert 'error:' not in p.stderr and 'Traceback' not in p.stderr, p.stderr
    assert p.stdout.endswith('\n'), repr(p.stdout)
    lines = p.stdout.split('\n')[:-1]
    assert len(lines) == n, f"{len(lines)} lines for {n} messages:\n{p.stdout}"
    return lines


def test_one_reply_per_line_the_same_for_the_same_seed(chat_model):
    messages = 'say red\n\n   \nand blue?\nsay pink\nand white?\n'   # blank lines are no message
    args = ['--checkpoint', chat_model, '--device', 'cpu', '--max-new-tokens', 24, '--temperature', 1.5]
    first = chat(*args, '--seed', 3, stdin=messages)
    lines = replies(first, 4)
    assert chat(*args, '--seed', 3, stdin=messages).stdout == first.stdout
    assert chat(*args, '--seed', 4, stdin=messages).stdout != first.stdout
    for line in lines:
        assert not any(m in line for m in MARKERS), line
        assert len(unescape_reply(line)) <= 24, line    # a character model: a token is a character
    assert '\\n' in first.stdout, first.stdout       # a reply held a newline, and it was written on one line


def test_a_long_conversation_forgets_its_oldest_exchanges(chat_model):
    "64 tokens of context less 16 for the reply: a few exchanges in, the oldest go, with a note on stderr."
    messages = ''.join(f'say {c}\n' for c in COLOURS)
    p = chat('--checkpoint', chat_model, '--device', 'cpu', '--max-new-tokens', 16, '--system', 'be short',
             stdin=messages)
    replies(p, len(COLOURS))
    notes = p.stderr.splitlines()
    assert notes and all(n.startswith('note: the conversation no longer fits in the 48 tokens') for n in notes), notes
    assert '(the system message is kept)' in notes[0]


def test_a_message_that_cannot_fit_ends_a_piped_run(chat_model):
    p = chat('--checkpoint', chat_model, '--device', 'cpu', '--max-new-tokens', 8,
             stdin='say red\nsay ' + 'red ' * 40 + '\nsay blue\n')
    assert_clean_error(p.returncode, p.stdout, p.stderr, contains='the message is too long')
    assert len(p.stdout.splitlines()) == 1      # the reply before it, then nothing


def test_a_model_without_chat_tokens_is_refused(tmp_path, capsys):
    "A model trained on text (in-process, to save a start of Python): the error names it and how to fine-tune it."
    out = tmp_path / 'plain'
    argv = ['--data', make_corpus(tmp_path / 'text.txt', n_lines=100), '--out-dir', out, '--max-steps', 2, *tiny_args()]
    assert train_main(list(map(str, argv))) == 0, capsys.readouterr().err[-3000:]
    r = chat('--checkpoint', out, '--device', 'cpu', stdin='hello\n')
    line = assert_clean_error(r.returncode, r.stdout, r.stderr,
                              contains=(f'{out} is not a chat model', f'tinylm_train --init-from {out} --data'))
    assert r.stdout == '' and r.stderr.count('\n') == 1, line


@pytest.mark.parametrize('args, message', [
    (['--temperature', '0'], 'temperature must be > 0'),
    (['--max-new-tokens', '0'], 'max_new_tokens must be at least 1'),
    (['--top-k', '0'], 'top_k must be at least 1'),
    (['--top-p', '1.5'], 'top_p must be in (0, 1]'),
    (['--system', 'be ' * 40], 'the system message (--system) is too long'),
    (['--system', 'be quiet'], "the system message (--system) cannot be encoded: character 'q'"),
])
def test_bad_settings(chat_model, args, message, monkeypatch, capsys):
    "In-process (the same `main` as the console script): one `error:` line, status 1, nothing on stdout."
    monkeypatch.setattr(sys, 'stdin', io.StringIO('say red\n'))
    code = main(['--checkpoint', str(chat_model), '--device', 'cpu', *args])
    out, err = capsys.readouterr()
    assert_clean_error(code, out, err, contains=message)
    assert out == '' and err.count('\n') == 1, err


def test_a_missing_checkpoint(tmp_path, capsys):
    code = main(['--checkpoint', str(tmp_path / 'nope')])
    out, err = capsys.readouterr()
    assert_clean_error(code, out, err, contains=f"checkpoint not found: {tmp_path / 'nope'}")


# ---------------------------------------------------------------- at a terminal
def controlling_terminal():
    "In the child, after `setsid`: make its standard input, the pty, its terminal, so that Ctrl+C sends it SIGINT."
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def read_until(fd, proc, expected: bytes, timeout: float = 60) -> bytes:
    "What the terminal shows until `expected` appears in it (or the program ends)."
    seen, end = b'', time.monotonic() + timeout
    while expected not in seen and time.monotonic() < end:
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            try:
                data = os.read(fd, 4096)
            except OSError:   # the program closed the terminal
                break
            seen += data
        elif proc.poll() is not None:
            break
    return seen


@pytest.mark.slow   # a terminal, real signals and two starts of the program: the slow set
@pytest.mark.parametrize('key, status', [(b'\x04', 0), (b'\x03', 130)], ids=['ctrl-d', 'ctrl-c'])
def test_a_conversation_at_a_terminal(chat_model, key, status):
    "A prompt, a reply streamed under it, the prompt again; Ctrl+D ends it cleanly, Ctrl+C at once, no traceback."
    master, slave = pty.openpty()
    proc = subprocess.Popen([shutil.which('tinylm_chat'), '--checkpoint', str(chat_model), '--device', 'cpu',
                             '--max-new-tokens', '16'], stdin=slave, stdout=slave, stderr=slave, env=env(),
                            start_new_session=True, preexec_fn=controlling_terminal)
    os.close(slave)
    try:
        shown = read_until(master, proc, b'> ')
        assert b'Ctrl+D ends the conversation' in shown, shown
        os.write(master, b'say red\n')
        shown = read_until(master, proc, b'\n> ')   # the reply, then the prompt for the next message
        assert b'\n> ' in shown, shown
        time.sleep(0.5)   # a Ctrl+C that lands before input() waits for the terminal is missed: a human is slower
        os.write(master, key)
        assert proc.wait(timeout=60) == status
        shown += read_until(master, proc, b'never shown', timeout=1)
        assert b'Traceback' not in shown and b'error:' not in shown, shown
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
