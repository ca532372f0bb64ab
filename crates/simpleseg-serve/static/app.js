"use strict";
const $ = (id) => document.getElementById(id);
const canvas = $("canvas"), ctx = canvas.getContext("2d");
let zoom = 1;
let image = null, dataUrl = null, target = null, polygons = [], maskBits = null, result = null, controller = null;
window.simpleseg = { polygons: () => polygons, result: () => result, done: false };

function setStatus(text, error) { $("status").textContent = text; $("status").className = error ? "err" : ""; }

// The EXIF orientation of a JPEG (1, upright, when there is none). Browsers show a photo
// turned as its EXIF says; the server reads the pixels as stored (as Pillow does).
function exifOrientation(buffer) {
  try {
    const v = new DataView(buffer);
    if (v.getUint16(0) !== 0xFFD8) return 1;
    for (let p = 2; p + 4 <= v.byteLength; p += 2 + v.getUint16(p + 2)) {
      const marker = v.getUint16(p);
      if (marker === 0xFFE1 && v.getUint32(p + 4) === 0x45786966) {
        const tiff = p + 10, le = v.getUint16(tiff) === 0x4949;
        const ifd = tiff + v.getUint32(tiff + 4, le);
        for (let i = 0, n = v.getUint16(ifd, le); i < n; i++) {
          const entry = ifd + 2 + i * 12;
          if (v.getUint16(entry, le) === 0x0112) return v.getUint16(entry + 8, le);
        }
        return 1;
      }
      if ((marker & 0xFF00) !== 0xFF00 || marker === 0xFFDA) return 1;
    }
  } catch (e) { /* a truncated header: treat as upright */ }
  return 1;
}

const readAs = (file, how) => new Promise((ok, fail) => { const r = new FileReader(); r.onload = () => ok(r.result); r.onerror = fail; r[how](file); });

async function loadFile(file) {
  dataUrl = await readAs(file, "readAsDataURL");
  image = new Image();
  await new Promise((ok, fail) => { image.onload = ok; image.onerror = () => fail(new Error("not an image")); image.src = dataUrl; });
  canvas.width = image.naturalWidth; canvas.height = image.naturalHeight;
  // One frame for everything: a photo the browser turns upright is sent as shown (the
  // picture drawn upright, as PNG), so the outline comes back where it is drawn.
  const turned = exifOrientation(await readAs(file, "readAsArrayBuffer")) > 1;
  if (turned) { ctx.drawImage(image, 0, 0); dataUrl = canvas.toDataURL("image/png"); }
  window.simpleseg.turned = turned;
  // Small images are shown enlarged (whole pixels), so their outlines can be seen.
  const stage = $("stage");
  zoom = Math.max(1, Math.min(8, Math.floor(Math.min((stage.clientWidth - 8) / canvas.width, 560 / canvas.height))));
  canvas.style.width = zoom > 1 ? `${canvas.width * zoom}px` : "";
  canvas.style.imageRendering = zoom > 1 ? "pixelated" : "";
  $("hint").style.display = "none"; polygons = []; maskBits = null; result = null; target = null;
  $("go").disabled = false; draw(); setStatus(`${image.naturalWidth} x ${image.naturalHeight}${turned ? " (turned upright as its EXIF says; sent as shown)" : ""}`);
}

function draw() {
  if (!image) return;
  ctx.drawImage(image, 0, 0);
  const w = canvas.width, h = canvas.height;
  if (maskBits && $("fill").checked) {
    const over = ctx.getImageData(0, 0, w, h);
    for (let i = 0; i < w * h; i++) if (maskBits[i]) {
      const p = i * 4; over.data[p] = (over.data[p] + 37) / 2; over.data[p + 1] = (over.data[p + 1] + 99) / 2; over.data[p + 2] = (over.data[p + 2] + 235) / 2;
    }
    ctx.putImageData(over, 0, 0);
  }
  ctx.lineWidth = Math.max(2 / zoom, w / 300); ctx.strokeStyle = "#f59e0b"; ctx.fillStyle = "#f59e0b";
  for (const poly of polygons) {
    ctx.beginPath();
    poly.forEach(([x, y], i) => i ? ctx.lineTo(x * w, y * h) : ctx.moveTo(x * w, y * h));
    if (poly.length > 2) ctx.closePath();
    ctx.stroke();
    for (const [x, y] of poly) { ctx.beginPath(); ctx.arc(x * w, y * h, ctx.lineWidth * 1.2, 0, 7); ctx.fill(); }
  }
  if (target && target.point) { ctx.fillStyle = "#dc2626"; ctx.beginPath(); ctx.arc(target.point[0] * w, target.point[1] * h, ctx.lineWidth * 2.5, 0, 7); ctx.fill(); }
  if (target && target.box) { const [a, b, c, d] = target.box; ctx.strokeStyle = "#dc2626"; ctx.strokeRect(a * w, b * h, (c - a) * w, (d - b) * h); }
}

// COCO RLE: column-major runs, compressed counts as pycocotools writes them.
function decodeRle(rle) {
  const [h, w] = rle.size; let counts = rle.counts;
  if (typeof counts === "string") {
    const s = counts, out = []; let p = 0;
    while (p < s.length) {
      let x = 0, k = 0, more = 1;
      while (more) { const c = s.charCodeAt(p) - 48; x |= (c & 0x1f) << (5 * k); more = c & 0x20; p++; k++; if (!more && (c & 0x10)) x |= -1 << (5 * k); }
      if (out.length > 2) x += out[out.length - 2];
      out.push(x);
    }
    counts = out;
  }
  const bits = new Uint8Array(w * h); let idx = 0, v = 0;
  for (const c of counts) { for (let j = 0; j < c; j++) { const col = Math.floor(idx / h), row = idx % h; if (v) bits[row * w + col] = 1; idx++; } v = 1 - v; }
  return bits;
}

function relPos(ev) {
  const r = canvas.getBoundingClientRect();
  return [Math.min(1, Math.max(0, (ev.clientX - r.left) / r.width)), Math.min(1, Math.max(0, (ev.clientY - r.top) / r.height))];
}
let dragStart = null;
canvas.addEventListener("mousedown", (ev) => { if ($("kind").value === "box") dragStart = relPos(ev); });
canvas.addEventListener("mouseup", (ev) => {
  const kind = $("kind").value, p = relPos(ev), r3 = (v) => Math.round(v * 1000) / 1000;
  if (kind === "point") target = { point: p.map(r3) };
  if (kind === "box" && dragStart) target = { box: [Math.min(dragStart[0], p[0]), Math.min(dragStart[1], p[1]), Math.max(dragStart[0], p[0]), Math.max(dragStart[1], p[1])].map(r3) };
  dragStart = null; $("picked").textContent = target ? JSON.stringify(target) : ""; draw();
});
$("kind").addEventListener("change", () => { $("queryLabel").style.display = $("kind").value === "query" ? "" : "none"; target = null; $("picked").textContent = ""; draw(); });
$("fill").addEventListener("change", draw);
$("file").addEventListener("change", (ev) => ev.target.files[0] && loadFile(ev.target.files[0]).catch((e) => setStatus(e.message, true)));
const stage = $("stage");
stage.addEventListener("dragover", (ev) => { ev.preventDefault(); stage.classList.add("drag"); });
stage.addEventListener("dragleave", () => stage.classList.remove("drag"));
stage.addEventListener("drop", (ev) => { ev.preventDefault(); stage.classList.remove("drag"); const f = ev.dataTransfer.files[0]; if (f) loadFile(f).catch((e) => setStatus(e.message, true)); });

function headers() { const h = { "Content-Type": "application/json" }; if ($("key").value) h.Authorization = "Bearer " + $("key").value; return h; }

async function segment() {
  const kind = $("kind").value, body = { image: dataUrl, stream: true, temperature: 0, constrain: $("constrain").checked ? "polygon" : "none" };
  if (kind === "query") body.query = $("query").value;
  else if (target && target[kind]) body[kind] = target[kind];
  else { setStatus(kind === "point" ? "click the object first" : "drag a box first", true); return; }
  polygons = []; maskBits = null; result = null; window.simpleseg.done = false; $("answer").textContent = "";
  $("go").disabled = true; $("stop").disabled = false; $("dlPng").disabled = $("dlRle").disabled = true; setStatus("thinking...");
  controller = new AbortController(); const t0 = performance.now();
  try {
    const res = await fetch("/v1/segment", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!res.ok) { const e = await res.json().catch(() => ({})); throw new Error((e.error && e.error.message) || res.statusText); }
    const reader = res.body.getReader(), dec = new TextDecoder(); let buf = "";
    for (;;) {
      const { value, done } = await reader.read(); if (done) break;
      buf += dec.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
        let name = "message", data = "";
        for (const line of block.split("\n")) { if (line.startsWith("event:")) name = line.slice(6).trim(); else if (line.startsWith("data:")) data += line.slice(5).trim(); }
        if (!data || data === "[DONE]") continue;
        const msg = JSON.parse(data);
        if (name === "token") $("answer").textContent += msg.text;
        else if (name === "point") { while (polygons.length <= msg.polygon) polygons.push([]); polygons[msg.polygon].push(msg.point); draw(); setStatus(`${polygons.flat().length} points...`); }
        else if (name === "result") {
          result = msg; polygons = msg.polygons; maskBits = decodeRle(msg.rle); draw();
          setStatus(`${msg.polygons.length} polygon(s), ${msg.area} pixels, ${((performance.now() - t0) / 1000).toFixed(1)} s`);
          $("dlPng").disabled = $("dlRle").disabled = false; window.simpleseg.done = true;
        } else if (name === "error") throw new Error(msg.message);
      }
    }
  } catch (e) { if (e.name !== "AbortError") setStatus(e.message, true); else setStatus("stopped"); }
  $("go").disabled = false; $("stop").disabled = true;
}
$("go").addEventListener("click", segment);
$("stop").addEventListener("click", () => controller && controller.abort());

function download(name, blob) { const a = document.createElement("a"); a.href = URL.createObjectURL(blob); a.download = name; a.click(); setTimeout(() => URL.revokeObjectURL(a.href), 1000); }
$("dlRle").addEventListener("click", () => result && download("mask.rle.json", new Blob([JSON.stringify(result.rle)], { type: "application/json" })));
$("dlPng").addEventListener("click", () => {
  if (!maskBits) return; const c = document.createElement("canvas"); c.width = canvas.width; c.height = canvas.height;
  const g = c.getContext("2d"), d = g.createImageData(c.width, c.height);
  for (let i = 0; i < maskBits.length; i++) { const v = maskBits[i] ? 255 : 0; d.data[i * 4] = d.data[i * 4 + 1] = d.data[i * 4 + 2] = v; d.data[i * 4 + 3] = 255; }
  g.putImageData(d, 0, 0); c.toBlob((b) => download("mask.png", b), "image/png");
});
// The model's name needs the key when the server has one: ask /health (open to all) first, and
// ask for the name once a key is typed, so that no request goes out without it.
let keyRequired = false;
function showModel() {
  if (keyRequired && !$("key").value) { $("model").textContent = "model: enter the API key"; return; }
  fetch("/v1/models", { headers: headers() }).then((r) => r.json()).then((m) => {
    $("model").textContent = m.data ? "model: " + m.data[0].id : "model: " + ((m.error && m.error.message) || "unknown");
  }).catch(() => {});
}
fetch("/health").then((r) => r.json()).then((h) => { keyRequired = !!h.api_key_required; showModel(); }).catch(() => {});
$("key").addEventListener("change", showModel);
