// The AUTOMATIC1111 "parameters" text, read in the browser (the same rules as sdtorch/infotext.py and
// A1111's parse_generation_parameters), and the PNG text chunk it lives in (a fallback for when the
// server's png-info cannot be reached).
"use strict";

const Infotext = (() => {
  // A1111's parameter-line regex, byte for byte
  const PARAM_RE = /\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)/g;
  const SCHEDULE_SUFFIXES = ["Karras", "Exponential", "Uniform", "SGM Uniform", "SGMUniform", "Polyexponential",
                             "KL Optimal", "Align Your Steps", "Simple", "Normal", "DDIM", "Beta"];

  function pairs(line) {
    const found = [];
    for (const m of line.matchAll(PARAM_RE)) found.push([m[1].trim(), m[2]]);
    return found;
  }

  function unquote(value) {
    if (value.length >= 2 && value.startsWith('"') && value.endsWith('"')) {
      try { return JSON.parse(value); } catch (e) { return value; }
    }
    return value;
  }

  // text -> {Prompt, "Negative prompt", Steps, Sampler, "Schedule type", "CFG scale", Seed, "Size-1", "Size-2", ...}
  function parse(text) {
    const lines = (text || "").trim().split("\n");
    let last = lines.pop() || "";
    if (pairs(last).length < 3) { lines.push(last); last = ""; }
    let prompt = "", negative = "", inNegative = false;
    for (let line of lines) {
      line = line.trim();
      if (line.startsWith("Negative prompt:")) { inNegative = true; line = line.slice(16).trim(); }
      if (inNegative) negative += (negative ? "\n" : "") + line;
      else prompt += (prompt ? "\n" : "") + line;
    }
    const out = {"Prompt": prompt, "Negative prompt": negative};
    for (const [key, raw] of pairs(last)) {
      const value = unquote(raw.trim());
      const size = /^(\d+)x(\d+)$/.exec(value);
      if (size) {  // "Size: 512x768" -> Size-1, Size-2 (as A1111)
        out[key + "-1"] = size[1]; out[key + "-2"] = size[2];
      }
      out[key] = value;
    }
    // before A1111 1.9 the schedule was part of the sampler's name: "DPM++ 2M Karras"
    if (out["Sampler"] && !out["Schedule type"]) {
      for (const suffix of SCHEDULE_SUFFIXES) {
        if (out["Sampler"].endsWith(" " + suffix) && out["Sampler"] !== suffix) {
          out["Sampler"] = out["Sampler"].slice(0, -suffix.length - 1);
          out["Schedule type"] = suffix === "SGMUniform" ? "SGM Uniform" : suffix;
          break;
        }
      }
    }
    return out;
  }

  // The "parameters" tEXt / uncompressed iTXt chunk of a PNG (ArrayBuffer), or null.
  function pngParameters(buffer) {
    const bytes = new Uint8Array(buffer);
    const view = new DataView(buffer);
    const signature = [137, 80, 78, 71, 13, 10, 26, 10];
    if (bytes.length < 8 || signature.some((b, i) => bytes[i] !== b)) return null;
    const latin1 = new TextDecoder("latin1"), utf8 = new TextDecoder("utf-8");
    for (let pos = 8; pos + 8 <= bytes.length;) {
      const length = view.getUint32(pos), type = latin1.decode(bytes.subarray(pos + 4, pos + 8));
      const data = bytes.subarray(pos + 8, Math.min(pos + 8 + length, bytes.length));
      pos += 12 + length;
      if (type === "IEND") break;
      if (type !== "tEXt" && type !== "iTXt") continue;
      const zero = data.indexOf(0);
      if (zero < 0 || latin1.decode(data.subarray(0, zero)) !== "parameters") continue;
      if (type === "tEXt") return latin1.decode(data.subarray(zero + 1));
      if (data[zero + 1] !== 0) continue;  // compressed iTXt: leave it to the server
      let at = data.indexOf(0, zero + 3);  // language tag
      at = data.indexOf(0, at + 1);        // translated keyword
      if (at >= 0) return utf8.decode(data.subarray(at + 1));
    }
    return null;
  }

  return {parse, pngParameters};
})();
