// liveserve's browser front: streams the webcam or a local video file to /v1/stream (the LiveStream
// session protocol as protobuf JSON) and shows what comes back. No dependencies.
// URL parameters preset the form: source=camera|file, model, fps, threshold, key, query; auto=1 starts at once
// (camera) and max_frames=N sends a Close after N frames (used by the browser test).
"use strict";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const DEFAULT_THRESHOLD = 0.725;  // the server's default (Open.threshold unset)
const FRAME_WIDTH = 384;          // frames are scaled to this width before JPEG encoding
const CAPTION_HOLD_MS = 6000;     // a finished reply stays on the video this long

let socket = null, timer = null, stream = null;
let session = null;

function setState(state, text) {
  document.body.dataset.state = state;
  $("status").textContent = text || state;
}

function newSession() {
  return { sent: 0, firstIndex: 0, decisions: [], sentAt: new Map(), startedAt: 0, replies: new Map(),
           threshold: null, closing: false, maxFrames: Number(params.get("max_frames")) || 0 };
}

// The models the deployment serves (GET /v1/models, ListModels): the picker lists them, the default first.
async function loadModels() {
  const picker = $("model");
  const wanted = picker.value || params.get("model") || "";
  const headers = $("api-key").value ? { "X-Api-Key": $("api-key").value } : {};
  try {
    const response = await fetch("/v1/models", { headers, cache: "no-store" });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error ? body.error.message : response.statusText);
    picker.replaceChildren(...body.models.map((model) => {
      const option = document.createElement("option");
      option.value = model.is_default ? "" : model.name;  // "" opens the default, whatever its name
      option.textContent = model.is_default ? `${model.name} (default)` : model.name;
      option.dataset.name = model.name;
      return option;
    }));
    const match = [...picker.options].find((option) => option.dataset.name === wanted || option.value === wanted);
    if (match) picker.value = match.value;
  } catch (err) {
    picker.title = `models: ${err.message || err}`;  // the default model is still there to use
  }
}

async function openSource() {
  const video = $("video");
  if ($("source").value === "camera") {
    stream = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 }, audio: false });
    video.srcObject = stream;
  } else {
    const file = $("file").files[0];
    if (!file) throw new Error("choose a video file first");
    video.srcObject = null;
    video.src = URL.createObjectURL(file);
    video.onended = () => closeSession();
  }
  await video.play();
}

function streamTime() {
  const video = $("video");
  return $("source").value === "file" ? video.currentTime : (performance.now() - session.startedAt) / 1000;
}

function send(message) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

function sendFrame() {
  const video = $("video");
  if (!session || session.closing || video.readyState < 2 || !video.videoWidth) return;
  const canvas = $("grab");
  canvas.width = FRAME_WIDTH;
  canvas.height = Math.round(FRAME_WIDTH * video.videoHeight / video.videoWidth);
  canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
  const url = canvas.toDataURL("image/jpeg", 0.85);
  session.lastFrame = url;
  const image = url.split(",", 2)[1];
  const index = session.firstIndex + session.sent;
  session.sentAt.set(index, performance.now());
  send({ frame: { timestamp: streamTime(), image } });
  session.sent += 1;
  $("sent").textContent = session.sent;
  if (session.maxFrames && session.sent >= session.maxFrames) closeSession();
}

function ask(text, timestamp) {
  if (text.trim()) send({ query: { timestamp, text } });
}

async function start() {
  if (socket) return;
  session = newSession();
  $("replies").replaceChildren();
  $("warnings").replaceChildren();
  $("caption").textContent = "";
  setState("starting", "opening the video");
  try {
    await openSource();
  } catch (err) {
    setState("error", `video: ${err.message || err}`);
    session = null;
    return;
  }
  const fps = Number($("fps").value) || 2;
  const threshold = $("threshold").value === "" ? null : Number($("threshold").value);
  session.threshold = threshold ?? DEFAULT_THRESHOLD;
  const open = { fps, credentials: {} };
  if ($("model").value) open.model = $("model").value;
  if (threshold !== null) open.threshold = threshold;
  if ($("api-key").value) open.credentials.api_key = $("api-key").value;
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  socket = new WebSocket(`${scheme}//${location.host}/v1/stream`);
  socket.onopen = () => { send({ open }); setState("opening", "opening the session"); };
  socket.onmessage = (event) => receive(JSON.parse(event.data), fps);
  socket.onclose = (event) => finish(event.code);
  $("start").disabled = true;
  $("stop").disabled = false;
}

function receive(message, fps) {
  if (message.opened) {
    const opened = message.opened;
    session.firstIndex = opened.next_frame_index;
    session.startedAt = performance.now();
    $("session").textContent = opened.session_id;
    setState("streaming", "streaming");
    ask($("query").value, streamTime());
    sendFrame();
    timer = setInterval(sendFrame, 1000 / fps);
  } else if (message.decision) {
    showDecision(message.decision);
  } else if (message.response_started) {
    const started = message.response_started;
    const item = document.createElement("li");
    item.innerHTML = '<span class="at"></span><span class="text"></span>';
    item.querySelector(".at").textContent = `${started.timestamp.toFixed(1)}s`;
    if (started.query) item.title = `query: ${started.query}`;
    $("replies").append(item);
    session.replies.set(started.timestamp, item);
    showCaption("");
  } else if (message.response_delta) {
    const delta = message.response_delta;
    const item = session.replies.get(delta.timestamp);
    if (item) item.querySelector(".text").textContent += delta.text;
    showCaption($("caption").textContent + delta.text);
  } else if (message.response_done) {
    const done = message.response_done;
    const item = session.replies.get(done.timestamp);
    if (item) {
      item.querySelector(".text").textContent = done.text;
      item.dataset.done = "true";
    }
    showCaption(done.text, CAPTION_HOLD_MS);
  } else if (message.warning) {
    const item = document.createElement("li");
    item.textContent = `${message.warning.code}: ${message.warning.message}`;
    $("warnings").append(item);
  } else if (message.error) {
    setState("error", `error ${message.error.code}: ${message.error.message}`);
  }
}

let captionTimer = null;
function showCaption(text, holdMs) {
  clearTimeout(captionTimer);
  $("caption").textContent = text;
  if (holdMs) captionTimer = setTimeout(() => { $("caption").textContent = ""; }, holdMs);
}

function showDecision(decision) {
  session.decisions.push(decision);
  $("decisions").textContent = session.decisions.length;
  $("p-silent").textContent = decision.p_silent.toFixed(3) + (decision.fired ? " (fired)" : "");
  $("lag").textContent = `${(decision.lag_s * 1000).toFixed(0)} ms`;
  const sentAt = session.sentAt.get(decision.frame_index);
  if (sentAt !== undefined) {
    $("round-trip").textContent = `${(performance.now() - sentAt).toFixed(0)} ms`;
    session.sentAt.delete(decision.frame_index);
  }
  drawTimeline();
}

function drawTimeline() {
  const canvas = $("timeline");
  const width = canvas.width = canvas.clientWidth || canvas.width;
  const height = canvas.height;
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, width, height);
  const decisions = session ? session.decisions : [];
  const pad = 6, last = decisions.length ? decisions[decisions.length - 1].timestamp : 0;
  const begin = decisions.length ? Math.max(decisions[0].timestamp, last - 60) : 0;  // the last minute at most
  const span = Math.max(10, last - begin);  // the line grows from the left over the first 10 s
  const x = (t) => pad + (width - 2 * pad) * (t - begin) / span;
  const y = (p) => pad + (height - 2 * pad) * (1 - p);
  ctx.strokeStyle = "#888";
  ctx.setLineDash([6, 4]);
  ctx.beginPath();
  ctx.moveTo(0, y(session ? session.threshold : DEFAULT_THRESHOLD));
  ctx.lineTo(width, y(session ? session.threshold : DEFAULT_THRESHOLD));
  ctx.stroke();
  ctx.setLineDash([]);
  ctx.strokeStyle = "#4fb3ff";
  ctx.lineWidth = 2;
  ctx.beginPath();
  const shown = decisions.filter((d) => d.timestamp >= begin);
  shown.forEach((d, i) => (i ? ctx.lineTo(x(d.timestamp), y(d.p_silent)) : ctx.moveTo(x(d.timestamp), y(d.p_silent))));
  ctx.stroke();
  ctx.fillStyle = "#ff5a5a";
  for (const d of shown) {
    if (d.fired) { ctx.beginPath(); ctx.arc(x(d.timestamp), y(d.p_silent), 4, 0, 2 * Math.PI); ctx.fill(); }
  }
}

function closeSession() {
  if (!session || session.closing) return;
  session.closing = true;
  clearInterval(timer);
  send({ close: {} });  // the server decides what was sent, then ends the call
  setState("closing", "closing: waiting for the last decisions");
}

function finish(code) {
  clearInterval(timer);
  const camera = stream;
  if (camera) camera.getTracks().forEach((track) => track.stop());
  $("video").pause();
  if (session && session.lastFrame) $("video").poster = session.lastFrame;  // the camera is off: keep the last frame
  if (camera) $("video").srcObject = null;
  stream = null;
  socket = null;
  if (document.body.dataset.state !== "error") {
    setState(code === 1000 ? "closed" : "error", code === 1000 ? "closed" : `connection closed (${code})`);
  }
  $("start").disabled = false;
  $("stop").disabled = true;
}

$("controls").addEventListener("submit", (event) => { event.preventDefault(); start(); });
$("stop").addEventListener("click", closeSession);
$("ask").addEventListener("submit", (event) => {
  event.preventDefault();
  if (session && !session.closing && session.startedAt) ask($("query").value, streamTime());
});
$("source").addEventListener("change", () => { $("file").hidden = $("source").value !== "file"; });

for (const [name, id] of [["source", "source"], ["fps", "fps"], ["threshold", "threshold"], ["key", "api-key"],
                          ["query", "query"]]) {
  if (params.has(name)) $(id).value = params.get(name);
}
$("file").hidden = $("source").value !== "file";
drawTimeline();
$("api-key").addEventListener("change", () => loadModels());
loadModels().then(() => { if (params.get("auto") === "1") start(); });
