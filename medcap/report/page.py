"""The report page: HTML around a JSON block of rows, the style sheet and the script that renders the rows.
Everything is inline (no fonts, scripts or styles from a network); rows are built with ``textContent`` only, so
no caption can inject markup, and the JSON block escapes ``<``, ``>`` and ``&`` so no caption can end it."""

import html
import json
import math

STYLE = """
:root { --ok: #1a7f37; --bad: #c62828; --muted: #667085; --line: #e4e7ec; --mark: #fde68a; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #101828; }
header, #summary { padding: 12px 20px 0; }
h1 { font-size: 20px; margin: 0 0 4px; }
.meta { color: var(--muted); margin: 0 0 8px; overflow-wrap: anywhere; }
table.metrics { border-collapse: collapse; margin: 4px 0 10px; }
table.metrics th, table.metrics td { padding: 3px 10px; border-bottom: 1px solid var(--line); text-align: right; }
table.metrics th:first-child, table.metrics td:first-child { text-align: left; }
table.metrics .ci { display: block; color: var(--muted); font-size: 11px; }
h2 { font-size: 15px; margin: 10px 0 2px; }
#controls { position: sticky; top: 0; z-index: 2; background: #f9fafb; border-bottom: 1px solid var(--line);
  padding: 8px 20px; display: flex; gap: 12px; align-items: center; flex-wrap: wrap; }
#controls input { width: 260px; padding: 4px 8px; }
#count { color: var(--muted); }
table#rows { border-collapse: collapse; width: 100%; }
#rows th { position: sticky; top: 45px; background: #fff; z-index: 1; text-align: left; padding: 6px 8px;
  border-bottom: 2px solid var(--line); font-weight: 600; white-space: nowrap; }
#rows td { padding: 6px 8px; border-bottom: 1px solid var(--line); vertical-align: top; }
#rows th button { font: inherit; font-weight: 600; background: none; border: 0; padding: 0; cursor: pointer; }
#rows th[aria-sort] button { text-decoration: underline; }
td.thumb { width: 112px; }
td.thumb img { width: 96px; height: auto; display: block; border-radius: 3px; background: #000; }
td.id { font-family: ui-monospace, monospace; font-size: 12px; overflow-wrap: break-word; max-width: 160px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td.num .other { display: block; color: var(--muted); font-size: 12px; }
td.num .other.ok { color: var(--ok); } td.num .other.bad { color: var(--bad); }
.line { margin: 0 0 4px; display: grid; grid-template-columns: 84px 1fr; gap: 6px; }
.said { white-space: pre-wrap; overflow-wrap: anywhere; }
.who { color: var(--muted); font-size: 12px; padding-top: 1px; }
mark { background: var(--mark); border-radius: 2px; }
.chips { margin: 0 0 6px 90px; }
.chip { display: inline-block; font-size: 11px; padding: 0 6px; margin-right: 4px; border-radius: 8px;
  border: 1px solid currentColor; }
.ok { color: var(--ok); } .bad { color: var(--bad); }
ol.options { margin: 2px 0 4px; padding-left: 22px; list-style: none; }
ol.options li.key { font-weight: 600; }
ol.options li.picked.bad { text-decoration: line-through; }
.missing { color: var(--muted); font-size: 12px; }
#more { padding: 12px 20px 40px; color: var(--muted); }
"""

SCRIPT = r"""
(() => {
  'use strict';
  const data = JSON.parse(document.getElementById('report-data').textContent);
  const rows = data.rows, columns = data.columns, CHUNK = 100;
  const index = Object.fromEntries(columns.map((c, i) => [c.key, i]));
  const tbody = document.querySelector('#rows tbody'), more = document.getElementById('more');
  const sortSelect = document.getElementById('sort-key'), orderButton = document.getElementById('sort-order');
  const filterInput = document.getElementById('filter'), count = document.getElementById('count');
  let sortKey = data.sort, ascending = true, query = '', order = [], shown = 0;

  const el = (tag, className, text) => {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  };
  const texts = (r) => data.kind === 'vqa'
    ? [r.id, r.q, r.raw, r.answer, r.group, r.desc, ...(r.opts || []).map(o => o[1])]
    : [r.id, ...r.refs, ...r.preds.map(p => p.join(''))];
  const haystack = rows.map(r => texts(r).filter(t => t).join('\n').toLowerCase());

  const format = (value, kind) => value === null ? '–'
    : kind === 'flag' ? (value > 0 ? '✓' : '✗')
    : kind === 'diff' ? (value > 0 ? '+' : '') + value.toFixed(3) : value.toFixed(3);

  function line(who, content) {
    const div = el('div', 'line'), said = el('span', 'said');
    if (Array.isArray(content)) {  // segments, alternately unmarked and marked (differing from the reference)
      content.forEach((text, i) => said.append(i % 2 ? el('mark', null, text) : document.createTextNode(text)));
    } else {
      said.textContent = content;
    }
    div.append(el('span', 'who', who), said);
    return div;
  }

  function thumbCell(r) {
    const td = el('td', 'thumb');
    if (r.img) {
      const img = el('img');
      img.loading = 'lazy';
      img.alt = r.id;
      img.src = r.img;
      if (r.href) {
        const link = el('a');
        link.href = r.href;
        link.target = '_blank';
        link.append(img);
        td.append(link);
      } else td.append(img);
    } else if (r.noimg) td.append(el('span', 'missing', r.noimg));
    return td;
  }

  function captionCell(r) {
    const td = el('td', 'text');
    r.refs.forEach(ref => td.append(line('reference', ref)));
    r.preds.forEach((segments, s) => {
      td.append(line(data.systems[s], segments));
      if (r.found) {
        const chips = el('div', 'chips');
        ['modality', 'finding', 'location'].forEach((part, k) => {
          const right = r.found.got[s][k] === r.found.want[k];
          const chip = el('span', 'chip ' + (right ? 'ok' : 'bad'), r.found.got[s][k]);
          chip.title = part + (right ? ' right' : ' wrong; reference: ' + r.found.want[k]);
          chips.append(chip);
        });
        td.append(chips);
      }
    });
    return td;
  }

  function questionCell(r) {
    const td = el('td', 'text');
    if (r.q) td.append(line('question', r.q));
    if (r.opts) {
      const list = el('ol', 'options');
      r.opts.forEach(([key, text]) => {
        const item = el('li', null, key + '. ' + text + (key === r.key ? '  ← answer' : ''));
        if (key === r.key) item.classList.add('key');
        if (key === r.parsed) item.classList.add('picked', r.ok ? 'ok' : 'bad');
        list.append(item);
      });
      td.append(list);
    } else if (r.answer !== null) td.append(line('answer', r.answer));
    if (r.desc) td.append(line('description', r.desc));
    td.append(line('model', r.raw));
    if (r.opts) td.append(line('parsed', r.parsed === null ? '— (names no option)' : r.parsed));
    if (r.group) td.append(line('group', r.group));
    return td;
  }

  function renderRow(r) {
    const tr = el('tr');
    tr.dataset.id = r.id;
    tr.append(thumbCell(r), el('td', 'id', r.id), data.kind === 'vqa' ? questionCell(r) : captionCell(r));
    data.cells.forEach(cell => {
      const td = el('td', 'num');
      cell.columns.forEach((c, s) => {
        const value = r.s[index[c]];
        const span = el('span', s ? 'other' : null, format(value, cell.kind));
        span.title = data.systems[s];
        if (cell.kind === 'flag' && value !== null) span.classList.add(value > 0 ? 'ok' : 'bad');
        td.append(span);
      });
      tr.append(td);
    });
    return tr;
  }

  function sorted() {
    const i = index[sortKey], sign = ascending ? 1 : -1, picked = [];
    rows.forEach((r, k) => { if (!query || haystack[k].includes(query)) picked.push(k); });
    return picked.sort((a, b) => {
      const x = rows[a].s[i], y = rows[b].s[i];
      if (x === null || y === null) return (x === null) - (y === null) || a - b;  // missing scores last
      return (x - y) * sign || a - b;
    });
  }

  function renderMore() {
    const end = Math.min(order.length, shown + CHUNK), rendered = document.createDocumentFragment();
    for (let k = shown; k < end; k++) rendered.append(renderRow(rows[order[k]]));
    tbody.append(rendered);
    shown = end;
    more.textContent = shown < order.length ? `${order.length - shown} more rows below (they load as you scroll)` : '';
  }

  function fill() {  // render until the end of the rendered rows is well below the window
    while (shown < order.length && more.getBoundingClientRect().top < 2 * window.innerHeight) renderMore();
  }

  function refresh() {
    order = sorted();
    shown = 0;
    tbody.replaceChildren();
    renderMore();
    fill();
    sortSelect.value = sortKey;
    orderButton.textContent = ascending ? 'worst first' : 'best first';
    document.querySelectorAll('#rows th[data-key]').forEach(th => {
      if (th.dataset.key === sortKey) th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
      else th.removeAttribute('aria-sort');
    });
    count.textContent = `${order.length} of ${rows.length} rows` + (query ? ' match' : '');
  }

  function sortBy(key) {
    ascending = key === sortKey ? !ascending : true;
    sortKey = key;
    refresh();
  }

  const head = document.querySelector('#rows thead tr');
  const textHeader = data.kind === 'vqa' ? 'question' : 'captions';
  head.append(el('th', null, 'image'), el('th', null, 'ID'), el('th', null, textHeader));
  data.cells.forEach(cell => {
    const th = el('th');
    th.dataset.key = cell.columns[0];
    const button = el('button', null, cell.label);
    button.type = 'button';
    button.title = 'sort by ' + cell.label + (cell.columns.length > 1 ? ' of ' + data.systems[0] : '');
    button.addEventListener('click', () => sortBy(cell.columns[0]));
    th.append(button);
    head.append(th);
  });
  columns.forEach(c => {
    const option = el('option', null, c.label);
    option.value = c.key;
    sortSelect.append(option);
  });
  sortSelect.addEventListener('change', () => { sortKey = sortSelect.value; ascending = true; refresh(); });
  orderButton.addEventListener('click', () => { ascending = !ascending; refresh(); });
  let typing;
  filterInput.addEventListener('input', () => {
    clearTimeout(typing);
    typing = setTimeout(() => { query = filterInput.value.trim().toLowerCase(); refresh(); }, 120);
  });
  window.addEventListener('scroll', fill, {passive: true});
  window.addEventListener('resize', fill);
  refresh();
  document.body.dataset.ready = '1';
  performance.mark('report-ready');
})();
"""


def script_json(value) -> str:
    """JSON that can sit inside a <script> element: ``<``, ``>`` and ``&`` as \\u escapes, so no string in it can
    close the element or open a comment."""
    text = json.dumps(value, separators=(",", ":"), allow_nan=False)  # ASCII: a lone surrogate stays an escape
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def number(value: float) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def metrics_table(corpus: dict[str, dict[str, float]], intervals: dict[str, dict] | None = None) -> str:
    """{system: {metric: value}} as an HTML table, each value with its 95% interval under it where known."""
    e = html.escape
    metrics = list(dict.fromkeys(m for values in corpus.values() for m in values))
    head = "".join(f"<th>{e(m)}</th>" for m in metrics)
    body = []
    for name, values in corpus.items():
        cells = []
        for m in metrics:
            ci = (intervals or {}).get(name, {}).get(m)
            under = f'<span class="ci">[{number(ci[0])}, {number(ci[1])}]</span>' if ci else ""
            cells.append(f"<td>{number(values.get(m))}{under}</td>")
        body.append(f"<tr><td>{e(name)}</td>{''.join(cells)}</tr>")
    return f'<table class="metrics"><tr><th></th>{head}</tr>{"".join(body)}</table>'


def paired_table(a: str, b: str, paired: dict[str, dict[str, float]], resamples: int, seed: int) -> str:
    """The paired bootstrap of ``a`` - ``b``: per metric the difference with its 95% interval under it, and the
    two-sided p-value (0 reads "<2/resamples")."""
    from medcap.metrics.bootstrap import p_text

    e = html.escape
    head = "".join(f"<th>{e(m)}</th>" for m in paired)
    differences = "".join(f'<td>{d["difference"]:+.4f}<span class="ci">[{d["low"]:+.4f}, {d["high"]:+.4f}]</span></td>'
                          for d in paired.values())
    p_values = "".join(f"<td>{e(p_text(d['p_value'], resamples))}</td>" for d in paired.values())
    return (f"<h2>{e(a)} − {e(b)}: paired bootstrap over the same images ({resamples} resamples, seed {seed})</h2>"
            f"<table class=\"metrics\"><tr><th></th>{head}</tr><tr><td>difference</td>{differences}</tr>"
            f"<tr><td>p (two-sided)</td>{p_values}</tr></table>")


def render_page(title: str, meta: list[str], summary_html: str, data: dict) -> str:
    """The whole page. ``meta``: plain-text lines under the title; ``summary_html``: trusted HTML built by this
    module's table functions; ``data``: the rows and columns the script renders."""
    e = html.escape
    meta_html = "".join(f'<p class="meta">{e(m)}</p>' for m in meta)
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<header><h1>{e(title)}</h1>{meta_html}</header>
<section id="summary">{summary_html}</section>
<div id="controls">
<label>sort by <select id="sort-key"></select></label>
<button id="sort-order" type="button">worst first</button>
<input id="filter" type="search" placeholder="filter: ID or words in the text" aria-label="filter rows">
<span id="count"></span>
</div>
<noscript><p>The rows need JavaScript; the metrics above do not.</p></noscript>
<table id="rows"><thead><tr></tr></thead><tbody></tbody></table>
<div id="more"></div>
<script type="application/json" id="report-data">{script_json(data)}</script>
<script>{SCRIPT}</script>
</body>
</html>
"""
