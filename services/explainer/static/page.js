// The explainer page: send the form to /explain (or, with a token, the white-box route) and show the answer.
// No framework and no build step. Text from the server is only ever set as textContent, never as HTML.
// The white-box token is read from its field when a request is sent and kept nowhere else.
"use strict";

(function () {
  const form = document.getElementById("explain-form");
  const fileInput = document.getElementById("image");
  const dropZone = document.getElementById("drop-zone");
  const chosen = document.getElementById("image-chosen");
  const preview = document.getElementById("preview");
  const labelSelect = document.getElementById("label");
  const methodSelect = document.getElementById("method");
  const tokenInput = document.getElementById("token");
  const whitebox = document.getElementById("whitebox");
  const submit = document.getElementById("submit");
  const status = document.getElementById("status");
  const errorBox = document.getElementById("error");
  const result = document.getElementById("result");
  const heading = document.getElementById("result-heading");
  const headline = document.getElementById("result-headline");
  const facts = document.getElementById("result-facts");
  const panel = document.getElementById("panel");
  const downloads = document.getElementById("downloads");

  // Advanced fields sent as typed, and only when the person filled them in (the server's defaults apply
  // otherwise, and a server that does not know a field yet ignores it).
  const ADVANCED = ["max_queries", "target", "refine", "saliency", "tau", "beta", "alpha"];
  const IMAGES = [
    ["panel", "panel.png", "Panel (original, changed, saliency)"],
    ["adversarial", "adversarial.png", "Changed image"],
    ["saliency", "saliency.png", "Saliency map"],
    ["overlay", "overlay.png", "Saliency over the image"],
  ];

  let previewUrl = null;
  let resultUrls = [];

  // ------------------------------------------------------------ choosing the image

  function showChosen() {
    const file = fileInput.files && fileInput.files[0];
    if (previewUrl) {
      URL.revokeObjectURL(previewUrl);
      previewUrl = null;
    }
    if (!file) {
      chosen.textContent = "";
      preview.hidden = true;
      preview.removeAttribute("src");
      return;
    }
    chosen.textContent = "Chosen: " + file.name + " (" + sizeInWords(file.size) + ")";
    if (file.type.startsWith("image/")) {
      previewUrl = URL.createObjectURL(file);
      preview.src = previewUrl;
      preview.alt = "Preview of " + file.name;
      preview.hidden = false;
    } else {
      preview.hidden = true;
      preview.removeAttribute("src");
    }
  }

  function sizeInWords(bytes) {
    if (bytes < 1024) return bytes + " bytes";
    if (bytes < 1024 * 1024) return (bytes / 1024).toFixed(1) + " KB";
    return (bytes / (1024 * 1024)).toFixed(1) + " MB";
  }

  fileInput.addEventListener("change", showChosen);

  dropZone.addEventListener("dragover", function (event) {
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    dropZone.classList.add("dragging");
  });
  dropZone.addEventListener("dragleave", function () {
    dropZone.classList.remove("dragging");
  });
  dropZone.addEventListener("drop", function (event) {
    event.preventDefault();
    dropZone.classList.remove("dragging");
    const files = event.dataTransfer && event.dataTransfer.files;
    if (!files || files.length === 0) return;
    // One file: the explainer takes exactly one image.
    const one = new DataTransfer();
    one.items.add(files[0]);
    fileInput.files = one.files;
    showChosen();
  });

  // ------------------------------------------------------------ sending

  function formData() {
    const data = new FormData();
    data.append("image", fileInput.files[0]);
    data.append("label", labelSelect.value);
    data.append("method", methodSelect.value);
    for (const name of ADVANCED) {
      const value = document.getElementById(name).value.trim();
      if (value !== "") data.append(name, value);
    }
    // Typed out of 255 for people; the API takes [0, 1] pixel units.
    const maxLinf = document.getElementById("max_linf").value.trim();
    if (maxLinf !== "") {
      const levels = Number(maxLinf);
      data.append("max_linf", Number.isFinite(levels) ? String(levels / 255) : maxLinf);
    }
    return data;
  }

  function setBusy(busy) {
    submit.disabled = busy;
    form.setAttribute("aria-busy", busy ? "true" : "false");
    status.textContent = busy ? "Explaining… this can take a few seconds." : "";
  }

  function showError(text, detail) {
    errorBox.replaceChildren();
    const strong = document.createElement("strong");
    strong.textContent = text;
    errorBox.append(strong);
    if (detail) {
      const p = document.createElement("p");
      p.textContent = detail;
      errorBox.append(p);
    }
    errorBox.hidden = false;
    errorBox.focus();
  }

  function errorDetail(response, body) {
    const code = body && body.error && body.error.code;
    const where = "HTTP " + response.status + (code ? ", " + code : "");
    if (body && body.error && typeof body.error.message === "string" && body.error.message) {
      let message = body.error.message;
      if (response.status === 404 && response.url.includes("/internal/")) {
        message = "This explainer has no white-box route (it runs without a white-box token or model).";
      }
      return sentence(message) + " (" + where + ")";
    }
    return "The explainer answered " + where + (response.statusText ? " " + response.statusText : "") + ".";
  }

  function sentence(text) {
    const trimmed = text.trim();
    const first = trimmed.charAt(0).toUpperCase() + trimmed.slice(1);
    return /[.!?]$/.test(first) ? first : first + ".";
  }

  form.addEventListener("submit", async function (event) {
    event.preventDefault();
    errorBox.hidden = true;
    if (!fileInput.files || fileInput.files.length === 0) {
      showError("Choose an image first.", "Use the file picker, or drag an image onto the box.");
      fileInput.focus();
      return;
    }
    if (!labelSelect.value) {
      showError("Choose the true label first.", "The explainer needs to know what the image really shows.");
      labelSelect.focus();
      return;
    }
    const token = whitebox.hidden ? "" : tokenInput.value.trim();
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = "Bearer " + token;
    const url = token ? "/internal/whitebox/explain" : "/explain";

    setBusy(true);
    let response;
    let body = null;
    try {
      response = await fetch(url, {
        method: "POST", body: formData(), headers: headers,
        credentials: "omit", cache: "no-store", referrerPolicy: "no-referrer",
      });
      try {
        body = await response.json();
      } catch (_) {
        body = null;
      }
    } catch (err) {
      setBusy(false);
      showError("Could not reach the explainer.", "Check that it is running, then try again. (" + err.message + ")");
      return;
    }
    setBusy(false);
    if (!response.ok) {
      showError("The explainer could not explain this image.", errorDetail(response, body));
      return;
    }
    if (!body || typeof body !== "object" || !body.images) {
      showError("The explainer sent an answer this page does not understand.", "HTTP " + response.status + ".");
      return;
    }
    showResult(body, token ? "white box" : "black box");
  });

  // ------------------------------------------------------------ showing the answer

  function quoted(name) {
    return "“" + name + "”";
  }

  function count(n, one, many) {
    return n + " " + (n === 1 ? one : many);
  }

  function describe(body, route) {
    const wanted = body.target || body.label;
    const lines = [];
    let top;
    if (body.already_correct) {
      top = "The model already predicts " + quoted(body.original_prediction) + " for this image: there is nothing to explain.";
    } else if (body.success) {
      top = "Found a change that makes the model predict " + quoted(wanted) + ".";
    } else {
      top = "No change was found that makes the model predict " + quoted(wanted) + ".";
    }
    lines.push("For your image the model predicted " + quoted(body.original_prediction) +
               "; the true label is " + quoted(body.label) + ".");
    if (body.target && body.target !== body.label) {
      lines.push("The change was meant to make it predict " + quoted(body.target) + ".");
    }
    if (body.success && !body.already_correct) {
      lines.push("After the change it predicts " + quoted(body.final_prediction) + ".");
    } else if (!body.success) {
      lines.push("The last image tried was classified as " + quoted(body.final_prediction) + ".");
    }
    const oracle = route === "white box" ? "the model" : "the black box";
    lines.push("It took " + count(body.queries, "query", "queries") + " to " + oracle + " (" +
               count(body.search_queries, "query", "queries") + " after the first prediction).");
    if (typeof body.l2 === "number" && typeof body.linf === "number" && !body.already_correct) {
      lines.push("Size of the change: L2 distance " + body.l2.toFixed(3) + "; the largest change to any pixel is " +
                 body.linf.toFixed(4) + ", that is " + Math.round(body.linf * 255) + "/255 of the brightness range.");
    }
    if (body.failure_reason) {
      lines.push("Why: " + sentence(String(body.failure_reason)));
    }
    lines.push("Method: " + body.method + ", through the " + route + ".");
    return { top: top, lines: lines };
  }

  function pngBlob(base64) {
    const raw = atob(base64);
    const bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    return new Blob([bytes], { type: "image/png" });
  }

  function link(url, filename, text) {
    const li = document.createElement("li");
    const a = document.createElement("a");
    a.href = url;
    a.download = filename;
    a.textContent = text + " (" + filename + ")";
    li.append(a);
    return li;
  }

  function showResult(body, route) {
    for (const url of resultUrls) URL.revokeObjectURL(url);
    resultUrls = [];
    const words = describe(body, route);
    headline.textContent = words.top;
    headline.className = "headline " + (body.success ? "ok" : "failed");
    facts.replaceChildren(...words.lines.map(function (line) {
      const li = document.createElement("li");
      li.textContent = line;
      return li;
    }));
    downloads.replaceChildren();
    for (const [key, filename, text] of IMAGES) {
      if (typeof body.images[key] !== "string") continue;
      const url = URL.createObjectURL(pngBlob(body.images[key]));
      resultUrls.push(url);
      downloads.append(link(url, filename, text));
      if (key === "panel") {
        panel.src = url;
        panel.alt = "Panel: your image (predicted " + body.original_prediction + "), the changed image (predicted " +
                    body.final_prediction + ") and the saliency map.";
      }
    }
    const json = URL.createObjectURL(new Blob([JSON.stringify(body, null, 2)], { type: "application/json" }));
    resultUrls.push(json);
    downloads.append(link(json, "explanation.json", "Everything the explainer answered"));
    result.hidden = false;
    heading.focus();
  }
})();
