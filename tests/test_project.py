"""Project rules that hold the notebooks and the package together (see tools/check_nbs.py)."""
import json, shutil, subprocess, sys, textwrap
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
_IGNORE = shutil.ignore_patterns('.venv', '_build', '_proc', '.git', '__pycache__', '*.egg-info', '.pytest_cache',
                                 '.hypothesis', '.ipynb_checkpoints', 'demo_out', 'out', 'models', '*.pth', '*.pkl')

@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
    "A copy of the repository without its environment and build outputs"
    dst = tmp_path_factory.mktemp('repo')/'fastsparse'
    shutil.copytree(ROOT, dst, ignore=_IGNORE)
    return dst

@pytest.fixture
def repo(pristine, tmp_path):
    "A fresh copy of `pristine` for one test to break"
    return Path(shutil.copytree(pristine, tmp_path/'fastsparse'))

def check_nbs(repo):
    "Run the copy's own tools/check_nbs.py on the copy (it works relative to its own location)"
    return subprocess.run([sys.executable, 'tools/check_nbs.py'], cwd=repo, capture_output=True, text=True, timeout=600)

def edit_nb(path, f):
    "Apply `f` to notebook `path`'s JSON and write it back the way nbdev does"
    nb = json.loads(path.read_text(encoding='utf-8'))
    f(nb)
    path.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n', encoding='utf-8')

NB = 'nbs/00_granularity.ipynb'

def test_unmodified_copy_passes(repo):
    r = check_nbs(repo)
    assert r.returncode == 0, r.stderr

def test_hand_edited_module_fails(repo):
    mod = repo/'fastsparse'/'granularity.py'
    mod.write_text(mod.read_text() + '\nHAND_EDIT = 1\n')
    r = check_nbs(repo)
    assert r.returncode != 0
    assert 'fastsparse/granularity.py' in r.stderr, r.stderr

def _code(src): return {'cell_type': 'code', 'execution_count': None, 'id': 'c0ffee01', 'metadata': {}, 'outputs': [], 'source': src}

@pytest.mark.parametrize('how', ['front_matter', 'eval_false', 'metadata', 'notest'])
def test_skipping_execution_fails(repo, how):
    nb = repo/NB
    if how == 'front_matter':
        edit_nb(nb, lambda n: n['cells'].insert(0, {'cell_type': 'raw', 'id': 'f00dcafe', 'metadata': {}, 'source': '---\nskip_exec: true\n---'}))
    elif how == 'eval_false': edit_nb(nb, lambda n: n['cells'].append(_code('#| eval: false\nx = 1')))
    elif how == 'metadata': edit_nb(nb, lambda n: n['metadata'].update(skip_exec=True))
    else: (repo/'nbs'/'.notest').touch()
    r = check_nbs(repo)
    assert r.returncode != 0, f"{how}: check_nbs.py passed"
    assert ('nbs/.notest' if how == 'notest' else NB) in r.stderr, r.stderr
    if how != 'notest': assert ('eval' if how == 'eval_false' else 'skip_exec') in r.stderr, r.stderr

def test_unclean_notebook_fails(repo):
    def f(nb): next(c for c in nb['cells'] if c['cell_type'] == 'code')['execution_count'] = 3
    edit_nb(repo/NB, f)
    r = check_nbs(repo)
    assert r.returncode != 0
    assert f'{NB}: not clean' in r.stderr, r.stderr

_NO_TORCHVISION = textwrap.dedent('''
    import importlib, importlib.util, json, pkgutil, sys, warnings
    warnings.simplefilter('ignore')
    tried = []
    class NoTorchvision:
        "Refuse torchvision, and remember who asked (a caller might swallow the ImportError)"
        def find_spec(self, name, path=None, target=None):
            if name.split('.')[0] == 'torchvision':
                tried.append(name)
                raise ImportError(f"fastsparse must not import {name}")
    sys.meta_path.insert(0, NoTorchvision())
    import fastsparse
    if importlib.util.find_spec('fastsparse.all'): mods = ['fastsparse.all']
    else: mods = [f'fastsparse.{m.name}' for m in pkgutil.iter_modules(fastsparse.__path__) if not m.name.startswith('_')]
    for m in mods: importlib.import_module(m)
    print(json.dumps(dict(mods=mods, tried=tried, loaded=[m for m in sys.modules if m.split('.')[0] == 'torchvision'
                                                          or m.startswith('fastai.vision')])))
''')

def test_package_never_imports_torchvision():
    r = subprocess.run([sys.executable, '-c', _NO_TORCHVISION], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert not res['tried'] and not res['loaded'], f"importing {res['mods']}: tried {res['tried']}, loaded {res['loaded']}"

def test_import_does_not_load_torch_pruning():
    "Only `fastsparse.export.shrinking` uses Torch-Pruning, and it imports it when it traces a model"
    code = ("import sys, fastsparse.all; from fastsparse.export import shrink; "
            "assert 'torch_pruning' not in sys.modules, 'torch_pruning imported by import fastsparse.all'")
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

def test_export_is_a_package_with_the_same_names():
    code = textwrap.dedent('''
        import fastsparse.export as fe
        from fastsparse.export import (shrink, shrink_plan, shrinkable_layers, to_sparse_inference, SparseLinear,
                                       save_compressed, load_compressed, count_params, size_report, time_inference, storage_form)
        assert fe.__path__, 'fastsparse.export is not a package'
        ns = {}
        exec('from fastsparse.all import *', ns)
        missing = [n for n in fe.__all__ if ns.get(n) is not getattr(fe, n)]
        assert not missing, missing
    ''')
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

def _quick_start_of_index():
    "The source of the home page's quick-start cell (the first code cell that trains)"
    nb = json.loads((ROOT/'nbs'/'index.ipynb').read_text(encoding='utf-8'))
    return next(''.join(c['source']) for c in nb['cells'] if c['cell_type'] == 'code' and 'fit_one_cycle' in ''.join(c['source']))

def test_readme_quick_start_is_the_home_pages():
    "README's quick start is the home page's, which the docs build executes and checks"
    import re
    readme = (ROOT/'README.md').read_text(encoding='utf-8')
    block = re.search(r'## Quick start\s+```python\n(.*?)\n```', readme, re.S)
    assert block, "README.md has no '## Quick start' python block"
    assert block.group(1).strip() == _quick_start_of_index().strip()

def test_distribution_name_and_install_line():
    "A distribution name that is free on the package index, used by pyproject, README and the home page"
    import tomllib
    name = tomllib.loads((ROOT/'pyproject.toml').read_text())['project']['name']
    assert name == 'fastsparse-ml'
    for f in ('README.md', 'nbs/index.ipynb'): assert f'pip install {name}' in (ROOT/f).read_text(encoding='utf-8'), f
