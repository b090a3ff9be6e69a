// The inpainting mask: a canvas laid over the init image, at the image's own pixel size, painted with the
// mouse (or a pen or a finger). What is painted is repainted; it leaves as A1111's `mask`, a PNG where
// white = repaint and black = keep.
"use strict";

class MaskEditor {
  constructor(canvas) {
    this.canvas = canvas;
    this.ctx = canvas.getContext("2d", {willReadFrequently: true});
    this.brushSize = 8;   // in image pixels
    this.eraser = false;
    this.last = null;     // the previous point of the stroke being drawn
    canvas.addEventListener("pointerdown", (e) => this.start(e));
    canvas.addEventListener("pointermove", (e) => this.move(e));
    for (const type of ["pointerup", "pointercancel", "lostpointercapture"]) {
      canvas.addEventListener(type, () => { this.last = null; });
    }
  }

  // Start over on an image of width x height pixels.
  reset(width, height) {
    this.canvas.width = width;
    this.canvas.height = height;
    this.clear();
  }

  clear() {
    this.ctx.clearRect(0, 0, this.canvas.width, this.canvas.height);
    this.canvas.dispatchEvent(new Event("maskchange"));
  }

  // Where a pointer event falls, in image pixels (the canvas is shown scaled).
  point(e) {
    const box = this.canvas.getBoundingClientRect();
    return [(e.clientX - box.left) * this.canvas.width / box.width,
            (e.clientY - box.top) * this.canvas.height / box.height];
  }

  start(e) {
    if (e.button !== 0) return;
    e.preventDefault();
    this.canvas.setPointerCapture(e.pointerId);
    this.last = this.point(e);
    this.stroke(this.last, this.last);
  }

  move(e) {
    if (this.last === null) return;
    const here = this.point(e);
    this.stroke(this.last, here);
    this.last = here;
  }

  stroke([x0, y0], [x1, y1]) {
    const ctx = this.ctx;
    ctx.globalCompositeOperation = this.eraser ? "destination-out" : "source-over";
    ctx.strokeStyle = ctx.fillStyle = "rgb(255, 64, 160)";
    ctx.lineWidth = this.brushSize;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(x0, y0);
    ctx.lineTo(x1 + 0.01, y1);  // a zero-length line draws no round cap
    ctx.stroke();
    this.canvas.dispatchEvent(new Event("maskchange"));
  }

  isEmpty() {
    const {width, height} = this.canvas;
    if (!width || !height) return true;
    const alpha = this.ctx.getImageData(0, 0, width, height).data;
    for (let i = 3; i < alpha.length; i += 4) if (alpha[i] !== 0) return false;
    return true;
  }

  // The mask as A1111 takes it: a data: URL of a black PNG, white where painted.
  toDataURL() {
    const {width, height} = this.canvas;
    const out = document.createElement("canvas");
    out.width = width;
    out.height = height;
    const ctx = out.getContext("2d");
    ctx.drawImage(this.canvas, 0, 0);
    ctx.globalCompositeOperation = "source-in";  // keep the painted shape, make it white
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, width, height);
    ctx.globalCompositeOperation = "destination-over";  // black under it
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, width, height);
    return out.toDataURL("image/png");
  }
}
