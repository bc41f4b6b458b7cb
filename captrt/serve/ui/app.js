// The page of `captrt serve`: caption images through this origin's API and show, word by word,
// where the model looked (the attention maps the API returns with attention=true) and how sure it
// was of each word (the log-probabilities it returns with return_scores=true), with the n-best list.
// Text from the API is only ever inserted as text (textContent), never as HTML.

const KEY_STORE = "captrt.apiKey";  // sessionStorage: this tab only, never a cookie or a URL
const PLAY_MS = 800;

// The decoding fields of POST /v1/captions offered in the form: one entry per parameter, `value`
// being the API's default (a field left at it is not sent). limit(model) gives the bounds the
// served model allows, once /v1/model has answered.
const FIELDS = [
  { name: "beam_size", label: "Beam size", type: "number", value: 5, min: 1,
    limit: (model) => ({ max: model.max_beam }) },
  { name: "num_hypotheses", label: "Number of alternatives", type: "number", value: 1, min: 1,
    limit: (model) => ({ max: model.max_beam }) },
  { name: "suppress", label: "Suppressed words", type: "text", value: "", placeholder: "space-separated" },
  { name: "min_length", label: "Min length", type: "number", value: 0, min: 0,
    limit: (model) => ({ max: model.max_steps_cap ? model.max_steps_cap - 1 : undefined }) },
];
const LOW_CONFIDENCE = 0.5;  // words the model gave less than this probability are flagged

const $ = (selector, root = document) => root.querySelector(selector);
const results = new Set();
let model = null;

// ------------------------------------------------------------------------------------- the API
function errorText(body, res) {
  if (body && typeof body.detail === "string") return body.detail;
  if (body && Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("; ");
  return `the service answered HTTP ${res.status} ${res.statusText}`.trim();
}

// fetch on this origin with the API key, if one was given -> {ok, status, body, message}.
async function api(path, init = {}) {
  const headers = new Headers(init.headers);
  const key = sessionStorage.getItem(KEY_STORE);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let res;
  try {
    res = await fetch(path, { ...init, headers, credentials: "omit", cache: "no-store" });
  } catch (err) {
    return { ok: false, status: 0, body: null, message: `cannot reach the service (${err.message})` };
  }
  const body = await res.json().catch(() => null);
  const message = res.ok ? "" : errorText(body, res);
  if (res.status === 401) askForKey(message);
  return { ok: res.ok, status: res.status, body, message };
}

// ------------------------------------------------------------------------------------- the key
function askForKey(message) {
  sessionStorage.removeItem(KEY_STORE);
  $("#key-message").textContent = `This service needs an API key. The service says: ${message}`;
  const form = $("#key-form");
  if (form.hidden) {
    form.hidden = false;
    $("#key").focus();
  }
}

function useKey(event) {
  event.preventDefault();
  const input = $("#key");
  sessionStorage.setItem(KEY_STORE, input.value.trim());
  input.value = "";
  $("#key-form").hidden = true;
  loadModel();
}

// ------------------------------------------------------------------------------------ the model
function verifiedText(verification) {
  const status = verification?.status ?? "unknown";
  if (status === "exact") return "yes (fp32 as exported)";
  if (status === "verified") return `yes (within the quality budget${verification.source ? `, ${verification.source}` : ""})`;
  return `no (${status})`;
}

function showModel(info) {
  const rows = [["Model", info.id], ["Engine", `${info.engine} on ${info.device} (${info.provider})`],
    ["Precision", info.precision], ["Verified", verifiedText(info.verification)]];
  const list = document.createElement("dl");
  for (const [term, value] of rows) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = value;
    list.append(dt, dd);
  }
  $("#model").replaceChildren(list);
}

async function loadModel() {
  const r = await api("/v1/model");
  if (r.ok) {
    model = r.body;
    showModel(model);
    applyLimits();
    return;
  }
  const panel = document.createElement("p");
  panel.textContent = `Model: not available (${r.message}).`;
  $("#model").replaceChildren(panel);
  if (r.status === 503) setTimeout(loadModel, 1000);  // still loading
}

// ------------------------------------------------------------------------------------- the form
function buildFields() {
  const box = $("#fields");
  for (const field of FIELDS) {
    const wrap = document.createElement("div");
    const label = document.createElement("label");
    const input = document.createElement("input");
    wrap.className = "field";
    label.htmlFor = input.id = `field-${field.name}`;
    label.textContent = field.label;
    input.name = field.name;
    input.type = field.type;
    input.value = String(field.value);
    if (field.min !== undefined) input.min = String(field.min);
    if (field.placeholder) input.placeholder = field.placeholder;
    if (field.type === "text") {
      input.autocomplete = "off";
      input.spellcheck = false;
    }
    wrap.append(label, input);
    box.append(wrap);
  }
}

function applyLimits() {
  for (const field of FIELDS) {
    const input = $(`#field-${field.name}`);
    for (const [attr, value] of Object.entries(field.limit?.(model) ?? {})) {
      if (value === undefined || value === null) continue;
      input[attr] = String(value);
      if (attr === "max" && Number(input.value) > value) input.value = String(value);
    }
  }
}

// [name, value] of every form field to send: one that is empty or at the API's default is left out.
function fieldValues() {
  const out = [];
  for (const field of FIELDS) {
    const value = $(`#field-${field.name}`).value.trim();
    const atDefault = value === String(field.value) || (field.type === "number" && Number(value) === field.value);
    if (value !== "" && !atDefault) out.push([field.name, value]);
  }
  return out;
}

// A log-probability from the API -> the probability as 2 decimals ("0.83"); null is -inf (a banned word).
function confidence(logp) {
  return (typeof logp === "number" ? Math.exp(logp) : 0).toFixed(2);
}

function opacity() {
  return Number($("#opacity").value) / 100;
}

// ---------------------------------------------------------------------------------- attention
// One (grid, grid) map, min-max scaled to grey levels like the seed's figure, drawn on `canvas` at
// the size it is shown and upsampled smoothly by the canvas (as the seed's pyramid_expand does).
function drawMap(canvas, map, alpha) {
  const width = Math.round(canvas.clientWidth * devicePixelRatio) || 256;
  const height = Math.round(canvas.clientHeight * devicePixelRatio) || 256;
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  if (!map) return;
  const rows = map.length;
  const cols = map[0].length;
  const values = map.flat();
  const low = Math.min(...values);
  const span = Math.max(...values) - low || 1;
  const small = document.createElement("canvas");
  small.width = cols;
  small.height = rows;
  const smallCtx = small.getContext("2d");
  const pixels = smallCtx.createImageData(cols, rows);
  values.forEach((v, i) => {
    const grey = Math.round((255 * (v - low)) / span);
    pixels.data.set([grey, grey, grey, 255], 4 * i);
  });
  smallCtx.putImageData(pixels, 0, 0);
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = "high";
  ctx.globalAlpha = alpha;
  ctx.drawImage(small, 0, 0, width, height);
}

// -------------------------------------------------------------------------------- one result
class Result {
  constructor(file) {
    this.node = $("#result-template").content.firstElementChild.cloneNode(true);
    this.name = file.name;
    this.img = $(".preview", this.node);
    this.canvas = $(".overlay", this.node);
    this.words = [];
    this.maps = [];
    this.selected = -1;
    this.timer = null;
    const url = URL.createObjectURL(file);
    const done = () => URL.revokeObjectURL(url);
    this.img.addEventListener("load", done, { once: true });
    this.img.addEventListener("error", () => { done(); this.node.classList.add("no-preview"); }, { once: true });
    this.img.alt = `${file.name}: being captioned`;
    this.img.src = url;
    $(".name", this.node).textContent = file.name;
    $(".meta", this.node).textContent = "Captioning…";
    $(".play", this.node).addEventListener("click", () => this.togglePlay());
    $("#results").append(this.node);
  }

  fail(message) {
    const error = $(".error", this.node);
    error.textContent = message;
    error.hidden = false;
    this.img.alt = `${this.name}: not captioned`;
    $(".meta", this.node).textContent = "";
    this.node.classList.add("failed");
  }

  show(entry, latencyMs) {
    const caption = $(".caption", this.node);
    const words = entry.caption ? entry.caption.split(" ") : [];
    // one log-prob per word, then <end>'s when finished; absent when the service returns no scores
    const scores = entry.token_scores ?? entry.hypotheses?.[0]?.token_scores ?? null;
    this.maps = entry.attention ?? [];
    words.forEach((word, i) => {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "word";
      button.dataset.testid = "word";
      button.textContent = word;
      button.setAttribute("aria-pressed", "false");
      if (Array.isArray(scores) && i < scores.length) this.markConfidence(button, word, confidence(scores[i]));
      const pick = () => { this.stop(); this.select(i); };
      button.addEventListener("mouseenter", pick);
      button.addEventListener("focus", pick);
      if (i > 0) caption.append(" ");
      caption.append(button);
      this.words.push(button);
    });
    this.img.alt = entry.caption || "(no words)";
    const score = typeof entry.score === "number" ? `, score ${entry.score.toFixed(2)}` : "";
    const unfinished = entry.finished === false ? ", stopped at max_steps" : "";
    $(".meta", this.node).textContent = `latency ${latencyMs.toFixed(0)} ms${score}${unfinished}`;
    $(".play", this.node).hidden = this.maps.length === 0;
    $(".legend", this.node).hidden = !Array.isArray(scores) || words.length === 0;
    this.showHypotheses(entry.hypotheses);
  }

  // The word's probability: data-confidence, a band 0..9 the stylesheet shades the underline by (no
  // inline style: the CSP refuses it), a flag below LOW_CONFIDENCE, and the same in words for everyone.
  markConfidence(button, word, value) {
    const p = Number(value);
    button.dataset.confidence = value;
    button.dataset.band = String(Math.min(9, Math.floor(p * 10)));
    button.classList.toggle("unsure", p < LOW_CONFIDENCE);
    const label = `${word}, confidence ${value}${p < LOW_CONFIDENCE ? " (low)" : ""}`;
    button.setAttribute("aria-label", label);
    button.title = label;
  }

  // The n-best list, when more than one hypothesis came back: [{caption, score, ...}, ...], the first
  // being the caption shown above. Score: the hypothesis's log-probability (null: -inf).
  showHypotheses(hypotheses) {
    if (!Array.isArray(hypotheses) || hypotheses.length < 2) return;
    const list = $(".hypotheses", this.node);
    for (const h of hypotheses) {
      const item = document.createElement("li");
      const text = document.createElement("span");
      const score = document.createElement("span");
      item.dataset.testid = "hypothesis";
      text.className = "hyp-caption";
      text.textContent = h.caption || "(no words)";
      score.className = "hyp-score";
      score.textContent = typeof h.score === "number" ? h.score.toFixed(2) : "-inf";
      score.title = "log-probability";
      item.append(text, " ", score);
      if (h.finished === false) item.append(" (unfinished)");
      list.append(item);
    }
    $(".alternatives", this.node).hidden = false;
  }

  select(i) {
    this.words.forEach((b, j) => b.setAttribute("aria-pressed", String(i === j)));
    this.selected = i;
    this.draw();
  }

  draw() {
    drawMap(this.canvas, this.maps[this.selected], opacity());
  }

  togglePlay() {
    if (this.timer !== null) return this.stop();
    let i = 0;
    this.select(i);
    this.setPlaying(true);
    this.timer = setInterval(() => {
      i += 1;
      if (i >= this.words.length) this.stop();
      else this.select(i);
    }, PLAY_MS);
  }

  stop() {
    if (this.timer === null) return;
    clearInterval(this.timer);
    this.timer = null;
    this.setPlaying(false);
  }

  setPlaying(on) {
    const button = $(".play", this.node);
    button.textContent = on ? "Pause" : "Play";
  }
}

async function caption(file) {
  const result = new Result(file);
  results.add(result);
  const form = new FormData();
  for (const [name, value] of fieldValues()) form.append(name, value);
  form.append("attention", "true");
  form.append("return_scores", "true");  // each word's confidence
  form.append("image", file, file.name);
  const r = await api("/v1/captions", { method: "POST", body: form });
  if (!r.ok) return result.fail(r.message);
  const entry = r.body.captions[0];
  if (entry.error) return result.fail(entry.error);
  result.show(entry, r.body.latency_ms);
}

function captionAll(files) {
  for (const file of files) caption(file);
}

// ---------------------------------------------------------------------------------- start-up
function start() {
  buildFields();
  $("#options").addEventListener("submit", (e) => e.preventDefault());
  const redraw = () => results.forEach((r) => r.draw());
  $("#opacity").addEventListener("input", redraw);
  window.addEventListener("resize", redraw);
  $("#key-form").addEventListener("submit", useKey);
  const input = $("#file");
  input.addEventListener("change", () => {
    const files = [...input.files];
    input.value = "";  // choosing the same file again is a new change
    captionAll(files);
  });
  // Anywhere on the page: a drop that misses the zone must not navigate away to the file.
  const drop = $("#drop");
  document.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  document.addEventListener("dragleave", () => drop.classList.remove("over"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    captionAll(e.dataTransfer.files);
  });
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files ?? [])];
    if (files.length) captionAll(files);
  });
  loadModel();
}

start();
