// The search page: no build step, no dependencies. It talks to the JSON API of python -m one_peace.serve.
"use strict";
const $ = (id) => document.getElementById(id);
let indexes = [];
let recorded = null;  // a Blob recorded with the microphone (WebM/Opus where the browser records that)

async function api(url, options) {
  // a server bound beyond loopback asks for its API key (401): asked once, kept in a same-site cookie
  let res = await fetch(url, options);
  if (res.status === 401) {
    const key = window.prompt("this server needs its API key");
    if (key) {
      document.cookie = `one_peace_key=${encodeURIComponent(key)}; path=/; SameSite=Strict`;
      res = await fetch(url, options);
    }
  }
  return res;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function currentIndex() {
  return indexes.find((d) => d.name === $("index").value) || indexes[0];
}

async function loadIndexes() {
  const res = await api("/indexes");
  indexes = (await res.json()).indexes;
  const select = $("index");
  select.innerHTML = "";
  for (const d of indexes) {
    const opt = document.createElement("option");
    opt.value = d.name;
    opt.textContent = `${d.name} (${d.count} ${d.modality})`;
    select.appendChild(opt);
  }
  describe();
}

const BESPOKE = { image: "drop", audio: "audio-box", video: "video-box" };  // built-in controls (drop zone, recorder)

function pluginInputs(d) {
  // a file input for every media modality of the model without a control of its own, from its plugin's media types
  const box = $("plugin-inputs");
  box.innerHTML = "";
  for (const input of (d && d.inputs) || []) {
    if (!input.media || input.modality in BESPOKE) continue;
    const label = document.createElement("label");
    label.textContent = `${input.modality} `;
    const file = document.createElement("input");
    file.type = "file";
    file.id = `input-${input.modality}`;
    file.name = input.modality;
    file.dataset.modality = input.modality;
    if (input.accept) file.accept = input.accept;
    label.appendChild(file);
    box.appendChild(label);
  }
  const takes = new Set(((d && d.inputs) || []).map((i) => i.modality));
  for (const [modality, id] of Object.entries(BESPOKE)) $(id).hidden = !takes.has(modality);
}

function describe() {
  const d = currentIndex();
  if (d) $("index-info").textContent = `query by: ${d.query_modalities.join(", ")}`;
  pluginInputs(d);
  const params = (d && d.search_params) || {};
  const name = "nprobe" in params ? "nprobe" : "efSearch" in params ? "efSearch" : null;
  $("probe-label").hidden = !name;
  if (name) $("probe").placeholder = `${name} ${params[name]}`;
}

function setImage(file) {
  const dt = new DataTransfer();
  dt.items.add(file);
  $("image").files = dt.files;
  const preview = $("drop-preview");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  $("drop-label").textContent = file.name;
}

function card(hit, index) {
  const el = document.createElement("div");
  el.className = "card";
  const meta = hit.metadata || {};
  const url = `/items/${encodeURIComponent(index.name)}/${encodeURIComponent(hit.id)}`;
  const served = meta.source_kind === "file" || meta.source_kind === "shard";
  // a timed segment (embed segments.window=...): the player starts at its window (a media fragment)
  const timed = typeof meta.start === "number" && typeof meta.end === "number";
  const span = timed ? `#t=${meta.start},${meta.end}` : "";
  let media = null;
  if (served && index.modality === "image") {
    media = document.createElement("img");
    media.src = url;
    media.alt = hit.id;
  } else if (served && index.modality === "audio") {
    media = document.createElement("audio");
    media.controls = true;
    media.src = url + span;
  } else if (served && index.modality === "video") {
    media = document.createElement("video");
    media.controls = true;
    media.muted = true;
    media.src = url + span;
  } else if (served && index.preview) {
    media = document.createElement("div");  // the plugin's preview hook draws it (a PNG, a sound clip, text)
    media.className = "preview";
    showPreview(media, `/previews/${encodeURIComponent(index.name)}/${encodeURIComponent(hit.id)}`, hit.id);
  } else if (served) {
    media = document.createElement("a");
    media.href = url;
    media.textContent = `open the ${index.modality} item`;
  }
  const score = document.createElement("div");
  score.className = "score";
  const clock = (s) => `${Math.floor(s / 60)}:${String(Math.floor(s % 60)).padStart(2, "0")}`;
  score.textContent = `${hit.score.toFixed(3)}  ${timed ? meta.parent_id : hit.id}` +
    (timed ? `  at ${clock(meta.start)}-${clock(meta.end)}` : "");
  el.appendChild(score);
  if (media) el.appendChild(media);
  const text = meta[index.field];
  if (!served && text !== undefined) {
    const t = document.createElement("div");
    t.className = "text";
    t.textContent = String(text);
    el.appendChild(t);
  }
  const dl = document.createElement("dl");
  for (const [k, v] of Object.entries(meta)) {
    if (["id", "source", "source_kind", "source_member", "row"].includes(k) || v === null || v === undefined) continue;
    if (k === "field.id" && String(v) === String(hit.id)) continue;  // the row's own id, already the card's title
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = typeof v === "object" ? JSON.stringify(v) : String(v);
    dl.append(dt, dd);
  }
  el.appendChild(dl);
  el.dataset.id = hit.id;
  return el;
}

async function showPreview(box, url, id) {
  try {
    const res = await api(url);
    if (!res.ok) throw new Error((await res.json()).error || res.status);
    const type = res.headers.get("content-type") || "";
    let el;
    if (type.startsWith("text/")) {
      el = document.createElement("pre");
      el.textContent = await res.text();
    } else {
      el = document.createElement(type.startsWith("audio/") ? "audio" : type.startsWith("video/") ? "video" : "img");
      el.src = URL.createObjectURL(await res.blob());
      if (el.tagName === "IMG") el.alt = id; else el.controls = true;
    }
    box.appendChild(el);
  } catch (err) {
    box.textContent = `no preview: ${err.message || err}`;
  }
}

async function search(event) {
  if (event) event.preventDefault();
  showError("");
  const index = currentIndex();
  const form = new FormData();
  form.append("index", index.name);
  form.append("top_k", $("top_k").value || "12");
  form.append("fuse", $("fuse").value);
  const params = index.search_params || {};
  const probe = $("probe").value.trim();
  if (probe && "nprobe" in params) form.append("nprobe", probe);
  if (probe && "efSearch" in params) form.append("ef_search", probe);
  const text = $("text").value.trim();
  if (text) form.append("text", text);
  for (const m of ["image", "audio", "video"]) {
    const f = $(BESPOKE[m]).hidden ? null : $(m).files[0];
    if (f) form.append(m, f, f.name);
  }
  for (const el of document.querySelectorAll("#plugin-inputs input[type=file]")) {
    if (el.files[0]) form.append(el.dataset.modality, el.files[0], el.files[0].name);
  }
  if (recorded && !$("audio-box").hidden && !$("audio").files[0]) form.append("audio", recorded, "recording.webm");
  $("status").textContent = "searching...";
  const started = performance.now();
  let res, body;
  try {
    res = await api("/search", { method: "POST", body: form });
    body = await res.json();
  } catch (err) {
    $("status").textContent = "";
    showError(`the server did not answer: ${err}`);
    return;
  }
  if (!res.ok) {
    $("status").textContent = "";
    $("results").innerHTML = "";
    showError(body.error || `error ${res.status}`);
    return;
  }
  const t = body.timings;
  $("status").textContent =
    `${body.results.length} results from ${body.index} in ${(performance.now() - started).toFixed(0)} ms ` +
    `(query embedding ${t.embed_ms} ms in a batch of ${t.batch}, search ${t.search_ms} ms, preprocessing ${t.preprocess_ms} ms)`;
  const grid = $("results");
  grid.innerHTML = "";
  for (const hit of body.results) grid.appendChild(card(hit, index));
  document.body.dataset.searched = String(Number(document.body.dataset.searched || 0) + 1);
}

async function toggleRecording() {
  const button = $("record");
  if (button.recorder) {
    button.recorder.stop();
    return;
  }
  if (!navigator.mediaDevices || !window.MediaRecorder) {
    $("record-state").textContent = "this browser cannot record here";
    return;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const recorder = new MediaRecorder(stream);
    const chunks = [];
    recorder.ondataavailable = (e) => chunks.push(e.data);
    recorder.onstop = () => {
      recorded = new Blob(chunks, { type: recorder.mimeType || "audio/webm" });
      stream.getTracks().forEach((tr) => tr.stop());
      button.recorder = null;
      button.textContent = "record";
      $("record-state").textContent = `recorded ${(recorded.size / 1024).toFixed(0)} KB`;
    };
    recorder.start();
    button.recorder = recorder;
    button.textContent = "stop";
    $("record-state").textContent = "recording...";
  } catch (err) {
    $("record-state").textContent = `no microphone: ${err.message || err}`;
  }
}

function clearQuery() {
  $("query").reset();
  for (const el of document.querySelectorAll("#plugin-inputs input[type=file]")) el.value = "";
  recorded = null;
  $("drop-preview").hidden = true;
  $("drop-label").textContent = "drop an image here, or click to pick one";
  $("record-state").textContent = "";
  showError("");
}

window.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  drop.addEventListener("click", () => $("image").click());
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) setImage(e.dataTransfer.files[0]);
  });
  $("image").addEventListener("change", () => { if ($("image").files[0]) setImage($("image").files[0]); });
  $("query").addEventListener("submit", search);
  $("index").addEventListener("change", describe);
  $("record").addEventListener("click", toggleRecording);
  $("clear").addEventListener("click", clearQuery);
  loadIndexes().then(() => { document.body.dataset.ready = "1"; });
});
