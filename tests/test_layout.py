"""The book's layout: chapters import only from earlier chapters, every collective lives in one module, module
docstrings are sentences, and `__all__` holds what users import (no method spread over cells with @patch leaks out as
a bare function)."""
import ast, importlib, inspect, json, re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / 'tinylm'
ROOT = PKG.parent
MODULES = sorted(p for p in PKG.glob('*.py') if p.name not in ('__init__.py', '_modidx.py'))


def chapter_key(name: str) -> tuple[int, str]:
    "The place of a chapter in reading order from its notebook's name: `02_x` is (2, ''), `02a_y` (2, 'a') after it."
    m = re.match(r'(\d+)([a-z]?)_', name)
    assert m, f"{name} is not a numbered chapter"
    return int(m.group(1)), m.group(2)


def chapter(path: Path) -> tuple[int, str]:
    "The chapter of a module, from the `File to edit: ../nbs/NN_name.ipynb` line nbdev writes at its top."
    m = re.search(r'File to edit: \.\./nbs/(\d+[a-z]?_\w+)\.ipynb', path.read_text(encoding='utf-8'))
    assert m, f"{path.name} has no 'File to edit' header: was it written by hand?"
    return chapter_key(m.group(1))


def imported_modules(path: Path) -> set[str]:
    "The tinylm modules `path` imports (`from .x import`, `from tinylm.x import`, `import tinylm.x`)."
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module: found.add(node.module.split('.')[0])
            elif node.module and node.module.startswith('tinylm.'): found.add(node.module.split('.')[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split('.')[1] for a in node.names if a.name.startswith('tinylm.')}
    return found


def test_every_module_comes_from_a_numbered_chapter():
    numbers = {p.stem: chapter(p) for p in MODULES}
    assert len(set(numbers.values())) == len(numbers), f"two modules share a chapter: {numbers}"


@pytest.mark.parametrize('path', MODULES, ids=lambda p: p.stem)
def test_no_forward_import(path):
    own = chapter(path)
    for name in imported_modules(path):
        other = PKG / f'{name}.py'
        assert other.is_file(), f"{path.name} imports tinylm.{name}, which does not exist"
        assert chapter(other) < own, (f"{path.name} (chapter {own}) imports tinylm.{name} (chapter {chapter(other)}): "
                                      "a chapter may only import from earlier chapters")


NOTEBOOKS = sorted((PKG.parent / 'nbs').glob('[0-9][0-9]*_*.ipynb'))


@pytest.mark.parametrize('nb', NOTEBOOKS, ids=lambda p: p.stem)
def test_no_chapter_reads_ahead(nb, tmp_path):
    "Every code cell of chapter NN, exported or not, imports only from chapters up to NN: the book reads in order."
    import json
    own = chapter_key(nb.name)
    code = '\n'.join(''.join(c['source']) for c in json.loads(nb.read_text(encoding='utf-8'))['cells']
                     if c['cell_type'] == 'code')
    code = '\n'.join(l for l in code.splitlines() if not l.lstrip().startswith(('%', '!')))   # IPython magics
    script = tmp_path / 'cells.py'
    script.write_text(code, encoding='utf-8')
    for name in imported_modules(script):
        other = PKG / f'{name}.py'
        assert other.is_file(), f"{nb.name} imports tinylm.{name}, which does not exist"
        assert chapter(other) <= own, (f"{nb.name} imports tinylm.{name} from the later chapter {chapter(other)}")


COLLECTIVES = {'all_reduce', 'all_gather', 'all_gather_object', 'all_gather_into_tensor', 'all_to_all',
               'all_to_all_single', 'broadcast', 'broadcast_object_list', 'barrier', 'monitored_barrier', 'reduce',
               'reduce_scatter', 'reduce_scatter_tensor', 'gather', 'gather_object', 'scatter', 'scatter_object_list',
               'send', 'recv', 'isend', 'irecv'}


def collective_calls(path: Path) -> list[str]:
    "Where `path` reaches a `torch.distributed` collective itself: `torch.distributed.X`, an alias's `X`, or `X` imported."
    tree = ast.parse(path.read_text(encoding='utf-8'))
    aliases, found = {'torch.distributed'}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == 'torch.distributed' and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == 'torch.distributed':
            found += [f"line {node.lineno}: from torch.distributed import {a.name}" for a in node.names
                      if a.name in COLLECTIVES]
        elif isinstance(node, ast.ImportFrom) and node.module == 'torch':
            aliases |= {a.asname or a.name for a in node.names if a.name == 'distributed'}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in COLLECTIVES and ast.unparse(node.value) in aliases:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


@pytest.mark.parametrize('path', [p for p in MODULES if p.stem != 'distributed'], ids=lambda p: p.stem)
def test_collectives_live_in_the_distributed_module(path):
    """Every all-reduce, gather, broadcast and barrier goes through tinylm.distributed, which puts its tensor where the
    backend needs it (the rank's GPU for NCCL, the CPU for gloo): a CPU tensor handed to NCCL fails on the first GPU."""
    found = collective_calls(path)
    assert not found, f"{path.name} calls torch.distributed's collectives itself (use tinylm.distributed): {found}"


def test_the_collective_check_finds_a_direct_call(tmp_path):
    bad = tmp_path / 'bad.py'
    bad.write_text("import torch\nimport torch.distributed as dist\nfrom torch import distributed as d2\n"
                   "def f(t):\n    torch.distributed.all_reduce(t)\n    dist.barrier()\n    d2.broadcast(t, 0)\n")
    assert len(collective_calls(bad)) == 3
    fine = tmp_path / 'fine.py'
    fine.write_text("import torch.distributed as dist\ndef f():\n    return dist.is_initialized()\n")
    assert collective_calls(fine) == []


@pytest.mark.parametrize('path', MODULES, ids=lambda p: p.stem)
def test_module_docstrings_are_sentences(path):
    "nbdev exports the first line of a chapter's summary as its module's docstring: it must be a whole sentence."
    doc = ast.get_docstring(ast.parse(path.read_text(encoding='utf-8')))
    assert doc, f"{path.name} has no docstring: give its chapter a one-line `> summary`"
    assert '\n' not in doc, f"{path.name}: the summary spans lines, and nbdev keeps only the first: {doc!r}"
    assert doc[0].isupper() or doc[0] == '`', f"{path.name}: {doc!r} does not start a sentence"
    assert doc.endswith(('.', '?', '!')), f"{path.name}: {doc!r} stops mid-sentence"
    assert doc.count('`') % 2 == 0 and doc.count('(') == doc.count(')'), f"{path.name}: {doc!r} is unbalanced"


def test_no_method_leaks_into_all():
    "A function attached to a class with @patch is a method, not something `from tinylm.x import *` should bring."
    mods = [importlib.import_module(f'tinylm.{p.stem}') for p in MODULES]
    classes = [c for m in mods for _, c in inspect.getmembers(m, inspect.isclass) if c.__module__.startswith('tinylm.')]
    for m in mods:
        assert hasattr(m, '__all__'), m.__name__
        for name in m.__all__:
            obj = getattr(m, name)
            for c in classes:
                attr = inspect.getattr_static(c, name, None)
                attr = getattr(attr, '__func__', attr)           # classmethods
                assert not (attr is not None and attr is obj), f"{m.__name__}.__all__ exports {name}, a method of {c.__name__}"


def test_star_import_of_the_trainer_shadows_no_module():
    import tinylm.trainer as t
    assert not {'fit', 'begin', 'end', 'sample', 'evaluate', 'training_step', 'from_checkpoint'} & set(t.__all__)
    assert {'Trainer', 'Hook', 'Evaluator', 'Sampler', 'Checkpointer', 'GracefulStop'} <= set(t.__all__)


def test_specification_names_import_from_where_they_always_did():
    from tinylm.trainer import Trainer
    from tinylm.data import WindowDataset, make_dataloaders, load_text
    from tinylm.tokenizer import Tokenizer
    from tinylm.model import Transformer
    from tinylm.optim import create_optimizer
    from tinylm.config import TrainingConfig
    from tinylm.main import main, build_trainer
    assert all(callable(x) for x in (Trainer.fit, Trainer.training_step, Trainer.save_checkpoint, Trainer.from_checkpoint))


LEAKS = re.compile(r'(?:/root/|/home/|/tmp/|/work/|/Users/|site-packages|\bWarning\b|Traceback \(most recent call last\))')

@pytest.mark.parametrize('nb', [p for p in sorted((PKG.parent / 'nbs').glob('*.ipynb'))], ids=lambda p: p.name)
def test_committed_outputs_hold_no_machine_paths_warnings_or_tracebacks(nb):
    "A committed output must read the same on every machine: no absolute paths, no warnings, no tracebacks."
    cells = json.loads(nb.read_text(encoding='utf-8'))['cells']
    for i, cell in enumerate(cells):
        for out in cell.get('outputs', []):
            text = ''.join(out.get('text', '')) + ''.join(out.get('data', {}).get('text/plain', ''))
            if out.get('output_type') == 'error': text += 'Traceback (most recent call last)'
            m = LEAKS.search(text)
            assert m is None, f"{nb.name} cell {i}: its output shows {m.group(0)!r}: {text[max(0, m.start() - 80):m.end() + 80]!r}"


@pytest.mark.parametrize('nb', [p for p in sorted((PKG.parent / 'nbs').glob('*.ipynb'))], ids=lambda p: p.name)
def test_notebook_lines_fit_in_120_characters(nb):
    "Every line of every cell, code and prose, reads without scrolling: at most 120 characters."
    cells = json.loads(nb.read_text(encoding='utf-8'))['cells']
    long = [(i, line[:60]) for i, cell in enumerate(cells) for line in ''.join(cell['source']).split('\n')
            if len(line) > 120]
    assert not long, f"{nb.name}: lines over 120 characters (cell, start): {long}"

def test_the_dev_extra_installs_every_other_extra():
    "The README installs `.[dev]` and then runs every test: nothing a test or a chapter imports may be left out."
    import configparser
    cfg = configparser.ConfigParser(delimiters=['='])
    cfg.read(ROOT / 'settings.ini', encoding='utf-8')
    d = cfg['DEFAULT']
    dev = set(d['dev_requirements'].split())
    for extra in [k for k in d if k.endswith('_requirements') and k not in ('requirements', 'dev_requirements')]:
        missing = set(d[extra].split()) - dev
        assert not missing, f"settings.ini: the dev extra lacks {extra[:-len('_requirements')]}'s {sorted(missing)}"


def test_ci_runs_the_readme_commands_as_written():
    "The README's install and test commands are read from the README itself by .ci/run."
    import subprocess, sys
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    for what in ('install', 'test'):
        r = subprocess.run([sys.executable, str(ROOT / '.ci' / 'readme_command.py'), what], capture_output=True,
                           text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() and r.stdout.strip() in readme, (what, r.stdout)
    run = (ROOT / '.ci' / 'run').read_text()
    assert 'python3 .ci/readme_command.py "$1"' in run and '\nreadme install\n' in run and '\nreadme test\n' in run
