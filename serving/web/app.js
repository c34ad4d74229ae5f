// The MultiTalk web page: choose an image and each person's speech (a file or text), check the person regions,
// submit, follow the job's progress events, play and download the video, browse past jobs. Plain DOM + fetch
// against the /v1 API.
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
  olderAfter: null,
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
  item.innerHTML = `<label>Person ${index} <input id="audio-${index}" type="file" accept="audio/*,video/*"></label>
    <label>or says <input id="speech-text-${index}" class="speech-text" type="text" placeholder="Hello!"></label>`;
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
    input.closest("li").querySelector(".speech-text").id = `speech-text-${i + 1}`;
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

// The prompt, or a schedule when later prompts are given ("SECONDS: prompt" per line).
function prompt() {
  const later = $("#prompt-schedule").value.split("\n").map((line) => line.trim()).filter(Boolean);
  if (!later.length) return $("#prompt").value;
  const entries = later.map((line) => {
    const match = line.match(/^(\d+(?:\.\d+)?)\s*:\s*(.*)$/);
    if (!match) throw new Error(`later prompts: "${line}" is not "SECONDS: prompt"`);
    return { start_s: Number(match[1]), prompt: match[2] };
  });
  return [{ start_s: 0, prompt: $("#prompt").value }, ...entries];
}

function options() {
  const chosen = { prompt: prompt(), audio_type: $("#audio-type").value, mode: $("#mode").value };
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
  const speech = audioInputs().map((input) => ({
    file: input.files[0],
    text: input.closest("li").querySelector(".speech-text").value.trim(),
  }));
  if (!image || speech.some(({ file, text }) => !file && !text)) {
    $("#form-error").textContent = "Choose an image or a video, and an audio file or the words of every person.";
    return;
  }
  const form = new FormData();
  form.append("input_reference", image); // an image, or a video to dub (told apart by content)
  // Persons are numbered in the order of their speech fields.
  speech.forEach(({ file, text }) => (file ? form.append("audio", file) : form.append("speech_text", text)));
  $("#submit").disabled = true;
  try {
    form.append("options", JSON.stringify(options()));
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
  const p = job.progress_detail;
  if (job.state === "running" && p.steps) {
    return `running: clip ${p.clip} of ${p.clips}, step ${p.step} of ${p.steps} (${job.progress}%)`;
  }
  if (job.error) return `${job.state}: ${job.error.message}`;
  return job.state;
}

function show(job) {
  $("#status").textContent = describe(job);
  $("#status").dataset.state = job.state;
  $("#progress").value = job.progress;
  $("#cancel").hidden = FINISHED.includes(job.state);
}

// The job's Server-Sent Events (/v1/videos/{id}/events), read through fetch: EventSource cannot send the API key.
async function* events(jobId) {
  const response = await api(`/v1/videos/${jobId}/events`);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const name = (block.match(/^event: (.*)$/m) || [])[1];
      const data = block.split("\n").filter((line) => line.startsWith("data: ")).map((line) => line.slice(6));
      if (data.length) yield { name, data: JSON.parse(data.join("\n")) };
    }
  }
}

async function watch(jobId) {
  state.jobId = jobId;
  $("#job").hidden = false;
  $("#result").hidden = true;
  $("#job-id").textContent = jobId;
  try {
    for await (const { name, data } of events(jobId)) {
      if (state.jobId !== jobId) return; // another job is shown now
      if (name === "error") throw new Error(data.detail);
      show(data);
      if (name === "done") {
        if (data.state === "succeeded") await showVideo(jobId);
        refreshJobs();
        return;
      }
    }
  } catch (error) {
    $("#status").textContent = error.message;
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

async function refreshJobs(after = null) {
  if (!$("#api-key").value.trim()) return;
  const query = after ? `?limit=10&after=${after}` : "?limit=10";
  let page;
  try {
    page = await (await api(`/v1/videos${query}`)).json();
  } catch (error) {
    $("#jobs").innerHTML = `<tr><td colspan="5" class="error"></td></tr>`;
    $("#jobs td").textContent = error.message;
    return;
  }
  if (!after) $("#jobs").innerHTML = "";
  for (const job of page.data) {
    const row = document.createElement("tr");
    row.dataset.jobId = job.id;
    const submitted = new Date(job.created_at * 1000).toLocaleString();
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
  state.olderAfter = page.has_more ? page.last_id : null;
  $("#older").hidden = !page.has_more;
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
$("#older").addEventListener("click", () => refreshJobs(state.olderAfter));
addPerson();
refreshJobs();
