// The page's logic: the public API only (/v1/models, /v1/videos), same origin, no libraries. Text from the server
// is only ever set as textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, current: null, url: null, timer: null };

function key() { return $("api_key").value.trim(); }

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (key()) headers["Authorization"] = "Bearer " + key();
  const r = await fetch(path, Object.assign({}, options, { headers }));
  if (!r.ok) {
    let message = r.status + " " + r.statusText;
    try { message = (await r.json()).error.message; } catch (e) { /* not our JSON */ }
    if (r.status === 401) $("key_row").hidden = false;
    const err = new Error(message);
    err.status = r.status;
    throw err;
  }
  return options.raw ? r : r.json();
}

function say(text, ok) {
  $("message").textContent = text || "";
  $("message").className = ok ? "ok" : "";
}

async function loadModel() {
  try {
    const m = (await api("/v1/models")).data[0];
    state.model = m;
    $("model").textContent = m.id + " · " + m.device + (m.world_size > 1 ? " × " + m.world_size : "") +
      " · default FIS " + m.default_fis;
    $("size").placeholder = m.default_size;
    $("length").placeholder = String(m.default_frames);
    $("num_inference_steps").placeholder = "4";
    $("guidance_scale").placeholder = String(m.default_guidance);
    $("image_row").hidden = !m.image_to_video;
    const fis = $("fis");
    while (fis.options.length > 1) fis.remove(1);
    for (const name of m.fis_presets) fis.add(new Option(name === "off" ? "off (dense)" : name, name));
    say("");
    refreshJobs();
  } catch (e) {
    $("model").textContent = "the model is not available";
    say(e.message);
  }
}

function formData() {
  const fd = new FormData();
  const text = (id) => $(id).value.trim();
  fd.append("prompt", $("prompt").value);
  for (const id of ["negative_prompt", "size", "num_inference_steps", "guidance_scale", "seed", "fis"]) {
    if (text(id)) fd.append(id, text(id));
  }
  if (text("length")) fd.append($("length_unit").value, text("length"));
  const file = $("input_reference").files[0];
  if (file && !$("image_row").hidden) fd.append("input_reference", file, file.name);
  return fd;
}

async function submit(event) {
  event.preventDefault();
  $("submit").disabled = true;
  say("");
  try {
    const video = await api("/v1/videos", { method: "POST", body: formData() });
    say("queued " + video.id, true);
    track(video.id);
  } catch (e) {
    say(e.message);
  } finally {
    $("submit").disabled = false;
    refreshJobs();
  }
}

function track(id) {
  clearTimeout(state.timer);
  state.current = id;
  $("current").hidden = false;
  $("current_id").textContent = id;
  $("player").hidden = true;
  showProgress(0, "queued");
  poll();
}

function showProgress(percent, text) {
  $("bar").style.width = percent + "%";
  $("bar").dataset.progress = String(percent);
  $("status").textContent = text;
}

async function poll() {
  const id = state.current;
  let video;
  try {
    video = await api("/v1/videos/" + id);
  } catch (e) {
    $("status").textContent = e.message;
    return;
  }
  if (id !== state.current) return;
  const steps = video.steps ? " · step " + video.steps.done + "/" + video.steps.total : "";
  showProgress(video.progress, video.status + steps);
  if (video.status === "completed") {
    showProgress(100, "completed in " + seconds(video.timings.run_s) + fisText(video));
    say("");
    await play(id);
    refreshJobs();
  } else if (video.status === "failed") {
    $("status").textContent = "failed: " + video.error.message;
    say(video.error.message);
    refreshJobs();
  } else {
    state.timer = setTimeout(poll, 300);
  }
}

async function play(id) {
  const r = await api("/v1/videos/" + id + "/content", { raw: true });
  const blob = await r.blob();
  if (state.url) URL.revokeObjectURL(state.url);
  state.url = URL.createObjectURL(blob);
  const player = $("player");
  player.src = state.url;
  player.hidden = false;
  player.play().catch(() => { /* autoplay refused: the controls are there */ });
}

function seconds(s) { return s === undefined ? "" : s.toFixed(2) + " s"; }

function fisText(v) {
  if (!v.fis || v.fis.preset === "off") return " · dense";
  const x = v.fis.speedup_estimate ? " " + v.fis.speedup_estimate.toFixed(2) + "×" : "";
  return " · FIS " + v.fis.preset + x;
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function button(td, label, action) {
  const b = document.createElement("button");
  b.className = "small";
  b.type = "button";
  b.textContent = label;
  b.addEventListener("click", action);
  td.appendChild(b);
}

async function refreshJobs() {
  let page;
  try {
    page = await api("/v1/videos?limit=20");
  } catch (e) {
    return;
  }
  const body = $("jobs").querySelector("tbody");
  body.replaceChildren();
  for (const v of page.data) {
    const row = document.createElement("tr");
    row.dataset.id = v.id;
    cell(row, new Date(v.created_at * 1000).toLocaleTimeString());
    cell(row, v.prompt, "prompt");
    cell(row, v.size + " · " + v.seconds + " s");
    const status = cell(row, v.status + (v.status === "in_progress" ? " " + v.progress + "%" : ""), v.status);
    if (v.error) status.title = v.error.message;
    if (v.error) status.textContent += " (" + v.error.code + ")";
    cell(row, seconds(v.timings.run_s));
    const fis = v.fis.preset === "off" ? "dense" : v.fis.preset;
    cell(row, fis + (v.fis.speedup_estimate ? " " + v.fis.speedup_estimate.toFixed(2) + "×" : ""));
    const actions = cell(row, "");
    if (v.status === "completed") button(actions, "play", () => track(v.id));
    const pending = v.status === "queued" || v.status === "in_progress";
    button(actions, pending ? "cancel" : "delete", async () => {
      try {
        await api("/v1/videos/" + v.id, { method: "DELETE" });
      } catch (e) {
        say(e.message);
      }
      refreshJobs();
    });
    body.appendChild(row);
  }
}

$("api_key").value = localStorage.getItem("fis_api_key") || "";
$("api_key").addEventListener("change", () => {
  localStorage.setItem("fis_api_key", key());
  loadModel();
});
$("create").addEventListener("submit", submit);
loadModel();
setInterval(refreshJobs, 3000);
