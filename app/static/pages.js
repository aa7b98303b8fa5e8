// The behaviour of each page; <body data-page> says which. Pages hold no data of a
// request: everything shown comes from the JSON API, and user text only ever goes into
// textContent or attributes, never into HTML.

import { apiFetch, ensureKey, readProblem, storedKey } from "./api.js";

const STATUS_WORDS = {
  importing: "storing its rows",
  pending: "waiting to start",
  processing: "processing",
  completed: "completed",
  completed_with_errors: "completed, with errors",
  failed: "failed",
  cancelled: "cancelled",
};
const FINISHED = new Set(["completed", "completed_with_errors", "failed", "cancelled"]);
const POLL_MILLISECONDS = 1000;
const PRODUCTS_PER_PAGE = 50;
const REQUESTS_PER_PAGE = 50;

// A small element builder: el("p", {className: "hint"}, "text", child, ...).
function el(tag, properties = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(properties)) {
    if (name in element) element[name] = value;
    else element.setAttribute(name, value);
  }
  element.append(...children.filter((child) => child !== null && child !== undefined));
  return element;
}

function sentence(text) {
  const trimmed = String(text ?? "").trim();
  if (!trimmed) return "";
  const capitalised = trimmed[0].toUpperCase() + trimmed.slice(1);
  return /[.!?]$/.test(capitalised) ? capitalised : `${capitalised}.`;
}

function formatBytes(bytes) {
  if (bytes < 1024) return `${bytes} B`;
  if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KB`;
  return `${(bytes / 1024 / 1024).toFixed(1)} MB`;
}

function formatTime(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

function isWebAddress(url) {
  try {
    return ["http:", "https:"].includes(new URL(url).protocol);
  } catch {
    return false;
  }
}

function setProgress(bar, percent) {
  const rounded = Math.round(percent);
  bar.setAttribute("aria-valuenow", String(rounded));
  bar.setAttribute("aria-valuetext", `${rounded}%`);
  bar.querySelector(".progress-fill").style.width = `${rounded}%`;
}

function progressBar(label, percent) {
  const bar = el(
    "div",
    { className: "progress", role: "progressbar", "aria-label": label, "aria-valuemin": "0", "aria-valuemax": "100" },
    el("div", { className: "progress-fill" }),
  );
  setProgress(bar, percent);
  return bar;
}

// Brings a list's children in line with items, rebuilding only the entries whose data
// changed: thumbnails already shown stay, and so does keyboard focus.
const shownData = new WeakMap();
function syncList(list, items, keyOf, build) {
  const existing = new Map([...list.children].map((child) => [child.dataset.key, child]));
  let previous = null;
  for (const item of items) {
    const key = String(keyOf(item));
    const data = JSON.stringify(item);
    let entry = existing.get(key);
    existing.delete(key);
    if (!entry || shownData.get(entry) !== data) {
      const fresh = build(item);
      fresh.dataset.key = key;
      shownData.set(fresh, data);
      if (entry) entry.replaceWith(fresh);
      entry = fresh;
    }
    const expected = previous ? previous.nextElementSibling : list.firstElementChild;
    if (entry !== expected) list.insertBefore(entry, expected);
    previous = entry;
  }
  for (const stale of existing.values()) stale.remove();
}

function showLoadProblem(problem) {
  const target = document.getElementById("load-problem");
  if (!problem) {
    target.hidden = true;
    return;
  }
  target.textContent =
    problem.status === 404
      ? "There is no such request, or it was made with another API key."
      : sentence(problem.detail ?? problem.title);
  target.hidden = false;
}

/* ---------------------------------------------------------------- upload page */

function describeCsvProblem(problem) {
  const where = [];
  if (problem.line) where.push(`Line ${problem.line}`);
  if (problem.column) where.push(`column “${problem.column}”`);
  if (problem.location) where.push(`field “${problem.location.replace(/^body\./, "")}”`);
  const message = problem.message ?? "";
  return where.length ? `${where.join(", ")}: ${message}` : sentence(message);
}

function setUpUploadPage() {
  const form = document.getElementById("upload-form");
  const fileInput = document.getElementById("csv-file");
  const dropZone = document.getElementById("drop-zone");
  const status = document.getElementById("upload-status");
  const problems = document.getElementById("upload-problems");
  ensureKey();

  for (const name of ["dragenter", "dragover"]) {
    dropZone.addEventListener(name, (event) => {
      event.preventDefault();
      dropZone.classList.add("dragging");
    });
  }
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("dragging");
    if (event.dataTransfer.files.length) fileInput.files = event.dataTransfer.files;
  });

  const fieldProblems = form.querySelectorAll(".field-problem");

  function clearFieldProblems() {
    for (const target of fieldProblems) {
      target.hidden = true;
      target.textContent = "";
    }
    for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  }

  /* An output option's problem goes beside its field; true when every problem found one. */
  function showFieldProblems(errors) {
    let placed = 0;
    for (const item of errors) {
      const target = item.field ? document.getElementById(`${item.field}-problem`) : null;
      if (!target) continue;
      target.textContent = sentence(item.message ?? "");
      target.hidden = false;
      form.elements.namedItem(item.field)?.setAttribute("aria-invalid", "true");
      placed += 1;
    }
    return errors.length > 0 && placed === errors.length;
  }

  function formData() {
    const data = new FormData(form);
    for (const [name, value] of [...data.entries()]) {
      if (typeof value === "string" && value.trim() === "") data.delete(name);
    }
    // An unchecked box sends nothing, which would mean "the server's default": say no.
    for (const box of form.querySelectorAll("input[type=checkbox]")) data.set(box.name, box.checked ? "true" : "false");
    return data;
  }

  function showProblems(problem) {
    document.getElementById("upload-problems-summary").textContent = sentence(problem.detail ?? problem.title);
    if (showFieldProblems(problem.errors ?? [])) {
      form.querySelector("[aria-invalid]")?.focus();
      return;
    }
    const items = (problem.errors ?? []).map((item) => el("li", {}, describeCsvProblem(item)));
    if (problem.errors_not_shown) items.push(el("li", {}, `…and ${problem.errors_not_shown} more.`));
    document.getElementById("upload-problems-list").replaceChildren(...items);
    problems.hidden = false;
    problems.focus();
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    problems.hidden = true;
    clearFieldProblems();
    status.textContent = "Uploading…";
    try {
      const response = await apiFetch("/upload", { method: "POST", body: formData() });
      if (response.status === 202) {
        const accepted = await response.json();
        status.textContent = "Uploaded. Opening the request's page…";
        window.location.assign(`/requests/${encodeURIComponent(accepted.request_id)}`);
        return;
      }
      status.textContent = "";
      showProblems(await readProblem(response));
    } catch (error) {
      status.textContent = `The upload did not reach the service (${error.message}). Try again.`;
    } finally {
      button.disabled = false;
    }
  });
}

/* ---------------------------------------------------------------- request page */

function setUpRequestPage() {
  const requestId = document.body.dataset.requestId;
  const errorSentences = JSON.parse(document.body.dataset.errorSentences);
  const productList = document.getElementById("products");
  const previousButton = document.getElementById("products-previous");
  const nextButton = document.getElementById("products-next");
  const downloadLink = document.getElementById("download-csv");
  const cursors = [null]; // the cursor of every page up to the one shown
  let nextCursor = null;
  let timer = null;
  let retrying = false; // a retry was sent from this page and has not finished yet

  // Mirrors app/api/image_errors.py:describe_image_error, from the table it sends.
  function describeError(code) {
    const http = /^http_(\d{3})$/.exec(code);
    if (http) {
      const status = http[1];
      const family = { 4: "4xx", 5: "5xx" }[status[0]] ?? "other";
      return (errorSentences.http[status] ?? errorSentences.http[family]).replace("{status}", status);
    }
    return errorSentences.codes[code] ?? `the image failed (${code})`;
  }

  // Output keys are "{request_id}/{image_id}.jpg", so the URL's last part names the image.
  function thumbnailUrl(outputUrl) {
    const file = new URL(outputUrl, window.location.href).pathname.split("/").pop();
    return /^\d+\.(jpg|webp|avif)$/.test(file) ? `/thumbnails/${encodeURIComponent(requestId)}/${file}` : null;
  }

  // "waiting for cdn.example.com (429, retry in 40 s)": a transient failure, tried again later.
  function waitingFor(image) {
    let host = "the image server";
    try {
      host = new URL(image.input_url).host;
    } catch {
      // an input URL the browser cannot parse: keep the generic words
    }
    const code = image.error.code.replace(/^http_/, "");
    const seconds = Math.max(0, Math.ceil((Date.parse(image.retry_at) - Date.now()) / 1000));
    const when = seconds > 0 ? `retry in ${seconds} s` : "retrying now";
    return code === "storage_error" ? `waiting for the storage (${when})` : `waiting for ${host} (${code}, ${when})`;
  }

  function imageEntry(image, position, productName) {
    const entry = el("li", { className: `image ${image.status}` });
    const thumbnail = image.output_url && isWebAddress(image.output_url) && thumbnailUrl(image.output_url);
    if (image.status === "succeeded" && thumbnail) {
      const scale = Math.min(1, 240 / Math.max(image.width || 240, image.height || 240));
      entry.append(
        el(
          "a",
          { href: image.output_url, target: "_blank", rel: "noopener" },
          el("img", {
            src: thumbnail,
            alt: `Image ${position} of ${productName}: open full size`,
            loading: "lazy",
            width: Math.round((image.width || 240) * scale),
            height: Math.round((image.height || 240) * scale),
          }),
        ),
      );
      const saved = image.input_bytes ? Math.round(100 * (1 - image.output_bytes / image.input_bytes)) : null;
      const saving = saved === null ? "" : saved >= 0 ? `, ${saved}% smaller` : `, ${-saved}% larger`;
      entry.append(
        el("p", { className: "sizes" }, `${formatBytes(image.input_bytes)} → ${formatBytes(image.output_bytes)}${saving}`),
        el("p", { className: "hint" }, `${image.width} × ${image.height} px`),
      );
    } else if (image.status === "pending" && image.error && image.retry_at) {
      entry.append(el("p", { className: "hint" }, waitingFor(image)));
    } else if (image.error) {
      entry.append(
        el("p", { className: "error" }, el("code", {}, image.error.code), " ", sentence(describeError(image.error.code))),
      );
    } else {
      const words = { processing: "Processing…", cancelled: "Cancelled: never fetched." };
      entry.append(el("p", {}, words[image.status] ?? "Waiting…"));
    }
    entry.append(el("p", { className: "url", title: "Input URL" }, image.input_url));
    return entry;
  }

  function productEntry(product) {
    return el(
      "li",
      { className: "product" },
      el("h3", {}, `${product.serial_number}. `, product.product_name),
      el("ul", { className: "images" }, ...product.images.map((image, i) => imageEntry(image, i + 1, product.product_name))),
    );
  }

  function describeWebhook(webhook) {
    const answer = webhook.last_status_code ? `HTTP ${webhook.last_status_code}` : webhook.last_error;
    const attempts = `${webhook.attempts} attempt${webhook.attempts === 1 ? "" : "s"}`;
    switch (webhook.state) {
      case "delivered":
        return `The webhook to ${webhook.url} was delivered at ${formatTime(webhook.delivered_at)} (${attempts}, ${answer}).`;
      case "failed":
        return `The webhook to ${webhook.url} could not be delivered after ${attempts}${answer ? `; the last answer was ${answer}` : ""}.`;
      case "pending":
        return `The webhook to ${webhook.url} is being delivered (${attempts} so far${answer ? `, last answer ${answer}` : ""}).`;
      default:
        return `The webhook to ${webhook.url} will be sent shortly.`;
    }
  }

  function show(status) {
    const { progress } = status;
    const finishedImages = progress.succeeded_images + progress.failed_images + progress.cancelled_images;
    const statusWord = document.getElementById("request-status");
    statusWord.textContent = STATUS_WORDS[status.status] ?? status.status;
    statusWord.className = `state-${status.status}`;
    setProgress(document.getElementById("progress"), progress.percent);
    document.getElementById("counts").textContent =
      `${finishedImages} of ${progress.total_images} images finished: ` +
      `${progress.succeeded_images} succeeded, ${progress.failed_images} failed, ` +
      `${progress.cancelled_images} cancelled. ` +
      `${status.total_products} products` +
      (status.stored_products < status.total_products ? ` (${status.stored_products} stored so far).` : ".");

    syncList(productList, status.products, (product) => product.serial_number, productEntry);
    const first = (cursors.length - 1) * PRODUCTS_PER_PAGE + 1;
    document.getElementById("products-range").textContent = status.products.length
      ? `(${first}–${first + status.products.length - 1} of ${status.total_products})`
      : "";
    nextCursor = status.next_cursor;
    nextButton.hidden = !nextCursor;
    previousButton.hidden = cursors.length === 1;

    document.getElementById("finished").hidden = !FINISHED.has(status.status);
    if (retrying && FINISHED.has(status.status)) {
      retrying = false;
      document.getElementById("retry-status").textContent = "The retried images are done.";
    }
    // A cancelled request is not run again (the service answers 409).
    document.getElementById("retry").hidden =
      !FINISHED.has(status.status) || status.status === "cancelled" || progress.failed_images === 0;
    const webhook = document.getElementById("webhook");
    webhook.hidden = !status.webhook || !FINISHED.has(status.status);
    if (status.webhook) document.getElementById("webhook-state").textContent = describeWebhook(status.webhook);
  }

  function keepsChanging(status) {
    return !FINISHED.has(status.status) || ["waiting", "pending"].includes(status.webhook?.state);
  }

  async function refresh() {
    clearTimeout(timer);
    const query = new URLSearchParams({ limit: PRODUCTS_PER_PAGE });
    if (cursors.at(-1)) query.set("cursor", cursors.at(-1));
    try {
      const response = await apiFetch(`/status/${encodeURIComponent(requestId)}?${query}`, {
        headers: { Accept: "application/json" },
      });
      if (!response.ok) {
        showLoadProblem(await readProblem(response));
        if (response.status >= 500) timer = setTimeout(refresh, 5 * POLL_MILLISECONDS);
        return;
      }
      const status = await response.json();
      showLoadProblem(null);
      show(status);
      if (keepsChanging(status)) {
        // Once only the webhook is still moving, there is no hurry.
        timer = setTimeout(refresh, FINISHED.has(status.status) ? 5 * POLL_MILLISECONDS : POLL_MILLISECONDS);
      }
    } catch (error) {
      showLoadProblem({ detail: `the service could not be reached (${error.message}); trying again` });
      timer = setTimeout(refresh, 5 * POLL_MILLISECONDS);
    }
  }

  function goToPage(change) {
    if (change > 0) cursors.push(nextCursor);
    else cursors.pop();
    productList.replaceChildren();
    refresh();
    document.getElementById("products-heading").scrollIntoView();
  }
  nextButton.addEventListener("click", () => goToPage(1));
  previousButton.addEventListener("click", () => goToPage(-1));

  // Without a key the plain link downloads; with one, the CSV is fetched with the key.
  downloadLink.addEventListener("click", async (event) => {
    if (!storedKey()) return;
    event.preventDefault();
    const response = await apiFetch(downloadLink.getAttribute("href"));
    if (!response.ok) {
      showLoadProblem(await readProblem(response));
      return;
    }
    const url = URL.createObjectURL(await response.blob());
    const link = el("a", { href: url, download: `${requestId}.csv`, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
  });

  document.getElementById("retry-failed").addEventListener("click", async (event) => {
    const button = event.currentTarget;
    const result = document.getElementById("retry-status");
    button.disabled = true;
    try {
      const response = await apiFetch(`/requests/${encodeURIComponent(requestId)}/retry`, { method: "POST" });
      if (response.ok) {
        const { retried_images: retried } = await response.json();
        retrying = retried > 0;
        result.textContent = retried
          ? `${retried} failed image${retried === 1 ? " is" : "s are"} being tried again; the progress updates here.`
          : "No image has failed: nothing to retry.";
      } else {
        result.textContent = sentence((await readProblem(response)).detail);
      }
      refresh();
    } finally {
      button.disabled = false;
    }
  });

  document.getElementById("redeliver-webhook").addEventListener("click", async (event) => {
    const button = event.currentTarget;
    const result = document.getElementById("redeliver-status");
    button.disabled = true;
    try {
      const response = await apiFetch(`/requests/${encodeURIComponent(requestId)}/webhook-deliveries/redeliver`, {
        method: "POST",
      });
      result.textContent = response.ok
        ? "The webhook is being sent again; its state updates here."
        : sentence((await readProblem(response)).detail);
      refresh();
    } finally {
      button.disabled = false;
    }
  });

  refresh();
}

/* ---------------------------------------------------------------- list of requests */

function setUpRequestsPage() {
  const list = document.getElementById("requests");
  const newerButton = document.getElementById("requests-previous");
  const olderButton = document.getElementById("requests-next");
  const cursors = [null];
  let nextCursor = null;
  let timer = null;

  function requestEntry(item) {
    const { progress } = item;
    const finishedImages = progress.succeeded_images + progress.failed_images + progress.cancelled_images;
    return el(
      "li",
      { className: "request-item" },
      el(
        "p",
        {},
        el("a", { href: `/requests/${encodeURIComponent(item.request_id)}` }, el("code", {}, item.request_id)),
      ),
      el(
        "p",
        {},
        el("strong", { className: `state-${item.status}` }, STATUS_WORDS[item.status] ?? item.status),
        ` · created ${formatTime(item.created_at)}`,
      ),
      progressBar(`Progress of request ${item.request_id}`, progress.percent),
      el(
        "p",
        { className: "hint" },
        `${item.total_products} products; ${finishedImages} of ${progress.total_images} images finished ` +
          `(${progress.succeeded_images} succeeded, ${progress.failed_images} failed, ` +
          `${progress.cancelled_images} cancelled)`,
      ),
    );
  }

  async function refresh() {
    clearTimeout(timer);
    const query = new URLSearchParams({ limit: REQUESTS_PER_PAGE });
    if (cursors.at(-1)) query.set("cursor", cursors.at(-1));
    try {
      const response = await apiFetch(`/requests?${query}`, { headers: { Accept: "application/json" } });
      if (!response.ok) {
        showLoadProblem(await readProblem(response));
        return;
      }
      const page = await response.json();
      showLoadProblem(null);
      syncList(list, page.items, (item) => item.request_id, requestEntry);
      document.getElementById("requests-empty").hidden = page.items.length > 0 || cursors.length > 1;
      nextCursor = page.next_cursor;
      olderButton.hidden = !nextCursor;
      newerButton.hidden = cursors.length === 1;
      if (page.items.some((item) => !FINISHED.has(item.status))) timer = setTimeout(refresh, 3 * POLL_MILLISECONDS);
    } catch (error) {
      showLoadProblem({ detail: `the service could not be reached (${error.message}); trying again` });
      timer = setTimeout(refresh, 5 * POLL_MILLISECONDS);
    }
  }

  olderButton.addEventListener("click", () => {
    cursors.push(nextCursor);
    refresh();
  });
  newerButton.addEventListener("click", () => {
    cursors.pop();
    refresh();
  });
  refresh();
}

const PAGES = { upload: setUpUploadPage, request: setUpRequestPage, requests: setUpRequestsPage };
PAGES[document.body.dataset.page]?.();
