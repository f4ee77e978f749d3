// btm web UI: draws each page from the JSON API under /api/ and polls it.
//
// Every value that came from the API is put into the page as a text node (createTextNode,
// textContent) or an attribute value of an element we chose; nothing is parsed as HTML.
// Domain descriptions, ids, reasons and every other record field are untrusted input.
'use strict';

const POLL_MS = 2000;

function h(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  setAttrs(e, attrs);
  append(e, kids);
  return e;
}

function svg(tag, attrs, ...kids) {
  const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
  setAttrs(e, attrs);
  append(e, kids);
  return e;
}

function setAttrs(e, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    e.setAttribute(k, String(v));
  }
}

function append(e, kids) {
  for (const k of kids.flat(4)) {
    if (k === null || k === undefined || k === false) continue;
    e.appendChild(k instanceof Node ? k : document.createTextNode(String(k)));
  }
}

const isNum = (x) => typeof x === 'number' && isFinite(x);
const num = (x, d) => (isNum(x) ? x.toFixed(d) : '-');
const short = (id) => (id ? String(id).slice(0, 8) : '-');
const id = (full) => h('span', { class: 'id', title: full }, short(full));

function bytes(n) {
  if (!isNum(n)) return '-';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + ' ' + units[i];
}

function duration(secs) {
  if (!isNum(secs)) return '-';
  if (secs < 90) return secs.toFixed(0) + ' s';
  if (secs < 5400) return (secs / 60).toFixed(0) + ' min';
  if (secs < 172800) return (secs / 3600).toFixed(1) + ' h';
  return (secs / 86400).toFixed(1) + ' days';
}

function facts(pairs) {
  return h('dl', { class: 'facts' }, pairs.map(([k, v, key]) => [
    h('dt', null, k),
    h('dd', key ? { id: key } : null, v),
  ]));
}

function table(head, rows, attrs) {
  return h('table', attrs,
    h('thead', null, h('tr', null, head.map((c) => {
      const [text, cls] = Array.isArray(c) ? c : [c, null];
      return h('th', cls ? { class: cls } : null, text);
    }))),
    h('tbody', null, rows));
}

const cell = (v, cls) => h('td', cls ? { class: cls } : null, v);
const numCell = (v, d) => cell(num(v, d), 'num');
const section = (title, ...kids) => h('section', null, h('h2', null, title), kids);
const verdictTag = (ok) => h('span', { class: ok ? 'tag ok' : 'tag bad' }, ok ? 'accepted' : 'rejected');

async function getJSON(path) {
  const r = await fetch(path, { cache: 'no-store' });
  const j = await r.json();
  if (!r.ok) throw new Error(j && j.error ? j.error : 'HTTP ' + r.status);
  return j;
}

// ---- charts ------------------------------------------------------------------------------

// A line chart of points [x, y]; `marks` are extra labelled points [x, y, label].
function lineChart(points, opt) {
  const W = opt.width || 560, H = opt.height || 220, L = 56, R = 12, T = 14, B = 30;
  const root = svg('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': opt.label });
  const all = points.concat((opt.marks || []).map((m) => [m[0], m[1]]));
  if (all.length === 0) {
    root.appendChild(svg('text', { x: L, y: H / 2 }, 'no data yet'));
    return root;
  }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (opt.yFromZero) y0 = 0;
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) y1 = y0 + 1;
  const px = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const py = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  root.appendChild(svg('path', { class: 'axis', d: `M${L} ${T}V${H - B}H${W - R}` }));
  for (let i = 0; i <= 4; i++) {
    const v = y0 + ((y1 - y0) * i) / 4;
    root.appendChild(svg('text', { x: 4, y: py(v) + 4 }, num(v, v < 10 ? 2 : 0)));
  }
  root.appendChild(svg('text', { x: L, y: H - 8 }, String(x0)));
  root.appendChild(svg('text', { x: W - R - 40, y: H - 8 }, String(x1)));
  root.appendChild(svg('text', { x: (W - 60) / 2, y: H - 8 }, opt.xLabel || ''));
  if (points.length > 0) {
    root.appendChild(svg('polyline', {
      class: 'line', points: points.map((p) => `${px(p[0]).toFixed(1)},${py(p[1]).toFixed(1)}`).join(' '),
    }));
  }
  for (const [x, y, label] of opt.marks || []) {
    root.appendChild(svg('circle', { cx: px(x), cy: py(y), r: 4, fill: '#c0392b' }));
    root.appendChild(svg('text', { x: px(x) - 120, y: py(y) - 8 }, label));
  }
  return root;
}

const SERIES_COLORS = ['#98a2b3', '#2f6fdf', '#1f8a4c', '#d4880f', '#8e44ad'];

// Grouped bars: groups [{label, values: [..]}], series names.
function barChart(groups, series, opt) {
  const W = Math.max(560, 130 * groups.length + 80), H = opt.height || 260, L = 56, T = 14, B = 60;
  const root = svg('svg', { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: 'img', 'aria-label': opt.label });
  const vals = groups.flatMap((g) => g.values).filter(isNum);
  const ymax = (vals.length ? Math.max(...vals) : 1) * 1.1;
  const py = (y) => T + (1 - y / ymax) * (H - T - B);
  root.appendChild(svg('path', { class: 'axis', d: `M${L} ${T}V${H - B}H${W - 8}` }));
  for (let i = 0; i <= 4; i++) {
    const v = (ymax * i) / 4;
    root.appendChild(svg('text', { x: 4, y: py(v) + 4 }, num(v, 0)));
  }
  const gw = (W - L - 16) / Math.max(1, groups.length);
  const bw = (gw - 16) / series.length;
  groups.forEach((g, gi) => {
    const gx = L + 8 + gi * gw;
    g.values.forEach((v, k) => {
      if (!isNum(v)) return;
      const rect = svg('rect', { x: gx + k * bw, y: py(v), width: Math.max(1, bw - 2), height: H - B - py(v), fill: SERIES_COLORS[k % SERIES_COLORS.length] },
        svg('title', null, `${g.label} ${series[k]}: ${num(v, 2)}`));
      root.appendChild(rect);
    });
    root.appendChild(svg('text', { x: gx, y: H - B + 14 }, g.label.slice(0, 18)));
  });
  series.forEach((s, k) => {
    const x = L + k * 110, y = H - 22;
    root.appendChild(svg('rect', { x, y: y - 9, width: 10, height: 10, fill: SERIES_COLORS[k % SERIES_COLORS.length] }));
    root.appendChild(svg('text', { x: x + 14, y }, s));
  });
  return root;
}

// ---- pages -------------------------------------------------------------------------------

function renderNetwork(d) {
  const reg = d.registry;
  const seed = reg && reg.seed;
  const arch = seed ? seed.architecture : null;
  return [
    h('div', { class: 'grid' },
      section('This node', facts([
        ['node', id(d.node)],
        ['role', d.role],
        ['listening on', (d.listen || []).map((a) => h('div', { class: 'id' }, a))],
      ])),
      section('Root and registry', facts([
        ['root version', d.root.version, 'root-version'],
        ['signatures needed', d.root.threshold],
        ['registry version', reg ? reg.version : 'none yet', 'registry-version'],
        ['registry expires in', reg ? duration(reg.expires - d.now) : '-'],
        ['domains', reg ? reg.domains : '-'],
        ['accepted ELMs', reg ? reg.accepted : '-', 'accepted-count'],
        ['seed', seed ? id(seed.weights) : '-'],
        ['seed architecture', arch ? `${arch.layers} layers × ${arch.d_model} wide, ${arch.heads} heads, ${arch.context} positions, ${arch.vocab_size} tokens` : '-'],
        ['seed training', seed ? `${seed.steps} updates, ${seed.tokens} tokens` : '-'],
      ])),
      section('Maintainers', h('ul', null, (d.maintainers || []).map((k) => h('li', null, id(k)))))),
    section('Domains',
      table(['domain', 'description', ['train', 'num'], ['valid', 'num'], ['test', 'num'], ['eval tokens', 'num'], 'withheld pool'],
        (d.domains || []).map((x) => h('tr', { 'data-domain': x.name },
          cell(x.name), cell(x.description, 'desc'),
          cell(bytes(x.data.train.bytes), 'num'), cell(bytes(x.data.valid.bytes), 'num'), cell(bytes(x.data.test.bytes), 'num'),
          cell(x.eval_tokens, 'num'), cell(x.withheld_pool ? 'yes' : 'no')))),
      h('p', { class: 'note' }, 'Sizes of data this node holds; "-" where it has not downloaded it.')),
    section(`Peers connected: ${d.peers_connected}`,
      h('span', { id: 'peers-connected', hidden: true }, d.peers_connected),
      table(['peer', 'node', 'agent', ['gossip score', 'num']],
        (d.peers || []).map((p) => h('tr', null, cell(h('span', { class: 'id' }, p.peer)), cell(p.node ? id(p.node) : '-'), cell(p.agent || '-'), numCell(p.score, 2))))),
  ];
}

// The branch tree: the seed at the root, each ELM under each of its parents.
function branchTree(domains) {
  const children = new Map();
  const add = (key, item) => { if (!children.has(key)) children.set(key, []); children.get(key).push(item); };
  for (const d of domains) {
    for (const e of d.elms) {
      if (e.parents.length === 0) add('seed', { e, d: d.name, w: null });
      for (const p of e.parents) add(p.of === null ? 'unknown' : p.of, { e, d: d.name, w: p.weight });
    }
  }
  const seen = new Set();
  const branch = (key, depth) => {
    const kids = children.get(key) || [];
    if (kids.length === 0 || depth > 16) return null;
    return h('ul', depth === 0 ? { class: 'tree' } : null, kids.map(({ e, d, w }) => {
      const again = seen.has(e.id);
      seen.add(e.id);
      return h('li', null,
        h('strong', null, d), ' ', id(e.id),
        w !== null && w < 0.9999 ? h('span', { class: 'mute' }, ` (${(w * 100).toFixed(0)}% of this parent)`) : null,
        ' ', e.accepted ? h('span', { class: 'tag ok' }, 'accepted') : h('span', { class: 'tag' }, 'not accepted'),
        again ? null : branch(e.id, depth + 1));
    }));
  };
  return [
    h('div', null, h('strong', null, 'seed')),
    branch('seed', 0) || h('p', { class: 'mute' }, 'no ELMs yet'),
    children.has('unknown') ? [h('div', null, h('strong', null, 'parents this node does not hold')), branch('unknown', 0)] : null,
  ];
}

function renderDomains(d) {
  if (d.registry_version === null) return [section('Domains', h('p', null, 'No trusted registry yet.'))];
  const doms = d.domains || [];
  const out = [section(`Branch tree (registry v${d.registry_version})`, branchTree(doms))];
  for (const x of doms) {
    out.push(h('section', { 'data-domain': x.name },
      h('h2', null, x.name),
      h('p', { class: 'desc' }, x.description),
      h('h3', null, 'Claims'),
      x.claims.length === 0 ? h('p', { class: 'mute' }, 'unclaimed') :
        table(['node', ['lease left', 'num'], ['held for', 'num'], 'progress'],
          x.claims.map((c) => h('tr', null,
            cell([id(c.node), c.me ? ' (this node)' : '']),
            cell(duration(c.lease_left_secs), 'num'), cell(duration(c.held_secs), 'num'),
            cell(c.progress ? `update ${c.progress.step}, loss ${num(c.progress.loss, 3)}` : '-')))),
      h('h3', null, 'ELMs'),
      x.elms.length === 0 ? h('p', { class: 'mute' }, 'none announced yet') :
        table(['ELM', 'trainer', ['updates', 'num'], ['tokens', 'num'], ['claimed ppl', 'num'], 'in registry', 'parents', 'verdicts (verifier, data, measured ppl)'],
          x.elms.map((e) => h('tr', { 'data-elm': e.id },
            cell(id(e.id)), cell(id(e.trainer)), cell(e.steps, 'num'), cell(e.tokens, 'num'), numCell(e.claimed_ppl, 2),
            cell(e.accepted ? h('span', { class: 'tag ok' }, 'accepted') : h('span', { class: 'tag' }, 'no')),
            cell(e.parents.map((p) => h('div', null, p.of === 'seed' ? 'seed' : (p.of ? id(p.of) : id(p.weights)), ` ${(p.weight * 100).toFixed(0)}%`))),
            cell(e.verdicts.length === 0 ? h('span', { class: 'mute' }, 'none yet') :
              e.verdicts.map((v) => h('div', null, verdictTag(v.accepted), ' ', id(v.verifier), v.me ? ' (this node)' : '', ` ${v.pool}`, v.measured_ppl !== null ? `, ${num(v.measured_ppl, 2)}` : '')))))),
    ));
  }
  return out;
}

function renderNode(d) {
  const a = d.activity;
  const pts = a.curve.map((p) => [p.step, p.loss]);
  const marks = [];
  const tput = a.curve.map((p) => [p.step, p.tokens_per_s]);
  const progress = a.steps > 0 ? h('progress', { max: a.steps, value: a.step }) : null;
  const queue = Object.entries(a.queue || {});
  return [
    h('div', { class: 'grid' },
      section('Now', facts([
        ['node', id(d.node)],
        ['role', a.role],
        ['doing', a.phase, 'phase'],
        ['for', duration(d.now - a.phase_since)],
        ['downloading', a.download ? `${a.download.what}: ${bytes(a.download.bytes)}${a.download.total ? ' of ' + bytes(a.download.total) : ''} at ${bytes(a.download.bytes_per_s)}/s` : (a.phase === 'downloading' && a.fetching ? a.fetching : '-'), 'download'],
        ['verifying', a.verifying ? [id(a.verifying[0]), ` for ${duration(d.now - a.verifying[1])}`] : '-', 'verifying'],
        ['domain', a.domain || '-', 'domain'],
        ['registry version', a.registry_version === null ? '-' : a.registry_version],
        ['peers connected', d.peers_connected === null ? '-' : d.peers_connected],
        ['bytes downloaded', bytes(d.bytes_received)],
        ['bytes served', bytes(d.bytes_served), 'bytes-served'],
        ['data dir', h('code', null, d.data_dir)],
      ])),
      section('Training', facts([
        ['update', a.steps > 0 ? `${a.step} / ${a.steps}` : '-', 'step'],
        ['loss', num(a.loss, 3), 'loss'],
        ['throughput', isNum(a.tokens_per_s) ? `${a.tokens_per_s.toFixed(0)} tokens/s` : '-', 'throughput'],
        ['tokens per update', a.tokens_per_step || '-'],
        ['resumed from', a.resumed_from === null ? '-' : `update ${a.resumed_from}`],
        ['branched', a.branch ? [a.branch, ': ', a.parents.map(([n, w]) => `${n} ${num(w, 2)}`).join(', ')] : '-'],
        ['validation perplexity', isNum(a.valid_ppl) ? `${num(a.valid_ppl, 2)} (seed ${num(a.seed_ppl, 2)})` : '-', 'valid-ppl'],
        ['announced ELM', a.announced ? id(a.announced) : '-', 'announced'],
      ]), progress)),
    section('Training curve: loss against updates',
      lineChart(pts, { label: 'training loss', xLabel: 'update', marks }),
      isNum(a.valid_ppl) ? h('p', null, `Validation perplexity after training: ${num(a.valid_ppl, 2)} (the seed: ${num(a.seed_ppl, 2)}), measured as verifiers measure it.`) : null),
    section('Validation perplexity against updates (public validation split, first tokens)',
      lineChart((a.valid_curve || []).map((p) => [p.step, p.ppl]), { label: 'validation perplexity', xLabel: 'update', height: 180 })),
    section('Throughput: tokens per second against updates', lineChart(tput, { label: 'throughput', xLabel: 'update', yFromZero: true, height: 160 })),
    section(`Verification queue: ${queue.length}`,
      queue.length === 0 ? h('p', { class: 'mute' }, 'nothing waiting') :
        table(['ELM record', ['waiting', 'num']], queue.map(([e, at]) => h('tr', null, cell(id(e)), cell(duration(d.now - at), 'num'))))),
    section('Verdicts of this node',
      a.verdicts.length === 0 ? h('p', { class: 'mute' }, 'none yet') :
        table(['ELM', 'verdict', ['measured ppl', 'num'], 'reason', ['ago', 'num']],
          a.verdicts.slice().reverse().map((v) => h('tr', null, cell(id(v.elm)), cell(verdictTag(v.accepted)), numCell(v.measured_ppl, 2), cell(v.reason, 'desc'), cell(duration(d.now - v.at), 'num'))))),
    a.notes.length === 0 ? null : section('Notes',
      h('ul', null, a.notes.slice().reverse().map((n) => h('li', null, h('span', { class: 'mute' }, duration(d.now - n.at) + ' ago: '), n.message)))),
  ];
}

function renderForest(d) {
  if (!d.forest) return [section('Forest', h('p', null, d.hint))];
  if (d.error) return [section('Forest', h('p', { class: 'bad' }, d.error), h('p', null, 'Forest: ', h('code', null, d.forest)))];
  const out = [section(`Forest: ${d.elms.length} ELMs`,
    h('p', null, h('code', null, d.forest)),
    table(['ELM', 'domains', ['updates', 'num'], ['tokens', 'num']],
      d.elms.map((e) => h('tr', null, cell(e.name), cell(e.domains.join(', ')), cell(e.train ? e.train.steps : '-', 'num'), cell(e.train ? e.train.tokens : '-', 'num')))))];
  const r = d.report;
  if (!r) {
    out.push(section('Perplexity per domain', h('p', { class: 'mute' }, d.hint)));
    return out;
  }
  const cols = ['seed'].concat(r.elms.map((e) => 'ELM ' + e), ['ensemble', 'ensemble + seed', 'avg (posterior)', 'avg (uniform)']);
  const rows = r.rows.map((row) => {
    const vals = [row.seed].concat(r.elms.map((e) => row.elms[e]), [row.ensemble, row.ensemble_with_seed, row.average_posterior, row.average_uniform]);
    const best = Math.min(...vals.filter(isNum));
    return h('tr', { 'data-domain': row.domain }, cell(row.domain), vals.map((v) => cell(num(v, 2), v === best ? 'num best' : 'num')));
  });
  out.push(section(`Perplexity per domain (${r.split} split, ${r.tokens_per_domain} tokens per domain; lower is better)`,
    table(['domain'].concat(cols.map((c) => [c, 'num'])), rows, { id: 'report' }),
    barChart(r.rows.map((row) => ({ label: row.domain, values: [row.seed, row.own_elm, row.ensemble, row.ensemble_with_seed, row.average_posterior, row.average_uniform] })),
      ['seed', 'own ELM', 'ensemble', 'ensemble + seed', 'avg posterior', 'avg uniform'], { label: 'perplexity per domain' })));
  return out;
}

function renderEnsemble(r) {
  const max = Math.max(...r.weights.map((w) => w.weight), 1e-9);
  return [
    h('h3', null, `Ensemble weights on your text (${r.tokens} tokens): the domain posterior over the ELMs`),
    table(['ELM', 'domains', ['weight', 'num'], ''],
      r.weights.map((w) => h('tr', null, cell(w.elm), cell(w.domains.join(', ')), numCell(w.weight, 3),
        cell(h('span', { class: 'bar', style: null, 'data-w': w.weight }, ''))))),
    h('h3', null, 'Continuation (greedy)'),
    h('pre', { class: 'continuation' }, r.text, h('mark', null, r.continuation)),
  ];
}

// Bar widths are set through the CSSOM (the style attribute is blocked by the page's policy).
function sizeBars(root) {
  for (const b of root.querySelectorAll('.bar[data-w]')) {
    const w = Number(b.getAttribute('data-w'));
    b.style.width = (isNum(w) ? Math.round(Math.max(0, Math.min(1, w)) * 200) : 0) + 'px';
  }
}

function setupEnsemble() {
  const form = document.getElementById('ensemble-form');
  if (!form) return;
  const out = document.getElementById('ensemble-out');
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const text = document.getElementById('ensemble-text').value;
    const tokens = document.getElementById('ensemble-tokens').value;
    out.replaceChildren(h('p', { class: 'mute' }, 'running the ensemble...'));
    try {
      const q = new URLSearchParams({ text, tokens });
      const r = await getJSON('/api/forest/ensemble?' + q.toString());
      out.replaceChildren(...renderEnsemble(r));
      sizeBars(out);
    } catch (e) {
      out.replaceChildren(h('p', { class: 'bad' }, String(e.message || e)));
    }
  });
}

const PAGES = {
  network: ['/api/network', renderNetwork, POLL_MS],
  domains: ['/api/domains', renderDomains, POLL_MS],
  node: ['/api/node', renderNode, POLL_MS],
  forest: ['/api/forest', renderForest, 10000],
};

async function tick(page) {
  const [api, render, every] = PAGES[page];
  const status = document.getElementById('status');
  try {
    const d = await getJSON(api);
    document.getElementById('main').replaceChildren(...render(d).flat().filter((x) => x));
    status.className = '';
    status.textContent = 'live, updated ' + new Date().toLocaleTimeString();
    document.body.setAttribute('data-loaded', '1');
  } catch (e) {
    status.className = 'error';
    status.textContent = 'cannot reach the node: ' + String(e.message || e);
  }
  setTimeout(() => tick(page), every);
}

(function main() {
  const page = document.body.getAttribute('data-page');
  for (const a of document.querySelectorAll('nav a')) {
    if (a.getAttribute('data-page') === page) a.setAttribute('aria-current', 'page');
  }
  setupEnsemble();
  if (PAGES[page]) tick(page);
  // Pre-filled text (?text=...) runs the ensemble box at once (links, and the browser test).
  const pre = new URLSearchParams(location.search).get('text');
  const box = document.getElementById('ensemble-text');
  if (pre !== null && box) {
    box.value = pre;
    document.getElementById('ensemble-form').requestSubmit();
  }
})();
