"""What every benchmark script shares: its options, the stamp its result starts with, and the result file it writes.

A script builds its parser with `parser(__doc__)` (options `--quick`, `--threads`, `--out`), calls `start(name, args)`
first (it prints the stamp and from then on keeps a copy of everything printed), and ends with
`run.write(title=..., intro=..., summary=..., reading=..., fig=...)`. A full run writes `bench/results/<name>.md` (and
`<name>.png` when there is a plot): the title, the stamp (commit, date, CPU, threads, versions, conditions), what it
measures, the summary table of the headline figures, the plot, how to read it, and the verbatim output folded under the
command that produced it. A `--quick` run, or a run with any option changed from its default, writes only where
`--out` says: the published result is always the default run's.
"""
import argparse, datetime, io, os, platform, shlex, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT/'bench'/'results'
ENV_CONDITIONS = ('MALLOC_TRIM_THRESHOLD_', 'MALLOC_TOP_PAD_', 'MALLOC_MMAP_THRESHOLD_', 'MALLOC_ARENA_MAX', 'OMP_NUM_THREADS',
                  'MKL_NUM_THREADS', 'LD_PRELOAD')

def parser(doc:str, quick:str='tiny sizes and few repeats: a smoke run of seconds that writes no result unless --out is given'):
    "An ArgumentParser with the options every script has: --quick, --threads, --out"
    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--quick', action='store_true', help=quick)
    ap.add_argument('--threads', type=int, default=None, help="torch threads (default: torch's own default)")
    ap.add_argument('--out', default=None, help='folder for the result file (default: bench/results for a run with the default '
                    'options, none otherwise)')
    global _PARSER
    _PARSER = ap
    return ap

_PARSER = None  # the parser `parser` built last: `Run` compares the options given with its defaults

def _git(*args):
    try: return subprocess.run(['git', *args], cwd=ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception: return ''

def commit() -> str:
    "The commit the code runs from, marked when the library or the benchmarks differ from it"
    sha = _git('rev-parse', '--short=10', 'HEAD') or 'unknown'
    dirty = _git('status', '--porcelain', '--', 'fastsparse', 'bench', ':!bench/results')
    return sha + (' with uncommitted changes' if dirty else '')

def cpu_model() -> str:
    try:
        for l in Path('/proc/cpuinfo').read_text().splitlines():
            if l.startswith('model name'): return l.split(':', 1)[1].strip()
    except OSError: pass
    return platform.processor() or platform.machine()

def _version(mod):
    try: return __import__(mod).__version__
    except Exception: return 'not installed'

def conditions() -> str:
    "The environment variables set that change timings (heap trimming, threads), or the note that there are none"
    set_ = [f"{k}={os.environ[k]}" for k in ENV_CONDITIONS if k in os.environ]
    return ', '.join(set_) if set_ else "glibc's and torch's defaults (no MALLOC_*/OMP_* variables set)"

def stamp() -> dict:
    "Commit, date, machine, versions and the command of this run"
    import torch
    cmd = 'python ' + ' '.join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])
    return {'commit': commit(), 'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
            'cpu': f"{cpu_model()}, {os.cpu_count()} cores", 'threads': str(torch.get_num_threads()),
            'python': platform.python_version(), 'torch': torch.__version__, 'fastai': _version('fastai'),
            'conditions': conditions(), 'command': cmd}

def _cell(v):
    if isinstance(v, float): return f"{v:.4g}"
    return str(v).replace('|', '\\|')

def md_table(df) -> str:
    "A DataFrame as a Markdown table (index dropped; floats to 4 significant digits)"
    cols = list(df.columns)
    rows = ['| ' + ' | '.join(map(str, cols)) + ' |', '|' + '|'.join('---' for _ in cols) + '|']
    rows += ['| ' + ' | '.join(_cell(v) for v in r) + ' |' for r in df.itertuples(index=False)]
    return '\n'.join(rows)

class _Tee(io.TextIOBase):
    def __init__(self, out): self.out,self.buf = out,io.StringIO()
    def write(self, s): self.buf.write(s); return self.out.write(s)
    def flush(self): self.out.flush()

class Run:
    "One benchmark run: its stamp, a copy of what it prints, and where its result goes"
    def __init__(self, name, args):
        import torch
        self.name,self.args = name,args
        if getattr(args, 'threads', None): torch.set_num_threads(args.threads)
        self.stamp = stamp()
        changed = [k for k,v in vars(args).items()
                   if k not in ('out', 'quick') and _PARSER is not None and v != _PARSER.get_default(k)]
        out = args.out if args.out else (None if args.quick or changed else RESULTS)
        self.out = Path(out) if out else None
        self.tee = _Tee(sys.stdout); sys.stdout = self.tee
        s = self.stamp
        print(f"commit {s['commit']}, {s['date']}; {s['cpu']}; {s['threads']} torch threads; python {s['python']}, "
              f"torch {s['torch']}, fastai {s['fastai']}; {s['conditions']}" + ('; QUICK (smoke run)' if args.quick else ''),
              flush=True)
        if changed and not args.out and not args.quick:
            print(f"options changed from their defaults ({', '.join('--' + k.replace('_', '-') for k in changed)}): "
                  f"bench/results/{name}.md is left as it is; give --out to keep this run's result", flush=True)

    def write(self, title:str, intro:str, summary=None, reading:str='', fig=None, notes:str=''):
        "Write bench/results/<name>.md (and .png): title, intro, summary table, plot, how to read it, stamp, folded output"
        sys.stdout = self.tee.out
        if self.out is None: return None
        self.out.mkdir(parents=True, exist_ok=True)
        s = self.stamp
        parts = [f"## {title}",
                 f"Run: commit `{s['commit']}`, {s['date']}, {s['cpu']}, {s['threads']} torch threads, python {s['python']}, "
                 f"torch {s['torch']}, fastai {s['fastai']}; environment: {s['conditions']}.",
                 intro.strip()]
        if summary is not None:
            parts.append(summary if isinstance(summary, str) else md_table(summary))
        if fig is not None:
            png = self.out/f"{self.name}.png"
            fig.savefig(png, dpi=110, bbox_inches='tight')
            parts.append(f"![{title}]({self.name}.png)")
        if reading: parts.append(reading.strip())
        if notes: parts.append(notes.strip())
        out = self.tee.buf.getvalue().rstrip()
        parts.append(f"<details markdown=\"1\"><summary>The command and its whole output</summary>\n\n```text\n$ {s['command']}\n"
                     f"{out}\n```\n\n</details>")
        p = self.out/f"{self.name}.md"
        p.write_text('\n\n'.join(parts) + '\n', encoding='utf-8')
        print(f"wrote {os.path.relpath(p, ROOT) if p.is_relative_to(ROOT) else p}")
        return p

def start(name:str, args) -> Run:
    "Stamp and start recording a benchmark run (call first in `main`)"
    return Run(name, args)
