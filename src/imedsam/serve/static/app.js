// imedsam serve: the page. Plain JavaScript, no dependencies (runs offline). Talks to the JSON API under /api.
// Coordinates sent to the server are slice pixels (x = column, y = row); labels come back as a PNG of object ids.
"use strict";

const PALETTE = [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
  [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255]];
const $ = (id) => document.getElementById(id);

const state = {
  token: null, session: null, slice: 0, window: "auto", model: null, models: [],
  objects: [1], current: 1, opacity: 0.5, heat: false,
  labels: new Map(),        // slice -> ImageData of the label plane (object ids in the red channel)
  heatmaps: new Map(),      // `${slice}:${object}` -> ImageData of the uncertainty (0..255)
  images: new Map(),        // `${window}:${slice}` -> ImageBitmap
  busy: 0, last: null, drag: null, version: 0,
  box: null, range: [null, null],   // the 3-D box: the last drawn 2-D box and its first / last slice
};
window.imedsam = state;    // for tests and the console

function color(id) { return PALETTE[(id - 1) % PALETTE.length]; }

// ------------------------------------------------------------------------------------------------- network
function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.token) h["Authorization"] = "Bearer " + state.token;
  return h;
}

async function api(method, path, body, raw) {
  const init = { method, headers: headers(raw ? { "Content-Type": "application/octet-stream" } : body ?
    { "Content-Type": "application/json" } : {}) };
  if (body !== undefined) init.body = raw ? body : JSON.stringify(body);
  let r = await fetch(path, init);
  if (r.status === 401) {
    const t = prompt("This server needs its access token:");
    if (t) { state.token = t; sessionStorage.setItem("imedsam-token", t); return api(method, path, body, raw); }
  }
  if (!r.ok) {
    let msg = r.status + " " + r.statusText;
    try { const j = await r.json(); if (j.detail) msg = typeof j.detail === "string" ? j.detail : JSON.stringify(j.detail); }
    catch (e) { /* not JSON */ }
    const err = new Error(msg); err.status = r.status; throw err;
  }
  return r;
}

async function busy(label, fn) {
  state.busy++;
  status("busy", label);
  const t0 = performance.now();
  try {
    const out = await fn();
    const ms = Math.round(performance.now() - t0);
    status("ready", out && out.message ? `${out.message} · ${ms} ms` : `ready (${ms} ms)`);
    return out;
  } catch (e) {
    status("error", e.message);
    throw e;
  } finally {
    state.busy--;
  }
}

function status(kind, text) {
  const s = $("status");
  s.dataset.state = kind;
  s.textContent = text;
}

// ------------------------------------------------------------------------------------------------ opening
async function openFile(file) {
  if (!file) return;
  await busy("uploading " + file.name + "…", async () => {
    const r = await api("POST", "/api/sessions?filename=" + encodeURIComponent(file.name), file, true);
    const info = await r.json();
    if (state.session) api("DELETE", "/api/sessions/" + state.session.id).catch(() => {});
    state.session = info;
    state.labels.clear(); state.heatmaps.clear(); state.images.clear();
    state.objects = [1]; state.current = 1; state.version++;
    state.slice = Math.floor(info.slices / 2);
    $("filename").textContent = info.name;
    const w = $("window");
    w.innerHTML = "";
    for (const name of info.windows) w.add(new Option(name.replace("_", " "), name));
    state.window = "auto";  // the file's own window (DICOM), else its intensity range: what the CLI uses
    w.value = state.window;
    $("slicebar").hidden = info.slices <= 1;
    $("slice").max = info.slices - 1;
    $("propagate").disabled = info.kind !== "volume";
    $("box3d").disabled = info.kind !== "volume";
    state.box = null; state.range = [null, null];
    $("download").disabled = false;
    const fmt = $("format");
    fmt.innerHTML = "";
    for (const f of info.download) fmt.add(new Option(f === "nifti" ? "NIfTI" : f === "png" ? "PNG" : "DICOM-SEG", f));
    $("drop").classList.add("hidden");
    const sp = info.spacing ? " · spacing " + info.spacing.map((v) => v.toFixed(3)).join(" × ") + " mm" : "";
    $("facts").textContent = `${info.kind} ${info.shape.join(" × ")}${sp}` +
      (info.modality ? " · " + info.modality : "");
    renderObjects();
    await showSlice(state.slice);
  });
}

// ----------------------------------------------------------------------------------------------- drawing
async function sliceBitmap(k) {
  const key = state.window + ":" + k;
  if (!state.images.has(key)) {
    const r = await api("GET", `/api/sessions/${state.session.id}/slices/${k}/image.png?window=${state.window}`);
    const bmp = await createImageBitmap(await r.blob());
    state.images.set(key, bmp);
    if (state.images.size > 64) state.images.delete(state.images.keys().next().value);
  }
  return state.images.get(key);
}

async function decodePng(url) {
  const img = new Image();
  img.src = url;
  await img.decode();
  const c = document.createElement("canvas");
  c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext("2d");
  g.drawImage(img, 0, 0);
  return g.getImageData(0, 0, c.width, c.height);
}

async function showSlice(k) {
  if (!state.session) return;
  k = Math.max(0, Math.min(state.session.slices - 1, k));
  state.slice = k;
  $("slice").value = k;
  $("sliceinfo").textContent = `slice ${k + 1} / ${state.session.slices}` + rangeText();
  const version = state.version;
  const bmp = await sliceBitmap(k);
  if (version !== state.version || k !== state.slice) return;
  layout(bmp.width, bmp.height);
  $("image").getContext("2d").drawImage(bmp, 0, 0);
  if (!state.labels.has(k)) {
    const r = await api("GET", `/api/sessions/${state.session.id}/slices/${k}/labels.png`);
    state.labels.set(k, await decodePng(URL.createObjectURL(await r.blob())));
  }
  if (k === state.slice) drawOverlay();
  prefetch(k);
}

// The embedding of a slice the user rests on is computed ahead of the first prompt (not while scrolling).
let prefetchTimer = null;
function prefetch(k) {
  clearTimeout(prefetchTimer);
  prefetchTimer = setTimeout(() => {
    if (!state.session || k !== state.slice || state.busy || volumeModel()) return;
    api("POST", `/api/sessions/${state.session.id}/embed`, target()).catch(() => {});
  }, 400);
}

function layout(w, h) {
  const stage = $("stage");
  const scale = Math.min(stage.clientWidth / w, stage.clientHeight / h);
  for (const id of ["image", "overlay", "draw"]) {
    const c = $(id);
    if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
    c.style.width = Math.floor(w * scale) + "px";
    c.style.height = Math.floor(h * scale) + "px";
  }
}

function drawOverlay() {
  const c = $("overlay"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const lab = state.labels.get(state.slice);
  if (!lab || lab.width !== c.width) return;
  const out = g.createImageData(lab.width, lab.height);
  const a = Math.round(state.opacity * 255);
  const heat = state.heat ? state.heatmaps.get(state.slice + ":" + state.current) : null;
  for (let i = 0; i < lab.data.length; i += 4) {
    const id = lab.data[i];
    if (heat) {
      const v = heat.data[i];
      if (v > 0) { out.data[i] = 255; out.data[i + 1] = 255 - v; out.data[i + 2] = 0; out.data[i + 3] = Math.min(255, v * 2); }
      continue;
    }
    if (id === 0) continue;
    const [r, gg, b] = color(id);
    out.data[i] = r; out.data[i + 1] = gg; out.data[i + 2] = b;
    out.data[i + 3] = id === state.current ? a : Math.round(a * 0.7);
  }
  g.putImageData(out, 0, 0);
}

function drawPrompt(box) {
  const c = $("draw"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  if (!box) return;
  g.strokeStyle = "rgb(" + color(state.current).join(",") + ")";
  g.lineWidth = Math.max(1, c.width / 300);
  g.strokeRect(box[0], box[1], box[2] - box[0], box[3] - box[1]);
}

function drawPoint(x, y, label) {
  const c = $("draw"), g = c.getContext("2d");
  g.fillStyle = label ? "#39d353" : "#ff4d4d";
  g.beginPath(); g.arc(x, y, Math.max(2, c.width / 120), 0, 2 * Math.PI); g.fill();
}

// --------------------------------------------------------------------------------------------- prompting
async function applyResult(r) {
  const res = await r.json();
  state.last = res;
  for (const s of res.changed_slices || []) if (s !== res.slice) state.labels.delete(s);
  state.labels.set(res.slice, await decodePng(res.labels));
  if (res.uncertainty) state.heatmaps.set(res.slice + ":" + state.current, await decodePng(res.uncertainty));
  for (const id of res.objects || []) if (!state.objects.includes(id)) state.objects.push(id);
  renderObjects();
  if (res.slice === state.slice) drawOverlay();
  return res;
}

function target(extra) {
  return Object.assign({ slice: state.slice, model: state.model, window: state.window }, extra || {});
}

function volumeModel() {   // MA-SAM: whole volumes from stacks of slices (auto, or one 3-D box)
  const m = state.models.find((x) => x.name === state.model);
  return !!(m && m.volume);
}

function rangeText() {
  const [a, b] = state.range;
  if (a === null && b === null) return "";
  const f = (v) => (v === null ? "?" : v + 1);
  return ` · 3-D box slices ${f(a)}–${f(b)}`;
}

function markRange(end) {   // F / L: the 3-D box's first / last slice is the current one
  if (!state.session || state.session.slices <= 1) return;
  state.range[end] = state.slice;
  $("sliceinfo").textContent = `slice ${state.slice + 1} / ${state.session.slices}` + rangeText();
}

async function box3d() {
  if (!state.session || state.session.slices <= 1) return;
  const [a, b] = state.range;
  if (!state.box || a === null || b === null) {
    status("error", "3-D box: draw a box, mark its first slice (F) and its last slice (L), then press B");
    return;
  }
  const [x0, y0, x1, y1] = state.box.map((v) => Math.round(v));
  const body = target({ object: state.current, box3d: [x0, y0, Math.min(a, b), x1, y1, Math.max(a, b) + 1] });
  await action("box3d", body, "segmenting the 3-D box…");
}

function wantsUncertainty() {
  const m = state.models.find((x) => x.name === state.model);
  return !!(m && m.uncertainty);
}

async function segment(prompt) {
  if (!state.session) return;
  const label = state.session.slices > 1 ? " (first prompt on a slice computes its embedding)" : "";
  await busy("computing…" + label, async () => {
    const body = target(Object.assign({ object: state.current, uncertainty: wantsUncertainty() }, prompt));
    state.lastPrompt = body;
    const res = await applyResult(await api("POST", `/api/sessions/${state.session.id}/segment`, body));
    return { message: `score ${res.score.toFixed(3)} · ${res.area} px` };
  }).catch(() => {});
}

async function action(path, body, label) {
  if (!state.session) return;
  await busy(label, async () => {
    const res = await applyResult(await api("POST", `/api/sessions/${state.session.id}/${path}`, body));
    const n = (res.changed_slices || []).filter((s) => s !== res.slice).length;
    return { message: n ? `${path}: ${n} other slice${n > 1 ? "s" : ""} changed` : `${path} done` };
  }).catch(() => {});
}

async function download() {
  if (!state.session) return;
  await busy("preparing download…", async () => {
    const fmt = $("format").value || "auto";
    const r = await api("GET", `/api/sessions/${state.session.id}/download?format=${fmt}`);
    const cd = r.headers.get("Content-Disposition") || "";
    const m = /filename="([^"]+)"/.exec(cd);
    const a = document.createElement("a");
    a.href = URL.createObjectURL(await r.blob());
    a.download = m ? m[1] : "labels";
    document.body.appendChild(a); a.click(); a.remove();
  }).catch(() => {});
}

// ----------------------------------------------------------------------------------------------- objects
function renderObjects() {
  const ul = $("objects");
  ul.innerHTML = "";
  for (const id of state.objects) {
    const li = document.createElement("li");
    li.className = id === state.current ? "selected" : "";
    li.dataset.object = id;
    li.innerHTML = `<span class="swatch" style="background:rgb(${color(id).join(",")})"></span> object ${id}`;
    li.onclick = () => { state.current = id; renderObjects(); drawOverlay(); };
    ul.appendChild(li);
  }
}

function newObject() {
  const id = Math.max(0, ...state.objects) + 1;
  if (id > 255) return;
  state.objects.push(id); state.current = id; renderObjects(); drawPrompt(null);
}

// ------------------------------------------------------------------------------------------------- input
function toImage(ev) {
  const c = $("draw"), rect = c.getBoundingClientRect();
  return [(ev.clientX - rect.left) * c.width / rect.width, (ev.clientY - rect.top) * c.height / rect.height];
}

function bindCanvas() {
  const c = $("draw");
  c.addEventListener("contextmenu", (ev) => ev.preventDefault());
  c.addEventListener("mousedown", (ev) => {
    if (!state.session) return;
    if (ev.button === 2) { const [x, y] = toImage(ev); drawPoint(x, y, 0); segment({ point: [x, y], label: 0 }); return; }
    if (ev.button !== 0) return;
    state.drag = { start: toImage(ev), moved: false };
  });
  c.addEventListener("mousemove", (ev) => {
    if (!state.drag) return;
    const [x, y] = toImage(ev), [x0, y0] = state.drag.start;
    const rect = c.getBoundingClientRect(), px = c.width / rect.width;
    if (Math.abs(x - x0) > 4 * px || Math.abs(y - y0) > 4 * px) state.drag.moved = true;
    if (state.drag.moved) drawPrompt([Math.min(x0, x), Math.min(y0, y), Math.max(x0, x), Math.max(y0, y)]);
  });
  window.addEventListener("mouseup", (ev) => {
    if (!state.drag || ev.button !== 0) return;
    const d = state.drag; state.drag = null;
    const [x, y] = toImage(ev), [x0, y0] = d.start;
    if (d.moved) {
      const cl = (v, n) => Math.max(0, Math.min(n, v));
      const box = [cl(Math.min(x0, x), c.width), cl(Math.min(y0, y), c.height),
        cl(Math.max(x0, x), c.width), cl(Math.max(y0, y), c.height)];
      drawPrompt(box);
      state.box = box;
      if (volumeModel()) status("idle", "box kept: mark the first (F) and last (L) slice, then 3-D box (B)");
      else segment({ box });
    } else {
      drawPoint(x0, y0, 1);
      segment({ point: [x0, y0], label: 1 });
    }
  });
  $("stage").addEventListener("wheel", (ev) => {
    if (!state.session || state.session.slices <= 1) return;
    ev.preventDefault();
    drawPrompt(null);
    showSlice(state.slice + (ev.deltaY > 0 ? 1 : -1));
  }, { passive: false });
}

function bindDrop() {
  const stage = document.body;
  stage.addEventListener("dragover", (ev) => { ev.preventDefault(); $("stage").classList.add("dragover"); });
  stage.addEventListener("dragleave", () => $("stage").classList.remove("dragover"));
  stage.addEventListener("drop", (ev) => {
    ev.preventDefault(); $("stage").classList.remove("dragover");
    if (ev.dataTransfer.files.length) openFile(ev.dataTransfer.files[0]);
  });
  $("file").addEventListener("change", (ev) => openFile(ev.target.files[0]));
}

function bindControls() {
  $("model").onchange = (ev) => { state.model = ev.target.value; };
  $("window").onchange = (ev) => { state.window = ev.target.value; showSlice(state.slice); };
  $("opacity").oninput = (ev) => { state.opacity = ev.target.value / 100; drawOverlay(); };
  $("heat").onchange = (ev) => { state.heat = ev.target.checked; drawOverlay(); };
  $("slice").oninput = (ev) => { drawPrompt(null); showSlice(parseInt(ev.target.value, 10)); };
  $("add").onclick = newObject;
  $("undo").onclick = () => { drawPrompt(null); action("undo", { slice: state.slice }, "undo…"); };
  $("clear").onclick = () => { drawPrompt(null); action("clear", { slice: state.slice, object: state.current }, "clearing…"); };
  $("auto").onclick = () => action("auto", target(), "automatic masks… (a grid of prompts)");
  $("propagate").onclick = () => action("propagate", target({ object: state.current }), "propagating through the volume…");
  $("box3d").onclick = box3d;
  $("download").onclick = download;
  document.addEventListener("keydown", (ev) => {
    if (ev.target.tagName === "INPUT" && ev.target.type !== "range" && ev.target.type !== "checkbox") return;
    const k = ev.key;
    if ((ev.ctrlKey || ev.metaKey) && k.toLowerCase() === "z") { ev.preventDefault(); $("undo").click(); return; }
    if (ev.ctrlKey || ev.metaKey || ev.altKey) return;
    if (k === "ArrowUp" || k === "ArrowRight") { ev.preventDefault(); showSlice(state.slice + 1); }
    else if (k === "ArrowDown" || k === "ArrowLeft") { ev.preventDefault(); showSlice(state.slice - 1); }
    else if (/^[1-9]$/.test(k)) {
      const id = state.objects[parseInt(k, 10) - 1];
      if (id) { state.current = id; renderObjects(); drawOverlay(); }
    }
    else if (k === "n" || k === "N") newObject();
    else if (k === "u" || k === "U") $("undo").click();
    else if (k === "c" || k === "C") $("clear").click();
    else if (k === "a" || k === "A") $("auto").click();
    else if ((k === "p" || k === "P") && !$("propagate").disabled) $("propagate").click();
    else if (k === "f" || k === "F") markRange(0);
    else if (k === "l" || k === "L") markRange(1);
    else if ((k === "b" || k === "B") && !$("box3d").disabled) $("box3d").click();
    else if (k === "h" || k === "H") { $("heat").checked = !$("heat").checked; $("heat").onchange({ target: $("heat") }); }
    else if (k === "d" || k === "D") download();
    else if (k === "[" || k === "]") {
      const o = $("opacity"); o.value = Math.max(0, Math.min(100, +o.value + (k === "]" ? 10 : -10)));
      o.oninput({ target: o });
    }
  });
  window.addEventListener("resize", () => state.session && showSlice(state.slice));
}

async function loadModels() {
  const r = await api("GET", "/api/models");
  const info = await r.json();
  state.models = info.models;
  state.model = info.default;
  const sel = $("model");
  sel.innerHTML = "";
  for (const m of info.models) {
    const note = m.uncertainty ? " (uncertainty)" : m.volume ? (m.prompt_free ? " (volumes, automatic)" : " (volumes, 3-D box)") : "";
    sel.add(new Option(m.name + note, m.name));
  }
  sel.value = info.default;
}

async function main() {
  const m = /token=([^&]+)/.exec(location.hash);
  state.token = m ? decodeURIComponent(m[1]) : sessionStorage.getItem("imedsam-token");
  if (m) { sessionStorage.setItem("imedsam-token", state.token); history.replaceState(null, "", location.pathname); }
  bindCanvas(); bindDrop(); bindControls(); renderObjects();
  try { await loadModels(); status("idle", "open a file to start"); }
  catch (e) { status("error", e.message); }
}

main();
