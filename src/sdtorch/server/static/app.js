// The sdtorch web page: a form that speaks the AUTOMATIC1111 API (sdapi/v1/..., relative URLs so the page
// works behind any host, port or path prefix), a live progress bar, and a gallery of this page's results.
"use strict";

const API = "sdapi/v1/";
const $ = (id) => document.getElementById(id);

const state = {
  busy: false,
  lastSeed: null,      // the first seed of the last job (the "reuse" button)
  initImage: null,     // data: URL of the img2img image, the file's own bytes
  initSize: null,      // [width, height] of that image
  samplers: [],        // sdapi/v1/samplers
  schedulers: [],      // sdapi/v1/schedulers
  pollTimer: null,
  taskId: null,        // this page's current job (force_task_id), to find it in the progress' queue
  interrupted: false,
  results: 0,          // images in the gallery so far (download names)
};
const mask = new MaskEditor($("mask-canvas"));

// ---- talking to the server ------------------------------------------------------------------------

async function api(path, body) {
  const init = {headers: {"Accept": "application/json"}};
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(API + path, init);
  const text = await response.text();
  let data = text;
  try { data = text ? JSON.parse(text) : null; } catch (e) { /* not JSON: keep the text */ }
  if (!response.ok) throw new Error(errorMessage(response, data));
  return data;
}

// A1111 answers errors as {error, detail, body, errors}; FastAPI's validation as {detail: [{loc, msg}]}.
function errorMessage(response, data) {
  let message = "";
  if (data && typeof data === "object") {
    const detail = data.detail || data.errors || data.error;
    if (typeof detail === "string") message = detail;
    else if (Array.isArray(detail)) {
      message = detail.map((e) => (e.loc ? e.loc.join(".") + ": " : "") + (e.msg || JSON.stringify(e))).join("; ");
    } else message = JSON.stringify(data);
  } else if (data) message = String(data).slice(0, 300);
  return `${response.status} ${response.statusText}${message ? ": " + message : ""}`;
}

function imageURL(base64) {
  return base64.startsWith("data:") ? base64 : "data:image/png;base64," + base64;
}

function readAsDataURL(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// ---- filling the form from the server --------------------------------------------------------------

function fillSelect(select, items, value, text, preferred) {
  select.replaceChildren(...items.map((item) => new Option(text(item), value(item))));
  const wanted = items.find((item) => value(item) === preferred);
  if (wanted) select.value = value(wanted);
}

async function loadLists() {
  const [samplers, schedulers, models, options, latentModes, upscalers] = await Promise.allSettled(
    ["samplers", "schedulers", "sd-models", "options", "latent-upscale-modes", "upscalers"].map((path) => api(path)));
  const problems = [];
  if (latentModes.status === "fulfilled" && upscalers.status === "fulfilled") {  // the hires fix's, as A1111's
    fillSelect($("hr-upscaler"), [...latentModes.value, ...upscalers.value], (u) => u.name, (u) => u.name, "Latent");
  } else problems.push("upscalers");
  if (samplers.status === "fulfilled") {
    state.samplers = samplers.value;
    fillSelect($("sampler"), state.samplers, (s) => s.name, (s) => s.name, "DPM++ 2M");
    fillSelect($("hr-sampler"), [{name: ""}, ...state.samplers], (s) => s.name, (s) => s.name || "Use same sampler",
               "");
  } else problems.push("samplers: " + samplers.reason.message);
  if (schedulers.status === "fulfilled") {
    state.schedulers = schedulers.value;
    fillSelect($("scheduler"), state.schedulers, (s) => s.name, (s) => s.label || s.name, "automatic");
  } else problems.push("schedulers: " + schedulers.reason.message);
  if (models.status === "fulfilled") {
    fillSelect($("model"), models.value, (m) => m.title, (m) => m.model_name || m.title, null);
    const current = options.status === "fulfilled" ? options.value.sd_model_checkpoint : null;
    const match = models.value.find((m) => current && (m.title === current || m.model_name === current ||
                                                       m.title.startsWith(current + " ")));
    if (match) $("model").value = match.title;
    $("model").dataset.current = $("model").value;
  } else problems.push("models: " + models.reason.message);
  showError(problems.length ? "Could not load " + problems.join("; ") : "");
}

async function switchModel() {
  const select = $("model"), title = select.value;
  select.disabled = $("generate").disabled = true;
  $("model-status").textContent = "loading " + title + "…";
  try {
    await api("options", {sd_model_checkpoint: title});
    select.dataset.current = title;
    $("model-status").textContent = "";
  } catch (e) {
    select.value = select.dataset.current || "";
    $("model-status").textContent = "";
    showError("Could not switch the model: " + e.message);
  } finally {
    select.disabled = false;
    $("generate").disabled = state.busy;
  }
}

// ---- the request ----------------------------------------------------------------------------------

function number(id, parse = Number) {
  const text = $(id).value.trim();
  if (text === "") return undefined;
  const value = parse(text);
  if (!Number.isFinite(value)) throw new Error(`${$(id).closest("label")?.textContent.trim() || id}: not a number`);
  return value;
}
const integer = (id) => number(id, (t) => Number.isInteger(Number(t)) ? Number(t) : NaN);

// ["txt2img" | "img2img", the A1111 request body]
function buildRequest() {
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative-prompt").value,
    sampler_name: $("sampler").value || undefined,
    scheduler: $("scheduler").value || undefined,
    steps: integer("steps"),
    cfg_scale: number("cfg-scale"),        // left out when blank: the model's own
    seed: integer("seed") ?? -1,
    batch_size: integer("batch-size") ?? 1,
    n_iter: 1,
    width: integer("width"),               // left out when blank: the model's own size (or the image's)
    height: integer("height"),
    tiling: $("tiling").checked,
    send_images: true,
    save_images: false,
  };
  if (state.initImage) {
    const [w, h] = state.initSize;
    body.width ??= Math.max(8, Math.floor(w / 8) * 8);
    body.height ??= Math.max(8, Math.floor(h / 8) * 8);
    body.init_images = [state.initImage];
    body.denoising_strength = Number($("denoising-strength").value);
    if (!mask.isEmpty()) {
      Object.assign(body, {
        mask: mask.toDataURL(),
        mask_blur: integer("mask-blur") ?? 4,
        inpainting_fill: 1,               // start from the original picture
        inpaint_full_res: $("inpaint-full-res").checked,
        inpaint_full_res_padding: integer("inpaint-padding") ?? 32,
        inpainting_mask_invert: 0,
      });
    }
    return ["img2img", body];
  }
  if ($("enable-hr").checked) {
    Object.assign(body, {
      enable_hr: true,
      hr_scale: number("hr-scale") ?? 2,
      hr_upscaler: $("hr-upscaler").value,
      hr_second_pass_steps: integer("hr-steps") ?? 0,
      denoising_strength: number("hr-denoise") ?? 0.7,
      hr_sampler_name: $("hr-sampler").value || undefined,   // blank: the first pass's
    });
  }
  return ["txt2img", body];
}

// ---- generating -----------------------------------------------------------------------------------

function setBusy(busy) {
  state.busy = busy;
  document.body.dataset.state = busy ? "busy" : "idle";
  $("generate").disabled = busy;
  $("interrupt").disabled = $("skip").disabled = !busy;
}

async function generate() {
  if (state.busy) return;
  let kind, body;
  try {
    [kind, body] = buildRequest();
  } catch (e) {
    showError(e.message);
    return;
  }
  showError("");
  setBusy(true);
  state.interrupted = false;
  state.taskId = body.force_task_id = "page-" + Math.random().toString(36).slice(2, 12);
  const started = performance.now();
  startPolling();
  try {
    const result = await api(kind, body);
    addResults(result);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    $("progress").value = state.interrupted ? $("progress").value : 1;
    $("progress-text").textContent = (state.interrupted ? "interrupted" : "done") + ` in ${seconds} s`;
  } catch (e) {
    showError(e.message);
    $("progress-text").textContent = state.interrupted ? "interrupted" : "failed";
  } finally {
    stopPolling();
    setBusy(false);
  }
}

function startPolling() {
  const bar = $("progress");
  bar.value = 0;
  bar.dataset.maxSeen = "0";  // the furthest the bar got during this job (for tests and the curious)
  $("progress-text").textContent = "waiting…";
  const tick = async () => {
    try {
      const progress = await api("progress?skip_current_image=false");
      if (state.busy) showProgress(progress);
    } catch (e) { /* keep polling: the generation request itself reports failures */ }
    if (state.busy) state.pollTimer = setTimeout(tick, 250);
  };
  state.pollTimer = setTimeout(tick, 100);
}

function stopPolling() {
  clearTimeout(state.pollTimer);
  state.pollTimer = null;
}

function showProgress(p) {
  const waiting = p.queue && Array.isArray(p.queue.pending) ? p.queue.pending.indexOf(state.taskId) : -1;
  if (waiting >= 0) {  // another job runs first: its progress is not ours
    $("progress").value = 0;
    $("progress-text").textContent = `queued: ${waiting + 1} job(s) ahead`;
    return;
  }
  const s = p.state || {};
  const value = Math.min(1, Math.max(0, Number(p.progress) || 0));
  const bar = $("progress");
  bar.value = value;
  bar.dataset.maxSeen = String(Math.max(value, Number(bar.dataset.maxSeen) || 0));
  const parts = [];
  if (s.sampling_steps) parts.push(`step ${s.sampling_step}/${s.sampling_steps}`);
  if (s.job_count > 1) parts.push(`image ${(s.job_no || 0) + 1}/${s.job_count}`);
  if (p.eta_relative > 0) parts.push(`ETA ${Number(p.eta_relative).toFixed(1)} s`);
  if (p.textinfo) parts.push(p.textinfo);
  if (state.interrupted) parts.push("interrupting…");
  $("progress-text").textContent = `${Math.round(value * 100)}%` + (parts.length ? " · " + parts.join(" · ") : "");
  if (p.current_image) {
    $("preview").src = imageURL(p.current_image);
    $("preview").hidden = false;
  }
}

async function interrupt() {
  state.interrupted = true;
  $("progress-text").textContent = "interrupting…";
  try { await api("interrupt", {}); } catch (e) { showError("Interrupt failed: " + e.message); }
}

async function skip() {
  try { await api("skip", {}); } catch (e) { showError("Skip failed: " + e.message); }
}

// ---- the gallery ----------------------------------------------------------------------------------

function addResults(result) {
  let info = {};
  try { info = typeof result.info === "string" ? JSON.parse(result.info) : (result.info || {}); } catch (e) { /* keep {} */ }
  const texts = info.infotexts || [], seeds = info.all_seeds || [];
  if (info.seed !== undefined) state.lastSeed = info.seed;
  const cards = (result.images || []).map((image, i) =>
    resultCard(imageURL(image), texts[i] || "", seeds[i] ?? info.seed, info.warnings));
  $("gallery").prepend(...cards);  // newest job first, its images in order
  $("preview").hidden = true;
}

function resultCard(url, text, seed, warnings) {
  const card = $("result-template").content.firstElementChild.cloneNode(true);
  state.results += 1;
  card.dataset.seed = seed ?? "";
  card.querySelector(".result-image").src = url;
  card.querySelector(".result-image").alt = text.split("\n")[0];
  card.querySelector(".result-params").textContent =
    text + (Array.isArray(warnings) && warnings.length ? "\n\n" + warnings.join("\n") : "");
  const link = card.querySelector(".result-download");
  link.href = url;
  link.download = `${String(state.results).padStart(5, "0")}-${seed ?? "image"}.png`;
  card.querySelector(".send-to-img2img").addEventListener("click", async () => {
    await setInitImage(url);
    $("img2img-section").scrollIntoView({behavior: "smooth"});
  });
  card.querySelector(".use-settings").addEventListener("click", () => applyParameters(Infotext.parse(text)));
  return card;
}

// ---- img2img and inpainting -----------------------------------------------------------------------

async function setInitImage(url) {
  const img = $("init-image");
  await new Promise((resolve, reject) => {
    img.onload = resolve;
    img.onerror = () => reject(new Error("the browser cannot read this image"));
    img.src = url;
  });
  state.initImage = url;
  state.initSize = [img.naturalWidth, img.naturalHeight];
  mask.reset(img.naturalWidth, img.naturalHeight);
  $("brush-size").max = String(Math.max(...state.initSize));
  setBrush(Math.max(1, Math.round(Math.max(...state.initSize) / 10)));
  $("canvas-box").hidden = false;
  $("init-badge").hidden = false;
  $("img2img-section").open = true;
  $("width").placeholder = String(Math.floor(img.naturalWidth / 8) * 8);
  $("height").placeholder = String(Math.floor(img.naturalHeight / 8) * 8);
  updateMode();
}

function removeInitImage() {
  state.initImage = state.initSize = null;
  $("init-image").removeAttribute("src");
  mask.reset(0, 0);
  $("canvas-box").hidden = true;
  $("init-badge").hidden = true;
  $("width").placeholder = $("height").placeholder = "model's";
  updateMode();
}

async function useInitFile(file) {
  try {
    showError("");
    await setInitImage(await readAsDataURL(file));
  } catch (e) {
    showError(`${file.name}: ${e.message}`);
  }
}

function setBrush(size) {
  mask.brushSize = Number(size);
  $("brush-size").value = size;
  $("brush-value").textContent = size;
}

// What Generate will do: txt2img, img2img or inpainting (the hires fix is txt2img's only).
function updateMode() {
  const mode = !state.initImage ? "txt2img" : mask.isEmpty() ? "img2img" : "inpaint";
  document.body.dataset.mode = mode;
  $("generate").textContent = mode === "txt2img" ? "Generate" : `Generate (${mode})`;
  $("enable-hr").disabled = mode !== "txt2img";
}

// ---- reading parameters back from a PNG -----------------------------------------------------------

async function readParameters(file) {
  showError("");
  let text = null;
  try {
    const answer = await api("png-info", {image: await readAsDataURL(file)});
    text = answer && typeof answer.info === "string" ? answer.info : "";
  } catch (e) {  // the server could not read it: try the PNG's own text chunk
    text = Infotext.pngParameters(await file.arrayBuffer());
    if (text === null) {
      showError(`${file.name}: could not read its parameters (${e.message})`);
      return;
    }
  }
  $("png-info-section").open = true;
  $("png-info-text").textContent = text || `${file.name} has no parameters`;
  if (text) applyParameters(Infotext.parse(text));
}

function findOption(select, wanted, names) {
  const key = String(wanted).toLowerCase();
  for (const option of select.options) {
    if ((names(option.value) || [option.value, option.text]).some((n) => String(n).toLowerCase() === key)) {
      return option.value;
    }
  }
  return null;
}

// Fill the form from parsed parameters ({Prompt, "Negative prompt", Steps, Sampler, ...}); report what did not fit.
function applyParameters(p) {
  const unknown = [];
  $("prompt").value = p["Prompt"] ?? "";
  $("negative-prompt").value = p["Negative prompt"] ?? "";
  const set = (id, key) => { if (p[key] !== undefined) $(id).value = p[key]; };
  set("steps", "Steps");
  set("cfg-scale", "CFG scale");
  set("seed", "Seed");
  set("width", "Size-1");
  set("height", "Size-2");
  if (p["Sampler"]) {
    const samplerNames = (value) => {
      const s = state.samplers.find((x) => x.name === value);
      return s ? [s.name, ...(s.aliases || [])] : null;
    };
    const value = findOption($("sampler"), p["Sampler"], samplerNames);
    if (value !== null) $("sampler").value = value; else unknown.push(`sampler ${p["Sampler"]}`);
  }
  const schedule = p["Schedule type"] || "Automatic";
  const scheduleNames = (value) => {
    const s = state.schedulers.find((x) => x.name === value);
    return s ? [s.name, s.label, ...(s.aliases || [])] : null;
  };
  const scheduleValue = findOption($("scheduler"), schedule, scheduleNames);
  if (scheduleValue !== null) $("scheduler").value = scheduleValue; else unknown.push(`schedule ${schedule}`);
  const hires = p["Hires upscale"] !== undefined || p["Hires resize-1"] !== undefined;
  $("enable-hr").checked = hires;
  if (hires) {
    set("hr-scale", "Hires upscale");
    set("hr-steps", "Hires steps");
    set("hr-denoise", "Denoising strength");
    if (p["Hires upscaler"]) {
      const value = findOption($("hr-upscaler"), p["Hires upscaler"], () => null);
      if (value !== null) $("hr-upscaler").value = value;
    }
    const hiresSampler = p["Hires sampler"] ? findOption($("hr-sampler"), p["Hires sampler"], () => null) : "";
    if (hiresSampler !== null) $("hr-sampler").value = hiresSampler; else unknown.push(`sampler ${p["Hires sampler"]}`);
    $("hires-section").open = true;
  } else if (p["Denoising strength"] !== undefined) {
    $("denoising-strength").value = p["Denoising strength"];
    $("denoising-value").textContent = $("denoising-strength").value;
  }
  set("mask-blur", "Mask blur");
  $("tiling").checked = p["Tiling"] === "True";
  if (unknown.length) showError("Not available here: " + unknown.join(", "));
}

// ---- wiring ---------------------------------------------------------------------------------------

// Small pictures (the built-in model draws 64 px) are shown enlarged with sharp pixels.
document.addEventListener("load", (e) => {
  if (e.target instanceof HTMLImageElement) e.target.classList.toggle("pixel", e.target.naturalWidth <= 256);
}, true);

function dropTarget(e) {
  return $("init-drop").contains(e.target) ? "init" : "parameters";
}

function wire() {
  $("generate").addEventListener("click", generate);
  $("interrupt").addEventListener("click", interrupt);
  $("skip").addEventListener("click", skip);
  $("model").addEventListener("change", switchModel);
  $("seed-random").addEventListener("click", () => { $("seed").value = -1; });
  $("seed-reuse").addEventListener("click", () => { if (state.lastSeed !== null) $("seed").value = state.lastSeed; });
  $("denoising-strength").addEventListener("input", (e) => { $("denoising-value").textContent = e.target.value; });
  $("brush-size").addEventListener("input", (e) => setBrush(e.target.value));
  $("eraser").addEventListener("change", (e) => { mask.eraser = e.target.checked; });
  $("mask-clear").addEventListener("click", () => mask.clear());
  $("mask-canvas").addEventListener("maskchange", updateMode);
  $("init-remove").addEventListener("click", removeInitImage);
  $("init-file").addEventListener("change", (e) => { if (e.target.files[0]) useInitFile(e.target.files[0]); e.target.value = ""; });
  $("png-info-file").addEventListener("change", (e) => { if (e.target.files[0]) readParameters(e.target.files[0]); e.target.value = ""; });

  // Drop an image on the img2img box to use it; anywhere else to read its parameters into the form.
  document.addEventListener("dragover", (e) => {
    e.preventDefault();
    $("init-drop").classList.toggle("over", dropTarget(e) === "init");
  });
  document.addEventListener("dragleave", () => $("init-drop").classList.remove("over"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    $("init-drop").classList.remove("over");
    const file = [...(e.dataTransfer?.files || [])].find((f) => f.type.startsWith("image/"));
    if (!file) return;
    if (dropTarget(e) === "init") useInitFile(file); else readParameters(file);
  });

  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
      e.preventDefault();
      generate();
    }
  });
}

wire();
updateMode();
loadLists().finally(() => { if (!state.busy) document.body.dataset.state = "idle"; });
