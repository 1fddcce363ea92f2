// The MiniVLM page: one image at a time. Detection and caption are asked for at once; the question
// goes to /v1/vqa with the same image. Every failure shows the server's own message.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324",
                "#800000", "#000075"];
let current = null; // data URL of the image on show

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function api(path, body) {
  const headers = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  let response;
  try {
    response = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
  } catch (err) {
    throw new Error(`cannot reach the server (${err.message})`);
  }
  let doc = null;
  try { doc = await response.json(); } catch { /* not JSON: reported below */ }
  if (!response.ok) {
    const message = doc && doc.error && doc.error.message ? doc.error.message : response.statusText;
    throw new Error(`${message} (HTTP ${response.status})`);
  }
  return doc;
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

function loadImage(url) {
  return new Promise((resolve) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => resolve(null); // a format the browser cannot show: boxes on a blank canvas
    img.src = url;
  });
}

function draw(img, det) {
  const canvas = $("canvas");
  const scale = Math.min(1, 640 / det.width, 480 / det.height);
  canvas.width = Math.max(1, Math.round(det.width * scale));
  canvas.height = Math.max(1, Math.round(det.height * scale));
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (img) ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  ctx.lineWidth = 2;
  ctx.font = "13px system-ui, sans-serif";
  det.detections.forEach((d, i) => {
    const [x, y, w, h] = d.bbox.map((v) => v * scale);
    const color = COLORS[i % COLORS.length];
    ctx.strokeStyle = color;
    ctx.strokeRect(x, y, w, h);
    const label = `${d.attribute ? d.attribute + " " : ""}${d.category} ${d.score.toFixed(2)}`;
    const tw = ctx.measureText(label).width + 6;
    const ty = y > 16 ? y - 16 : y;
    ctx.fillStyle = color;
    ctx.fillRect(x, ty, tw, 16);
    ctx.fillStyle = "#fff";
    ctx.fillText(label, x + 3, ty + 12);
  });
  canvas.dataset.boxes = String(det.detections.length);
  $("detections").replaceChildren(...det.detections.map((d) => {
    const li = document.createElement("li");
    const [x, y, w, h] = d.bbox.map((v) => Math.round(v));
    li.textContent = `${d.attribute ? d.attribute + " " : ""}${d.category} (${d.score.toFixed(2)}) at ` +
                     `${x},${y} ${w}x${h}`;
    return li;
  }));
}

async function useFile(file) {
  if (!file) return;
  showError("");
  current = null;
  $("caption").textContent = "";
  $("answers").replaceChildren();
  $("detections").replaceChildren();
  $("canvas").dataset.boxes = "0";
  $("question").disabled = $("ask").disabled = true;
  $("status").textContent = `Analysing ${file.name}…`;
  try {
    const url = await readAsDataURL(file);
    const [det, cap, img] = await Promise.all([
      api("/v1/detect", { image: url, max_regions: 10 }),
      api("/v1/caption", { image: url }),
      loadImage(url),
    ]);
    draw(img, det);
    $("caption").textContent = cap.caption || "(empty caption)";
    current = url;
    $("question").disabled = $("ask").disabled = false;
    $("status").textContent = `${file.name}: ${det.width}x${det.height} pixels, ${det.detections.length} regions shown.`;
  } catch (err) {
    $("status").textContent = `${file.name}: failed.`;
    showError(err.message);
  }
}

async function ask(event) {
  event.preventDefault();
  if (!current) return;
  showError("");
  $("answers").replaceChildren();
  $("ask").disabled = true;
  try {
    const doc = await api("/v1/vqa", { image: current, question: $("question").value, top_k: 5 });
    $("answers").replaceChildren(...doc.answers.map((a) => {
      const li = document.createElement("li");
      const name = document.createElement("span");
      name.className = "answer";
      name.textContent = a.answer;
      const meter = document.createElement("meter");
      meter.min = 0; meter.max = 1; meter.value = a.score;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = a.score.toFixed(3);
      li.append(name, meter, score);
      return li;
    }));
  } catch (err) {
    showError(err.message);
  } finally {
    $("ask").disabled = false;
  }
}

window.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => useFile(e.target.files[0]));
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault();
    drop.classList.remove("over");
  }));
  drop.addEventListener("drop", (e) => useFile(e.dataTransfer.files[0]));
  // a drop that misses the zone would make the browser navigate away to the file
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("ask-form").addEventListener("submit", ask);
});
