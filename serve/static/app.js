// The page speaks the same API as any client: GET /v1/models, POST /v1/chat/completions (streamed),
// POST /v1/search. The server decides what is an image (it reads the bytes), so any file is sent and
// the server's message is shown when it refuses one.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];
let imageUrl = null; // the chosen file as a data: URL
let pending = null; // the request under way

// One request at a time: a new one (a second click, another image) cancels the one under way, whose
// answer would otherwise run on into the new one's.
function restart() {
  if (pending) pending.abort();
  pending = new AbortController();
  return pending.signal;
}

function task() {
  const m = models.find((x) => x.id === $("model").value);
  return m ? m.task : null;
}

function setStatus(text) { $("status").textContent = text; }
function setError(text) { $("error").textContent = text; }

function showTask() {
  const t = task();
  const caption = t === "caption";
  $("task").textContent = t === "caption"
    ? "A captioner: it describes the image (the text, if any, is its prompt)."
    : t === "chat" ? "A chat model: ask a question, about an image if you choose one."
    : t === "retrieval" ? "Retrieval: search its gallery." : "";
  $("generate").hidden = t === "retrieval";
  $("search").hidden = t !== "retrieval";
  $("prompt-label").textContent = caption ? "Prompt (optional)" : "Question";
  $("ask").textContent = caption ? "Caption" : "Ask";
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body.error && body.error.code === "body_too_large") {
      // An image travels as base64, a third larger than its file.
      return `the image is too large to send: ${body.error.message}`;
    }
    return body.error ? body.error.message : `HTTP ${response.status}`;
  } catch (e) {
    return `HTTP ${response.status}`;
  }
}

function refuse(text) { setError(text); setStatus("refused"); }

// A failed fetch or a connection lost mid-stream: said on the page, not left at "generating...".
function unreachable(e) {
  setError(`cannot reach the server: ${e.message}`);
  setStatus("failed");
}

async function ask() {
  const signal = restart();
  setError("");
  $("answer").textContent = "";
  const text = $("prompt").value.trim();
  // A chat model answers text alone (the server says so when a model needs an image); a captioner needs one.
  if (!imageUrl && task() !== "chat") { refuse("Choose an image first."); return; }
  if (!imageUrl && !text) { refuse("Type a question, or choose an image."); return; }
  const content = imageUrl ? [{ type: "image_url", image_url: { url: imageUrl } }] : [];
  if (text) content.push({ type: "text", text });
  const body = { model: $("model").value, stream: true, messages: [{ role: "user", content }] };
  const maxTokens = $("max_tokens").value.trim();
  if (maxTokens && !/^-?[0-9]+$/.test(maxTokens)) {
    refuse("Max tokens must be a whole number (or empty: the server's default).");
    return;
  }
  // Any whole number goes to the server, negative ones too: only the server knows its limit, and its
  // message for a number out of range says the bound it crossed.
  if (maxTokens) body.max_tokens = Number(maxTokens);
  setStatus("generating...");
  try {
    await generate(body, signal);
  } catch (e) {
    if (e.name !== "AbortError") unreachable(e); // aborted: a newer request owns the page
  }
}

async function generate(body, signal) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body), signal,
  });
  if (!response.ok) {
    const message = await errorMessage(response);
    if (!signal.aborted) refuse(message); // else a newer request owns the page
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") { setStatus("done"); return; }
      const chunk = JSON.parse(data);
      if (chunk.error) { setError(chunk.error.message); setStatus("failed"); return; }
      const choice = chunk.choices[0];
      if (choice && choice.delta.content) $("answer").textContent += choice.delta.content;
    }
  }
  setError("the connection closed before the answer ended");
  setStatus("failed");
}

async function search() {
  const signal = restart();
  setError("");
  $("results").textContent = "";
  const query = $("query").value.trim();
  if (!query) { refuse("Type a text to search for."); return; }
  setStatus("searching...");
  let hits;
  try {
    const response = await fetch("/v1/search", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model: $("model").value, query, k: 8 }), signal,
    });
    if (!response.ok) {
      const message = await errorMessage(response);
      if (!signal.aborted) refuse(message);
      return;
    }
    hits = (await response.json()).data;
  } catch (e) {
    if (e.name !== "AbortError") unreachable(e);
    return;
  }
  for (const hit of hits) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = hit.url;
    img.alt = hit.image;
    const caption = document.createElement("figcaption");
    caption.textContent = `${hit.rank}. ${hit.score.toFixed(3)}`;
    figure.append(img, caption);
    $("results").append(figure);
  }
  setStatus("done");
}

let latestReader = null;

function useFile(file) {
  if (!file) return;
  // A large file chosen first can finish reading after a small one chosen next: only the last one counts.
  if (latestReader) latestReader.abort();
  const reader = latestReader = new FileReader();
  reader.onload = () => {
    if (reader !== latestReader) return;
    imageUrl = reader.result;
    const preview = $("preview");
    preview.src = imageUrl;
    preview.style.display = file.type.startsWith("image/") ? "block" : "none";
    if (task() === "caption") ask();
  };
  reader.readAsDataURL(file);
}

async function init() {
  try {
    models = (await (await fetch("/v1/models")).json()).data;
  } catch (e) {
    unreachable(e);
    return;
  }
  for (const m of models) {
    const option = document.createElement("option");
    option.value = m.id;
    option.textContent = `${m.id} (${m.task})`;
    $("model").append(option);
  }
  showTask();
  $("model").addEventListener("change", showTask);
  $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
  $("ask").addEventListener("click", ask);
  $("search-button").addEventListener("click", search);
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    useFile(e.dataTransfer.files[0]);
  });
  setStatus("ready");
}

init();
