// trainfer's page: chat over /v1/chat/completions (streamed), the server's vitals from /vitals, and training
// runs from /ui/runs. No framework and no innerHTML anywhere: every piece of text (model output included) goes
// into the page as a text node, so an answer holding <script> or <img onerror> is shown, never run.
"use strict";

const TTFT_BAR_MS = 250; // "feels instant" is 200-300 ms; TTFT is colored against it
const VITALS_EVERY_MS = 1000;
const RUNS_EVERY_MS = 2000;
const MAX_RETRIES = 3; // for a 429, after the server's Retry-After
const COLORS = ["--c1", "--c2", "--c3", "--c4", "--c5", "--c6"];

const state = {
  info: { model: null, auth: false, runs: 0 },
  key: localStorage.getItem("trainfer.key") || "",
  messages: [], // the conversation sent with each request (system prompt added at send time)
  conversation: newConversationId(), // x-trainfer-affinity: a balancer keeps the conversation on one replica
  busy: null, // the AbortController of the answer in flight
  vitals: [],
  vitalsTimer: null,
  runs: [], // {summary, records, next, on}
  runsTimer: null,
};

const $ = (sel) => document.querySelector(sel);

// Random, so conversations spread over replicas (deploy/haproxy.cfg hashes it) while each stays on the one
// whose prefix cache holds its earlier turns.
function newConversationId() {
  return Array.from(crypto.getRandomValues(new Uint8Array(8)), (b) => b.toString(16).padStart(2, "0")).join("");
}

// An element with attributes and children; strings become text nodes (never parsed as HTML).
function h(tag, attrs = {}, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids) if (kid !== null && kid !== undefined) node.append(kid);
  return node;
}

// ---- Markdown, built as DOM nodes ------------------------------------------------------------------------

function renderMarkdown(src) {
  const out = document.createDocumentFragment();
  const lines = src.split("\n");
  const isList = (l) => /^\s*([-*+]|\d+[.)])\s+/.test(l);
  const isSpecial = (l) => /^\s*(```|~~~)/.test(l) || /^#{1,6}\s/.test(l) || isList(l) || /^\s*>/.test(l);
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*(```|~~~)\s*([\w+#.-]*)/);
    if (fence) {
      const body = [];
      i++;
      while (i < lines.length && !lines[i].trim().startsWith(fence[1])) body.push(lines[i++]);
      i++; // the closing fence (or the end of a still-streaming answer)
      const code = h("code", { text: body.join("\n") });
      if (fence[2]) code.className = "language-" + fence[2];
      out.append(h("pre", {}, code));
      continue;
    }
    if (!line.trim()) { i++; continue; }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      out.append(h("h" + Math.min(6, heading[1].length + 2), {}, inline(heading[2])));
      i++;
      continue;
    }
    if (isList(line)) {
      const ordered = /^\s*\d/.test(line);
      const list = h(ordered ? "ol" : "ul");
      while (i < lines.length && (isList(lines[i]) || (/^\s{2,}\S/.test(lines[i]) && list.lastChild))) {
        if (isList(lines[i])) list.append(h("li", {}, inline(lines[i].replace(/^\s*([-*+]|\d+[.)])\s+/, ""))));
        else list.lastChild.append(" ", inline(lines[i].trim()));
        i++;
      }
      out.append(list);
      continue;
    }
    if (/^\s*>/.test(line)) {
      const quoted = [];
      while (i < lines.length && /^\s*>/.test(lines[i])) quoted.push(lines[i++].replace(/^\s*>\s?/, ""));
      out.append(h("blockquote", {}, renderMarkdown(quoted.join("\n"))));
      continue;
    }
    const para = [];
    while (i < lines.length && lines[i].trim() && (para.length === 0 || !isSpecial(lines[i]))) para.push(lines[i++]);
    out.append(h("p", {}, inline(para.join("\n"))));
  }
  return out;
}

const INLINE = /`([^`\n]+)`|\*\*(.+?)\*\*|__(.+?)__|\*(\S(?:[^*\n]*?\S)?)\*|\[([^\]\n]+)\]\(([^)\s]+)\)/g;

function inline(text) {
  const out = document.createDocumentFragment();
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    out.append(text.slice(last, m.index));
    if (m[1] !== undefined) out.append(h("code", { text: m[1] }));
    else if (m[2] !== undefined || m[3] !== undefined) out.append(h("strong", {}, inline(m[2] ?? m[3])));
    else if (m[4] !== undefined) out.append(h("em", {}, inline(m[4])));
    else if (/^https?:\/\//i.test(m[6])) {
      out.append(h("a", { href: m[6], target: "_blank", rel: "noopener noreferrer nofollow" }, inline(m[5])));
    } else out.append(m[0]); // a javascript: or data: link stays text
    last = m.index + m[0].length;
  }
  out.append(text.slice(last));
  return out;
}

// ---- HTTP ------------------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, code, retryAfter) {
    super(message);
    Object.assign(this, { status, code, retryAfter });
  }
}

function headers(json) {
  const out = {};
  if (json) out["content-type"] = "application/json";
  if (state.key) out.authorization = "Bearer " + state.key;
  return out;
}

async function failure(res) {
  let message = res.statusText || "request failed", code = null;
  try {
    const body = await res.json();
    message = body.error?.message || message;
    code = body.error?.code || null;
  } catch { /* not JSON */ }
  return new ApiError(res.status, message, code, Number(res.headers.get("retry-after")) || 1);
}

async function getJSON(path) {
  const res = await fetch(path, { headers: headers(false) });
  if (!res.ok) throw await failure(res);
  return res.json();
}

// Server-sent events from a fetch body: the payload of each `data:` event.
async function* sseData(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let k;
    while ((k = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, k);
      buf = buf.slice(k + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (data) yield data;
    }
  }
}

// ---- chat ------------------------------------------------------------------------------------------------

function requestBody() {
  const num = (id) => $(id).value === "" ? null : Number($(id).value);
  const system = $("#system").value.trim();
  const body = {
    model: $("#model").value || undefined,
    messages: [...(system ? [{ role: "system", content: system }] : []), ...state.messages],
    stream: true,
    stream_options: { include_usage: true },
    temperature: num("#temperature") ?? 0.7,
    top_p: num("#top_p") ?? 1,
    max_tokens: num("#max_tokens") ?? 256,
  };
  const seed = num("#seed");
  if (seed !== null) body.seed = seed;
  const strategy = $("#strategy").value;
  if (strategy) body.test_time = { strategy, n: num("#tt_n") ?? 8 };
  return body;
}

function addMessage(role, text) {
  const body = h("div", { class: "body" });
  if (role === "user") body.textContent = text;
  else body.append(renderMarkdown(text));
  const node = h("div", { class: "msg " + role }, body);
  $("#messages").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

function setBusy(controller) {
  state.busy = controller;
  $("#send").disabled = Boolean(controller);
  $("#stop").disabled = !controller;
}

async function send() {
  const text = $("#input").value;
  if (!text.trim() || state.busy) return;
  $("#input").value = "";
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  await answer(0);
}

async function answer(attempt) {
  const node = addMessage("assistant", "");
  node.dataset.state = "streaming";
  const body = node.querySelector(".body");
  const controller = new AbortController();
  setBusy(controller);
  const started = performance.now();
  let first = null, last = null, text = "", usage = null, cache = null, route = null, testTime = null, pending = false;
  let chunks = 0;
  node.append(h("div", { class: "stats" }));
  const live = () => ({
    started, first, last, usage, cache, route, testTime, chunks, stopped: node.dataset.state === "stopped",
  });
  const paint = () => {
    pending = false;
    body.replaceChildren(renderMarkdown(text));
    // TTFT as soon as the first token is in, tokens/s as they come
    node.querySelector(".stats").replaceWith(stats(live(), node));
    node.scrollIntoView({ block: "end" });
  };
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { ...headers(true), "x-trainfer-affinity": state.conversation },
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!res.ok) throw await failure(res);
    cache = res.headers.get("x-trainfer-response-cache");
    route = res.headers.get("x-trainfer-route") && {
      who: res.headers.get("x-trainfer-route"), why: res.headers.get("x-trainfer-route-reason"),
    };
    let ended = false;
    for await (const data of sseData(res.body)) {
      if (data === "[DONE]") { ended = true; break; }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      if (chunk.test_time) testTime = chunk.test_time;
      const delta = chunk.choices?.[0]?.delta?.content;
      if (delta) {
        const now = performance.now();
        first ??= now;
        last = now;
        text += delta;
        chunks += 1;
        node.dataset.chunks = String(chunks);
        if (!pending) { pending = true; requestAnimationFrame(paint); }
      }
    }
    if (!ended) throw new TypeError("the stream closed before its end");
    node.dataset.state = "done";
  } catch (e) {
    if (e.name === "AbortError") node.dataset.state = "stopped";
    else {
      node.remove();
      setBusy(null);
      // A stream cut mid-answer (the server died; a balancer cannot retry an answer under way) is not a finished
      // answer: say so, and keep the question for sending again.
      const cut = chunks > 0 && !(e instanceof ApiError);
      return failed(cut ? new ApiError(0, `the answer was cut off after ${chunks} tokens (the server stopped ` +
        "mid-answer); send the question again") : e, attempt);
    }
  } finally {
    setBusy(null);
  }
  paint();
  if (text) state.messages.push({ role: "assistant", content: text });
}

function stats(s, node) {
  const parts = [];
  if (s.first !== null) {
    const ttft = s.first - s.started;
    node.dataset.ttftMs = ttft.toFixed(1);
    const grade = ttft <= TTFT_BAR_MS ? "good" : ttft <= 4 * TTFT_BAR_MS ? "warn" : "bad";
    parts.push(h("span", { class: "ttft", title: `time to first token; under ${TTFT_BAR_MS} ms feels instant` },
      "TTFT ", h("b", { class: grade, text: `${ttft.toFixed(0)} ms` })));
  }
  const tokens = s.usage?.completion_tokens ?? s.chunks; // a streamed chunk holds a token's text, about one each
  if (tokens) {
    parts.push(h("span", { class: "tokens", text: `${tokens} tokens` }));
    if (tokens > 1 && s.last > s.first) {
      const rate = (tokens - 1) / ((s.last - s.first) / 1000);
      node.dataset.tokensPerS = rate.toFixed(2);
      parts.push(h("span", { class: "rate", text: `${rate.toFixed(1)} tok/s` }));
    }
  }
  if (s.cache === "hit") parts.push(h("span", { class: "cache good", text: "response cache hit" }));
  else {
    const cached = s.usage?.prompt_tokens_details?.cached_tokens;
    if (cached !== undefined) {
      parts.push(h("span", { class: "cache", text: `prefix cache ${cached}/${s.usage.prompt_tokens} prompt tokens` }));
    }
  }
  if (s.route) { // serve --upstream: who answered, and why
    node.dataset.route = s.route.who;
    parts.push(h("span", { class: "route", text: `answered ${s.route.who === "upstream" ? "upstream" : "locally"} (${s.route.why})` }));
  }
  if (s.testTime) {
    const c = s.testTime.compute || {};
    parts.push(h("span", { class: "test-time",
      text: `${s.testTime.strategy}: answer ${s.testTime.answer ?? "(none)"}, ${c.samples ?? "?"} samples` }));
  }
  if (s.stopped) parts.push(h("span", { class: "warn", text: "stopped" }));
  return h("div", { class: "stats" }, ...parts);
}

// A readable error in the chat: what happened and what to do; a 429 retries after the server's Retry-After.
function failed(e, attempt) {
  let text = e.message;
  if (e.status === 401) {
    text = "This server needs an API key: enter it under Settings, then send again.";
    $("#settings").open = true;
    $("#api_key").focus();
  } else if (e.code === "context_length_exceeded") {
    text = `The conversation is too long for this model's context (${e.message}). Start a new chat or shorten it.`;
  } else if (e.status === 429 && attempt < MAX_RETRIES) {
    return retryLater(e, attempt);
  } else if (e.status === 429) {
    text = `The server is busy (429) after ${MAX_RETRIES} retries; try again shortly.`;
  } else if (e.status) {
    text = `Error ${e.status}: ${e.message}`;
  } else {
    text = `The request failed: ${e.message}`;
  }
  state.messages.pop(); // the question stays on screen; it was not answered, so it is not context
  const node = addMessage("assistant", "");
  node.classList.add("error");
  node.dataset.status = String(e.status || 0);
  node.querySelector(".body").append(h("span", { class: "err", text }));
}

function retryLater(e, attempt) {
  const node = addMessage("assistant", "");
  node.classList.add("error");
  node.dataset.status = "429";
  const line = h("span", { class: "warn" });
  node.querySelector(".body").append(line);
  let left = Math.max(1, e.retryAfter);
  const tick = () => {
    line.textContent = `The server is at capacity (429); retrying in ${left} s (attempt ${attempt + 1} of ${MAX_RETRIES})`;
    if (left-- > 0) return setTimeout(tick, 1000);
    node.remove();
    answer(attempt + 1);
  };
  tick();
}

function stop() {
  if (state.busy) state.busy.abort(); // closes the stream; the server aborts the sequence on disconnect
}

function newChat() {
  stop();
  state.messages = [];
  state.conversation = newConversationId();
  $("#messages").replaceChildren();
  $("#input").focus();
}

async function loadModels() {
  try {
    const { data } = await getJSON("/v1/models");
    const select = $("#model");
    select.replaceChildren(...data.map((m) => h("option", { value: m.id, text: m.parent ? `${m.id} (adapter)` : m.id })));
  } catch (e) {
    if (e.status === 401) $("#model").replaceChildren(h("option", { value: "", text: "(enter the API key)" }));
  }
}

// ---- charts (SVG) ----------------------------------------------------------------------------------------

function niceTicks(lo, hi, count = 5) {
  if (!(hi > lo)) { hi = lo + 1; }
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

function fmt(v) {
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(1);
  return Number(v.toPrecision(4)).toString();
}

// One figure: series [{label, color, points: [[x, y], ...], dash, width}], opts {refY, refLabel, xLabel, yMin}.
function chart(id, title, series, opts = {}) {
  const W = 560, H = 200, L = 52, R = 10, T = 8, B = 26;
  const pts = series.flatMap((s) => s.points);
  const caption = h("figcaption", { text: title }, opts.xLabel ? h("span", { class: "muted", text: ` by ${opts.xLabel}` }) : null);
  const fig = h("figure", { "data-chart": id }, caption);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  const add = (tag, attrs, text) => {
    const n = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    svg.append(n);
    return n;
  };
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("class", "chart");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", title);
  fig.append(svg);
  if (!pts.length) {
    add("text", { x: W / 2, y: H / 2, "text-anchor": "middle" }, "no data yet");
    return fig;
  }
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  const ys = pts.map((p) => p[1]).concat(opts.refY !== undefined ? [opts.refY] : []);
  let [y0, y1] = [opts.yMin ?? Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) {
    if (opts.yMin !== undefined) y1 = y0 + (Math.abs(y0) || 1);
    else { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  }
  const pad = (y1 - y0) * 0.05;
  y1 += pad;
  if (opts.yMin === undefined) y0 -= pad;
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => H - B - ((y - y0) / (y1 - y0)) * (H - T - B);
  for (const t of niceTicks(y0, y1, 4)) {
    add("line", { x1: L, x2: W - R, y1: Y(t), y2: Y(t), class: "axis", "stroke-opacity": 0.5 });
    add("text", { x: L - 4, y: Y(t) + 4, "text-anchor": "end" }, fmt(t));
  }
  for (const t of niceTicks(x0, x1, 5)) add("text", { x: X(t), y: H - 8, "text-anchor": "middle" }, fmt(t));
  add("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" });
  if (opts.refY !== undefined) {
    add("line", { x1: L, x2: W - R, y1: Y(opts.refY), y2: Y(opts.refY), class: "ref" });
    add("text", { x: W - R, y: Y(opts.refY) - 3, "text-anchor": "end" }, opts.refLabel || "");
  }
  const legend = h("div", { class: "legend" });
  for (const s of series) {
    if (!s.points.length) continue;
    const color = `var(${s.color})`;
    add("polyline", {
      points: s.points.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" "),
      style: `stroke: ${color}`, "stroke-dasharray": s.dash || "", "stroke-width": s.width || 1.6,
      "data-series": s.label, "data-count": s.points.length,
    });
    if (s.points.length <= 60 && s.markers) {
      for (const p of s.points) add("circle", { cx: X(p[0]), cy: Y(p[1]), r: 2.5, style: `fill: ${color}` });
    }
    const sample = h("i");
    sample.style.background = color;
    legend.append(h("span", {}, sample, s.label));
  }
  fig.append(legend);
  return fig;
}

// ---- vitals ----------------------------------------------------------------------------------------------

async function pollVitals() {
  try {
    const since = state.vitals.length ? state.vitals[state.vitals.length - 1].t : 0;
    const v = await getJSON("/vitals?since=" + since);
    state.vitals = state.vitals.concat(v.history).slice(-300);
    drawVitals(v);
  } catch (e) {
    $("#vitals-note").textContent = "vitals unavailable: " + e.message;
  }
}

// serve --upstream: the share of answers the upstream gave since the server started, and the policy.
function routeCard(route, card) {
  const sum = (o) => Object.values(o).reduce((a, b) => a + b, 0);
  const up = sum(route.upstream), total = up + sum(route.local);
  const share = total ? `${((100 * up) / total).toFixed(0)}%` : "-";
  return card("route", share, `forwarded upstream (${up} of ${total}, ${route.policy})`);
}

// serve --draft: the share of guesses the model kept, tokens per checking forward, and the share kept by position.
function speculationCard(spec, card, pct) {
  const at = spec.kept_at_position.map((x) => pct(x)).join(", ");
  return card("speculation", pct(spec.acceptance),
    `${spec.draft} guesses kept (${spec.tokens_per_forward.toFixed(2)} tokens a check; by position ${at})`);
}

function drawVitals(v) {
  const hist = state.vitals;
  const now = hist.length ? hist[hist.length - 1] : null;
  const pct = (x) => (x === null || x === undefined ? "-" : `${(100 * x).toFixed(0)}%`);
  const ms = (x) => (x === null || x === undefined ? "-" : `${x.toFixed(0)} ms`);
  const card = (key, value, label, cls) => h("div", { class: "card", "data-vital": key },
    h("div", { class: "v " + (cls || ""), text: value }), h("div", { class: "k", text: label }));
  const ttftGrade = now && now.ttft_p50_ms !== null ? (now.ttft_p50_ms <= TTFT_BAR_MS ? "good" : "warn") : "";
  $("#vital-cards").replaceChildren(
    card("running", now ? String(now.running) : "-", `running (of ${v.max_num_seqs})`),
    card("waiting", now ? String(now.waiting) : "-", "waiting"),
    card("kv", now ? pct(now.kv_cache_usage) : "-", `KV cache used (${v.kv_cache_blocks} blocks)`),
    card("tokens_per_s", now ? now.tokens_per_s.toFixed(1) : "-", "generated tokens/s"),
    card("ttft", now ? ms(now.ttft_p50_ms) : "-", `TTFT p50 (p90 ${now ? ms(now.ttft_p90_ms) : "-"})`, ttftGrade),
    card("tpot", now ? ms(now.tpot_p50_ms) : "-", `TPOT p50 (p99 ${now ? ms(now.tpot_p99_ms) : "-"})`),
    card("prefix", now ? pct(now.prefix_cache_hit_rate) : "-", "prefix cache hits"),
    card("response", now ? pct(now.response_cache_hit_rate) : "-", "response cache hits"),
    card("finished", now ? String(now.finished) : "-", `answers in the last ${v.window_s} s`),
    ...(v.route ? [routeCard(v.route, card)] : []),
    ...(v.speculation ? [speculationCard(v.speculation, card, pct)] : []),
  );
  const t = now ? now.t : 0;
  const line = (key, label, color, scale = 1) => ({
    label, color, points: hist.filter((p) => p[key] !== null).map((p) => [p.t - t, p[key] * scale]),
  });
  $("#vital-charts").replaceChildren(
    chart("sequences", "Sequences", [line("running", "running", "--c1"), line("waiting", "waiting", "--c2")],
      { xLabel: "seconds ago", yMin: 0 }),
    chart("throughput", "Generated tokens/s", [line("tokens_per_s", "tokens/s", "--c3")], { xLabel: "seconds ago", yMin: 0 }),
    chart("ttft", `Time to first token (ms, last ${v.window_s} s)`,
      [line("ttft_p50_ms", "p50", "--c1"), line("ttft_p90_ms", "p90", "--c2"), line("ttft_p99_ms", "p99", "--c5")],
      { xLabel: "seconds ago", yMin: 0, refY: TTFT_BAR_MS, refLabel: `${TTFT_BAR_MS} ms` }),
    chart("tpot", `Time per output token (ms, last ${v.window_s} s)`,
      [line("tpot_p50_ms", "p50", "--c1"), line("tpot_p90_ms", "p90", "--c2"), line("tpot_p99_ms", "p99", "--c5")],
      { xLabel: "seconds ago", yMin: 0 }),
    chart("caches", "KV cache use and cache hit rates (%)", [
      line("kv_cache_usage", "KV cache used", "--c4", 100),
      line("prefix_cache_hit_rate", "prefix hits", "--c6", 100),
      line("response_cache_hit_rate", "response hits", "--c3", 100),
    ], { xLabel: "seconds ago", yMin: 0 }),
  );
  $("#vitals-note").textContent = `${v.model}: one point a second, the last ${hist.length} s; ` +
    `${v.inflight} sequences admitted of ${v.capacity}.`;
}

// ---- training runs ---------------------------------------------------------------------------------------

async function pollRuns() {
  try {
    if (!state.runs.length) {
      const { runs } = await getJSON("/ui/runs");
      state.runs = runs.map((summary, i) => ({ summary, records: [], next: 0, on: i < 6 }));
      drawRunList();
    }
    for (const run of state.runs.filter((r) => r.on)) {
      for (;;) { // page through until the run's records are all here
        const got = await getJSON(`/ui/run?i=${run.summary.id}&after=${run.next}`);
        if (got.reset) run.records = [];
        run.records = run.records.concat(got.records);
        run.summary = got.run;
        const more = got.next > run.next && got.records.length >= 5000;
        run.next = got.next;
        if (!more) break;
      }
    }
    drawRuns();
  } catch (e) {
    $("#run-charts").replaceChildren(h("p", { class: "err", text: "runs unavailable: " + e.message }));
  }
}

function drawRunList() {
  const list = $("#run-list");
  if (!state.runs.length) {
    list.replaceChildren(h("p", { class: "muted",
      text: "No training runs here: start `trainfer ui RUN_DIR...`, or `trainfer serve MODEL --run RUN_DIR`." }));
    return;
  }
  list.replaceChildren(...state.runs.map((run, i) => h("label", {},
    h("input", { type: "checkbox", checked: run.on, "data-run": i, onchange: (e) => {
      run.on = e.target.checked;
      pollRuns();
    } }), " ", run.summary.name)));
}

function drawRuns() {
  const shown = state.runs.filter((r) => r.on);
  // One run: a color per curve. Several: a color per run, the curves of a run told apart by dash and width.
  const series = (key, kind, opts = {}) => shown.map((run) => ({
    label: (shown.length > 1 ? run.summary.name + " " : "") + kind,
    color: shown.length > 1 || !opts.color ? COLORS[state.runs.indexOf(run) % COLORS.length] : opts.color,
    dash: opts.dash, width: opts.width, markers: opts.markers,
    points: run.records.filter((r) => typeof r[key] === "number" && (!opts.event || r.event === opts.event))
      .map((r) => [r.step, r[key]]),
  }));
  const kinds = (arr) => arr.flat();
  $("#run-charts").replaceChildren(
    chart("loss", "Loss (nats/token)", kinds([
      series("loss", "train (batch)", { width: 1, color: "--c1" }),
      series("train_eval_loss", "train (eval)", { dash: "5 3", markers: true, color: "--c3" }),
      series("val_loss", "held-out", { markers: true, width: 2.2, color: "--c2" }),
    ]), { xLabel: "step" }),
    chart("bpb", "Held-out bits per byte", series("val_bpb", "bits/byte", { markers: true }), { xLabel: "step" }),
    chart("lr", "Learning rate", series("lr", "lr"), { xLabel: "step", yMin: 0 }),
    chart("tokens_per_s", "Training tokens/s", series("tokens_per_s", "tokens/s"), { xLabel: "step", yMin: 0 }),
  );
  drawEvals(shown);
}

// The evaluations of each shown run: losses, the memorization probe when logged, and the sample.
function drawEvals(shown) {
  const blocks = [];
  for (const run of shown) {
    const evals = run.records.filter((r) => r.event === "eval");
    if (!evals.length) continue;
    const probe = evals.some((r) => r.probe_train_exact !== undefined);
    const num = (v, d = 4) => (typeof v === "number" ? v.toFixed(d) : "-");
    const pc = (v) => (typeof v === "number" ? `${(100 * v).toFixed(1)}%` : "-");
    const head = ["step", "train loss", "held-out loss", "gap", "bits/byte"]
      .concat(probe ? ["exact train", "exact held-out"] : [], ["sample"]);
    const rows = evals.slice().reverse().map((r) => h("tr", {},
      h("td", { text: String(r.step) }), h("td", { text: num(r.train_eval_loss) }), h("td", { text: num(r.val_loss) }),
      h("td", { text: num(r.gap) }), h("td", { text: num(r.val_bpb, 3) }),
      ...(probe ? [h("td", { text: pc(r.probe_train_exact) }), h("td", { text: pc(r.probe_val_exact) })] : []),
      h("td", {}, h("pre", { text: r.sample ?? "" }))));
    blocks.push(h("h3", { text: `${run.summary.name}: ${evals.length} evaluations` + (run.summary.finished ? "" : " (running)") }),
      h("table", { "data-run": run.summary.name }, h("thead", {}, h("tr", {}, ...head.map((t) => h("th", { text: t })))),
        h("tbody", {}, ...rows)));
  }
  $("#run-evals").replaceChildren(...blocks);
}

// ---- views, theme, keys ----------------------------------------------------------------------------------

function show(view) {
  const views = ["chat", "vitals", "runs"].filter((v) => !$("#tab-" + v).classList.contains("off"));
  if (!views.includes(view)) view = views[0];
  for (const v of ["chat", "vitals", "runs"]) {
    $("#view-" + v).hidden = v !== view;
    if (v === view) $("#tab-" + v).setAttribute("aria-current", "page");
    else $("#tab-" + v).removeAttribute("aria-current");
  }
  clearInterval(state.vitalsTimer);
  clearInterval(state.runsTimer);
  if (view === "vitals") {
    pollVitals();
    state.vitalsTimer = setInterval(pollVitals, VITALS_EVERY_MS);
  } else if (view === "runs") {
    pollRuns();
    state.runsTimer = setInterval(pollRuns, RUNS_EVERY_MS);
  } else {
    $("#input").focus();
  }
}

function setTheme(theme) {
  document.documentElement.dataset.theme = theme;
  localStorage.setItem("trainfer.theme", theme);
}

async function start() {
  const saved = localStorage.getItem("trainfer.theme");
  setTheme(saved || (matchMedia("(prefers-color-scheme: dark)").matches ? "dark" : "light"));
  $("#theme").addEventListener("click", () =>
    setTheme(document.documentElement.dataset.theme === "dark" ? "light" : "dark"));
  if (matchMedia("(max-width: 760px)").matches) $("#settings").open = false;
  $("#api_key").value = state.key;
  $("#api_key").addEventListener("change", (e) => {
    state.key = e.target.value.trim();
    localStorage.setItem("trainfer.key", state.key);
    loadModels();
  });
  $("#composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("#input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") stop(); });
  $("#stop").addEventListener("click", stop);
  $("#new-chat").addEventListener("click", newChat);
  try {
    state.info = await getJSON("/ui/info");
  } catch { /* an older server: assume a model */ }
  if (!state.info.model) {
    $("#tab-chat").classList.add("off");
    $("#tab-vitals").classList.add("off");
  } else {
    $("#model-name").textContent = state.info.model;
    loadModels();
  }
  if (!state.info.runs) $("#tab-runs").classList.add("off");
  window.addEventListener("hashchange", () => show(location.hash.slice(1)));
  show(location.hash.slice(1));
  document.body.dataset.ready = "1";
}

window.trainfer = { renderMarkdown, state }; // for the page's own tests
start();
