/* Canary desk: renders the state JSON (embedded at first load, then polled), keeps the
 * live alert feed over the WebSocket (snapshot on every (re)connect), and sends the
 * operator actions. Plain JS, no build step; all text goes in through textContent. */
(function () {
  "use strict";

  const root = document.getElementById("desk-root");
  const STATE_URL = root.dataset.stateUrl;
  const LOGIN_URL = root.dataset.loginUrl;
  const WS_PATH = root.dataset.wsPath;
  const DRAFTS_KEY = "desk-drafts";
  const MAX_ALERTS = 100;

  let state = JSON.parse(document.getElementById("desk-state").textContent);
  let serverOffsetMs = Date.parse(state.now) - Date.now();
  let lastUpdate = Date.now();
  let pollTimer = null;
  let pollFailures = 0;
  let pollError = "";
  let expired = false;
  let chart = null;
  let chartKey = "";
  const alerts = new Map(); // id -> alert message
  let snapshotSeen = false;

  // ------------------------------------------------------------------ helpers

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") el.className = v;
      else if (k === "text") el.textContent = v;
      else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : v);
    }
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  const $ = (id) => document.getElementById(id);
  function fill(el, ...children) { el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false)); }

  const STATUS = {
    pass: ["\u2713", "s-pass"], warn: ["\u25B2", "s-warn"], fail: ["\u2715", "s-fail"],
    none: ["\u2013", "s-none"], info: ["\u2139", "s-info"],
  };
  function badge(kind, word) {
    const [icon, cls] = STATUS[kind] || STATUS.none;
    return h("span", { class: "badge " + cls }, h("span", { "aria-hidden": "true" }, icon), word);
  }
  const VERDICT_KIND = { PASS: "pass", WARNING: "warn", FAIL: "fail", INCONCLUSIVE: "none" };
  const KS_KIND = { ACTIVE: "pass", REDUCING: "warn", HALTED: "fail", UNREADABLE: "fail" };
  const SEV_KIND = { critical: "fail", warning: "warn", info: "info" };

  function pad(n) { return String(n).padStart(2, "0"); }
  function utc(iso, withDate) {
    if (!iso) return "-";
    const d = new Date(iso);
    const t = `${pad(d.getUTCHours())}:${pad(d.getUTCMinutes())}:${pad(d.getUTCSeconds())}`;
    return withDate ? `${d.getUTCFullYear()}-${pad(d.getUTCMonth() + 1)}-${pad(d.getUTCDate())} ${t}` : t;
  }
  function duration(s) {
    if (s === null || s === undefined) return "-";
    s = Math.max(0, Math.round(s));
    const hh = Math.floor(s / 3600), mm = Math.floor((s % 3600) / 60), ss = s % 60;
    return hh ? `${hh} h ${pad(mm)} min` : mm ? `${mm} min ${pad(ss)} s` : `${ss} s`;
  }
  function num(v, digits) {
    if (v === null || v === undefined) return "-";
    const a = Math.abs(v);
    const d = digits !== undefined ? digits : a >= 1000 ? 0 : a >= 1 ? 4 : 6;
    return Number(v).toLocaleString("en-US", { minimumFractionDigits: d, maximumFractionDigits: d });
  }
  function signed(v, digits) {
    if (v === null || v === undefined) return h("span", { class: "muted" }, "-");
    const cls = v > 0 ? "pos" : v < 0 ? "neg" : "";
    const word = v > 0 ? "gain" : v < 0 ? "loss" : "flat";
    return h("span", { class: cls, title: word }, (v > 0 ? "+" : "") + num(v, digits), h("span", { class: "sr-only" }, ` (${word})`));
  }
  function serverNow() { return Date.now() + serverOffsetMs; }
  function csrfToken() {
    const m = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    if (m) return decodeURIComponent(m[1]);
    const input = document.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }
  function toast(text, kind) {
    const el = h("div", { class: "toast " + (kind ? STATUS[kind][1] : "") }, text);
    $("toasts").append(el);
    setTimeout(() => el.remove(), kind === "fail" ? 9000 : 5000);
  }
  function banner(text, kind, extra) {
    const el = $("banner");
    el.className = "banner " + (kind ? STATUS[kind][1] : "");
    fill(el, h("p", {}, text, extra || null));
    el.hidden = false;
  }

  // ------------------------------------------------------------------ panels

  function renderKillSwitch() {
    const ks = state.kill_switch;
    const box = $("ks");
    if (!ks) { fill($("ks-badge"), "-"); return; }
    const kind = KS_KIND[ks.state] || "fail";
    box.className = "ks " + STATUS[kind][1];
    fill($("ks-badge"), h("span", { "aria-hidden": "true" }, STATUS[kind][0] + " "), ks.state);
    $("ks-words").textContent = ks.words + (ks.mirror_differs ? ` (database mirror says ${ks.mirror})` : "");
    $("dep-name").textContent = state.deployment
      ? `${state.deployment.name} · ${state.deployment.exchange} · ${(state.deployment.symbols || []).join(", ")} · allocation ${Math.round((ks.allocation || 0) * 100)} %`
      : "no deployment";
  }

  function phaseItem(p, i, n) {
    const cls = ["phase", p.status, p.outcome && /FAIL|ROLL/.test(p.outcome) ? "failed" : ""].join(" ");
    const kind = p.status === "current" ? "info" : p.status === "done" ? (/FAIL|ROLL/.test(p.outcome || "") ? "fail" : "pass") : "none";
    const rows = [];
    const now = serverNow();
    if (p.status === "current" && p.started_at) {
      const elapsed = (now - Date.parse(p.started_at)) / 1000;
      const left = p.ends_at ? (Date.parse(p.ends_at) - now) / 1000 : null;
      rows.push(["In phase", duration(elapsed)]);
      rows.push(["Left", left === null ? "ongoing" : left > 0 ? duration(left) : "due now (awaiting verdict)"]);
      if (p.ends_at) rows.push(["Ends", utc(p.ends_at) + " UTC"]);
      if (p.extensions) rows.push(["Extended", `${p.extensions} time${p.extensions > 1 ? "s" : ""}`]);
    } else if (p.status === "done") {
      rows.push(["Ran", duration(p.elapsed_s)]);
      rows.push(["Ended", utc(p.ended_at) + " UTC"]);
    } else {
      rows.push(["Planned", p.min_duration_s ? duration(p.min_duration_s) : "ongoing, no end"]);
      if (p.needs_manual_promote) rows.push(["Starts", "on a manual promote"]);
    }
    let bar = null;
    if (p.status === "current" && p.started_at && p.ends_at) {
      const total = Date.parse(p.ends_at) - Date.parse(p.started_at);
      const pct = total > 0 ? Math.min(100, Math.max(0, ((now - Date.parse(p.started_at)) / total) * 100)) : 100;
      bar = h("div", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": String(Math.round(pct)), "aria-label": `phase ${p.index} progress` }, h("span", { style: `width:${pct.toFixed(1)}%` }));
    }
    return h("li", { class: cls, "aria-current": p.status === "current" ? "step" : null },
      h("div", { class: "alloc" }, `${Math.round(p.allocation * 100)} %`),
      h("div", { class: "state" }, `Phase ${p.index} `, badge(kind, p.words)),
      h("dl", {}, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
      bar,
      i < n - 1 ? h("span", { class: "phase-arrow", "aria-hidden": "true" }, "\u2192") : null);
  }

  function renderTimeline() {
    const r = state.rollout;
    if (!r) {
      $("rollout-name").textContent = "";
      fill($("rollout-state"), h("span", { class: "empty" }, "No rollout yet. Create one in the admin, run pre-flight, then collect the gate #1 approvals."));
      fill($("phases"));
      return;
    }
    $("rollout-name").textContent = `${r.name} · config v${r.config_version}${r.rehearsal ? " · rehearsal" : ""}`;
    const kind = { RUNNING: "info", LIVE: "pass", PAUSED: "warn", ROLLING_BACK: "fail", ROLLED_BACK: "fail", PENDING: "none" }[r.state] || "none";
    fill($("rollout-state"), badge(kind, r.state), " ", r.words, r.reason ? h("span", { class: "muted" }, ` \u2014 ${r.reason}`) : null);
    fill($("phases"), r.phases.map((p, i) => phaseItem(p, i, r.phases.length)));
  }

  function renderGates() {
    const g = state.gates;
    if (!g) {
      $("gates-sub").textContent = "";
      $("gates-note").textContent = "";
      fill($("gates-body"), h("tr", {}, h("td", { colspan: "5", class: "empty" }, "No rollout: no gate metrics.")));
      return;
    }
    $("gates-sub").textContent = g.evaluated_at ? `phase ${g.phase} · evaluated ${utc(g.evaluated_at)} UTC` : `phase ${g.phase} · not evaluated yet`;
    const orders = g.orders === null || g.orders === undefined ? "no orders counted yet" : `${g.orders} orders in the window`;
    const enough = g.orders !== null && g.orders !== undefined && g.orders >= g.min_orders;
    fill($("gates-note"), g.verdict ? badge(VERDICT_KIND[g.verdict] || "none", g.verdict) : null, g.verdict ? " " : null,
      `${orders}; a verdict needs at least ${g.min_orders}${enough ? "" : " (INCONCLUSIVE until then)"}.`,
      g.problem ? h("strong", { class: "neg" }, " " + g.problem) : null);
    fill($("gates-body"), g.rows.map((row) => h("tr", { class: STATUS[row.status][1], "data-metric": row.metric },
      h("th", { scope: "row" }, row.label),
      h("td", { class: "num" }, row.display),
      h("td", {}, row.target),
      h("td", {}, row.fail),
      h("td", {}, badge(row.status, { pass: "PASS", warn: "WARN", fail: "FAIL", none: "NO DATA" }[row.status]), h("span", { class: "words" }, row.words)))));
  }

  function renderVerdicts() {
    const list = state.verdicts || [];
    fill($("verdict-list"), list.length ? list.map((v) => h("li", {},
      h("div", {}, badge(VERDICT_KIND[v.verdict] || "none", v.verdict), " ",
        h("span", {}, v.phase ? `phase ${v.phase}` : ""), v.action ? h("span", { class: "muted" }, ` \u2192 ${v.action}`) : null,
        h("span", { class: "muted" }, ` · ${utc(v.at)} UTC`)),
      v.reasons.length ? h("ul", {}, v.reasons.map((r) => h("li", {}, r))) : h("div", { class: "muted" }, "all metrics within target")))
      : h("li", { class: "empty" }, "No gate evaluations yet."));
  }

  function makeCharts(box, eq, data) {
    fill(box);
    const width = Math.max(300, box.clientWidth || 600);
    const axisX = { stroke: "#9da7b3", grid: { stroke: "#21262d" }, ticks: { stroke: "#30363d" } };
    const hover = (u) => {
      const i = u.cursor.idx;
      const cur = state.equity;
      if (i === null || i === undefined || !cur.t[i]) { $("equity-caption").textContent = equityCaption(); return; }
      $("equity-caption").textContent = `At ${utc(new Date(cur.t[i] * 1000).toISOString(), true)} UTC: equity ${num(cur.equity[i])} ${cur.quote}, drawdown ${num(cur.drawdown[i], 2)} %.`;
    };
    const common = {
      width,
      legend: { show: false },
      tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
      cursor: { sync: { key: "desk-equity" }, drag: { x: false, y: false } },
      hooks: { setCursor: [hover] },
    };
    const top = h("div", { class: "chart-part" });
    const bottom = h("div", { class: "chart-part" });
    box.append(top, bottom);
    const equity = new uPlot({
      ...common, height: 190,
      scales: { x: { time: true } },
      axes: [{ ...axisX, show: false }, { stroke: "#79b8ff", grid: { stroke: "#21262d" }, size: 72, label: `Equity (${eq.quote})` }],
      series: [
        { label: "Time (UTC)" },
        { label: `Equity (${eq.quote})`, stroke: "#79b8ff", width: 2, value: (u, v) => (v == null ? "-" : num(v)) },
      ],
    }, [data[0], data[1]], top);
    const drawdown = new uPlot({
      ...common, height: 130,
      scales: { x: { time: true }, y: { range: (u, min) => [Math.min(min, -0.5) * 1.1, 0] } },
      axes: [axisX, { stroke: "#ff6b61", grid: { stroke: "#21262d" }, size: 72, label: "Drawdown %", values: (u, v) => v.map((x) => x.toFixed(1)) }],
      series: [
        { label: "Time (UTC)" },
        { label: "Drawdown from peak %", stroke: "#ff6b61", fill: "rgba(255,107,97,0.16)", width: 1.5, value: (u, v) => (v == null ? "-" : v.toFixed(2) + " %") },
      ],
    }, [data[0], data[2]], bottom);
    return { equity, drawdown };
  }

  function equityCaption() {
    const eq = state.equity;
    const last = eq.last;
    return `Equity ${num(last.equity)} ${eq.quote} at ${utc(last.ts, true)} UTC; drawdown now ${num(last.drawdown_pct, 2)} %, worst ${num(eq.worst_drawdown_pct, 2)} %. Point at the chart for values.`;
  }

  function renderChart() {
    const eq = state.equity;
    const box = $("equity-chart");
    if (!eq || !eq.t.length) {
      if (chart) { chart.equity.destroy(); chart.drawdown.destroy(); chart = null; chartKey = ""; }
      fill(box, h("p", { class: "empty" }, "No equity snapshots yet."));
      $("equity-caption").textContent = "";
      $("equity-sub").textContent = "";
      return;
    }
    $("equity-sub").textContent = `${eq.quote} · last 24 h`;
    $("equity-caption").textContent = equityCaption();
    box.setAttribute("aria-label", "Equity and drawdown charts. " + $("equity-caption").textContent);
    if (typeof uPlot === "undefined") return;
    const data = [eq.t, eq.equity, eq.drawdown];
    const key = `${eq.t.length}:${eq.t[eq.t.length - 1]}:${eq.equity[eq.equity.length - 1]}`;
    if (chart && key === chartKey) return;
    chartKey = key;
    if (chart) { chart.equity.setData([data[0], data[1]]); chart.drawdown.setData([data[0], data[2]]); return; }
    chart = makeCharts(box, eq, data);
  }

  function renderPositions() {
    const rows = state.positions || [];
    fill($("positions-body"), rows.length ? rows.map((p) => h("tr", {},
      h("th", { scope: "row" }, p.symbol), h("td", {}, p.side),
      h("td", { class: "num" }, num(p.qty)), h("td", { class: "num" }, num(p.avg_entry)),
      h("td", { class: "num" }, num(p.last_price)), h("td", { class: "num" }, signed(p.unrealised)),
      h("td", { class: "num" }, signed(p.realised))))
      : h("tr", {}, h("td", { colspan: "7", class: "empty" }, "Flat: no open positions.")));
  }

  function renderHealth() {
    const hlt = state.health;
    if (!hlt) return;
    $("health-sub").textContent = hlt.ok ? "" : "";
    fill($("health-sub"), badge(hlt.ok ? "pass" : "fail", hlt.ok ? "ALL OK" : "DEGRADED"));
    fill($("health-list"), Object.entries(hlt.components || {}).map(([name, c]) => h("li", {},
      badge(c.ok ? "pass" : "fail", c.ok ? "OK" : "DOWN"), h("span", {}, name.replace("_", " ")),
      h("span", { class: "muted" }, c.error ? c.error : c.age_s !== undefined ? `seen ${c.age_s} s ago` : `${c.ms} ms`))));
    const t = state.today;
    $("today").textContent = t ? `Today (UTC): ${t.orders} orders, ${t.errors} order errors, ${t.alerts} alerts; ${t.unacked} alerts unacknowledged.` : "";
  }

  function renderPreflight() {
    const pf = state.preflight;
    if (!pf) {
      fill($("preflight-sub"));
      fill($("preflight-body"), h("tr", {}, h("td", { colspan: "3", class: "empty" }, "No pre-flight run yet.")));
      return;
    }
    fill($("preflight-sub"), badge(pf.go ? "pass" : "fail", pf.decision), ` ${utc(pf.started_at, true)} UTC by ${pf.actor}`);
    fill($("preflight-body"), pf.checks.map((c) => h("tr", { class: STATUS[c.kind][1] },
      h("th", { scope: "row" }, c.name, c.critical ? null : h("span", { class: "muted" }, " (advisory)")),
      h("td", {}, badge(c.kind, c.status.toUpperCase())),
      h("td", { class: "muted" }, c.detail, c.duration_ms !== null && c.duration_ms !== undefined ? ` \u00B7 ${Math.round(c.duration_ms)} ms` : ""))));
  }

  function renderApprovals() {
    const list = state.approvals || [];
    const roles = [["alpha", "Alpha trader"], ["planner", "Planner"]];
    const version = state.rollout ? state.rollout.config_version : null;
    const users = new Set(list.filter((a) => a.current).map((a) => a.user));
    const cards = roles.map(([role, label]) => {
      const rows = list.filter((a) => a.role === role);
      const a = rows.filter((x) => x.current).pop() || rows.pop();
      if (!a) return h("div", { class: "approval" }, badge("none", "AWAITING"), ` ${label}: not approved yet`);
      const kind = a.current ? "pass" : "warn";
      const word = a.current ? "APPROVED" : `VOID (config v${a.config_version}, now v${version})`;
      const problems = a.evidence_problems;
      const check = problems === null || problems === undefined ? null
        : problems.length ? h("div", {}, badge("fail", "BELOW BOUNDS"), " " + problems.join("; "))
        : h("div", {}, badge("pass", "SIGNALS VALIDATED"), " SMC alignment >= 80 %, reward:risk > 3, no sweep errors");
      return h("div", { class: "approval" },
        h("div", {}, badge(kind, word), " ", h("strong", {}, label), ` by ${a.user} at ${utc(a.at, true)} UTC`),
        a.comment ? h("div", { class: "muted" }, `\u201C${a.comment}\u201D`) : null,
        a.evidence.length ? h("dl", {}, a.evidence.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])) : h("div", { class: "muted" }, "no evidence attached"),
        check);
    });
    const gate = state.gate1;
    if (gate) cards.unshift(h("div", { class: "approval" }, gate.ok ? badge("pass", "GATE #1 OPEN") : badge("warn", "GATE #1 CLOSED"), " ", gate.ok ? "pre-flight GO and both approvals in place" : gate.problems.join("; ")));
    const both = list.filter((a) => a.current).length >= 2;
    if (both && users.size < 2) cards.push(h("div", { class: "approval" }, badge("fail", "FOUR EYES BROKEN"), " the same person approved both roles"));
    fill($("approval-list"), state.rollout ? cards : h("p", { class: "empty" }, "No rollout."));
  }

  function renderReports() {
    const list = state.reports || [];
    fill($("report-list"), list.length ? list.map((r) => {
      const hd = r.headline || {};
      const text = r.has_data
        ? `${hd.orders} orders, ${hd.errors} errors, P&L ${hd.realised_pnl >= 0 ? "+" : ""}${num(hd.realised_pnl)}, ${hd.rollbacks} rollbacks`
        : "no data that day";
      return h("li", {}, h("a", { href: r.url }, r.day), h("span", { class: "muted" }, text),
        h("span", { class: "muted" }, r.emailed_at ? `emailed ${r.emailed_to.length}` : "not emailed"));
    }) : h("li", { class: "empty" }, "No reports yet: python manage.py daily_report"));
  }

  function renderAudit() {
    const rows = state.audit || [];
    fill($("audit-body"), rows.length ? rows.map((e) => h("tr", { "data-action": e.action },
      h("td", { class: "num" }, e.seq), h("td", {}, utc(e.at, true)), h("td", {}, e.actor),
      h("td", {}, e.action), h("td", { class: "muted" }, e.target), h("td", { class: "muted" }, e.reason))) :
      h("tr", {}, h("td", { colspan: "6", class: "empty" }, "Nothing recorded yet.")));
  }

  function renderAll() {
    const steps = [renderKillSwitch, renderTimeline, renderGates, renderVerdicts, renderChart, renderPositions, renderHealth, renderPreflight, renderApprovals, renderReports, renderAudit];
    for (const step of steps) {
      try { step(); } catch (err) { console.error(step.name, err); }
    }
    for (const a of state.acks || []) markAcked(a.id, a.by, a.at);
  }

  // ------------------------------------------------------------------ polling

  function setPoll(text, kind) {
    const el = $("poll-status");
    el.className = "pill " + (kind ? STATUS[kind][1] : "");
    el.textContent = text;
  }
  function pollLabel() {
    if (expired) return;
    const age = Math.round((Date.now() - lastUpdate) / 1000);
    if (pollFailures) setPoll(`Data: ${pollError || "server unreachable"}, retrying \u00B7 ${age} s old`, "warn");
    else setPoll(`Data: live \u00B7 updated ${age} s ago`, "pass");
  }

  let polling = false;
  let pollAgain = false;

  async function poll() {
    clearTimeout(pollTimer);
    if (expired) return;
    if (polling) { pollAgain = true; return; }
    polling = true;
    const abort = new AbortController();
    const deadline = setTimeout(() => abort.abort(), 8000);
    try {
      const resp = await fetch(STATE_URL, { credentials: "same-origin", headers: { Accept: "application/json" }, cache: "no-store", signal: abort.signal });
      if (resp.status === 401) { sessionExpired(); return; }
      if (!resp.ok) throw new Error(`server error (HTTP ${resp.status})`);
      state = await resp.json();
      serverOffsetMs = Date.parse(state.now) - Date.now();
      lastUpdate = Date.now();
      if (pollFailures) { pollFailures = 0; document.body.classList.remove("stale"); toast("Server reachable again: data is live.", "pass"); }
      renderAll();
    } catch (err) {
      pollFailures += 1;
      pollError = err instanceof TypeError || err.name === "AbortError" ? "server unreachable" : err.message;
      document.body.classList.add("stale");
    } finally {
      clearTimeout(deadline);
      polling = false;
    }
    pollLabel();
    if (pollAgain) { pollAgain = false; poll(); return; }
    const base = (state.poll_s || 3) * 1000;
    pollTimer = setTimeout(poll, pollFailures ? Math.min(5000, base * (1 + pollFailures / 2)) : base);
  }

  // ------------------------------------------------------------------ session expiry, drafts

  function collectDrafts() {
    const drafts = { fields: {}, open: null, scrollY: window.scrollY };
    document.querySelectorAll("[data-draft]").forEach((el) => { if (el.value) drafts.fields[el.dataset.draft] = el.value; });
    const open = document.querySelector("dialog[open]");
    if (open) drafts.open = open.id;
    return drafts;
  }
  function saveDrafts() {
    try { sessionStorage.setItem(DRAFTS_KEY, JSON.stringify(collectDrafts())); } catch (e) { /* storage full or disabled */ }
  }
  function restoreDrafts() {
    let drafts = null;
    try { drafts = JSON.parse(sessionStorage.getItem(DRAFTS_KEY) || "null"); } catch (e) { drafts = null; }
    sessionStorage.removeItem(DRAFTS_KEY);
    if (!drafts) return;
    const restored = [];
    for (const [key, value] of Object.entries(drafts.fields || {})) {
      const el = document.querySelector(`[data-draft="${key}"]`);
      if (el) { el.value = value; restored.push(key.replace("-", " ")); }
    }
    if (drafts.scrollY) window.scrollTo(0, drafts.scrollY);
    if (!restored.length) return;
    const text = `Restored after sign-in: your unsent ${restored.join(", ")}. Nothing was sent while you were signed out.`;
    banner(text, "info");
    const dialog = drafts.open && $(drafts.open);
    if (dialog) {
      dialog.querySelector(".form-note").textContent = text;
      dialog.showModal();
    }
  }

  function sessionExpired() {
    if (expired) return;
    expired = true;
    clearTimeout(pollTimer);
    saveDrafts();
    document.querySelectorAll("dialog[open]").forEach((d) => d.close());
    setPoll("Data: session expired", "fail");
    setWs("Alerts: session expired", "fail");
    const target = `${LOGIN_URL}?next=${encodeURIComponent(location.pathname)}&expired=1`;
    let left = 5;
    const link = h("a", { href: target, id: "relogin" }, "Sign in now");
    const tick = () => {
      banner(`Your session has expired. What you had typed is kept and comes back after you sign in. Going to the sign-in page in ${left} s\u2026 `, "fail", link);
      if (left-- <= 0) { location.assign(target); return; }
      setTimeout(tick, 1000);
    };
    tick();
  }

  // ------------------------------------------------------------------ alert feed over the WebSocket

  let ws = null;
  let wsAttempts = 0;
  let pingTimer = null;
  let pongTimer = null;
  let reconnectTimer = null;
  const me = state.user.name;
  const canHandle = !!state.user.can.handle_alerts;

  function setWs(text, kind) {
    const el = $("ws-status");
    el.className = "pill " + (kind ? STATUS[kind][1] : "");
    el.textContent = text;
    document.body.dataset.ws = kind === "pass" ? "live" : kind === "warn" ? "reconnecting" : "down";
  }

  function alertItem(a) {
    const kind = SEV_KIND[a.severity] || "info";
    const arrow = a.direction === "up" ? " \u2191" : a.direction === "down" ? " \u2193" : "";
    const where = [a.symbol, a.timeframe].filter(Boolean).join(" ") || a.source;
    const actions = h("div", { class: "alert-actions" });
    if (a._ackedBy) {
      actions.append(h("span", { class: "acked-by" }, `\u2713 Acknowledged by ${a._ackedBy}${a._ackedAt ? " at " + utc(a._ackedAt) + " UTC" : ""}`));
    } else if (canHandle) {
      actions.append(
        h("button", { type: "button", class: "small", "data-ack": a.id, "aria-label": `Acknowledge alert ${a.id}: ${a.detector} on ${where}`, onclick: () => ack(a.id) }, "Acknowledge"),
        h("button", { type: "button", class: "small", "aria-label": `Silence alerts like ${a.id}`, onclick: () => openSilence(a) }, "Silence\u2026"));
    } else {
      actions.append(h("span", { class: "muted" }, "unacknowledged"));
    }
    return h("li", { class: `alert sev-${a.severity}${a._ackedBy ? " acked" : ""}${a._fresh ? " fresh" : ""}`, "data-alert-id": a.id },
      h("div", { class: "alert-head" }, badge(kind, a.severity.toUpperCase()), h("strong", {}, where), h("span", {}, a.detector + arrow),
        h("time", { datetime: a.detected_at }, utc(a.detected_at) + " UTC")),
      h("div", { class: "alert-msg" }, a.message || ""), actions);
  }

  function renderAlerts() {
    const list = Array.from(alerts.values()).sort((x, y) => (y.detected_at > x.detected_at ? 1 : y.detected_at < x.detected_at ? -1 : y.id - x.id)).slice(0, MAX_ALERTS);
    const open = list.filter((a) => !a._ackedBy).length;
    $("alerts-sub").textContent = `${open} unacknowledged`;
    const none = snapshotSeen ? "No unacknowledged alerts." : "Waiting for the alert feed\u2026";
    fill($("alert-list"), list.length ? list.map(alertItem) : h("li", { class: "empty" }, none));
    for (const a of list) a._fresh = false;
  }

  function markAcked(id, by, at) {
    const a = alerts.get(id);
    if (!a || a._ackedBy) return;
    a._ackedBy = by || "someone";
    a._ackedAt = at || new Date(serverNow()).toISOString();
    renderAlerts();
  }

  function onSocketMessage(msg) {
    if (msg.type === "snapshot") {
      snapshotSeen = true;
      const acked = new Map(Array.from(alerts.values()).filter((a) => a._ackedBy).map((a) => [a.id, a]));
      alerts.clear();
      for (const a of msg.alerts) alerts.set(a.id, a);
      for (const [id, a] of acked) if (!alerts.has(id)) alerts.set(id, a);
      renderAlerts();
    } else if (msg.type === "alert") {
      const a = msg.alert;
      if (!alerts.has(a.id)) { a._fresh = true; alerts.set(a.id, a); renderAlerts(); }
    } else if (msg.type === "result" && msg.op === "ack") {
      markAcked(msg.id, me);
      toast(`Alert ${msg.id} acknowledged.`, "pass");
      poll();
    } else if (msg.type === "result" && msg.op === "silence") {
      toast(`Silenced until ${utc(msg.expires_at, true)} UTC.`, "pass");
      poll();
    } else if (msg.type === "error") {
      toast(`Not done: ${msg.error}`, "fail");
    } else if (msg.type === "pong") {
      clearTimeout(pongTimer);
    }
  }

  function connect() {
    clearTimeout(reconnectTimer);
    if (expired) return;
    setWs(wsAttempts ? `Alerts: reconnecting (attempt ${wsAttempts})` : "Alerts: connecting", wsAttempts ? "warn" : null);
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    let socket;
    try { socket = new WebSocket(`${scheme}//${location.host}${WS_PATH}`); } catch (e) { return scheduleReconnect(); }
    ws = socket;
    socket.onopen = () => {
      const wasDown = wsAttempts > 0;
      wsAttempts = 0;
      setWs("Alerts: live", "pass");
      if (wasDown) { toast("Alert feed reconnected: caught up from the snapshot.", "pass"); poll(); }
      pingTimer = setInterval(() => {
        if (socket.readyState !== WebSocket.OPEN) return;
        socket.send(JSON.stringify({ type: "ping" }));
        clearTimeout(pongTimer);
        pongTimer = setTimeout(() => socket.close(), 10000);
      }, 15000);
    };
    socket.onmessage = (e) => { try { onSocketMessage(JSON.parse(e.data)); } catch (err) { console.error(err); } };
    socket.onclose = (e) => {
      clearInterval(pingTimer); clearTimeout(pongTimer);
      if (ws !== socket) return;
      ws = null;
      if (e.code === 4401) return sessionExpired();
      if (e.code === 4403) return setWs("Alerts: not allowed for this account", "fail");
      scheduleReconnect();
    };
  }

  function scheduleReconnect() {
    wsAttempts += 1;
    const delay = Math.min(5000, 500 * 2 ** (wsAttempts - 1)) * (0.8 + Math.random() * 0.4);
    setWs(`Alerts: reconnecting in ${Math.ceil(delay / 1000)} s (attempt ${wsAttempts})`, "warn");
    reconnectTimer = setTimeout(connect, delay);
  }

  async function post(url, body, json) {
    const headers = { "X-CSRFToken": csrfToken(), Accept: "application/json" };
    if (json) headers["Content-Type"] = "application/json";
    const resp = await fetch(url, { method: "POST", credentials: "same-origin", headers, body: json ? JSON.stringify(body) : body });
    if (resp.status === 401) { sessionExpired(); throw new Error("session expired"); }
    let data = {};
    try { data = await resp.json(); } catch (e) { data = {}; }
    if (!resp.ok) {
      const msg = data.message || data.error || data.detail || (data.errors ? JSON.stringify(data.errors) : `HTTP ${resp.status}`);
      throw new Error(msg);
    }
    return data;
  }

  async function ack(id) {
    if (ws && ws.readyState === WebSocket.OPEN) { ws.send(JSON.stringify({ type: "ack", id })); return; }
    try {
      await post(`/api/v1/alerts/${id}/ack`, null, false);
      markAcked(id, me);
      toast(`Alert ${id} acknowledged.`, "pass");
    } catch (err) { toast(`Not acknowledged: ${err.message}`, "fail"); }
  }

  function openSilence(a) {
    const dialog = $("silence-dialog");
    const form = dialog.querySelector("form");
    form.elements.symbol.value = a.symbol || "";
    form.elements.detector.value = a.detector || "";
    dialog.querySelector('[data-field="symbol"]').textContent = a.symbol || "(any)";
    dialog.querySelector('[data-field="detector"]').textContent = a.detector || "(any)";
    form.elements.use_symbol.checked = !!a.symbol;
    form.elements.use_symbol.disabled = !a.symbol;
    form.querySelector(".form-error").textContent = "";
    form.querySelector(".form-note").textContent = "";
    dialog.showModal();
  }

  async function submitSilence(form) {
    const body = {
      symbol: form.elements.use_symbol.checked ? form.elements.symbol.value : "",
      detector: form.elements.use_detector.checked ? form.elements.detector.value : "",
      duration_s: Number(form.elements.duration_s.value),
      reason: form.elements.reason.value.trim(),
    };
    if (!body.symbol && !body.detector) throw new Error("choose the symbol, the detector or both");
    if (ws && ws.readyState === WebSocket.OPEN) { ws.send(JSON.stringify({ type: "silence", ...body })); return null; }
    const data = await post("/api/v1/alerts/silences/", body, true);
    return `Silenced until ${utc(data.expires_at, true)} UTC.`;
  }

  // ------------------------------------------------------------------ dialogs and actions

  async function submitAction(form) {
    const data = await post(form.action, new FormData(form), false);
    return data.message;
  }

  function wireDialogs() {
    document.querySelectorAll("[data-dialog]").forEach((btn) => btn.addEventListener("click", () => {
      const dialog = $(btn.dataset.dialog);
      dialog.querySelector(".form-error").textContent = "";
      dialog.querySelector(".form-note").textContent = "";
      dialog.showModal();
    }));
    document.querySelectorAll("dialog").forEach((dialog) => {
      dialog.querySelectorAll("[data-close]").forEach((b) => b.addEventListener("click", () => dialog.close()));
      const form = dialog.querySelector("form");
      form.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        const error = form.querySelector(".form-error");
        if (!form.reportValidity()) return;
        const submit = form.querySelector("button[type=submit]");
        submit.disabled = true;
        error.textContent = "";
        try {
          const message = form.dataset.op === "silence" ? await submitSilence(form) : await submitAction(form);
          dialog.close();
          form.reset();
          if (message) toast(message, "pass");
          poll();
        } catch (err) {
          if (!expired) error.textContent = err.message;
        } finally {
          submit.disabled = false;
        }
      });
    });
  }

  // ------------------------------------------------------------------ start

  function start() {
    renderAll();
    renderAlerts();
    wireDialogs();
    restoreDrafts();
    pollLabel();
    setInterval(() => { pollLabel(); if (state.rollout && !expired) renderTimeline(); }, 1000);
    pollTimer = setTimeout(poll, (state.poll_s || 3) * 1000);
    connect();
    window.addEventListener("resize", () => {
      if (!chart) return;
      const width = Math.max(300, $("equity-chart").clientWidth);
      chart.equity.setSize({ width, height: 190 });
      chart.drawdown.setSize({ width, height: 130 });
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
