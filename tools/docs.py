"""Build the docs site from the notebooks, offline, in two steps (`make docs`; `make test` runs both).

    python tools/docs.py execute [NB ...]  # the notebook test run: copy nbs/ to _build/nbs/, add a `show_doc` cell
                                           # per public symbol, execute every notebook with nbdev's runner, keep outputs
    python tools/docs.py build             # executed notebooks -> Markdown pages in _build/docs_src/ -> mkdocs -> _build/site/

`execute` exits non-zero, naming the notebooks that failed. `build` refuses notebooks that changed since
they were executed. One page per notebook, named without its number (`00_granularity.ipynb` -> `granularity.html`);
`nbs/index.ipynb` is the home page. A page shows a notebook's prose, the parameter cards of what it exports,
its examples and tests, with their outputs: not the source (nor the outputs) of its exported cells.
One more page, Benchmarks (`benchmarks.html`), is assembled from `bench/results/<script>.md` (and the plots beside
them): per script with a committed result, what it measures, its summary table and plot, how to read it, the stamp of
the run (commit, date, machine, versions) and the command with its verbatim output, folded.
The site loads nothing from the network, and no page shows a path of the machine it was built on (both checked at
the end of `build`).

This file is also imported inside the executed notebooks, for `DocRenderer`: keep its top-level imports light."""
import ast, hashlib, html, inspect, json, re, shutil, sys, time, warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS, BUILD = ROOT/'nbs', ROOT/'_build'
EXEC, SRC, SITE = BUILD/'nbs', BUILD/'docs_src', BUILD/'site'
STAMP, BUILT = EXEC/'_executed.json', BUILD/'site_sources.json'   # what was executed / what the site was built from
RESULTS = ROOT/'bench'/'results'   # one Markdown file per benchmark script with a committed result

# ---------------------------------------------------------------- notebooks, pages, directives
def notebooks():
    "The library's notebooks in reading order: `index.ipynb` (the home page) first, then by file name"
    nbs = sorted(p for p in NBS.glob('*.ipynb') if not p.name.startswith(('_', '.')))
    return sorted(nbs, key=lambda p: p.name != 'index.ipynb')

def page_name(nb_path):
    "Page (file) name of a notebook: its stem without the numeric prefix, `00_granularity` -> `granularity`"
    return re.sub(r'^\d+[a-z]?_', '', Path(nb_path).stem)

def read_nb(p): return json.loads(Path(p).read_text(encoding='utf-8'))
def cell_src(c): return ''.join(c['source']) if isinstance(c['source'], list) else c['source']

_dir_re = re.compile(r'^\s*#\|\s?(.*)$')
def split_directives(src):
    "(directives, rest of the source): the `#| key value` lines at the top of a cell, as a dict"
    lines, dirs = src.splitlines(), {}
    i = 0
    while i < len(lines) and (not lines[i].strip() or _dir_re.match(lines[i])):
        m = _dir_re.match(lines[i])
        if m and m.group(1).strip():
            k, _, v = m.group(1).strip().partition(' ')
            dirs[k.rstrip(':')] = v.strip()
        i += 1
    return dirs, '\n'.join(lines[i:])

def nb_title(nb, default=''):
    "The notebook's title: the first `# Title` line of its first markdown cell"
    for c in nb['cells']:
        if c['cell_type'] == 'markdown':
            m = re.search(r'^#\s+(.+?)\s*$', cell_src(c), re.M)
            return m.group(1) if m else default
    return default

def nb_module(nb):
    "The module a notebook exports to (`default_exp`), or None"
    for c in nb['cells']:
        if c['cell_type'] == 'code':
            d = split_directives(cell_src(c))[0]
            if 'default_exp' in d: return d['default_exp']
    return None

def pages():
    "[(notebook path, page name, title, module)] in nav order"
    res, seen = [], {}
    for p in notebooks():
        nb, name = read_nb(p), page_name(p)
        if name in seen: raise SystemExit(f"nbs/{p.name} and nbs/{seen[name]} would both be the page {name!r}: rename one")
        seen[name] = p.name
        res.append((p, name, nb_title(nb, name), nb_module(nb)))
    return res

# ---------------------------------------------------------------- which symbols to document
_EXPORT = ('export', 'exports')   # `exporti` is internal: not documented
_EXPORTED = (*_EXPORT, 'exporti')  # cells whose source the library holds: not shown on the pages

def _patch_targets(fn):
    "For a `@patch`ed function, the class names it is patched onto (from the annotation of its first argument)"
    is_patch = any((isinstance(d, ast.Name) and d.id == 'patch') or
                   (isinstance(d, ast.Call) and isinstance(d.func, ast.Name) and d.func.id == 'patch') for d in fn.decorator_list)
    if not is_patch or not fn.args.args or fn.args.args[0].annotation is None: return None
    a = fn.args.args[0].annotation
    elts = a.elts if isinstance(a, ast.Tuple) else [a.left, a.right] if isinstance(a, ast.BinOp) else [a]  # (A,B) or A|B
    return [ast.unparse(e) for e in elts]

# Methods that a framework calls, not users: they get no card of their own. fastai's events on a callback; the hooks of
# `MaskPolicy` on the policies that implement them (documented once, on `MaskPolicy` itself).
_EVENT_RE = re.compile(r'^(before|after)_\w+$')
_POLICY_HOOKS = {'build', 'on_total', 'read_grads', 'on_tick', 'on_skip', 'on_epoch_end', 'start_at', 'finish', 'close',
                 'reopen', 'final_targets', 'settled', 'reached', 'state', 'load_state'}
def _hooks_of(cls_node):
    "A predicate: is a method of this class a hook its framework calls (hidden from the cards)?"
    bases = {ast.unparse(b).split('.')[-1] for b in cls_node.bases}
    if any(b == 'MaskedTraining' or b.endswith('Callback') for b in bases): return lambda m: bool(_EVENT_RE.match(m))
    if bases & {'MaskPolicy', 'GradualPruning', 'DynamicSparse', 'FixedMasks'}: return lambda m: m in _POLICY_HOOKS
    return lambda m: False

def public_symbols(src):
    "[(expression, title level)] to `show_doc` for the public names an exported cell defines"
    try: tree = ast.parse(src)
    except SyntaxError: return []   # IPython magics: nothing nbdev would export anyway
    res = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if (tgts := _patch_targets(node)) is not None:
                if not node.name.startswith('_'): res += [(f'{t}.{node.name}', 3) for t in tgts[:1]]
            elif not node.name.startswith('_'): res.append((node.name, 3))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith('_'):
            res.append((node.name, 3))
            hooks = _hooks_of(node)
            res += [(f'{node.name}.{m.name}', 4) for m in node.body
                    if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef)) and not m.name.startswith('_') and not hooks(m.name)]
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                for n in (t.elts if isinstance(t, ast.Tuple) else [t]):
                    if isinstance(n, ast.Name) and not n.id.startswith('_'): res.append((n.id, 3))
                    # `Cls.method = _method`: a method attached after the class, documented like one defined in it
                    elif (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and not n.attr.startswith('_')
                          and isinstance(node.value, ast.Name)): res.append((f'{n.value.id}.{n.attr}', 4))
    return res

# ---------------------------------------------------------------- the show_doc renderer (runs inside the notebooks)
def _anno(a):
    if a is inspect.Parameter.empty or a is None: return ''
    if isinstance(a, str): return a   # `from __future__ import annotations`: as written
    return inspect.formatannotation(a).removeprefix('typing.')

def _short_repr(o, n=300):
    r = repr(o)
    return r if len(r) <= n else r[:n] + '...'

def _cell(s, code=False):
    "Text for a Markdown table cell (docments are Markdown); `code`: shown verbatim"
    s = html.escape(str(s), quote=False) if code else str(s)
    s = s.replace('|', '&#124;').replace('\n', '<br>')
    return f'<code>{s}</code>' if code and s else s

def _params(sig):
    "The parameters a caller passes: without the `self`/`cls` of a function defined in a class"
    ps = list(sig.parameters.values())
    return ps[1:] if ps and ps[0].name in ('self', 'cls') else ps

def _sig_docs(sym):
    "(signature, docments) of callable `sym`; for a callable instance, of its `__call__`"
    from fastcore.docments import docments
    sig = inspect.signature(sym)
    target = sym if inspect.isroutine(sym) or inspect.isclass(sym) else type(sym).__call__
    try: dm = docments(target, full=True)
    except Exception: dm = {}
    return sig, dm

def signature_str(sym, name, prefix='def '):
    "`def name(a:int=0, *, b=None)->T`, one parameter per line when it is long"
    sig, parts, prev = inspect.signature(sym), [], None
    P = inspect.Parameter
    for p in _params(sig):
        if prev == P.POSITIONAL_ONLY and p.kind != prev: parts.append('/')
        if p.kind == P.KEYWORD_ONLY and prev not in (P.KEYWORD_ONLY, P.VAR_POSITIONAL): parts.append('*')
        star = '*' if p.kind == P.VAR_POSITIONAL else '**' if p.kind == P.VAR_KEYWORD else ''
        a = _anno(p.annotation)
        parts.append(star + p.name + (f':{a}' if a else '') + ('' if p.default is P.empty else f'={_short_repr(p.default, 60)}'))
        prev = p.kind
    if prev == P.POSITIONAL_ONLY: parts.append('/')
    ret = _anno(sig.return_annotation)
    ret = f'->{ret}' if ret else ''
    one = f'{prefix}{name}({", ".join(parts)}){ret}'
    return one if len(one) <= 90 else f'{prefix}{name}(\n' + ''.join(f'    {x},\n' for x in parts) + f'){ret}'

def param_table(sym):
    "Markdown table of callable `sym`'s parameters (name, type, default, details from docments), or '' if it has none"
    try: sig, dm = _sig_docs(sym)
    except (TypeError, ValueError): return ''
    ps = _params(sig)
    if not ps: return ''
    rows = ['| | Type | Default | Details |', '|---|---|---|---|']
    for p in ps:
        pre = '\\*' if p.kind == p.VAR_POSITIONAL else '\\*\\*' if p.kind == p.VAR_KEYWORD else ''
        dflt = '' if p.default is p.empty else _cell(_short_repr(p.default, 80), code=True)
        doc = (dm.get(p.name) or {}).get('docment') or ''
        rows.append(f"| {pre}`{p.name}` | {_cell(html.escape(_anno(p.annotation), quote=False))} | {dflt} | {_cell(doc)} |")
    r_anno, r_doc = _anno(sig.return_annotation), (dm.get('return') or {}).get('docment') or ''
    if r_anno or r_doc: rows.append(f'| **Returns** | {_cell(html.escape(r_anno, quote=False))} | | {_cell(r_doc)} |')
    return '\n'.join(rows)

def _code(s): return f'```python\n{s}\n```'

class DocRenderer:
    "`show_doc` renderer: heading, signature, docstring and parameter table, in a `div.fs-doc[data-symbol=name]`"
    def __init__(self, sym, name=None, title_level=3, **kwargs):
        self.sym, self.level = sym, title_level
        self.name = name or getattr(sym, '__qualname__', None) or repr(sym)

    def _sig(self, f, prefix):
        try: return _code(signature_str(f, self.name, prefix))
        except (TypeError, ValueError) as e:
            warnings.warn(f"no signature for {self.name}: {e}")
            return ''

    def _body(self):
        from fastcore.docments import docstring
        f = self.sym.fget if isinstance(self.sym, property) else self.sym
        if inspect.isclass(f) or inspect.isroutine(f):
            prefix = 'class ' if inspect.isclass(f) else 'async def ' if inspect.iscoroutinefunction(f) else 'def '
            parts = [self._sig(f, prefix), docstring(f), param_table(f)]
        elif callable(f):   # a callable instance, e.g. a built-in schedule
            parts = [_code(f'{self.name} = {_short_repr(f)}'), f'A `{type(f).__name__}`, called as:', self._sig(f, ''), param_table(f)]
        else: parts = [_code(f'{self.name} = {_short_repr(f)}')]
        return '\n\n'.join(p for p in parts if p)

    def _repr_markdown_(self):
        return (f'<div class="fs-doc" data-symbol="{html.escape(self.name)}" markdown="1">\n\n'
                f'{"#" * self.level} {self.name}\n\n{self._body()}\n\n</div>\n')
    def __repr__(self): return f'<documentation of {self.name}>'

# ---------------------------------------------------------------- execute
def _code_cell(src, cid, meta=None):
    return {'cell_type': 'code', 'execution_count': None, 'id': cid, 'metadata': meta or {}, 'outputs': [], 'source': src}

SETUP = rf'''#| hide
import importlib.util as _fs_iu, nbdev.showdoc as _fs_sd
_fs_spec = _fs_iu.spec_from_file_location('_fastsparse_docs', {str(Path(__file__).resolve())!r})
_fs_docs = _fs_iu.module_from_spec(_fs_spec); _fs_spec.loader.exec_module(_fs_docs)
_fs_sd.BasicMarkdownRenderer = _fs_docs.DocRenderer   # the notebook's own `show_doc(...)` calls render the same way
_fs_show_doc = _fs_sd.show_doc
import warnings as _fs_warnings   # fastai's own import-time warning (fastai.layers decorates with torch.jit.script)
_fs_warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)'''

_own_re = re.compile(r'\bshow_doc\(\s*([\w.]+)')
def add_show_docs(nb):
    "Insert after each exported cell one `show_doc` cell per public symbol it defines (shown without its code)"
    code = [cell_src(c) for c in nb['cells'] if c['cell_type'] == 'code']
    done = {m for src in code for m in _own_re.findall(src)}   # symbols the notebook documents itself
    cells, k = [], 0
    for c in nb['cells']:
        if c['cell_type'] == 'code' and not k:   # before any code runs
            cells.append(_code_cell(SETUP, 'fsdoc-setup', {'fastsparse_docs': 'setup'}))
            k = 1
        cells.append(c)
        if c['cell_type'] != 'code': continue
        dirs, _ = split_directives(cell_src(c))
        if not any(d in dirs for d in _EXPORT): continue
        # Cells skipped by a test flag (`#| slow`) define nothing in this run: their docs cells carry the same flag
        flags = ''.join(f'#| {f}\n' for f in dirs if f not in _EXPORT and f not in ('hide', 'echo', 'output'))
        for expr, lvl in public_symbols(cell_src(c)):
            if expr in done: continue
            done.add(expr)
            cells.append(_code_cell(f"{flags}#| echo: false\n_fs_show_doc({expr}, renderer=_fs_docs.DocRenderer, name={expr!r}, title_level={lvl})",
                                    f'fsdoc-{k}', {'fastsparse_docs': 'show_doc'}))
            k += 1
    nb['cells'] = cells
    return nb

def _sha(p): return hashlib.sha256(Path(p).read_bytes()).hexdigest()

def execute(names=()):
    "Copy the notebooks to `_build/nbs/` with docs cells added, and run them all with nbdev's test runner, saving outputs"
    from fastcore.parallel import parallel
    from fastcore.xtras import working_directory
    from nbdev.config import get_config
    from nbdev.test import test_nb
    nbs = notebooks()
    if names:
        want = {Path(n).stem for n in names} | {page_name(n) for n in names}
        nbs = [p for p in nbs if p.stem in want or page_name(p) in want]
        if not nbs: raise SystemExit(f"no notebook matches {list(names)}")
    stamp = json.loads(STAMP.read_text()) if names and STAMP.exists() else {}
    if not names: shutil.rmtree(EXEC, ignore_errors=True)
    # the whole folder (data files notebooks may read), then the notebooks with their docs cells
    shutil.copytree(NBS, EXEC, dirs_exist_ok=True, ignore=shutil.ignore_patterns('.ipynb_checkpoints', '*.ipynb'))
    for p in nbs: (EXEC/p.name).write_text(json.dumps(add_show_docs(read_nb(p)), indent=1, ensure_ascii=False) + '\n', encoding='utf-8')
    cfg = get_config(ROOT)
    skip = cfg.tst_flags.split() if isinstance(cfg.tst_flags, str) else list(cfg.tst_flags or [])
    files = [EXEC/p.name for p in nbs]
    print(f"Executing {len(files)} notebooks (nbdev test runner, 2 workers, skipping flags {skip})...", flush=True)
    t0 = time.time()
    with working_directory(EXEC):
        results = parallel(test_nb, files, skip_flags=skip, force_flags=[], n_workers=min(2, len(files)), basepath=cfg.config_path,
                           pause=0.01, do_print=False, verbose=False, save=True, cell_timeout=cfg.cell_timeout or None)
    failed = []
    for p, (ok, secs) in zip(nbs, results):
        stamp[p.name] = {'sha256': _sha(p), 'ok': bool(ok), 'seconds': round(secs, 1)}
        print(f"  {'ok  ' if ok else 'FAIL'} nbs/{p.name} ({secs:.1f}s)")
        if not ok: failed.append(p.name)
    STAMP.write_text(json.dumps(stamp, indent=1) + '\n')
    if failed:
        sys.stderr.write(f"Notebook tests failed ({time.time()-t0:.0f}s): " + ', '.join(f'nbs/{f}' for f in failed) + '\n')
        sys.exit(1)
    print(f"All {len(files)} notebooks passed in {time.time()-t0:.0f}s; executed copies in {EXEC.relative_to(ROOT)}/")

# ---------------------------------------------------------------- build: notebook -> Markdown page
_link_re = re.compile(r'\]\((?!https?:|#|/)([^)#\s]+)\.ipynb(#[^)\s]*)?\)')
def _fix_links(md): return _link_re.sub(lambda m: f'](../{m.group(1)}.md{m.group(2) or ""})' if m.group(1).startswith('../')
                                        else f']({page_name(m.group(1))}.md{m.group(2) or ""})', md)

def _text(s):
    "Text of a stream/plain output, with carriage-return progress overwrites resolved"
    s = ''.join(s) if isinstance(s, list) else s
    s = '\n'.join(l.rsplit('\r', 1)[-1] for l in s.split('\n'))
    s = re.sub(r'\x1b\[[0-9;]*m', '', s)   # ANSI colours
    fence = '~~~~' if '```' in s else '```'
    return f'{fence}text\n{s.rstrip()}\n{fence}'

def _output_md(o, page, n, files):
    "Markdown for one output; images are written to `files` (the page's folder)"
    import base64
    t = o['output_type']
    if t == 'stream':
        return f'<div class="nb-output nb-{o.get("name", "stdout")}" markdown="1">\n\n{_text(o["text"])}\n\n</div>'
    if t == 'error': return f'<div class="nb-output nb-error" markdown="1">\n\n{_text(o.get("traceback") or o.get("evalue", ""))}\n\n</div>'
    d = o.get('data', {})
    j = lambda k: ''.join(d[k]) if isinstance(d[k], list) else d[k]
    for mime, ext in (('image/png', 'png'), ('image/jpeg', 'jpg'), ('image/svg+xml', 'svg')):
        if mime in d:
            files.mkdir(parents=True, exist_ok=True)
            f = files/f'{page}_{n}.{ext}'
            if ext == 'svg': f.write_text(j(mime), encoding='utf-8')
            else: f.write_bytes(base64.b64decode(j(mime)))
            return f'<div class="nb-output nb-image"><img src="{files.name}/{f.name}" alt="output {n}"></div>'
    if 'text/markdown' in d: return j('text/markdown')
    if 'text/html' in d:   # raw HTML block: a blank line inside would end it early
        h = re.sub(r'\n\s*\n', '\n', j('text/html').strip())
        return f'<div class="nb-output nb-html">\n{h}\n</div>'
    if 'text/plain' in d: return f'<div class="nb-output nb-result" markdown="1">\n\n{_text(j("text/plain"))}\n\n</div>'
    return ''

def nb_to_markdown(nb, page):
    "The page for one executed notebook: hidden cells dropped, directives stripped, outputs inlined"
    out, n, files = [], 0, SRC/f'{page}_files'
    for c in nb['cells']:
        src = cell_src(c)
        if c['cell_type'] == 'markdown': out.append(_fix_links(src)); continue
        if c['cell_type'] != 'code': continue   # raw cells: front matter
        dirs, code = split_directives(src)
        if 'hide' in dirs or 'default_exp' in dirs and not code.strip(): continue
        if any(d in dirs for d in _EXPORTED): continue   # the library's code: its `show_doc` cards follow it
        if code.strip() and dirs.get('echo', 'true').lower() != 'false':
            out.append(f'```python\n{code.strip()}\n```')
        if dirs.get('output', 'true').lower() == 'false': continue
        for o in c.get('outputs', []):
            n += 1
            if md := _output_md(o, page, n, files): out.append(md)
    return '\n\n'.join(s.strip('\n') for s in out if s.strip()) + '\n'

CSS = '''
.rst-content div.highlight pre { margin: 0; padding: 0; }
.rst-content div.highlight pre code { border: none; background: none; display: block; padding: 12px; }
.fs-doc { border-top: 1px solid #e1e4e5; margin: 1.5em 0; padding-top: .2em; }
.fs-doc h4 { margin-top: .6em; }
.fs-doc table, .nb-output table { margin-bottom: 1em; }
.rst-content .fs-doc table td, .rst-content .fs-doc table th { white-space: normal; }
.nb-output { margin: -12px 0 24px 0; }
.nb-output pre, .nb-output .highlight { background: #fafafa; }
.nb-output img { max-width: 100%; }
.nb-output table.dataframe { border-collapse: collapse; font-size: 90%; }
.nb-output table.dataframe th, .nb-output table.dataframe td { border: 1px solid #e1e4e5; padding: 2px 8px; }
.nb-stderr pre { background: #fff5f5; }
'''

def check_offline(site):
    "Paths of pages that would load anything from the network (scripts, styles, images, fonts, frames)"
    bad = {}
    rx = re.compile(r'<(?:script|link|img|iframe|source|embed)\b[^>]*?\b(?:src|href)\s*=\s*["\']?((?:https?:)?//[^"\'\s>]+)', re.I)
    for p in site.rglob('*'):
        if p.suffix in ('.html', '.css', '.js') and p.is_file():
            t = p.read_text(encoding='utf-8', errors='replace')
            hits = rx.findall(t) if p.suffix == '.html' else re.findall(r'(?:@import|url\()\s*["\']?((?:https?:)?//[^"\')\s]+)', t)
            # links (<a href>) are fine: only what a page loads by itself counts; rel=canonical/alternate links load nothing
            hits = [h for h in hits if not re.search(rf'<link\b[^>]*rel="(?:canonical|alternate)"[^>]*{re.escape(h)}', t)]
            if hits: bad[str(p.relative_to(site))] = sorted(set(hits))
    return bad

# ---------------------------------------------------------------- the Benchmarks page
BENCH_ORDER = ('applications', 'overhead', 'update_cost', 'dispatch', 'run_to_run', 'mask_dtype', 'global_threshold', 'sensitivity',
               'dst', 'oneshot', 'distributed', 'deploy', 'export', 'gpu')  # then A-Z
STAMP_LINE = re.compile(r'^Run: commit `([0-9a-f]{7,40})`, (\d{4}-\d\d-\d\d) ', re.M)   # what `bench/common.py` writes

BENCH_INTRO = '''# Benchmarks

Each section is one script of `bench/`: what it measures, a table of its headline figures and a plot, how to read
them, the run's stamp (commit, date, CPU and threads, versions, environment), and, folded, the command that produced
it with its whole output. The scripts run on a CPU unless a section says otherwise, under a user's conditions (torch's
default threads, glibc's heap settings) unless the stamp says otherwise. Timings on a shared machine vary from run to
run, which is why the scripts take turns between what they compare, in a shuffled order, and report medians. Run one
with `python bench/<script>.py --help` for its options, or `--quick` for a smoke run of seconds.
'''

def bench_results():
    "[(script name, Markdown)] of `bench/results/*.md`, in page order; each must show `$ python bench/<script>.py` in a code block"
    files = {p.stem: p for p in RESULTS.glob('*.md')}
    errs, res = [], []
    for name in [*[n for n in BENCH_ORDER if n in files], *sorted(set(files) - set(BENCH_ORDER))]:
        md = files[name].read_text(encoding='utf-8')
        where = f"bench/results/{name}.md"
        if not (ROOT/'bench'/f'{name}.py').exists(): errs.append(f"{where}: no script bench/{name}.py")
        if not re.search(rf'^(```|~~~)\w*\n\$ python bench/{re.escape(name)}\.py\b.*\n.+', md, re.M):
            errs.append(f"{where}: no code block starting with the command `$ python bench/{name}.py ...` and its output")
        if not re.match(r'## \S', md): errs.append(f"{where}: must start with a `## Title` line")
        if not STAMP_LINE.search(md): errs.append(f"{where}: no stamp line `Run: commit `<sha>`, <date> ...` (bench/common.py writes it)")
        if 'uncommitted' in md.split('<details', 1)[0]: errs.append(f"{where}: produced by code with uncommitted changes")
        for img in re.findall(r'!\[[^\]]*\]\(([^)\s]+)\)', md):
            if not (RESULTS/img).exists(): errs.append(f"{where}: shows {img}, which is not in bench/results/")
        res.append((name, md))
    if errs: raise SystemExit("Benchmark results:\n  " + '\n  '.join(errs))
    return res

def benchmarks_md():
    "The Benchmarks page: the introduction, then each script's results file"
    stamp = lambda md: re.sub(r'^Run: .*$', lambda m: m.group(0).replace('*', r'\*'), md, flags=re.M)  # `MALLOC_*` is no emphasis
    return '\n\n'.join([BENCH_INTRO.strip(), *(stamp(md.strip()) for _, md in bench_results())]) + '\n'

_MACHINE = ('/work/', '/root/', '/home/', 'site-packages')
def machine_paths(site):
    "{page: [lines]} of the site's pages (and search index) that show a path of the build machine"
    pats = sorted({*_MACHINE, str(ROOT)})
    bad = {}
    for p in [*site.rglob('*.html'), *site.rglob('search_index.json')]:
        hits = [l.strip()[:160] for l in p.read_text(encoding='utf-8', errors='replace').splitlines() if any(s in l for s in pats)]
        if hits: bad[str(p.relative_to(site))] = hits[:3]
    return bad

def _sources():
    "sha256 of everything the site is made from: the notebooks, the benchmark results, this file and mkdocs.yml"
    return {p.relative_to(ROOT).as_posix(): _sha(p)
            for p in [*notebooks(), *sorted(RESULTS.glob('*.md')), *sorted(RESULTS.glob('*.png')), Path(__file__).resolve(),
                      ROOT/'mkdocs.yml']}

def site_is_current():
    "Whether `_build/site` was built from the notebooks as they are now (by content, not by date)"
    return (SITE/'index.html').exists() and BUILT.exists() and json.loads(BUILT.read_text()) == _sources()

def build():
    "Render the executed notebooks into Markdown pages and build the site with mkdocs"
    import logging
    from mkdocs.config import load_config
    from mkdocs.commands.build import build as mk_build
    from mkdocs.exceptions import MkDocsException
    from pygments.formatters import HtmlFormatter
    t0 = time.time()
    stamp = json.loads(STAMP.read_text()) if STAMP.exists() else {}
    pgs, srcs = pages(), _sources()
    BUILT.unlink(missing_ok=True)
    stale = [p.name for p,*_ in pgs if not (s := stamp.get(p.name)) or not s['ok'] or s['sha256'] != _sha(p)]
    if stale: raise SystemExit(f"Not executed since last changed (run `tools/docs.py execute`): {', '.join(stale)}")
    shutil.rmtree(SRC, ignore_errors=True)
    (SRC/'css').mkdir(parents=True)
    nav = []
    for p, name, title, mod in pgs:
        (SRC/f'{name}.md').write_text(nb_to_markdown(read_nb(EXEC/p.name), name), encoding='utf-8')
        nav.append({('Home' if name == 'index' else title): f'{name}.md'})
    (SRC/'benchmarks.md').write_text(benchmarks_md(), encoding='utf-8')
    for png in RESULTS.glob('*.png'): shutil.copy2(png, SRC/png.name)   # the plots the results show, beside the page
    last_module = max((i for i, (*_, mod) in enumerate(pgs) if mod and mod != 'all'), default=len(pgs) - 1)
    nav.insert(last_module + 1, {'Benchmarks': 'benchmarks.md'})   # after the module pages, before the tutorials
    (SRC/'css'/'pygments.css').write_text(HtmlFormatter(style='default').get_style_defs('.highlight'))
    (SRC/'css'/'fastsparse.css').write_text(CSS)
    logging.basicConfig(level=logging.WARNING, format='mkdocs %(levelname)s: %(message)s')
    try: mk_build(load_config(str(ROOT/'mkdocs.yml'), nav=nav))
    except MkDocsException as e: raise SystemExit(f"mkdocs build failed: {e.format_message() if hasattr(e, 'format_message') else e}")
    if bad := check_offline(SITE):
        raise SystemExit("The site would load remote assets:\n  " + '\n  '.join(f'{k}: {v}' for k,v in bad.items()))
    if bad := machine_paths(SITE):   # a warning's file path, a traceback: filter or fix it where it comes from
        raise SystemExit("Pages show paths of this machine:\n  " + '\n  '.join(f'{k}: {v}' for k,v in bad.items()))
    BUILT.write_text(json.dumps(srcs, indent=1) + '\n')
    print(f"Built {len(pgs) + 1} pages into {SITE.relative_to(ROOT)}/ in {time.time()-t0:.1f}s "
          f"(open {(SITE/'index.html').relative_to(ROOT)}, or `python -m http.server -d {SITE.relative_to(ROOT)}`)")

if __name__ == '__main__':
    cmd, *args = sys.argv[1:] or ['']
    if cmd == 'execute': execute(args)
    elif cmd == 'build' and not args: build()
    else: raise SystemExit(__doc__)
