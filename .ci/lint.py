"""Lint the exported package with ruff: pyflakes, lines of at most 120 characters, one statement per line, and a
limit on how tangled one function may be.

- F: pyflakes (unused imports and names, undefined names).
- E501: lines of at most 120 characters.
- E701, E702, E703: one statement per line. A statement after `if x:` or after a `;` reads as if it always ran.
- C901: McCabe complexity of at most 10 per function: past that, a function does several things and is read several
  times. The exceptions are named below, each with the reason it is one function.

One kind of finding is left out: the first line of `__all__`, which nbdev writes itself (it wraps the names at 120
characters and then puts `__all__ = ` in front). Everything else ruff reports fails the check."""
import json, subprocess, sys
from pathlib import Path

MAX_COMPLEXITY = 10
COMPLEX_ON_PURPOSE = {   # 'module.function': why it stays one function
}

cmd = [sys.executable, '-m', 'ruff', 'check', '--select', 'F,E501,E701,E702,E703,C901', '--line-length', '120',
       '--config', f'lint.mccabe.max-complexity={MAX_COMPLEXITY}', '--output-format', 'json',
       '--exclude', 'tinylm/_modidx.py', 'tinylm']
p = subprocess.run(cmd, capture_output=True, text=True)
if p.returncode not in (0, 1):
    sys.exit(f"error: ruff did not run: {p.stderr.strip()[-500:]}")
found = []
for f in json.loads(p.stdout or '[]'):
    path = Path(f['filename'])
    line = path.read_text(encoding='utf-8').splitlines()[f['location']['row'] - 1]
    if f['code'] == 'E501' and line.startswith('__all__ = '):
        continue
    if f['code'] == 'C901' and f"{path.stem}.{f['message'].split('`')[1]}" in COMPLEX_ON_PURPOSE:
        continue
    found.append(f"{path.relative_to(Path.cwd())}:{f['location']['row']}: {f['code']} {f['message']}")
print('\n'.join(found) or 'lint: no findings')
sys.exit(1 if found else 0)
