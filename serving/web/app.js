// The MultiTalk web page: choose an image and one audio file per person, check the person regions, submit,
// follow the job, play and download the video, browse past jobs. Plain DOM + fetch against the /v1 API.
"use strict";

const COLOURS = ["#e6194b", "#3cb44b", "#0082c8", "#f58230", "#911eb4", "#46f0f0"];
const FINISHED = ["succeeded", "failed", "cancelled"];
const $ = (selector) => document.querySelector(selector);

const state = {
  picture: null, // the chosen image, decoded, for the canvas
  regions: null, // {width, height, source, boxes} in image pixels
  drawn: false, // the user drew at least one region
  dragStart: null,
  jobId: null,
  videoUrl: null,
  olderCursor: null,
};

// ------------------------------------------------------------------------------------------------------ the API

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${$("#api-key").value.trim()}` };
  const response = await fetch(path, { ...options, headers });
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (_) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

// ------------------------------------------------------------------------------------------------------ persons

function audioInputs() {
  return [...document.querySelectorAll("#persons input[type=file]")];
}

function addPerson() {
  const index = audioInputs().length + 1;
  const item = document.createElement("li");
  item.innerHTML = `<label>Person ${index} <input id="audio-${index}" type="file" accept="audio/*,video/*"></label>`;
  if (index > 1) {
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.addEventListener("click", () => { item.remove(); renumberPersons(); });
    item.append(" ", remove);
  }
  $("#persons").append(item);
  personsChanged();
}

function renumberPersons() {
  audioInputs().forEach((input, i) => {
    input.id = `audio-${i + 1}`;
    input.parentElement.firstChild.textContent = `Person ${i + 1} `;
  });
  personsChanged();
}

function personsChanged() {
  const count = audioInputs().length;
  const choices = Array.from({ length: count }, (_, i) => `<option value="${i}">person ${i + 1}</option>`);
  $("#draw-person").innerHTML = choices.join("");
  state.drawn = false;
  detectRegions();
}

// ------------------------------------------------------------------------------------------------------ regions

// A chosen video is dubbed: the service finds the persons on its first frame.
function isVideo(file) {
  return file.type.startsWith("video/");
}

async function detectRegions() {
  const image = $("#image").files[0];
  if (!image || isVideo(image)) return;
  const form = new FormData();
  form.append("image", image);
  form.append("persons", String(audioInputs().length));
  $("#regions-note").textContent = "finding the persons...";
  try {
    state.regions = await (await api("/v1/regions", { method: "POST", body: form })).json();
    state.drawn = false;
    drawRegions();
  } catch (error) {
    $("#regions-note").textContent = `regions: ${error.message}`;
  }
}

async function imageChosen() {
  const image = $("#image").files[0];
  if (!image) return;
  if (isVideo(image)) {
    state.picture = state.regions = null;
    $("#regions-panel").hidden = true;
    $("#mode").value = "streaming"; // a dub is as long as its new audio
    return;
  }
  state.picture = await createImageBitmap(image, { imageOrientation: "from-image" });
  $("#regions-panel").hidden = false;
  drawRegions();
  detectRegions();
}

function drawRegions(dragBox = null) {
  const canvas = $("#regions");
  if (!state.picture) return;
  const scale = Math.min(640 / state.picture.width, 480 / state.picture.height);
  canvas.width = Math.round(state.picture.width * scale);
  canvas.height = Math.round(state.picture.height * scale);
  const context = canvas.getContext("2d");
  context.drawImage(state.picture, 0, 0, canvas.width, canvas.height);
  const boxes = state.regions ? state.regions.boxes : [];
  const shown = dragBox ? boxes.map((box, i) => (i === dragBox.person ? dragBox.box : box)) : boxes;
  shown.forEach((box, i) => {
    if (!box) return;
    const [x0, y0, x1, y1] = box.map((v) => v * scale);
    const colour = COLOURS[i % COLOURS.length];
    context.fillStyle = `${colour}40`;
    context.fillRect(x0, y0, x1 - x0, y1 - y0);
    context.strokeStyle = colour;
    context.lineWidth = 3;
    context.strokeRect(x0, y0, x1 - x0, y1 - y0);
    context.font = "bold 16px system-ui";
    context.lineWidth = 4;
    context.strokeStyle = "white";
    context.strokeText(`person ${i + 1}`, x0 + 6, y0 + 20);
    context.fillStyle = colour;
    context.fillText(`person ${i + 1}`, x0 + 6, y0 + 20);
  });
  canvas.dataset.boxes = JSON.stringify(boxes);
  if (state.regions) {
    const source = state.drawn ? "drawn" : state.regions.source;
    $("#regions-note").textContent = `${boxes.length} region(s), from ${source}`;
  }
}

function imagePoint(event) {
  const canvas = $("#regions");
  const rect = canvas.getBoundingClientRect();
  const scale = state.picture.width / rect.width;
  const clamp = (v, max) => Math.min(Math.max(v, 0), max);
  return [
    clamp((event.clientX - rect.left) * scale, state.picture.width),
    clamp((event.clientY - rect.top) * scale, state.picture.height),
  ];
}

function dragBox(event) {
  const [x0, y0] = state.dragStart;
  const [x1, y1] = imagePoint(event);
  const box = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
  return { person: Number($("#draw-person").value), box };
}

function startDrawing(event) {
  if (!state.picture || !state.regions) return;
  state.dragStart = imagePoint(event);
}

function whileDrawing(event) {
  if (state.dragStart) drawRegions(dragBox(event));
}

function stopDrawing(event) {
  if (!state.dragStart) return;
  const { person, box } = dragBox(event);
  state.dragStart = null;
  if (box[2] - box[0] < 4 || box[3] - box[1] < 4) { drawRegions(); return; } // a click, not a box
  state.regions.boxes[person] = box.map(Math.round);
  state.drawn = true;
  drawRegions();
}

// ------------------------------------------------------------------------------------------------------ submitting

function options() {
  const chosen = { prompt: $("#prompt").value, audio_type: $("#audio-type").value, mode: $("#mode").value };
  if ($("#fast").checked) chosen.fast = true;
  if ($("#seed").value !== "") chosen.seed = Number($("#seed").value);
  // Send the regions the page shows, so the video binds each voice to the region seen here. One person needs none
  // unless drawn (the whole image is theirs).
  const persons = audioInputs().length;
  if (state.regions && state.regions.boxes.length === persons && (persons > 1 || state.drawn)) {
    chosen.boxes = state.regions.boxes;
  }
  return chosen;
}

async function submit(event) {
  event.preventDefault();
  $("#form-error").textContent = "";
  const image = $("#image").files[0];
  const audio = audioInputs().map((input) => input.files[0]);
  if (!image || audio.some((file) => !file)) {
    $("#form-error").textContent = "Choose an image or a video and one audio file for every person.";
    return;
  }
  const form = new FormData();
  form.append(isVideo(image) ? "video" : "image", image);
  audio.forEach((file) => form.append("audio", file));
  form.append("options", JSON.stringify(options()));
  $("#submit").disabled = true;
  try {
    const job = await (await api("/v1/videos", { method: "POST", body: form })).json();
    watch(job.id);
    refreshJobs();
  } catch (error) {
    $("#form-error").textContent = error.message;
  } finally {
    $("#submit").disabled = false;
  }
}

// ------------------------------------------------------------------------------------------------------ one job

function describe(job) {
  const p = job.progress;
  if (job.state === "running" && p.steps) {
    return `running: clip ${p.clip} of ${p.clips}, step ${p.step} of ${p.steps} (${p.percent.toFixed(0)}%)`;
  }
  if (job.state === "failed") return `failed: ${job.error}`;
  return job.state;
}

async function watch(jobId) {
  state.jobId = jobId;
  $("#job").hidden = false;
  $("#result").hidden = true;
  $("#job-id").textContent = jobId;
  while (state.jobId === jobId) {
    let job;
    try {
      job = await (await api(`/v1/videos/${jobId}`)).json();
    } catch (error) {
      $("#status").textContent = error.message;
      return;
    }
    $("#status").textContent = describe(job);
    $("#status").dataset.state = job.state;
    $("#progress").value = job.progress.percent;
    $("#cancel").hidden = FINISHED.includes(job.state);
    if (FINISHED.includes(job.state)) {
      if (job.state === "succeeded") await showVideo(jobId);
      refreshJobs();
      return;
    }
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
}

async function showVideo(jobId) {
  // The content needs the API key, which a <video src> cannot send: fetch it and play it from a blob.
  const blob = await (await api(`/v1/videos/${jobId}/content`)).blob();
  if (state.videoUrl) URL.revokeObjectURL(state.videoUrl);
  state.videoUrl = URL.createObjectURL(blob);
  $("#video").src = state.videoUrl;
  $("#download").href = state.videoUrl;
  $("#download").download = `${jobId}.mp4`;
  $("#result").hidden = false;
}

async function cancel() {
  if (!state.jobId) return;
  try {
    await api(`/v1/videos/${state.jobId}`, { method: "DELETE" });
  } catch (error) {
    $("#status").textContent = error.message;
  }
}

// ------------------------------------------------------------------------------------------------------ past jobs

async function refreshJobs(cursor = null) {
  if (!$("#api-key").value.trim()) return;
  const query = cursor ? `?limit=10&cursor=${cursor}` : "?limit=10";
  let page;
  try {
    page = await (await api(`/v1/videos${query}`)).json();
  } catch (error) {
    $("#jobs").innerHTML = `<tr><td colspan="5" class="error"></td></tr>`;
    $("#jobs td").textContent = error.message;
    return;
  }
  if (!cursor) $("#jobs").innerHTML = "";
  for (const job of page.jobs) {
    const row = document.createElement("tr");
    row.dataset.jobId = job.id;
    const submitted = new Date(job.created_at).toLocaleString();
    const cells = [submitted, job.prompt || "(no prompt)", String(job.persons), describe(job)];
    cells.forEach((text, i) => {
      const cell = row.insertCell();
      cell.textContent = text;
      if (i === 3) cell.className = `state-${job.state}`;
    });
    const open = document.createElement("button");
    open.type = "button";
    open.textContent = job.state === "succeeded" ? "Play" : "Follow";
    open.addEventListener("click", () => watch(job.id));
    row.insertCell().append(open);
    $("#jobs").append(row);
  }
  state.olderCursor = page.next_cursor;
  $("#older").hidden = !page.next_cursor;
}

// ------------------------------------------------------------------------------------------------------ wiring

$("#api-key").value = localStorage.getItem("multitalk-api-key") || "";
$("#api-key").addEventListener("change", () => {
  localStorage.setItem("multitalk-api-key", $("#api-key").value.trim());
  refreshJobs();
});
$("#image").addEventListener("change", imageChosen);
$("#add-person").addEventListener("click", addPerson);
$("#detect").addEventListener("click", detectRegions);
$("#regions").addEventListener("mousedown", startDrawing);
$("#regions").addEventListener("mousemove", whileDrawing);
window.addEventListener("mouseup", stopDrawing);
$("#job-form").addEventListener("submit", submit);
$("#cancel").addEventListener("click", cancel);
$("#refresh").addEventListener("click", () => refreshJobs());
$("#older").addEventListener("click", () => refreshJobs(state.olderCursor));
addPerson();
refreshJobs();
