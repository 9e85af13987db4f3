// vroom's dashboard script, served as /ui/assets/app.js (embedded in vroomd;
// no build step). It makes the server-rendered pages live:
// - follows GET /v1/events with an EventSource (which resumes by itself
//   with Last-Event-ID) and, on each event or reset, fetches this page
//   again and swaps every part marked data-live for its newer rendering;
// - reads GET /metrics every few seconds for the CPU sparklines and RSS;
// - follows the console of an instance page through its logs route;
// - sends the action buttons to the JSON API after a confirmation.
'use strict';

(() => {
  const $ = (selector, root = document) => root.querySelector(selector);
  const $$ = (selector, root = document) => Array.from(root.querySelectorAll(selector));

  // --- status line and messages -------------------------------------------

  const live = $('#live');
  function status(text, kind) {
    if (!live) return;
    live.textContent = text;
    live.className = `live ${kind}`;
  }

  let toastTimer = null;
  function toast(text, kind) {
    const box = $('#toast');
    if (!box) return;
    box.textContent = text;
    box.className = kind;
    box.hidden = false;
    clearTimeout(toastTimer);
    toastTimer = setTimeout(() => { box.hidden = true; }, kind === 'bad' ? 15000 : 4000);
  }

  // --- live parts ---------------------------------------------------------

  let refreshTimer = null;
  let refreshing = false;
  let again = false;

  async function refresh() {
    refreshTimer = null;
    if (refreshing) { again = true; return; }
    refreshing = true;
    try {
      const answer = await fetch(location.pathname + location.search, { cache: 'no-store' });
      if (answer.ok) {
        const fresh = new DOMParser().parseFromString(await answer.text(), 'text/html');
        for (const part of $$('[data-live][id]')) {
          const newer = fresh.getElementById(part.id);
          if (newer && newer.innerHTML !== part.innerHTML) part.innerHTML = newer.innerHTML;
        }
        drawSparklines();
        document.body.dataset.refreshed = String(Date.now());
      }
    } catch (e) {
      status('refresh failed', 'bad');
    } finally {
      refreshing = false;
      if (again) { again = false; soon(); }
    }
  }

  // Events come in bursts (starting, then ready): one refresh for a burst.
  function soon() {
    if (refreshTimer === null) refreshTimer = setTimeout(refresh, 150);
  }

  function follow() {
    // Every node's events in a cluster (one host's alone otherwise).
    const events = new EventSource('/v1/events?node=*');
    // What happened between this page's rendering and the stream's start.
    events.addEventListener('open', () => { status('live', 'ok'); soon(); });
    events.addEventListener('event', () => soon());
    // Events were lost to this page: list everything again.
    events.addEventListener('reset', () => soon());
    events.addEventListener('heartbeat', () => status('live', 'ok'));
    events.addEventListener('error', () => status('reconnecting', 'warn'));
    window.addEventListener('pagehide', () => events.close());
  }

  // --- CPU sparklines and memory from /metrics ----------------------------

  const SAMPLES = 30;
  const cpu = new Map(); // vm -> { seconds, at, series: [fraction of a CPU] }
  const rss = new Map(); // vm -> bytes

  function label(labels, name) {
    const found = new RegExp(`${name}="((?:[^"\\\\]|\\\\.)*)"`).exec(labels);
    return found ? found[1].replace(/\\(.)/g, '$1') : null;
  }

  async function sample() {
    if ($$('[data-spark],[data-rss]').length === 0) return;
    let text;
    try {
      const answer = await fetch('/metrics', { cache: 'no-store' });
      if (!answer.ok) return;
      text = await answer.text();
    } catch (e) {
      return;
    }
    const at = performance.now() / 1000;
    for (const line of text.split('\n')) {
      const m = /^(vroom_instance_cpu_seconds_total|vroom_instance_memory_rss_bytes)\{([^}]*)\} (\S+)$/.exec(line);
      if (!m) continue;
      const vm = label(m[2], 'vm');
      const value = Number(m[3]);
      if (vm === null || !Number.isFinite(value)) continue;
      if (m[1] === 'vroom_instance_memory_rss_bytes') {
        rss.set(vm, value);
        continue;
      }
      const seen = cpu.get(vm);
      if (seen && at > seen.at && value >= seen.seconds) {
        seen.series.push((value - seen.seconds) / (at - seen.at));
        if (seen.series.length > SAMPLES) seen.series.shift();
        seen.seconds = value;
        seen.at = at;
      } else {
        cpu.set(vm, { seconds: value, at, series: seen ? seen.series : [] });
      }
    }
    drawSparklines();
  }

  function mib(bytes) {
    return `${(bytes / 1048576).toFixed(0)} MiB`;
  }

  function drawSparklines() {
    for (const cell of $$('[data-rss]')) {
      const bytes = rss.get(cell.dataset.rss);
      cell.textContent = bytes === undefined ? '' : `(${mib(bytes)} resident)`;
    }
    for (const svg of $$('svg[data-spark]')) {
      const seen = cpu.get(svg.dataset.spark);
      const series = seen ? seen.series : [];
      while (svg.firstChild) svg.removeChild(svg.firstChild);
      const title = document.createElementNS('http://www.w3.org/2000/svg', 'title');
      if (series.length === 0) {
        title.textContent = 'CPU: measuring';
        svg.appendChild(title);
        continue;
      }
      const top = Math.max(0.05, ...series);
      const step = 60 / Math.max(1, SAMPLES - 1);
      const points = series.map((v, i) => {
        const x = 60 - (series.length - 1 - i) * step;
        const y = 15.5 - (v / top) * 15;
        return `${x.toFixed(1)},${y.toFixed(1)}`;
      });
      const line = document.createElementNS('http://www.w3.org/2000/svg', 'polyline');
      line.setAttribute('points', points.join(' '));
      svg.appendChild(line);
      const last = series[series.length - 1];
      title.textContent = `CPU: ${(last * 100).toFixed(1)}% of one CPU (peak ${(top * 100).toFixed(1)}%)`;
      svg.appendChild(title);
      svg.dataset.last = last.toFixed(4);
    }
  }

  // --- console ------------------------------------------------------------

  const MAX_CONSOLE = 256 * 1024;

  async function followConsole() {
    const pre = $('#logs');
    if (!pre) return;
    const name = pre.dataset.logs;
    const url = (offset) => `/v1/instances/${encodeURIComponent(name)}/logs?offset=${offset}`;
    let offset = 0;
    for (;;) {
      const following = $('#follow');
      if (offset === 0 || !following || following.checked) {
        try {
          const answer = await fetch(url(offset), { cache: 'no-store' });
          if (answer.status === 404) {
            pre.textContent += '\n[the instance is gone]';
            return;
          }
          if (answer.ok) {
            const chunk = await answer.json();
            if (chunk.next_offset < offset) pre.textContent = ''; // a new boot
            if (chunk.data) {
              let text = pre.textContent + chunk.data;
              if (text.length > MAX_CONSOLE) text = text.slice(text.length - MAX_CONSOLE);
              pre.textContent = text;
              if (!following || following.checked) pre.scrollTop = pre.scrollHeight;
            }
            offset = chunk.next_offset;
          }
        } catch (e) {
          // vroomd restarting: try again.
        }
      }
      await new Promise((resolve) => setTimeout(resolve, 1000));
    }
  }

  // --- actions ------------------------------------------------------------

  async function act(button) {
    const name = button.dataset.name;
    const action = button.dataset.action;
    if (!window.confirm(button.dataset.confirm)) return;
    const request = action === 'snapshot'
      ? { url: '/v1/snapshots', body: { instance: name } }
      : { url: `/v1/instances/${encodeURIComponent(name)}/actions`, body: { action } };
    button.disabled = true;
    toast(`${action} ${name}…`, 'ok');
    try {
      const answer = await fetch(request.url, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(request.body),
      });
      if (answer.ok) {
        toast(`${action} ${name}: done`, 'ok');
      } else {
        const error = await answer.json().catch(() => ({ message: answer.statusText }));
        toast(`${action} ${name}: ${error.message}`, 'bad');
      }
    } catch (e) {
      toast(`${action} ${name}: ${e.message}`, 'bad');
    }
    soon();
  }

  document.addEventListener('click', (event) => {
    const button = event.target.closest('button[data-action]');
    if (button && !button.disabled) act(button);
  });

  follow();
  sample();
  setInterval(sample, 3000);
  followConsole();
})();
