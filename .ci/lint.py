"""Lint the exported package with ruff (pyflakes rules, lines of at most 120 characters).

One kind of finding is left out: the first line of `__all__`, which nbdev writes itself (it wraps the names at 120
characters and then puts `__all__ = ` in front). Everything else ruff reports fails the check."""
import json, subprocess, sys
from pathlib import Path

cmd = [sys.executable, '-m', 'ruff', 'check', '--select', 'F,E501', '--line-length', '120', '--output-format', 'json',
       '--exclude', 'tinylm/_modidx.py', 'tinylm']
p = subprocess.run(cmd, capture_output=True, text=True)
if p.returncode not in (0, 1): sys.exit(f"error: ruff did not run: {p.stderr.strip()[-500:]}")
found = []
for f in json.loads(p.stdout or '[]'):
    line = Path(f['filename']).read_text(encoding='utf-8').splitlines()[f['location']['row'] - 1]
    if f['code'] == 'E501' and line.startswith('__all__ = '): continue
    found.append(f"{Path(f['filename']).relative_to(Path.cwd())}:{f['location']['row']}: {f['code']} {f['message']}")
print('\n'.join(found) or 'lint: no findings')
sys.exit(1 if found else 0)
