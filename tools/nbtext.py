"""Round-trip a notebook to an editable text file and back (edit the text, rebuild the notebook, then `make export`).
  python nbtext.py out NB.ipynb [TXT]   # write TXT (default /tmp/NB.txt)
  python nbtext.py in  TXT NB.ipynb     # rebuild NB from TXT (keeps nbformat metadata; outputs cleared)
Text format: each cell starts with a line `##%% md <id>` or `##%% code <id>` (id optional: a new one is made)."""
import json, sys, re, secrets
from pathlib import Path
META = {"jupytext": {"cell_metadata_filter": "-all", "main_language": "python", "notebook_metadata_filter": "-all"}}
HDR = re.compile(r'^##%% (md|code|raw)(?: (\S+))?\s*$')
def out(nb, txt):
    nb = json.loads(Path(nb).read_text())
    parts = []
    for c in nb['cells']:
        kind = {'markdown':'md','code':'code','raw':'raw'}[c['cell_type']]
        s = ''.join(c['source'])
        parts.append(f"##%% {kind} {c.get('id','')}".rstrip() + '\n' + s + '\n')
    Path(txt).write_text(''.join(parts))
def inn(txt, nbp):
    lines = Path(txt).read_text().split('\n')
    cells, cur = [], None
    for l in lines:
        m = HDR.match(l)
        if m:
            cur = {'kind': m.group(1), 'id': m.group(2) or secrets.token_hex(4), 'lines': []}; cells.append(cur)
        elif cur is not None: cur['lines'].append(l)
    old = json.loads(Path(nbp).read_text()) if Path(nbp).exists() else {}
    res = []
    for c in cells:
        src = '\n'.join(c['lines']).strip('\n')
        srcl = [l + '\n' for l in src.split('\n')]; srcl[-1] = srcl[-1][:-1]
        if src == '': srcl = []
        if c['kind'] == 'md': res.append({'cell_type':'markdown','id':c['id'],'metadata':{},'source':srcl})
        elif c['kind'] == 'raw': res.append({'cell_type':'raw','id':c['id'],'metadata':{},'source':srcl})
        else: res.append({'cell_type':'code','execution_count':None,'id':c['id'],'metadata':{},'outputs':[],'source':srcl})
    nb = {'cells': res, 'metadata': old.get('metadata', META), 'nbformat': 4, 'nbformat_minor': 5}
    Path(nbp).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + '\n')
if __name__ == '__main__':
    cmd, a = sys.argv[1], sys.argv[2]
    if cmd == 'out': out(a, sys.argv[3] if len(sys.argv) > 3 else '/tmp/' + Path(a).stem + '.txt')
    else: inn(a, sys.argv[3])
