"""The docs site: built from the notebooks, served locally, every page opened in headless Chromium.

`make test` builds the site just before pytest (`tools/docs.py execute` + `build`); run alone, this test
builds it first when it is missing or was built from other notebooks. Chromium and chromedriver come from Debian
(`tools/install.sh`); without them the test is skipped, unless `CI` is set, where that is a failure."""
import importlib, importlib.util, inspect, os, shutil, subprocess, sys, tempfile, threading
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, DRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'
_spec = importlib.util.spec_from_file_location('_fastsparse_docs', ROOT/'tools'/'docs.py')
docs = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(docs)

@pytest.fixture(scope='module')
def site():
    if not docs.site_is_current():   # missing, or built from other notebooks than these
        for step in ('execute', 'build'):
            r = subprocess.run([sys.executable, str(ROOT/'tools'/'docs.py'), step], cwd=ROOT, capture_output=True, text=True)
            assert r.returncode == 0, f"tools/docs.py {step} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return docs.SITE

class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args): pass

@pytest.fixture(scope='module')
def server(site):
    httpd = ThreadingHTTPServer(('127.0.0.1', 0), partial(_Quiet, directory=str(site)))
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f'http://127.0.0.1:{httpd.server_address[1]}'
    httpd.shutdown(); httpd.server_close()

@pytest.fixture(scope='module')
def browser():
    missing = [p for p in (CHROMIUM, DRIVER) if not Path(p).exists()]
    try: from selenium import webdriver
    except ImportError: missing.append('selenium')
    if missing:
        msg = f"docs browser test needs {', '.join(missing)} (tools/install.sh installs them)"
        if os.environ.get('CI'): pytest.fail(msg)
        pytest.skip(msg)
    from selenium.webdriver.chrome.service import Service
    profile = tempfile.mkdtemp(prefix='fastsparse-chromium-')
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
              '--disable-background-networking', '--disable-component-update', '--disable-sync',
              '--disable-dev-shm-usage', '--window-size=1280,1000', f'--user-data-dir={profile}'):
        opts.add_argument(a)
    opts.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    drv = webdriver.Chrome(service=Service(DRIVER), options=opts)   # explicit paths: selenium-manager downloads nothing
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()
    shutil.rmtree(profile, ignore_errors=True)

def _param_names(obj):
    try: ps = list(inspect.signature(obj).parameters)
    except (TypeError, ValueError): return []
    return ps[1:] if ps and ps[0] in ('self', 'cls') else ps

def _has_params(obj):
    "Whether the documentation of `obj` owes a parameter table: it is callable with at least one parameter"
    return callable(obj) and bool(_param_names(obj))

# For each rendered `show_doc` block: its symbol, whether it is visible, its heading, the first column of its first table
_DOCS_JS = """
return Array.from(document.querySelectorAll('div.fs-doc')).map(d => {
  const h = d.querySelector('h3, h4'), t = d.querySelector('table');
  const r = d.getBoundingClientRect();
  return {symbol: d.dataset.symbol, visible: r.width > 0 && r.height > 0 && getComputedStyle(d).visibility !== 'hidden',
          heading: h ? h.textContent : '',
          params: t ? Array.from(t.querySelectorAll('tbody tr td:first-child')).map(c => c.textContent.trim()) : null};
});"""

def _open(browser, url):
    browser.get(url)
    logs = browser.get_log('browser')   # fetching also clears them for the next page
    return [l for l in logs if l['level'] == 'SEVERE']

PAGES = docs.pages()

def test_every_notebook_has_a_page(site):
    for nb, name, title, mod in PAGES: assert (site/f'{name}.html').exists(), f"no page for nbs/{nb.name}"
    assert PAGES[0][1] == 'index', "nbs/index.ipynb (the home page) is missing"

@pytest.mark.parametrize('nb,name,title,mod', PAGES, ids=[p[1] for p in PAGES])
def test_page(browser, server, nb, name, title, mod):   # browser first: skip before building
    from selenium.webdriver.common.by import By
    errors = _open(browser, f'{server}/{name}.html')
    problems = [f"console: {e['message']}" for e in errors]
    h1 = browser.find_element(By.CSS_SELECTOR, '[role=main] h1').text
    if not (title in h1 and title in browser.title): problems.append(f"title {browser.title!r} / h1 {h1!r} lacks {title!r}")
    if mod and mod != 'all':  # fastsparse.all only re-exports: its symbols are documented on their own pages
        m = importlib.import_module(f'fastsparse.{mod}'.removesuffix('.__init__'))   # a package: its __init__ notebook
        shown = {d['symbol']: d for d in browser.execute_script(_DOCS_JS)}   # one round trip for the whole page
        for sym in getattr(m, '__all__', []):
            home = getattr(getattr(m, sym), '__module__', None) or m.__name__
            if home.startswith('fastsparse.') and home != m.__name__: continue   # re-exported: documented on its own page
            d = shown.get(sym)
            if d is None: problems.append(f"{sym}: not documented"); continue
            if not d['visible']: problems.append(f"{sym}: documentation hidden"); continue
            if sym not in d['heading']: problems.append(f"{sym}: heading {d['heading']!r} lacks its name")
            if _has_params(obj := getattr(m, sym)):
                if d['params'] is None: problems.append(f"{sym}: no parameter table"); continue
                names = [c.lstrip('*') for c in d['params']]
                if miss := [p for p in _param_names(obj) if p not in names]:
                    problems.append(f"{sym}: parameters {miss} missing from its table {names}")
    if name == 'index':
        out = ROOT/'_build'/'screenshots'
        out.mkdir(parents=True, exist_ok=True)
        h = browser.execute_script('return document.documentElement.scrollHeight')
        browser.set_window_size(1280, min(max(h, 1000), 4000))   # the whole home page, within reason
        browser.save_screenshot(str(out/'home.png'))
        browser.set_window_size(1280, 1000)
    assert not problems, f"{name}.html (from nbs/{nb.name}):\n  " + '\n  '.join(problems)

def test_outputs_and_plots(site):
    "Executed outputs are in the pages: each visible image output (a plot) is an image of the page, present in the site"
    import re
    for nb, name, *_ in PAGES:
        ex = docs.read_nb(docs.EXEC/nb.name)
        shown = lambda c: c['cell_type'] == 'code' and not ({'hide': '', 'output': 'false'}.items() & docs.split_directives(docs.cell_src(c))[0].items())
        n_img = sum(any(k.startswith('image/') for k in o.get('data', {})) for c in ex['cells'] if shown(c) for o in c.get('outputs', []))
        srcs = re.findall(r'<img src="([^"]+)"', (site/f'{name}.html').read_text())
        srcs = [s for s in srcs if s.startswith(f'{name}_files/')]
        assert len(srcs) == n_img, f"{name}.html shows {len(srcs)} output images, nbs/{nb.name} has {n_img}"
        for s in srcs: assert (site/s).stat().st_size > 1000, f"{name}.html: {s} missing or empty"

def _page_text(site, name): return (site/f'{name}.html').read_text(encoding='utf-8')

MODULE_PAGES = [(nb, name) for nb, name, title, mod in PAGES if mod and mod != 'all']

@pytest.mark.parametrize('nb,name', MODULE_PAGES, ids=[n for _, n in MODULE_PAGES])
def test_module_page_shows_no_export_source(site, nb, name):
    "A module page shows prose, parameter cards, examples and tests: not the source of its `#| export` cells"
    import html, re
    text = html.unescape(re.sub(r'<[^>]+>', '', _page_text(site, name)))
    assert 'from __future__ import annotations' not in text, f"{name}.html shows the imports of an exported cell"
    ex = docs.read_nb(docs.EXEC/nb.name)
    for c in ex['cells']:
        dirs, code = docs.split_directives(docs.cell_src(c))
        if c['cell_type'] != 'code' or not any(d in dirs for d in ('export', 'exports', 'exporti')): continue
        defs = [l for l in code.splitlines() if re.match(r'(def|class) \w', l)]
        for l in defs[:3]: assert l.rstrip() not in text, f"{name}.html shows the source line {l!r} of an exported cell"

def test_benchmarks_page(site):
    "One Benchmarks page, from bench/results/: each script's command, then its verbatim output"
    import html, re
    assert (site/'benchmarks.html').exists(), "no benchmarks.html"
    page = html.unescape(_page_text(site, 'benchmarks'))
    results = docs.bench_results()
    assert results, "bench/results/ holds no results"
    pres = [re.sub(r'<[^>]+>', '', p) for p in re.findall(r'<pre[^>]*>(.*?)</pre>', page, re.S)]
    for name, md in results:
        shown = [p for p in pres if p.startswith(f'$ python bench/{name}.py')]
        assert shown, f"benchmarks.html: no code block starting with the command of bench/{name}.py"
        out = re.search(r'^(?:```|~~~)\w*\n\$ python[^\n]*\n(.*?)\n(?:```|~~~)$', md, re.S | re.M).group(1)
        assert out.splitlines()[0].strip() in shown[0], f"benchmarks.html: the output of bench/{name}.py is not under its command"
        for img in re.findall(r'!\[[^\]]*\]\(([^)\s]+)\)', md):
            assert (site/img).exists() and f'src="{img}"' in page, f"benchmarks.html: the plot {img} of bench/{name}.py is missing"
        assert re.search(r'Run: commit <code>[0-9a-f]{7,40}</code>', page), "benchmarks.html: no stamp shown"
    nav = re.search(r'<div class="wy-menu wy-menu-vertical".*?</div>', html.unescape(_page_text(site, 'index')), re.S).group(0)
    assert 'href="benchmarks.html"' in nav and '>Benchmarks<' in nav, "the Benchmarks page is not in the navigation"

def test_benchmarks_page_in_browser(browser, server):
    from selenium.webdriver.common.by import By
    errors = _open(browser, f'{server}/index.html')
    link = [a for a in browser.find_elements(By.CSS_SELECTOR, '.wy-menu-vertical a') if a.text.strip() == 'Benchmarks']
    assert link and link[0].is_displayed(), "no visible Benchmarks entry in the navigation"
    link[0].click()
    assert browser.current_url.endswith('/benchmarks.html')
    assert 'Benchmarks' in browser.find_element(By.CSS_SELECTOR, '[role=main] h1').text
    imgs = browser.find_elements(By.CSS_SELECTOR, '[role=main] img')
    assert imgs, "no plot on the Benchmarks page"
    broken = [i.get_attribute('src') for i in imgs if not browser.execute_script('return arguments[0].complete && arguments[0].naturalWidth > 0', i)]
    assert not broken, f"plots that do not load: {broken}"
    assert browser.find_elements(By.CSS_SELECTOR, '[role=main] table'), "no summary table"
    summaries = browser.find_elements(By.CSS_SELECTOR, '[role=main] details > summary')
    assert summaries, "no folded output"
    assert not [p for p in browser.find_elements(By.CSS_SELECTOR, '[role=main] details pre') if p.is_displayed()], "output shown unfolded"
    browser.execute_script('arguments[0].scrollIntoView()', summaries[0]); summaries[0].click()
    pres = [p.text for p in browser.find_elements(By.CSS_SELECTOR, '[role=main] details[open] pre')]
    assert any(p.startswith('$ python bench/') and len(p.splitlines()) > 2 for p in pres), "no command with its output shown once unfolded"
    assert not errors

def test_no_page_shows_a_machine_path(site):
    "Warnings and tracebacks carry file paths of the build machine: none may reach a page"
    bad = docs.machine_paths(site)
    assert not bad, f"pages showing machine paths: {bad}"
