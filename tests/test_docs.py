"""`tinylm_docs` executes a folder of notebooks in Jupyter kernels and renders a static site: chapter pages in
order with previous/next links, an index with titles and descriptions, and one `error:` line per failing chapter."""
import pytest
import os, re, shutil, subprocess, sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_notebook, new_markdown_cell, new_code_cell

from test_walkthrough import ensure_python3_kernel



pytestmark = pytest.mark.slow   # the slow set (`pytest -m slow`): CI runs it after the quick loop

def docs_cmd() -> list[str]:
    exe = shutil.which('tinylm_docs')
    return [exe] if exe else [sys.executable, '-m', 'tinylm.docs']


def run_docs(args, cwd, timeout=180) -> subprocess.CompletedProcess:
    ensure_python3_kernel()
    return subprocess.run(docs_cmd() + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, 'PYTHONUNBUFFERED': '1'})


def write_nb(path: Path, *cells):
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(new_notebook(cells=list(cells)), path)


def test_builds_an_executed_site(tmp_path):
    nbs = tmp_path / 'book'
    write_nb(nbs / '00_first.ipynb',
             new_markdown_cell("# First chapter\n\n> Where it all begins.\n\nThen [the second](01_second.ipynb)."),
             new_code_cell("#| export\nimport os\nprint('answer', 6 * 7)"),
             new_code_cell("print('cwd', os.getcwd()); print('threads', os.environ.get('OMP_NUM_THREADS'))"),
             new_code_cell("#| hide\nprint('SECRET-HIDDEN')"),
             new_code_cell("#| eval: false\nprint('MUST-NOT-' + 'RUN')"))
    write_nb(nbs / '01_second.ipynb',
             new_markdown_cell("# Second `chapter`\n\n> And then some."),
             new_code_cell("x = 'out' + '-put'\nx"))
    write_nb(nbs / '_draft.ipynb', new_markdown_cell("# Draft"), new_code_cell("1/0"))
    out = tmp_path / 'site'

    r = run_docs(['--nbs', str(nbs), '--out', str(out)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert 'error:' not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ['00_first.html', '01_second.html', 'index.html']

    index = (out / 'index.html').read_text()
    links = re.findall(r'href="([^"]+\.html)"', index)
    assert links == ['00_first.html', '01_second.html']
    assert 'First chapter' in index and 'Where it all begins.' in index
    assert 'Second <code>chapter</code>' in index and 'And then some.' in index

    first = (out / '00_first.html').read_text()
    assert 'answer 42' in first                                   # executed output
    assert f'cwd {nbs.resolve()}' in first and 'threads 1' in first
    assert 'SECRET-HIDDEN' not in first                           # `#| hide` cell not shown
    assert '#| export' not in first and '#| eval' not in first    # directives stripped
    assert 'MUST-NOT-' in first                                   # eval: false cell shown...
    assert 'MUST-NOT-RUN' not in first                            # ...but not run
    assert 'href="01_second.html">the second' in first            # markdown link retargeted
    assert 'href="01_second.html">Second <code>chapter</code> →' in first
    second = (out / '01_second.html').read_text()
    assert 'out-put' in second
    assert 'href="00_first.html">← First chapter' in second and 'href="index.html"' in second


def test_failing_notebook_is_an_error_but_the_rest_is_built(tmp_path):
    write_nb(tmp_path / 'nbs' / '00_bad.ipynb',
             new_markdown_cell("# Bad"), new_code_cell("x = 1"), new_code_cell("#| export\n1 / 0"),
             new_code_cell("print('never printed')"))
    write_nb(tmp_path / 'nbs' / '01_fine.ipynb', new_markdown_cell("# Fine"), new_code_cell("print('fine', 2 + 2)"))

    r = run_docs([], cwd=tmp_path)          # defaults: ./nbs -> ./_docs
    assert r.returncode == 1
    errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert len(errors) == 1, r.stderr
    assert '00_bad.ipynb' in errors[0] and 'cell 3' in errors[0] and 'ZeroDivisionError' in errors[0], errors
    assert 'Traceback' not in r.stderr
    site = tmp_path / '_docs'
    assert 'fine 4' in (site / '01_fine.html').read_text()       # the others are still built
    bad = (site / '00_bad.html').read_text()
    assert 'ZeroDivisionError' in bad and 'never printed' in bad and 'This chapter failed' in bad
    assert '<span class="failed">failed</span>' in (site / 'index.html').read_text()


def test_missing_notebooks_folder(tmp_path):
    r = run_docs([], cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith('error: notebooks folder not found') and '--nbs' in r.stderr
    assert not (tmp_path / '_docs').exists()


def run_outputs(args, cwd, timeout=180) -> subprocess.CompletedProcess:
    ensure_python3_kernel()
    exe = shutil.which('tinylm_outputs')
    return subprocess.run(([exe] if exe else [sys.executable, '-m', 'tinylm.outputs']) + list(args), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, 'PYTHONUNBUFFERED': '1'})


def test_check_names_each_stale_output_and_update_refreshes_it(tmp_path):
    "`tinylm_outputs` fails on an output today's code would not print (naming notebook and cell), passes on float noise and"
    "on volatile cells; `--update` writes the new outputs, after which the check passes."
    from nbformat.v4 import new_output
    nbs = tmp_path / 'nbs'
    stale = new_code_cell("print(f'loss {1.86101:.5f} (2.685 bpb)')")
    stale.outputs = [new_output('stream', name='stdout', text='loss 1.86102 (2.685 bpc)\n')]   # a renamed unit
    noise = new_code_cell("print(f'loss {1.86101:.5f}')")
    noise.outputs = [new_output('stream', name='stdout', text='loss 1.86102\n')]               # the fifth digit
    timing = new_code_cell("#| volatile: a timing\nimport time; print(time.time())")
    timing.outputs = [new_output('stream', name='stdout', text='12.5\n')]
    skipped = new_code_cell("#| eval: false\nprint('not run')")
    skipped.outputs = [new_output('stream', name='stdout', text='not run\n')]
    write_nb(nbs / '00_a.ipynb', new_markdown_cell("# A"), stale, noise, timing, skipped)
    write_nb(nbs / '01_b.ipynb', new_markdown_cell("# B"), new_code_cell("x = 1"))
    r = run_outputs([], cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    errors = [l for l in r.stderr.splitlines() if l.startswith('error:')]
    assert errors == [
        "error: nbs/00_a.ipynb: cell 2 (`print(f'loss {1.86101:.5f} (2.685 bpb)')`): committed "
        "'[stdout] loss 1.86102 (2.685 bpc)', now '[stdout] loss 1.86101 (2.685 bpb)'",
        "error: nbs/00_a.ipynb: cell 5 (`#| eval: false`) is not run (eval: false) but has committed outputs"], errors
    assert '2 stale outputs or failures in 1' in r.stdout
    r = run_outputs(['--update', '00_a'], cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = run_outputs([], cwd=tmp_path)
    assert r.returncode == 0 and 'every output is current' in r.stdout, r.stdout + r.stderr
    r = run_outputs(['nope'], cwd=tmp_path)
    assert r.returncode == 1 and 'error: no notebook nope in nbs' in r.stderr, r.stderr
