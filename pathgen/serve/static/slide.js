// The slide page: OpenSeadragon over the slide's DeepZoom tiles, the tissue outline and every kept patch as
// overlays (coloured by cluster; retrieval picks with a filled corner); a click on a patch opens it.
// Hand-written, no build step. Marks its progress on <body data-*> so that a browser test can wait for it.
(function () {
  "use strict";
  const box = document.getElementById("viewer");
  if (!box) return;
  const mark = (name, value) => { document.body.dataset[name] = String(value); };
  if (box.dataset.viewer !== "yes" || typeof OpenSeadragon === "undefined") { mark("viewer", "missing"); return; }

  function patchLink(slideId, patchId) {
    return "/patches/" + encodeURIComponent(patchId) + "?slide=" + encodeURIComponent(slideId);
  }

  function addPatches(viewer, info) {
    for (const p of info.patches) {
      const link = document.createElement("a");
      link.className = "patch-overlay" + (p.retrieval.length ? " pick" : "");
      link.style.borderColor = p.colour;
      link.href = patchLink(info.slide_id, p.patch_id);
      link.title = p.patch_id + (p.cluster === null ? "" : " · cluster " + p.cluster) +
        (p.retrieval.length ? " · retrieval: " + p.retrieval.join(", ") : "");
      link.dataset.patch = p.patch_id;
      viewer.addOverlay({ element: link, location: viewer.viewport.imageToViewportRectangle(p.x, p.y, p.w0, p.h0) });
      // OpenSeadragon's own tracker takes the canvas's clicks: a tracker on the overlay opens the patch.
      new OpenSeadragon.MouseTracker({ element: link, clickHandler: () => { window.location.href = link.href; } });
    }
    mark("patches", info.patches.length);
  }

  async function addOutline(viewer, info) {
    const reply = await fetch(info.outline_url);
    const outline = await reply.json();
    const note = document.getElementById("outline-note");
    if (!reply.ok) { note.textContent = "Tissue outline: " + outline.error; return; }
    if (outline.note) note.textContent = "Tissue outline: " + outline.note;
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("class", "tissue-outline");
    svg.setAttribute("viewBox", "0 0 " + info.width + " " + info.height);
    svg.setAttribute("preserveAspectRatio", "none");
    const stroke = Math.max(info.width, info.height) / 400;
    for (const polygon of outline.polygons) {
      const shape = document.createElementNS(ns, "polygon");
      shape.setAttribute("points", polygon.map((pt) => pt.join(",")).join(" "));
      shape.setAttribute("fill", "none");
      shape.setAttribute("stroke", "#00c000");
      shape.setAttribute("stroke-width", String(stroke));
      svg.appendChild(shape);
    }
    viewer.addOverlay({ element: svg, location: viewer.viewport.imageToViewportRectangle(0, 0, info.width, info.height) });
    // OpenSeadragon 6 wraps each overlay in a div of its size: the outline's spans the slide and must let clicks
    // through to the patches (and drags to the viewer).
    if (svg.parentElement && svg.parentElement.classList.contains("openseadragon-overlay-wrapper")) {
      svg.parentElement.style.pointerEvents = "none";
    }
    mark("outline", outline.polygons.length);
  }

  async function start() {
    const reply = await fetch(box.dataset.api);
    const info = await reply.json();
    if (!reply.ok) { mark("viewer", "error"); box.textContent = info.error; return; }
    const viewer = OpenSeadragon({
      element: box,
      prefixUrl: "/vendor/openseadragon/images/",
      tileSources: info.dzi,
      showNavigator: true,
      gestureSettingsMouse: { clickToZoom: false },
      // The 2D canvas drawer: OpenSeadragon 6 prefers WebGL, which a browser without a GPU (headless, remote
      // desktops) may not give, leaving the view black while the navigator draws.
      drawer: "canvas",
    });
    let tiles = 0;
    viewer.addHandler("tile-loaded", () => mark("tilesLoaded", ++tiles));
    viewer.addHandler("open-failed", (event) => { mark("viewer", "error"); box.dataset.error = event.message; });
    viewer.addHandler("open", () => {
      addPatches(viewer, info);
      addOutline(viewer, info).catch((error) => mark("outline", "error: " + error));
      mark("viewer", "open");
    });
    window.pathgenViewer = viewer;
  }

  start().catch((error) => { mark("viewer", "error"); box.textContent = String(error); });
})();
