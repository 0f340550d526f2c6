// The study page's slice viewer: the analysed series from head to foot, scrolled with the
// mouse wheel, the arrow keys (PageUp/PageDown by ten, Home/End) or the slider; the
// segmentation drawn over it on request; a cursor on the probability chart follows the slice.
(() => {
  "use strict";
  const root = document.getElementById("viewer");
  if (!root) return;
  const $ = (id) => document.getElementById(id);
  const img = $("viewer-image");
  const slider = $("viewer-slider");
  const overlay = $("viewer-overlay");
  const info = $("viewer-info");
  const chart = $("chart");
  const cursor = $("chart-cursor");
  const cache = new Map();
  let slices = [];
  let index = 0;
  let size = 512;

  const url = (s, withOverlay) =>
    root.dataset.image.replace("/slices/0/", `/slices/${s.id}/`) +
    `?size=${size}&overlay=${withOverlay ? 1 : 0}`;

  function picture(i, withOverlay) {
    const key = `${slices[i].id}:${withOverlay}`;
    if (!cache.has(key)) {
      const im = new Image();
      im.src = url(slices[i], withOverlay);
      cache.set(key, im);
    }
    return cache.get(key);
  }

  function describe(s, i) {
    const where = s.position === null ? "" : ` · ${s.position.toFixed(1)} mm`;
    const number = s.image_number === null ? "image ?" : `image ${s.image_number}`;
    const score = s.probability === null
      ? `not analysed: ${s.skipped || "no score"}`
      : `p = ${s.probability.toFixed(3)}`;
    const zone = s.zone ? ` · ${s.zone} zone` : "";
    return `${number} · slice ${i + 1} of ${slices.length}${where}${zone} · ${score}`;
  }

  function moveCursor(s) {
    if (!chart || !cursor || s.position === null) return;
    const [x0, x1, p0, p1] = ["x0", "x1", "p0", "p1"].map((k) => Number(chart.dataset[k]));
    const x = p1 === p0 ? x0 : x0 + ((x1 - x0) * (s.position - p0)) / (p1 - p0);
    cursor.setAttribute("x1", x.toFixed(1));
    cursor.setAttribute("x2", x.toFixed(1));
  }

  function show(i) {
    if (!slices.length) return;
    index = Math.max(0, Math.min(slices.length - 1, i));
    const s = slices[index];
    const withOverlay = overlay.checked && !overlay.disabled;
    img.src = picture(index, withOverlay).src;
    slider.value = String(index);
    info.textContent = describe(s, index);
    $("marker-left").textContent = s.right_on_left ? "R" : "L";
    $("marker-right").textContent = s.right_on_left ? "L" : "R";
    root.dataset.index = String(index);
    root.dataset.slice = String(s.id);
    moveCursor(s);
    for (let d = 1; d <= 6; d++) {  // the neighbours next, so that scrolling does not wait
      if (index + d < slices.length) picture(index + d, withOverlay);
      if (index - d >= 0) picture(index - d, withOverlay);
    }
  }

  function jumpTo(id) {
    const i = slices.findIndex((s) => s.id === id);
    if (i >= 0) show(i);
    root.focus();
  }

  root.addEventListener("wheel", (e) => {
    e.preventDefault();
    show(index + (e.deltaY > 0 ? 1 : -1));
  }, { passive: false });
  root.addEventListener("keydown", (e) => {
    const step = { ArrowDown: 1, ArrowRight: 1, ArrowUp: -1, ArrowLeft: -1,
      PageDown: 10, PageUp: -10 }[e.key];
    if (step !== undefined) show(index + step);
    else if (e.key === "Home") show(0);
    else if (e.key === "End") show(slices.length - 1);
    else return;
    e.preventDefault();
  });
  slider.addEventListener("input", () => show(Number(slider.value)));
  overlay.addEventListener("change", () => show(index));
  document.querySelectorAll("a[data-slice]").forEach((a) => {
    a.addEventListener("click", (e) => {
      e.preventDefault();
      root.scrollIntoView({ block: "start" });
      jumpTo(Number(a.dataset.slice));
    });
  });

  fetch(root.dataset.src, { credentials: "same-origin" })
    .then((r) => {
      if (!r.ok) throw new Error(`the slices could not be loaded (${r.status})`);
      return r.json();
    })
    .then((data) => {
      const headAtHigh = data.slices.length ? data.slices[0].head_at_high : true;
      // head first, as a PACS shows an axial stack
      slices = headAtHigh ? data.slices.slice().reverse() : data.slices.slice();
      slider.max = String(Math.max(0, slices.length - 1));
      if (!data.overlay) {
        overlay.disabled = true;
        $("viewer-overlay-label").hidden = true;
      }
      if ($("chart-low") && $("chart-high")) {
        $("chart-low").textContent += headAtHigh ? " (foot)" : " (head)";
        $("chart-high").textContent += headAtHigh ? " (head)" : " (foot)";
      }
      const wanted = img.parentElement.clientWidth * (window.devicePixelRatio || 1);
      size = data.sizes.find((n) => n >= wanted) || data.sizes[data.sizes.length - 1];
      const keys = $("viewer-keys");
      data.key.forEach((id) => {
        const s = slices.find((x) => x.id === id);
        if (!s) return;
        const b = document.createElement("button");
        b.type = "button";
        b.dataset.slice = String(id);
        const zone = s.zone ? `, ${s.zone}` : "";
        b.textContent = `image ${s.image_number ?? "?"}${zone} (p = ${s.probability.toFixed(2)})`;
        b.addEventListener("click", () => jumpTo(id));
        keys.appendChild(b);
      });
      document.querySelectorAll("[data-image-number-for]").forEach((el) => {
        const s = slices.find((x) => x.id === Number(el.dataset.imageNumberFor));
        if (s && s.image_number !== null) el.textContent = `image ${s.image_number}, `;
      });
      const first = slices.findIndex((s) => s.id === data.key[0]);
      show(first >= 0 ? first : Math.floor(slices.length / 2));
      root.dataset.ready = "1";
    })
    .catch((err) => { info.textContent = err.message; info.classList.add("error"); });
})();
