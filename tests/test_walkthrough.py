"""The walkthrough notebook (nbs/20_walkthrough.ipynb) runs top to bottom in a real Jupyter kernel, as a learner
runs it in JupyterLab: nbclient starts an ipykernel `python3` kernel and executes every cell with the short
default settings (`LONG = False`)."""
import pytest
import os, tempfile, time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


pytestmark = pytest.mark.slow   # the slow set (`pytest -m slow`): CI runs it after the quick loop

WALKTHROUGH = Path(__file__).resolve().parent.parent / "nbs" / "20_walkthrough.ipynb"


def ensure_python3_kernel():
    "Install ipykernel's own `python3` kernelspec for this interpreter if none is registered (fresh machines)."
    from jupyter_client.kernelspec import find_kernel_specs
    if 'python3' not in find_kernel_specs():
        from ipykernel.kernelspec import install
        install(user=True)


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])]


def test_walkthrough_runs_in_a_kernel(tmp_path):
    ensure_python3_kernel()
    nb = nbformat.read(WALKTHROUGH, as_version=4)
    sources = [c.source for c in nb.cells if c.cell_type == 'code']
    assert any(s.lstrip().startswith('LONG = False') for s in sources), "the short version must be the default"
    tmp_root = Path(tempfile.gettempdir())
    before = set(tmp_root.glob('tinylm-walkthrough-*'))

    client = NotebookClient(nb, timeout=120, kernel_name='python3', coalesce_streams=True,
                            resources={'metadata': {'path': str(tmp_path)}})
    t0 = time.time()
    client.execute(env={**os.environ, 'OMP_NUM_THREADS': '1'})   # raises CellExecutionError if any cell fails
    elapsed = time.time() - t0

    outs = _outputs(nb)
    assert not [o for o in outs if o.output_type == 'error']
    text = ''.join(o.get('text', '') for o in outs if o.output_type == 'stream')
    assert 'status: completed; final training loss' in text, text[-2000:]
    assert 'ROMEO:' in text and 'same text: True' in text
    assert 'status: interrupted at step 30' in text
    assert 'resumed run trained steps 31..60' in text and 'identical: True' in text
    images = [o for o in outs if 'image/png' in o.get('data', {})]
    assert len(images) >= 2, "the two loss-curve plots should be images"
    assert list(tmp_path.iterdir()) == [], "the walkthrough must write only to its own temporary folder"
    assert set(tmp_root.glob('tinylm-walkthrough-*')) == before, "the last cell deletes the temporary folder"
    assert elapsed < 120, f"the short walkthrough took {elapsed:.0f} s"
