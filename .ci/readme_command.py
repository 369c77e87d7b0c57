"""Print one of the README's commands, as written there, for .ci/run to run: `install` or `test`.

The README marks each with an HTML comment (invisible on GitHub) right above its code block:
`<!-- ci: install = first line -->` (the first line of the block) and `<!-- ci: test = block -->` (the whole block).
So CI runs exactly what a newcomer reads, and the two cannot drift apart."""
import re, sys
from pathlib import Path

MARK = re.compile(r'<!-- ci: (\w+) = (first line|block) -->\s*\n```[a-z]*\n(.*?)\n```', re.S)

def command(readme: str, what: str) -> str:
    found = {m.group(1): (m.group(2), m.group(3)) for m in MARK.finditer(readme)}
    if what not in found: raise SystemExit(f"error: README.md has no '<!-- ci: {what} = ... -->' code block")
    how, block = found[what]
    lines = [l for l in block.splitlines() if l.strip()]
    return lines[0] if how == 'first line' else '\n'.join(lines)

if __name__ == '__main__':
    if len(sys.argv) != 2 or sys.argv[1] not in ('install', 'test'):
        raise SystemExit("usage: python3 .ci/readme_command.py install|test")
    print(command((Path(__file__).resolve().parent.parent / 'README.md').read_text(encoding='utf-8'), sys.argv[1]))
