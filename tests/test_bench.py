"""The benchmark scripts and their published results.

Every script of `bench/` runs in its smoke mode (`--quick`: tiny sizes, seconds) and writes its result file the way a
full run does: a title, the stamp line, and the command with its output. Every committed result in `bench/results/`
carries a stamp whose commit is in this repository's history, and neither the script, nor `bench/common.py`, nor the
library changed since that commit: the published figures come from the code as it is. README's figures are found in
the result file each line cites."""
import os, re, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH, RESULTS = ROOT/'bench', ROOT/'bench'/'results'
SCRIPTS = sorted(p.stem for p in BENCH.glob('*.py') if p.stem not in ('common', 'gpu'))  # gpu.py: tests/test_cuda.py runs its CPU smoke run
STAMP = re.compile(r'^Run: commit `([0-9a-f]{7,40})`, (\d{4}-\d\d-\d\d) ', re.M)
PRINTS = {'oneshot': ('sparsegpt', 'plain', 'targets:', 'layers:'),
          'applications': ('recommended vs small-dense', 'collab_dot   70%', 'tabular      70%')}   # what a script's output must show besides its stamp

def test_every_script_is_smoke_tested():
    assert {'applications', 'overhead', 'dispatch', 'deploy', 'export'} <= set(SCRIPTS), SCRIPTS

@pytest.mark.parametrize('name', SCRIPTS)
def test_quick_run_writes_its_result(name, tmp_path):
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]), 'MPLBACKEND': 'Agg'}
    r = subprocess.run([sys.executable, f'bench/{name}.py', '--quick', '--out', str(tmp_path)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    md = (tmp_path/f'{name}.md').read_text()
    assert md.startswith('## '), md[:200]
    assert re.search(r'^Run: commit `[^`]+`, \d{4}-\d\d-\d\d ', md, re.M), f"no stamp line in {name}.md"  # (the tree may differ from its commit here)
    assert re.search(rf'^```text\n\$ python bench/{name}\.py --quick --out \S+\n.+', md, re.M), "no command with its output"
    for img in re.findall(r'!\[[^\]]*\]\(([^)\s]+)\)', md): assert (tmp_path/img).stat().st_size > 1000, img
    assert 'How to read it' in md
    for s in PRINTS.get(name, ()): assert s in r.stdout, (s, r.stdout[-2000:])

def _git(*args):
    return subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True)

def _history():
    "Why the stamps cannot be checked here (not a git checkout, or a shallow one), or None"
    r = _git('rev-parse', '--is-shallow-repository')
    if r.returncode != 0: return "not a git checkout: the stamps' commits cannot be looked up"
    if r.stdout.strip() == 'true': return "a shallow clone: the stamps' commits may be outside it"
    return None

RESULT_FILES = sorted(p.stem for p in RESULTS.glob('*.md'))

def test_every_script_has_a_result():
    "Each script but the GPU's (which needs a CUDA machine) has a committed result"
    assert set(SCRIPTS) <= set(RESULT_FILES), set(SCRIPTS) - set(RESULT_FILES)

@pytest.mark.parametrize('name', RESULT_FILES)
def test_result_comes_from_the_current_code(name):
    if why := _history(): pytest.skip(why)
    md = (RESULTS/f'{name}.md').read_text()
    m = STAMP.search(md)
    assert m, f"bench/results/{name}.md has no stamp line"
    sha = m.group(1)
    assert 'uncommitted' not in md.split('<details', 1)[0], f"{name}.md was produced by code with uncommitted changes"
    assert _git('merge-base', '--is-ancestor', sha, 'HEAD').returncode == 0, f"{name}.md: commit {sha} is not in HEAD's history"
    changed = _git('diff', '--name-only', sha, 'HEAD', '--', f'bench/{name}.py', 'bench/common.py', 'fastsparse').stdout.split()
    assert not changed, f"bench/results/{name}.md (commit {sha}) predates changes to {changed}: rerun `python bench/{name}.py`"

# ---- README's figures
NUM = re.compile(r'(?<![\w.])[-+]?\d[\d,]*(?:\.\d+)?(?=x\b|%|\s?(?:us|ms|s|MB|KB|GB)\b|\b)')

def readme_claims():
    "[(the item's start, result files it cites, [numbers it quotes])] of README's list items and paragraphs that cite bench/results/"
    out = []
    for item in re.split(r'\n(?=- |\n)', (ROOT/'README.md').read_text()):
        files = re.findall(r'bench/results/(\w+)\.md', item)
        if not files: continue
        prose = re.sub(r'`[^`]*`|\[[^\]]*\]', ' ', item)   # code and link texts name things; they quote no measurement
        nums = [n for n in NUM.findall(prose) if not re.fullmatch(r'[-+]?\d', n)]
        out.append((' '.join(item.split())[:70], files, nums))
    return out

def test_readme_cites_results():
    assert len(readme_claims()) >= 3, "README quotes no measured figure with the result it comes from"

@pytest.mark.parametrize('item,names,nums', readme_claims())
def test_readme_figures_are_in_their_results(item, names, nums):
    "Every figure of a README item that cites results is found in one of the result files it cites"
    mds = [(RESULTS/f'{n}.md').read_text() for n in names]
    missing = [n for n in nums if not any(n.lstrip('+') in md for md in mds)]
    assert not missing, f"README quotes {missing}, found in none of {names}: {item}"
