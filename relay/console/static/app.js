// The relay console: one page over the admin API. Every string from a client, a key or the config reaches the
// page as a text node (el() never parses HTML), so a model named "<script>" is shown, never run.
"use strict";

const KEY = "relay-admin-key";
const POLL_MS = 1500;
let timer = null;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (name === "on") for (const [ev, fn] of Object.entries(value)) node.addEventListener(ev, fn);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  return node;
}

class Refused extends Error {}

async function api(method, path, body) {
  const init = { method, headers: { "x-api-key": sessionStorage.getItem(KEY) || "" }, credentials: "omit", cache: "no-store" };
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const res = await fetch(path, init);
  const doc = await res.json().catch(() => ({}));
  if (res.status === 401 || res.status === 403) {
    sessionStorage.removeItem(KEY);
    showLogin((doc.error && doc.error.message) || "refused");
    throw new Refused("refused");
  }
  if (!res.ok) throw new Error((doc.error && doc.error.message) || `HTTP ${res.status}`);
  return doc;
}

// ---- formatting ----------------------------------------------------------------------------------

const num = (v, d = 0) => (v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US", { maximumFractionDigits: d, minimumFractionDigits: d }));
const usd = (v) => (v === null || v === undefined ? "–" : "$" + Number(v).toFixed(v !== 0 && Math.abs(v) < 1 ? 4 : 2));
const ms = (v) => (v === null || v === undefined ? "–" : `${num(v, v < 10 ? 1 : 0)} ms`);
const pct = (v) => (v === null || v === undefined ? "–" : `${num(v * 100, 1)} %`);
const clock = (t) => new Date(t * 1000).toLocaleTimeString("en-GB", { hour12: false });
const today = () => new Date().toISOString().slice(0, 10);

// ---- charts: one polyline per series, in plain SVG -----------------------------------------------

function spark(values) {
  const w = 360, h = 48;
  const box = svg("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", role: "img" });
  const nums = values.map((v) => (v === null ? 0 : v));
  const top = Math.max(...nums, 1e-9);
  const step = w / Math.max(nums.length - 1, 1);
  const points = nums.map((v, i) => `${(i * step).toFixed(1)},${(h - 2 - (v / top) * (h - 4)).toFixed(1)}`);
  box.append(svg("polygon", { class: "area", points: `0,${h} ${points.join(" ")} ${w},${h}` }));
  box.append(svg("polyline", { class: "line", points: points.join(" ") }));
  return box;
}

function bars(values, labels, format) {
  // One bar per value, each with its label and value as a tooltip (a text node, like every string here).
  const w = 300;
  const h = 80;
  const box = svg("svg", { viewBox: `0 0 ${w} ${h}`, preserveAspectRatio: "none", role: "img" });
  const top = Math.max(...values, 1e-9);
  const step = w / Math.max(values.length, 1);
  values.forEach((v, i) => {
    const bar = svg("rect", { class: "col", x: (i * step + step * 0.1).toFixed(1), width: (step * 0.8).toFixed(1),
      y: (h - (v / top) * (h - 2)).toFixed(1), height: ((v / top) * (h - 2)).toFixed(1) });
    const tip = svg("title", {});
    tip.textContent = `${labels[i]}: ${format(v)}`;
    bar.append(tip);
    box.append(bar);
  });
  return box;
}

function card(label, value, values, title) {
  return el("div", { class: "card", title: title || "" }, el("div", { class: "label" }, label),
    el("div", { class: "value", "data-metric": label }, value), values ? spark(values) : null,
    values ? el("div", { class: "axis" }, el("span", {}, "1 h ago"), el("span", {}, "now")) : null);
}

// ---- pages ---------------------------------------------------------------------------------------

const pages = {
  async overview(root) {
    const cards = el("div", { class: "cards", id: "cards" });
    const body = el("tbody", { id: "recent" });
    const scope = el("p", { class: "muted", id: "scope" });
    root.append(el("h1", {}, "Overview"), scope, cards, el("h2", {}, "Recent requests"),
      el("table", {}, el("thead", {}, el("tr", {}, ["time", "key", "model asked", "target served", "status", "TTFB",
        "duration", "tokens in/out", "cost"].map((h) => el("th", {}, h)))), body));
    let shown = new Set();
    let spend = null;
    let spendAt = 0;
    const tick = async () => {
      const live = await api("GET", "/admin/live");
      if (Date.now() - spendAt > 10000) {
        spendAt = Date.now();
        const usage = await api("GET", `/admin/usage?since=${today()}`).catch(() => null);
        spend = usage ? usage.data.filter((r) => r.day === today()).reduce((s, r) => s + r.cost_usd, 0) : null;
      }
      const n = live.instances;
      scope.textContent = `The whole gateway: ${n} relay process${n === 1 ? "" : "es"} seen` +
        (live.store === "down" ? " (the store is unreachable: this process alone)" : "") +
        (live.unreadable ? ` (${live.unreadable} more sent figures this relay cannot read: another version?)` : "") +
        ". Figures over the last minute; charts over the last hour in 10-second steps. The table shows requests as they finish.";
      scope.dataset.instances = String(n);
      const s = live.series;
      const m = live.last_minute;
      cards.replaceChildren(
        card("requests / s", num(m.requests_per_s, 2), s.requests_per_s, "headline: the last minute"),
        card("streams open", num(live.streams_open), s.streams_open, "now; the chart: the most open in each step"),
        card("TTFB p50", ms(m.ttfb_p50_ms), s.ttfb_p50_ms, "time to first byte over the last minute, to within 25 %"),
        card("TTFB p99", ms(m.ttfb_p99_ms), s.ttfb_p99_ms, "time to first byte over the last minute, to within 25 %"),
        card("error rate", pct(m.error_rate), s.error_rate, "answers that were not 2xx, over the last minute"),
        card("tokens / s", num(m.tokens_per_s, 1), s.tokens_per_s, "input + output, over the last minute"),
        card("spend today", usd(spend), s.cost_usd, "today (UTC) from the store, every instance; the chart: per step"));
      const now = new Set();
      body.replaceChildren(...live.recent.map((r) => {
        now.add(r.id);
        return el("tr", { class: shown.has(r.id) ? "" : "fresh", "data-id": r.id },
          el("td", {}, clock(r.time)), el("td", {}, r.key), el("td", { class: "wrap" }, r.model),
          el("td", { class: "wrap" }, r.target), el("td", { class: `status-${String(r.status)[0]}` }, r.status || "gone"),
          el("td", {}, ms(r.ttfb_ms)), el("td", {}, ms(r.duration_ms)),
          el("td", {}, `${num(r.input_tokens)} / ${num(r.output_tokens)}`), el("td", {}, usd(r.cost_usd)));
      }));
      shown = now;
    };
    await tick();
    return tick;
  },

  async keys(root) {
    const list = el("tbody", { id: "keys" });
    const shown = el("div", { id: "secret-box" });
    const err = el("p", { class: "error", role: "alert" });
    const field = (name, label, type, extra) => el("label", {}, label, el("input", { name, type, ...(extra || {}) }));
    const form = el("form", { class: "inline", id: "create-key" },
      field("name", "name", "text", { required: true, pattern: "[A-Za-z0-9][\\w.@\\-]{0,63}" }),
      field("models", "models (globs, comma separated)", "text"),
      field("rpm", "requests / min", "number", { min: 1 }), field("tpm", "tokens / min", "number", { min: 1 }),
      field("max_streams", "streams", "number", { min: 1 }), field("budget", "budget USD", "number", { min: 0, step: "0.01" }),
      el("label", {}, "period", el("select", { name: "budget_period" }, el("option", { value: "month" }, "month"), el("option", { value: "day" }, "day"))),
      field("expires", "expires", "date"),
      el("button", { type: "submit", class: "primary" }, "Create key"));
    const read = (f) => {
      const doc = {};
      for (const name of ["rpm", "tpm", "max_streams"]) doc[name] = f.elements[name].value ? parseInt(f.elements[name].value, 10) : null;
      doc.budget = f.elements.budget.value ? parseFloat(f.elements.budget.value) : null;
      doc.budget_period = f.elements.budget_period.value;
      doc.models = f.elements.models.value.split(",").map((m) => m.trim()).filter(Boolean);
      doc.expires = f.elements.expires.value || null;
      return doc;
    };
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      err.textContent = "";
      try {
        const made = await api("POST", "/admin/keys", { name: form.elements.name.value, ...read(form) });
        shown.replaceChildren(el("div", { class: "secret" }, `Key ${made.key.name} created. Its secret, shown this once:`,
          el("br"), el("code", { id: "new-secret" }, made.secret)));
        form.reset();
        await load();
      } catch (e) { if (!(e instanceof Refused)) err.textContent = e.message; }
    });
    const edit = (k) => {
      const f = el("form", { class: "inline" },
        field("models", "models", "text", { value: (k.models || []).join(", ") }),
        field("rpm", "requests / min", "number", { min: 1, value: k.limits.rpm ?? "" }),
        field("tpm", "tokens / min", "number", { min: 1, value: k.limits.tpm ?? "" }),
        field("max_streams", "streams", "number", { min: 1, value: k.limits.max_streams ?? "" }),
        field("budget", "budget USD", "number", { min: 0, step: "0.01", value: k.limits.budget ?? "" }),
        el("label", {}, "period", el("select", { name: "budget_period" },
          ["month", "day"].map((p) => el("option", { value: p, selected: p === (k.limits.budget_period || "month") }, p)))),
        field("expires", "expires", "date", { value: k.expires || "" }),
        el("button", { type: "submit", class: "primary" }, "Save"));
      f.addEventListener("submit", async (ev) => {
        ev.preventDefault();
        try { await api("PATCH", `/admin/keys/${encodeURIComponent(k.name)}`, read(f)); await load(); }
        catch (e) { if (!(e instanceof Refused)) err.textContent = e.message; }
      });
      return f;
    };
    const budgetCell = (k) => {
      if (k.limits.budget === null || k.limits.budget === undefined) return k.spend ? usd(k.spend.usd) : "no budget";
      const spent = k.spend ? k.spend.usd : 0;
      const bar = svg("svg", { viewBox: "0 0 80 8" });
      bar.append(svg("rect", { class: "used", width: Math.min(80, (80 * spent) / Math.max(k.limits.budget, 1e-9)), height: 8 }));
      return el("span", {}, el("span", { class: "bar" }, bar), `${usd(spent)} of ${usd(k.limits.budget)} / ${k.limits.budget_period || "month"}`);
    };
    const load = async () => {
      const keys = (await api("GET", "/admin/keys")).data;
      list.replaceChildren(...keys.flatMap((k) => {
        const row = el("tr", { "data-key": k.name },
          el("td", {}, k.name), el("td", {}, el("span", { class: `pill ${k.state}` }, k.state)), el("td", { class: "muted" }, k.hint || ""),
          el("td", { class: "wrap" }, (k.models || []).join(", ") || "any"),
          el("td", {}, k.limits.rpm ?? "–"), el("td", {}, k.limits.tpm ?? "–"), el("td", {}, k.limits.max_streams ?? "–"),
          el("td", {}, budgetCell(k)), el("td", {}, k.expires || "–"), el("td", {}));
        const actions = row.lastChild;
        const editRow = el("tr", { hidden: true }, el("td", { colspan: 10 }, edit(k)));
        if (k.state !== "revoked") {
          actions.append(el("button", { type: "button", on: { click: () => { editRow.hidden = !editRow.hidden; } } }, "Limits"), " ",
            el("button", { type: "button", "data-revoke": k.name, on: { click: async () => {
              try { await api("DELETE", `/admin/keys/${encodeURIComponent(k.name)}`); await load(); }
              catch (e) { if (!(e instanceof Refused)) err.textContent = e.message; }
            } } }, "Revoke"));
        }
        return [row, editRow];
      }));
    };
    root.append(el("h1", {}, "Keys"), form, err, shown,
      el("table", {}, el("thead", {}, el("tr", {}, ["name", "state", "secret", "models", "rpm", "tpm", "streams",
        "spend / budget", "expires", ""].map((h) => el("th", {}, h)))), list));
    await load();
    return null;
  },

  async providers(root) {
    const tryCell = (target) => {
      const out = el("span", { class: "try-result" });
      const button = el("button", { type: "button", "data-try": target, on: { click: async () => {
        button.disabled = true;
        out.textContent = " …";
        try {
          const r = await api("POST", "/admin/try", { target });
          out.className = `try-result ${r.ok ? "ok" : "error"}`;
          out.textContent = r.ok ? ` ${ms(r.ms)}: ${r.text}` : ` ${ms(r.ms)}: ${r.status} ${r.error}`;
        } catch (e) { if (!(e instanceof Refused)) out.textContent = ` ${e.message}`; }
        button.disabled = false;
      } } }, "Try it");
      return el("td", { class: "wrap" }, button, out);
    };
    const data = (await api("GET", "/admin/providers")).data;
    root.append(el("h1", {}, "Providers"), el("p", { class: "muted" }, "Health as this relay process sees it. Upstream keys are counted, never shown."));
    for (const p of data) {
      if (p.error) {  // stored, but this process cannot serve it: say why, draw the rest
        root.append(el("h2", {}, `${p.name} `, el("span", { class: "muted" }, "store · left out here")),
          el("p", { class: "error" }, p.error));
        continue;
      }
      const h = p.health;
      root.append(el("h2", {}, `${p.name} `, el("span", { class: "muted" }, `${p.format} · ${p.base_url}${p.preset ? " · preset " + p.preset : ""} · ${p.source}`)),
        el("p", {}, "circuit ", el("span", { class: `pill ${h.circuit}` }, h.circuit),
          ` · ${h.failures} failures in a row · ${h.keys} key(s), ${h.keys_cooling} cooling down · TTFB p50 ${ms(p.ttfb_p50_ms)} · last error `,
          h.last_error ? `${h.last_error.status}, ${num(h.last_error.seconds_ago)} s ago` : "none"),
        el("table", {}, el("thead", {}, el("tr", {}, ["model", "context window", "max output", "USD / M in", "USD / M out", "cache read", "cache write", ""].map((x) => el("th", {}, x)))),
          el("tbody", {}, p.models.map((m) => el("tr", {}, el("td", {}, m.id), el("td", {}, num(m.context_window)), el("td", {}, num(m.max_output)),
            ...["input", "output", "cache_read", "cache_write"].map((f) => el("td", {}, m.price && m.price[f] !== null ? m.price[f] : "–")),
            tryCell(`${p.name}/${m.id}`))))));
      if (p.passthrough_models) root.append(el("p", { class: "muted" }, "Any other model name is passed through unchanged."));
    }
    return null;
  },

  async models(root) {
    // Providers stored at run time: any format, checked by relay's config parser, live on every instance.
    const BASIC = ["format", "preset", "base_url", "api_key", "models"];
    const err = el("p", { class: "error", role: "alert", id: "model-error" });
    const done = el("p", { class: "ok", id: "model-saved" });
    const list = el("tbody", { id: "stored" });
    const fileList = el("tbody", { id: "from-file" });
    const listed = await api("GET", "/admin/providers");
    const choices = listed.choices;
    const select = (name, values, blank) => el("select", { name }, blank ? el("option", { value: "" }, blank) : null,
      values.map((v) => el("option", { value: v }, v)));
    const form = el("form", { class: "inline", id: "model-form" },
      el("label", {}, "name", el("input", { name: "name", type: "text", required: true, pattern: "[A-Za-z0-9][\\w.\\-]{0,63}" })),
      el("label", {}, "format", select("format", choices.format, "(the preset's, else openai)")),
      el("label", {}, "preset", select("preset", choices.preset, "(none)")),
      el("label", { class: "wide" }, "base URL", el("input", { name: "base_url", type: "url", placeholder: "https://host/v1" })),
      el("label", {}, "upstream key", el("input", { name: "api_key", type: "password", autocomplete: "off", placeholder: "sk-… or ${ENV_VAR}" })),
      el("label", { class: "wide" }, "models (comma separated)", el("input", { name: "models", type: "text" })),
      el("label", { class: "wide" }, "more settings: quirks, limits, prices (JSON, as the [providers.NAME] keys)",
        el("textarea", { name: "extra", rows: 3, spellcheck: "false", placeholder: '{"tool_call_content": "empty", "context_window": 32768}' })),
      el("button", { type: "submit", class: "primary" }, "Save"),
      el("button", { type: "button", id: "model-new", on: { click: () => edit(null) } }, "New"));
    let editing = null;  // the stored provider being edited: its shown table
    const edit = (p) => {
      editing = p;
      err.textContent = done.textContent = "";
      const t = p ? p.table : {};
      form.elements.name.value = p ? p.name : "";
      form.elements.name.readOnly = !!p;
      form.elements.format.value = t.format || "";
      form.elements.preset.value = t.preset || "";
      form.elements.base_url.value = t.base_url || "";
      form.elements.api_key.value = "";
      form.elements.api_key.placeholder = p && t.api_key ? "unchanged (type to replace)" : "sk-… or ${ENV_VAR}";
      form.elements.models.value = (t.models || []).join(", ");
      const extra = Object.fromEntries(Object.entries(t).filter(([k]) => !BASIC.includes(k)));
      form.elements.extra.value = Object.keys(extra).length ? JSON.stringify(extra) : "";
    };
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      err.textContent = done.textContent = "";
      let extra = {};
      try {
        extra = form.elements.extra.value.trim() ? JSON.parse(form.elements.extra.value) : {};
        if (typeof extra !== "object" || extra === null || Array.isArray(extra)) throw new Error("not an object");
      } catch (e) { err.textContent = `more settings: expected a JSON object (${e.message})`; return; }
      const f = form.elements;
      const table = { ...extra, format: f.format.value || null, preset: f.preset.value || null,
        base_url: f.base_url.value || null, models: f.models.value.split(",").map((m) => m.trim()).filter(Boolean) };
      if (f.api_key.value) table.api_key = f.api_key.value;
      try {
        let answer;
        if (editing) {
          // Only what changed goes back: what the page was shown masked (a URL's credentials, header values)
          // stays as stored.
          const was = editing.table;
          const changes = {};
          for (const [k, v] of Object.entries(table)) {
            const before = was[k] === undefined ? null : was[k];
            if (JSON.stringify(v) !== JSON.stringify(before)) changes[k] = v;
          }
          if (!f.models.value.trim() && !was.models) delete changes.models;
          for (const k of Object.keys(was)) if (!BASIC.includes(k) && !(k in extra)) changes[k] = null;
          answer = await api("PATCH", `/admin/providers/${encodeURIComponent(editing.name)}`, changes);
        } else {
          for (const k of Object.keys(table)) if (table[k] === null || (Array.isArray(table[k]) && !table[k].length)) delete table[k];
          answer = await api("POST", "/admin/providers", { name: f.name.value, ...table });
        }
        const saved = (answer.left_out
          ? `Saved ${f.name.value}, but this relay process leaves it out: ${answer.left_out}`
          : `Saved ${f.name.value}: served here now, by the other instances within a second.`) +
          (answer.note ? ` Note: it ${answer.note}.` : "");
        await load();
        edit(null);
        done.textContent = saved;
      } catch (e) { if (!(e instanceof Refused)) err.textContent = e.message; }
    });
    const load = async () => {
      const data = (await api("GET", "/admin/providers")).data;
      const models = (p) => (p.models || []).map((m) => m.id).join(", ");
      list.replaceChildren(...data.filter((p) => p.source === "store").map((p) => el("tr", { "data-name": p.name },
        el("td", {}, p.name), el("td", {}, p.format || (p.table && p.table.format) || ""), el("td", { class: "wrap" }, p.base_url || (p.table && p.table.base_url) || ""),
        el("td", { class: "wrap" }, models(p)), el("td", { class: p.error ? "error wrap" : "" }, p.error ? `left out: ${p.error}` : p.health.circuit),
        el("td", {}, el("button", { type: "button", "data-edit": p.name, on: { click: () => edit(p) } }, "Edit"), " ",
          el("button", { type: "button", "data-delete": p.name, on: { click: async () => {
            if (!confirm(`Delete ${p.name}?`)) return;
            try { await api("DELETE", `/admin/providers/${encodeURIComponent(p.name)}`); await load(); }
            catch (e) { if (!(e instanceof Refused)) err.textContent = e.message; }
          } } }, "Delete")))));
      fileList.replaceChildren(...data.filter((p) => p.source === "config").map((p) => el("tr", {},
        el("td", {}, p.name), el("td", {}, p.format), el("td", { class: "wrap" }, p.base_url), el("td", { class: "wrap" }, models(p)))));
    };
    root.append(el("h1", {}, "Custom models"),
      el("p", { class: "muted" }, "Add an endpoint of any format. It is checked as the config file is, kept in the store, and served by every instance within a second, no restart. Ask for it as provider/model or by a model name it lists. Upstream keys are never shown again; write ${VAR}, a variable [store] provider_env allows, to keep one in each instance's environment instead of the store."),
      form, err, done, el("h2", {}, "Stored"),
      el("table", {}, el("thead", {}, el("tr", {}, ["name", "format", "base URL", "models", "state", ""].map((h) => el("th", {}, h)))), list),
      el("h2", {}, "From the config file (read-only)"),
      el("table", {}, el("thead", {}, el("tr", {}, ["name", "format", "base URL", "models"].map((h) => el("th", {}, h)))), fileList));
    edit(null);
    await load();
    return null;
  },

  async routes(root) {
    const out = el("div", { id: "resolved" });
    const input = el("input", { name: "model", type: "text", required: true, placeholder: "a model id, e.g. claude-sonnet-4-5" });
    const row = (r) => el("tr", {}, el("td", { class: "wrap" }, r.model), r.error ? el("td", { class: "error" }, r.error)
      : el("td", { class: "wrap" }, r.targets.map((t) => t.target + (t.context_window ? ` (window ${num(t.context_window)})` : "")).join(" → ")));
    const form = el("form", { class: "inline", id: "resolve" }, el("label", {}, "resolve a model id as relay check does", input),
      el("button", { type: "submit", class: "primary" }, "Resolve"));
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const r = await api("GET", `/admin/resolve?model=${encodeURIComponent(input.value)}`);
      out.replaceChildren(el("table", { class: "kv" }, el("tbody", {}, row(r))));
    });
    const all = await api("GET", "/admin/resolve");
    const pairs = (obj) => Object.entries(obj).map(([k, v]) => el("tr", {}, el("td", { class: "wrap" }, k), el("td", { class: "wrap" }, v.join(" → "))));
    root.append(el("h1", {}, "Routes"), form, out, el("h2", {}, "Claude Code's tiers"),
      el("table", { class: "kv" }, el("tbody", {}, all.tiers.map(row))),
      el("h2", {}, "Routes"), el("table", { class: "kv" }, el("tbody", {}, pairs(all.routes))),
      el("h2", {}, "Aliases"), el("table", { class: "kv" }, el("tbody", {}, pairs(all.aliases))));
    return null;
  },

  async usage(root) {
    const since = new Date(Date.now() - 30 * 86400000).toISOString().slice(0, 10);
    const rows = (await api("GET", `/admin/usage?since=${since}`)).data;
    const cols = ["day", "key", "model", "requests", "refused", "input_tokens", "output_tokens", "cache_read", "cache_write", "cost_usd"];
    const cell = (v) => {
      // Text a spreadsheet would run as a formula (key names and model ids come from clients) starts with a quote.
      let t = String(v ?? "");
      if (typeof v === "string" && /^[=+\-@\t\r]/.test(t)) t = "'" + t;
      return /[",\n\r]/.test(t) ? `"${t.replace(/"/g, '""')}"` : t;
    };
    const csv = [cols.join(",")].concat(rows.map((r) => cols.map((c) => cell(r[c])).join(","))).join("\n");
    const link = el("a", { href: URL.createObjectURL(new Blob([csv + "\n"], { type: "text/csv" })), download: `relay-usage-${today()}.csv`, id: "csv" }, "Download CSV");
    const sum = (by) => {
      const out = new Map();
      for (const r of rows) {
        const t = out.get(by(r)) || { requests: 0, refused: 0, tokens: 0, cost: 0 };
        t.requests += r.requests; t.refused += r.refused; t.tokens += r.input_tokens + r.output_tokens; t.cost += r.cost_usd;
        out.set(by(r), t);
      }
      return out;
    };
    const days = [...sum((r) => r.day).entries()].sort(([a], [b]) => (a < b ? -1 : 1)).slice(-31);
    const keys = [...sum((r) => r.key).entries()].sort(([, a], [, b]) => b.cost - a.cost || b.tokens - a.tokens);
    const chart = (label, id, pairs, pick, format) => el("div", { class: "card", id },
      el("div", { class: "label" }, label), bars(pairs.map(([, t]) => pick(t)), pairs.map(([k]) => k), format),
      el("div", { class: "axis" }, el("span", {}, pairs.length ? pairs[0][0] : ""), el("span", {}, pairs.length ? pairs[pairs.length - 1][0] : "")));
    root.append(el("h1", {}, "Usage"), el("p", { class: "muted" }, `Per key, model and day (UTC) since ${since}, from the store: every instance. `, link),
      el("div", { class: "cards wide" },
        chart("spend per day", "chart-spend", days, (t) => t.cost, usd),
        chart("tokens per day (in + out)", "chart-tokens", days, (t) => t.tokens, (v) => num(v)),
        chart("spend per key", "chart-keys", keys, (t) => t.cost, usd)),
      el("h2", {}, "Per key"),
      el("table", { id: "usage-keys" }, el("thead", {}, el("tr", {}, ["key", "requests", "refused", "tokens", "cost"].map((c) => el("th", {}, c)))),
        el("tbody", {}, keys.map(([k, t]) => el("tr", {}, el("td", {}, k), el("td", {}, num(t.requests)), el("td", {}, num(t.refused)),
          el("td", {}, num(t.tokens)), el("td", {}, usd(t.cost)))))),
      el("h2", {}, "Per key, model and day"),
      el("table", {}, el("thead", {}, el("tr", {}, cols.map((c) => el("th", {}, c.replace(/_/g, " "))))),
        el("tbody", {}, rows.slice().reverse().map((r) => el("tr", {}, cols.map((c) => el("td", {}, c === "cost_usd" ? usd(r[c]) : r[c])))))));
    return null;
  },
};

// ---- shell ---------------------------------------------------------------------------------------

function showLogin(message) {
  clearInterval(timer);
  document.getElementById("page").hidden = true;
  document.getElementById("nav").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("login").hidden = false;
  document.getElementById("login-error").textContent = message || "";
}

async function show() {
  clearInterval(timer);
  if (!sessionStorage.getItem(KEY)) return showLogin("");
  const name = (location.hash || "#overview").slice(1);
  const page = pages[name] ? name : "overview";
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === page);
  const root = document.getElementById("page");
  try {
    const status = await api("GET", "/admin/status");
    const store = status.store;
    document.getElementById("instance").textContent = store ? `store ${store.up ? "up" : "down"} · ${store.instances ?? 1} instance(s)` : "no store";
  } catch (e) { if (e instanceof Refused) return; }
  document.getElementById("login").hidden = true;
  document.getElementById("nav").hidden = false;
  document.getElementById("logout").hidden = false;
  root.hidden = false;
  root.replaceChildren();
  root.dataset.page = page;
  try {
    const tick = await pages[page](root);
    if (tick) {
      const stale = el("p", { class: "error", id: "stale", role: "status" });
      root.prepend(stale);
      let last = new Date();
      timer = setInterval(() => tick().then(() => { last = new Date(); stale.textContent = ""; }).catch((e) => {
        if (!(e instanceof Refused)) stale.textContent = `Not updated since ${clock(last / 1000)}: ${e.message}`;
      }), POLL_MS);
    }
  } catch (e) {
    if (!(e instanceof Refused)) root.append(el("p", { class: "error" }, e.message));
  }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(KEY, document.getElementById("admin-key").value);
    document.getElementById("admin-key").value = "";
    show();
  });
  document.getElementById("logout").addEventListener("click", () => { sessionStorage.removeItem(KEY); showLogin(""); });
  window.addEventListener("hashchange", show);
  show();
});
