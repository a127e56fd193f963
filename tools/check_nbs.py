"""Checks that the notebooks (the source) and the package agree, before any test runs.

1. Export: `nbdev_export` must not change any file of `fastsparse/` (a hand edit of a `.py` file fails here).
2. Clean: `nbdev_clean` must not change any notebook (no stray metadata or execution counts).
3. No skipping: no library notebook may opt out of execution (`skip_exec`, `#| eval: false`
   on a whole notebook, or a `.notest` file); slow/GPU cells use the `slow`/`cuda` flags instead.

Exits non-zero with a message naming each offending file."""
import hashlib, json, re, shutil, subprocess, sys, tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LIB, NBS = ROOT/'fastsparse', ROOT/'nbs'

def _digest(folder, pattern):
    "Map each file under `folder` matching `pattern` to the sha256 of its bytes"
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob(pattern)) if '.ipynb_checkpoints' not in p.parts}

def _changed(before, after):
    return sorted(k for k in set(before)|set(after) if before.get(k) != after.get(k))

def check_export():
    "Export the notebooks and fail if that changes the package: `fastsparse/` must be exactly what the notebooks say"
    before = _digest(LIB, '*.py')
    subprocess.run([sys.executable, '-c', 'from nbdev.doclinks import nbdev_export; nbdev_export.__wrapped__()'],
                   cwd=ROOT, check=True)
    changed = _changed(before, _digest(LIB, '*.py'))
    if changed:
        return [f"fastsparse/{f}: differs from what nbs/ exports (edit the notebook, then run `make export`)" for f in changed]
    return []

def check_clean():
    "Clean a copy of the notebooks and fail if cleaning changes any of them"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)/'nbs'
        shutil.copytree(NBS, tmp, ignore=shutil.ignore_patterns('.ipynb_checkpoints', '_*'))
        before = _digest(tmp, '*.ipynb')
        subprocess.run([sys.executable, '-c', f'from nbdev.clean import nbdev_clean; nbdev_clean.__wrapped__(fname={str(tmp)!r})'],
                       cwd=ROOT, check=True)
        changed = _changed(before, _digest(tmp, '*.ipynb'))
    return [f"nbs/{f}: not clean (run `make clean-nbs`)" for f in changed]

_skip_re = re.compile(r'^\s*#\|\s*(skip_exec|eval:\s*false)', re.M)
def check_no_skip():
    "Fail when a library notebook, or the whole test run, is marked to skip execution"
    errs = []
    for p in sorted(NBS.rglob('*.ipynb')):
        nb = json.loads(p.read_text())
        if nb.get('metadata', {}).get('skip_exec'): errs.append(f"nbs/{p.name}: metadata skip_exec")
        for c in nb['cells']:
            src = ''.join(c['source'])
            if c['cell_type'] == 'raw' and re.search(r'^skip_exec:\s*true', src, re.M): errs.append(f"nbs/{p.name}: front matter skip_exec")
            if c['cell_type'] == 'code' and _skip_re.search(src):
                errs.append(f"nbs/{p.name}: cell marked `{_skip_re.search(src).group(1)}`; use `#| slow` or `#| cuda` instead")
    for p in NBS.rglob('.notest'): errs.append(f"{p.relative_to(ROOT)}: .notest file makes nbdev skip a folder")
    return errs

if __name__ == '__main__':
    errs = check_no_skip() + check_clean() + check_export()
    if errs:
        sys.stderr.write('Notebook checks failed:\n  ' + '\n  '.join(errs) + '\n')
        sys.exit(1)
    print(f"Notebook checks passed: {len(list(NBS.glob('*.ipynb')))} notebooks clean, none skipped, package in sync.")
