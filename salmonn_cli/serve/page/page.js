// The page at /: pick, drop or record audio, ask about it (the answer streams in), or transcribe it
// (with the .srt to download). Plain browser APIs only: no libraries, no network but this server.
"use strict";

const $ = (id) => document.getElementById(id);
let audio = null;        // {blob, name}

// the API's input_audio formats, from the file name; the server reads the container from the bytes
const FORMATS = { wav: "wav", wave: "wav", mp3: "mp3", flac: "flac", ogg: "ogg", oga: "ogg", opus: "ogg" };

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "muted";
}

function headers(extra = {}) {
  const key = $("key").value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function choose(blob, name) {
  audio = { blob, name };
  $("chosen").textContent = `${name} (${(blob.size / 1024).toFixed(0)} kB)`;
  $("preview").src = URL.createObjectURL(blob);
  $("preview").hidden = false;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error ? body.error.message : JSON.stringify(body);
  } catch (e) {
    return `${response.status} ${response.statusText}`;
  }
}

function base64(blob) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(blob);
  });
}

// --- ask: a streamed chat completion -------------------------------------------------------------

async function ask() {
  if (!audio) return status("Choose or record some audio first.", true);
  const ext = audio.name.split(".").pop().toLowerCase();
  const body = {
    model: $("model").textContent,
    stream: true,
    messages: [{ role: "user", content: [
      { type: "text", text: $("question").value },
      { type: "input_audio", input_audio: { data: await base64(audio.blob), format: FORMATS[ext] || "wav" } },
    ] }],
  };
  $("answer").textContent = "";
  $("download").hidden = true;
  status("Listening…");
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) });
  if (!response.ok) return status(await errorText(response), true);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    pending += decoder.decode(value, { stream: true });
    let end;
    while ((end = pending.indexOf("\n\n")) >= 0) {
      const line = pending.slice(0, end).trim();
      pending = pending.slice(end + 2);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return status("Done.");
      const chunk = JSON.parse(data);
      if (chunk.error) return status(chunk.error.message, true);
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) $("answer").textContent += choice.delta.content;
      }
    }
  }
  status("The answer ended early.", true);
}

// --- transcribe: the .srt, shown and offered for download -----------------------------------------

async function transcribe() {
  if (!audio) return status("Choose or record some audio first.", true);
  const language = $("language").value.trim();
  const form = new FormData();
  form.append("file", audio.blob, audio.name);
  form.append("model", $("model").textContent);
  form.append("response_format", "srt");
  if (language) form.append("language", language);
  $("answer").textContent = "";
  $("download").hidden = true;
  status(language ? `Translating into ${language}…` : "Transcribing…");
  const route = language ? "/v1/audio/translations" : "/v1/audio/transcriptions";
  const response = await fetch(route, { method: "POST", headers: headers(), body: form });
  if (!response.ok) return status(await errorText(response), true);
  const srt = await response.text();
  $("answer").textContent = srt || "(no speech)";
  const link = $("download");
  link.href = URL.createObjectURL(new Blob([srt], { type: "application/x-subrip" }));
  link.download = audio.name.replace(/\.[^.]*$/, "") + ".srt";
  link.hidden = false;
  status("Done.");
}

// --- recording: 16-bit PCM WAV, made here (browsers record only compressed formats otherwise) ------

let recording = null;

async function toggleRecording() {
  if (recording) return stopRecording();
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (e) {
    return status(`No microphone: ${e.message}`, true);
  }
  const context = new AudioContext();
  const source = context.createMediaStreamSource(stream);
  const processor = context.createScriptProcessor(4096, 1, 1);
  const chunks = [];
  processor.onaudioprocess = (event) => chunks.push(new Float32Array(event.inputBuffer.getChannelData(0)));
  source.connect(processor);
  processor.connect(context.destination);
  recording = { stream, context, processor, chunks };
  $("record").textContent = "Stop recording";
  status("Recording…");
}

function stopRecording() {
  const { stream, context, processor, chunks } = recording;
  recording = null;
  processor.disconnect();
  stream.getTracks().forEach((track) => track.stop());
  context.close();
  $("record").textContent = "Record from the microphone";
  choose(wav(chunks, context.sampleRate), "recording.wav");
  status("Recorded.");
}

function wav(chunks, rate) {
  const n = chunks.reduce((sum, c) => sum + c.length, 0);
  const view = new DataView(new ArrayBuffer(44 + 2 * n));
  const text = (at, s) => [...s].forEach((ch, i) => view.setUint8(at + i, ch.charCodeAt(0)));
  text(0, "RIFF"); view.setUint32(4, 36 + 2 * n, true); text(8, "WAVE");
  text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true); view.setUint16(22, 1, true);
  view.setUint32(24, rate, true); view.setUint32(28, 2 * rate, true); view.setUint16(32, 2, true);
  view.setUint16(34, 16, true); text(36, "data"); view.setUint32(40, 2 * n, true);
  let at = 44;
  for (const c of chunks) {
    for (const x of c) { view.setInt16(at, Math.max(-1, Math.min(1, x)) * 0x7fff, true); at += 2; }
  }
  return new Blob([view], { type: "audio/wav" });
}

// --- wiring ----------------------------------------------------------------------------------------

$("file").addEventListener("change", () => { if ($("file").files[0]) choose($("file").files[0], $("file").files[0].name); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  const file = e.dataTransfer.files[0];
  if (file) choose(file, file.name);
});
$("record").addEventListener("click", toggleRecording);
$("ask").addEventListener("click", () => ask().catch((e) => status(e.message, true)));
$("transcribe").addEventListener("click", () => transcribe().catch((e) => status(e.message, true)));
fetch("/health").then((r) => r.json()).then((h) => { $("model").textContent = h.model; })
  .catch(() => { $("model").textContent = "(unreachable)"; });
