// The review page: plain JavaScript over the service's REST API (no build step, nothing loaded from outside).
"use strict";

(() => {
  // The API lives where the page does: /ui -> "", /prefix/ui -> "/prefix".
  const ROOT = location.pathname.replace(/\/ui\/?$/, "");
  const KEY_NAME = "llmatch.apiKey";
  const REVIEW_BATCH = 20;
  const REFRESH_EVERY = 5; // pairs answered before the queue is asked again
  const ENTITY_PAGE = 20;
  const REFRESH_MS = 5000;
  const SIM_HIGH = 0.8;
  const SIM_LOW = 0.5;
  const TRAIN_POLL_MS = 1000;
  const TRAIN_UNFINISHED = new Set(["queued", "training", "encoding"]);

  const $ = (id) => document.getElementById(id);

  const state = {
    datasets: [],
    current: null, // the selected dataset's name
    queue: [], // pairs from /review not yet labelled or skipped
    index: 0,
    seen: new Set(), // pairs labelled or skipped on this page
    labelled: 0,
    skipped: 0,
    labels: { total: 0, matches: 0 }, // stored for the dataset
    busy: false,
    pairToken: 0,
    entitiesOffset: 0,
    trainJob: null, // the selected dataset's latest training job, as last read
    trainTimer: null,
    trainToken: 0, // bumped to stop a polling loop (another dataset, a new job)
  };

  // ---- API access ------------------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, detail) {
      super(detail);
      this.status = status;
      this.detail = detail;
    }
  }

  function storedKey() {
    return sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME) || "";
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const key = storedKey();
    if (key) headers.Authorization = `Bearer ${key}`;
    const init = { method, headers };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(ROOT + path, init);
    } catch (error) {
      throw new ApiError(0, `The service cannot be reached (${error.message}); is it running?`);
    }
    const text = await response.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = null;
    }
    if (!response.ok) {
      const detail = data && typeof data.detail === "string" ? data.detail : `HTTP ${response.status} from ${path}`;
      throw new ApiError(response.status, detail);
    }
    return data;
  }

  const enc = encodeURIComponent;
  const datasetPath = (suffix = "") => `/datasets/${enc(state.current)}${suffix}`;

  // ---- messages --------------------------------------------------------------------------------------------

  function showMessage(text, kind = "error") {
    $("message-text").textContent = text;
    $("message").className = kind === "info" ? "message info" : "message";
    $("message").dataset.kind = kind;
    $("message").hidden = false;
  }

  function clearMessage() {
    $("message").hidden = true;
    $("message-text").textContent = "";
    $("key-form").classList.remove("wanted");
  }

  function showError(error, doing) {
    if (!(error instanceof ApiError)) {
      console.error(error);
      showMessage(`${doing}: ${error.message}`);
      return;
    }
    if (error.status === 401 || error.status === 403) {
      const ask =
        error.status === 401
          ? "This service needs an API key: enter one in the API key field above and press Use key."
          : "Your API key does not allow this: enter a key with the scope it needs in the API key field above.";
      showMessage(`${ask} (${error.detail})`, "auth");
      $("key-form").classList.add("wanted");
      $("api-key").focus();
      return;
    }
    showMessage(`${doing}: ${error.detail}`);
  }

  // ---- formatting ------------------------------------------------------------------------------------------

  function el(tag, props = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(props)) {
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else if (name === "dataset") Object.assign(node.dataset, value);
      else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child);
    }
    return node;
  }

  const fixed = (value, digits = 3) => (value === null || value === undefined ? "–" : Number(value).toFixed(digits));
  const valueText = (value) => (value === null || value === undefined || value === "" ? null : String(value));
  const pairKey = (pair) =>
    [`${pair.left.source}\u0000${pair.left.id}`, `${pair.right.source}\u0000${pair.right.id}`].sort().join("\u0001");

  // ---- datasets --------------------------------------------------------------------------------------------

  async function loadDatasets({ quiet = false } = {}) {
    try {
      const data = await api("GET", "/datasets");
      state.datasets = data.datasets || [];
    } catch (error) {
      if (!quiet) showError(error, "Could not list the datasets");
      return;
    }
    renderDatasets();
    const current = state.datasets.find((d) => d.name === state.current);
    if (current) renderSummary(current);
  }

  function calibrationLine(calibration) {
    if (!calibration) return "uncalibrated";
    return `threshold ${fixed(calibration.threshold)} · F1 ${fixed(calibration.f1, 2)}`;
  }

  function renderDatasets() {
    const list = $("datasets");
    list.replaceChildren();
    $("datasets-empty").hidden = state.datasets.length > 0;
    for (const dataset of state.datasets) {
      const totals = dataset.totals || {};
      const counts = [`${totals.encoded ?? 0}/${totals.total ?? 0} encoded`];
      if (totals.pending) counts.push(`${totals.pending} pending`);
      if (totals.failed) counts.push(`${totals.failed} failed`);
      const item = el(
        "li",
        { class: dataset.name === state.current ? "selected" : "", dataset: { name: dataset.name } },
        el(
          "button",
          { type: "button", onclick: () => selectDataset(dataset.name) },
          el("span", { class: "name", text: dataset.name }),
          el("span", { class: "line counts-line", text: counts.join(" · ") }),
          el("span", { class: "line calibration-line", text: calibrationLine(dataset.calibration) }),
        ),
      );
      list.append(item);
    }
  }

  function renderSummary(dataset) {
    $("dataset-name").textContent = `${dataset.name}  `;
    const version = dataset.encoder_version ? `version: ${dataset.encoder_version}` : "as configured";
    $("dataset-name").append(
      el("span", { class: "muted", text: `encoder ${dataset.encoder} · ` }),
      el("span", { id: "encoder-version", class: "muted", text: version }),
    );
    const body = $("counts").querySelector("tbody");
    body.replaceChildren();
    const row = (name, c, cls = "") =>
      el(
        "tr",
        { class: cls },
        el("td", { text: name }),
        el("td", { text: String(c.encoded ?? 0) }),
        el("td", { text: String(c.pending ?? 0) }),
        el("td", { text: String(c.failed ?? 0) }),
        el("td", { text: String(c.total ?? 0) }),
      );
    for (const [source, counts] of Object.entries(dataset.records || {})) body.append(row(source, counts));
    body.append(row("all", dataset.totals || {}, "total"));
    const calibration = dataset.calibration;
    const box = $("calibration");
    box.replaceChildren();
    if (calibration) {
      box.dataset.threshold = String(calibration.threshold);
      box.append(
        el("strong", { text: `Calibrated: threshold ${fixed(calibration.threshold)}` }),
        el("span", {
          class: "muted",
          text:
            `  precision ${fixed(calibration.precision, 2)} · recall ${fixed(calibration.recall, 2)} · ` +
            `F1 ${fixed(calibration.f1, 2)} on ${calibration.pairs} pairs (${calibration.positives} matches)`,
        }),
      );
    } else {
      delete box.dataset.threshold;
      box.append(
        el("strong", { text: "Uncalibrated" }),
        el("span", { class: "muted", text: "  label pairs below, then recalibrate to get decisions and entities" }),
      );
    }
  }

  async function selectDataset(name) {
    clearMessage();
    state.current = name;
    if (location.hash !== `#${name}`) history.replaceState(null, "", `#${enc(name)}`);
    state.queue = [];
    state.index = 0;
    state.seen = new Set();
    state.labelled = 0;
    state.skipped = 0;
    $("calibrate-result").hidden = true;
    stopTrainingWatch();
    state.trainJob = null;
    $("train-answer").hidden = true;
    renderTraining(null);
    $("dataset").hidden = false;
    renderDatasets();
    const dataset = state.datasets.find((d) => d.name === name);
    if (dataset) renderSummary(dataset);
    renderSessionCount();
    await Promise.all([loadLabelCount(), loadQueue(), loadEntities(true), watchTraining()]);
  }

  async function loadLabelCount() {
    const name = state.current;
    try {
      const data = await api("GET", datasetPath("/labels"));
      if (name !== state.current) return;
      state.labels = { total: data.total, matches: data.pairs.filter((pair) => pair.label === 1).length };
      renderLabelCount();
    } catch (error) {
      if (name === state.current) showError(error, "Could not read the stored labels");
    }
  }

  function renderLabelCount() {
    const { total, matches } = state.labels;
    $("labels-count").textContent = `${total} labelled pair${total === 1 ? "" : "s"} stored (${matches} matches)`;
    $("labels-count").dataset.total = String(total);
  }

  // ---- review queue ----------------------------------------------------------------------------------------

  async function loadQueue() {
    const name = state.current;
    let pairs, basis, threshold;
    try {
      const data = await api("GET", datasetPath(`/review?limit=${REVIEW_BATCH}`));
      pairs = data.pairs || [];
      basis = data.basis;
      threshold = data.threshold;
    } catch (error) {
      if (name !== state.current) return;
      state.queue = [];
      state.index = 0;
      showPair();
      $("review-empty").textContent = `The review queue is unavailable: ${error.detail || error.message}`;
      showError(error, "Could not load the review queue");
      return;
    }
    if (name !== state.current) return;
    renderBasis(basis, threshold);
    state.queue = pairs.filter((pair) => !state.seen.has(pairKey(pair)));
    state.index = 0;
    showPair();
  }

  const BASIS = {
    calibration: "nearest the calibrated threshold",
    labels: "nearest the threshold your labels suggest",
    middle: "nearest the middle of the scores (no labels of both kinds yet)",
  };

  function renderBasis(basis, threshold) {
    const text = BASIS[basis];
    $("review-basis").textContent = text && threshold !== null && threshold !== undefined
      ? `Pairs ${text}, ${fixed(threshold)}, first, a few records at a time; ` +
        "every fifth pair is taken from higher or random scores."
      : "";
  }

  const currentPair = () => state.queue[state.index] || null;

  function showPair() {
    const pair = currentPair();
    const box = $("pair");
    state.pairToken += 1;
    if (!pair) {
      box.hidden = true;
      box.dataset.state = "empty";
      delete box.dataset.pair;
      const dataset = state.datasets.find((d) => d.name === state.current);
      const pending = dataset && dataset.totals && dataset.totals.pending;
      $("review-empty").textContent = pending
        ? `Nothing to review yet: ${pending} records are still being encoded.`
        : "Nothing to review: every candidate pair near the threshold is labelled (or skipped on this page).";
      $("review-empty").hidden = false;
      return;
    }
    $("review-empty").hidden = true;
    box.hidden = false;
    box.dataset.pair = pairKey(pair);
    delete box.dataset.explained;
    box.dataset.left = `${pair.left.source}/${pair.left.id}`;
    box.dataset.right = `${pair.right.source}/${pair.right.id}`;
    $("pair-position").textContent = `pair ${state.index + 1} of ${state.queue.length}`;
    $("pair-score").textContent = fixed(pair.score);
    $("pair-probability").textContent = fixed(pair.probability, 2);
    $("left-title").textContent = `${pair.left.source} · ${pair.left.id}`;
    $("right-title").textContent = `${pair.right.source} · ${pair.right.id}`;
    const threshold = Number($("calibration").dataset.threshold);
    const decision = $("pair-decision");
    if (Number.isFinite(threshold)) {
      const yes = pair.score >= threshold;
      decision.textContent = yes ? "service says: match" : "service says: no match";
      decision.className = yes ? "decision-yes" : "decision-no";
    } else {
      decision.textContent = "";
    }
    // The records first (from /review), then the explanation when it arrives.
    renderComparison(pair, null);
    box.dataset.state = "ready";
    loadExplanation(pair, state.pairToken);
  }

  async function loadExplanation(pair, token) {
    $("explanation-state").textContent = "explaining…";
    const query = new URLSearchParams({
      dataset: state.current,
      left_source: pair.left.source,
      left_id: pair.left.id,
      right_source: pair.right.source,
      right_id: pair.right.id,
      explain: "true",
    });
    try {
      const data = await api("GET", `/match?${query}`);
      if (token !== state.pairToken) return;
      if (!data.explanation) {
        $("explanation-state").textContent = "This service gives no explanation for the pair.";
        return;
      }
      renderComparison(pair, data.explanation);
      $("explanation-state").textContent = "";
      $("pair").dataset.explained = "true";
    } catch (error) {
      if (token !== state.pairToken) return;
      $("explanation-state").textContent = `No explanation: ${error.detail || error.message}`;
      if (error.status === 401 || error.status === 403) showError(error, "Could not explain the pair");
    }
  }

  function identifierSets(explanation) {
    const ids = (explanation && explanation.identifiers) || {};
    const norm = (list) => new Set((list || []).map((token) => String(token).toLowerCase().replace(/-/g, "")));
    return { shared: norm(ids.shared), left: norm(ids.left_only), right: norm(ids.right_only) };
  }

  // A value's text with its model/part numbers marked: shared ones, and those found on this side only.
  function markedValue(text, shared, only) {
    const cell = document.createDocumentFragment();
    if (!shared.size && !only.size) {
      cell.append(text);
      return cell;
    }
    const matches = (set, token) => {
      for (const id of set) if (token === id || (id.length >= 4 && token.startsWith(id))) return true;
      return false;
    };
    let last = 0;
    for (const found of text.matchAll(/[A-Za-z0-9][A-Za-z0-9-]*[A-Za-z0-9]/g)) {
      const token = found[0].toLowerCase().replace(/-/g, "");
      const cls = matches(shared, token) ? "id-shared" : matches(only, token) ? "id-only" : null;
      if (!cls) continue;
      cell.append(text.slice(last, found.index), el("mark", { class: cls, text: found[0] }));
      last = found.index + found[0].length;
    }
    cell.append(text.slice(last));
    return cell;
  }

  function renderComparison(pair, explanation) {
    const rows = [];
    if (explanation && Array.isArray(explanation.attributes)) {
      for (const a of explanation.attributes) rows.push(a);
    } else {
      const names = [...Object.keys(pair.left.attributes || {})];
      for (const name of Object.keys(pair.right.attributes || {})) if (!names.includes(name)) names.push(name);
      for (const name of names) {
        rows.push({
          name,
          left: valueText((pair.left.attributes || {})[name]),
          right: valueText((pair.right.attributes || {})[name]),
          similarity: undefined,
        });
      }
    }
    const ids = identifierSets(explanation);
    const body = $("comparison").querySelector("tbody");
    body.replaceChildren();
    for (const row of rows) {
      const left = valueText(row.left);
      const right = valueText(row.right);
      let cls = "";
      let simCell;
      if (row.similarity === undefined) {
        simCell = el("td", { class: "sim muted", text: "…" });
      } else if (row.similarity === null) {
        cls = "sim-missing";
        simCell = el("td", { class: "sim", text: "–" });
      } else {
        const s = Number(row.similarity);
        cls = s >= SIM_HIGH ? "sim-high" : s < SIM_LOW ? "sim-low" : "sim-mid";
        const bar = el("div", { class: "bar" }, el("span"));
        bar.firstChild.style.width = `${Math.max(0, Math.min(1, s)) * 100}%`;
        simCell = el("td", { class: "sim" }, fixed(s, 2), bar);
      }
      const valueCell = (text, only) =>
        text === null
          ? el("td", { class: "value empty", text: "empty" })
          : el("td", { class: "value" }, markedValue(text, ids.shared, only));
      body.append(
        el(
          "tr",
          { class: cls, dataset: { attribute: row.name } },
          el("th", { text: row.name }),
          valueCell(left, ids.left),
          simCell,
          valueCell(right, ids.right),
        ),
      );
    }
    renderIdentifiers(explanation);
  }

  function renderIdentifiers(explanation) {
    const box = $("identifiers");
    box.replaceChildren();
    if (!explanation || !explanation.identifiers) return;
    const group = (title, list, cls, name) =>
      el(
        "div",
        { dataset: { group: name } },
        el("span", { class: "label", text: title }),
        ...(list && list.length
          ? list.map((token) => el("mark", { class: cls, text: token }))
          : [el("span", { class: "muted", text: "none" })]),
      );
    const ids = explanation.identifiers;
    box.append(
      group("model / part numbers on both sides", ids.shared, "id-shared", "shared"),
      group("only on the left", ids.left_only, "id-only", "left_only"),
      group("only on the right", ids.right_only, "id-only", "right_only"),
    );
  }

  function renderSessionCount() {
    const parts = [];
    if (state.labelled) parts.push(`${state.labelled} labelled`);
    if (state.skipped) parts.push(`${state.skipped} skipped`);
    $("session-count").textContent = parts.length ? `· ${parts.join(", ")} on this page` : "";
    $("session-count").dataset.labelled = String(state.labelled);
  }

  async function act(kind) {
    const pair = currentPair();
    if (!pair || state.busy || !state.current) return;
    state.busy = true;
    $("pair").dataset.state = "labelling";
    try {
      if (kind !== "skip") {
        const label = kind === "yes" ? 1 : 0;
        const body = {
          pairs: [
            {
              left_source: pair.left.source,
              left_id: pair.left.id,
              right_source: pair.right.source,
              right_id: pair.right.id,
              label,
            },
          ],
        };
        const result = await api("PUT", datasetPath("/labels"), body);
        state.labelled += 1;
        state.labels = { total: result.total, matches: state.labels.matches + label }; // the pair was unlabelled
        renderLabelCount();
      } else {
        state.skipped += 1;
      }
      clearMessage();
      state.seen.add(pairKey(pair));
      state.index += 1;
      renderSessionCount();
      // Each label changes what the queue asks next (the threshold moves): fetch it again every few pairs.
      if (state.index >= state.queue.length || state.index >= REFRESH_EVERY) await loadQueue();
      else showPair();
    } catch (error) {
      $("pair").dataset.state = "ready";
      showError(error, "Could not store the label");
    } finally {
      state.busy = false;
    }
  }

  // ---- calibration -----------------------------------------------------------------------------------------

  async function recalibrate() {
    if (!state.current) return;
    const button = $("recalibrate");
    button.disabled = true;
    clearMessage();
    const result = $("calibrate-result");
    try {
      const out = await api("POST", datasetPath("/calibrate"), { from: "labels", objective: "f1" });
      result.className = "result";
      result.textContent =
        `Recalibrated on ${out.pairs} labelled pairs (${out.positives} matches): threshold ${fixed(out.threshold)}, ` +
        `precision ${fixed(out.precision, 2)}, recall ${fixed(out.recall, 2)}, F1 ${fixed(out.f1, 2)}.`;
      result.hidden = false;
      result.dataset.threshold = String(out.threshold);
      await loadDatasets();
      await Promise.all([loadQueue(), loadEntities(true), loadLabelCount()]);
    } catch (error) {
      result.hidden = true;
      showError(error, "Could not recalibrate");
    } finally {
      button.disabled = false;
    }
  }

  // ---- training --------------------------------------------------------------------------------------------

  async function startTraining() {
    if (!state.current) return;
    const name = state.current;
    const button = $("train");
    button.disabled = true;
    clearMessage();
    const answer = $("train-answer");
    answer.hidden = true;
    try {
      const job = await api("POST", datasetPath("/train"), {});
      if (name !== state.current) return;
      answer.className = "result";
      answer.textContent = `Training job ${job.id} ${job.status} on ${job.labels} stored labels.`;
      answer.dataset.status = "202";
      answer.hidden = false;
      stopTrainingWatch();
      state.trainJob = job;
      renderTraining(job);
      await watchTraining();
    } catch (error) {
      if (name !== state.current) return;
      if (error.status !== 409) {
        showError(error, "Could not start training");
        return;
      }
      // Too few labels, or a job of the dataset still running: the service says which.
      answer.className = "result bad";
      answer.textContent = error.detail;
      answer.dataset.status = "409";
      answer.hidden = false;
      stopTrainingWatch();
      await watchTraining();
    } finally {
      button.disabled = false;
    }
  }

  async function cancelTraining() {
    if (!state.current) return;
    const name = state.current;
    $("train-cancel").disabled = true;
    try {
      const job = await api("DELETE", datasetPath("/train"));
      if (name !== state.current) return;
      stopTrainingWatch();
      state.trainJob = job;
      renderTraining(job);
      await watchTraining();
    } catch (error) {
      if (name === state.current) showError(error, "Could not cancel training");
    } finally {
      $("train-cancel").disabled = false;
    }
  }

  function stopTrainingWatch() {
    clearTimeout(state.trainTimer);
    state.trainTimer = null;
    state.trainToken += 1;
  }

  // Read the latest job and show it; while it is unfinished, read it again about every second. A 404 is no job.
  async function watchTraining(token = state.trainToken) {
    const name = state.current;
    let job;
    try {
      job = await api("GET", datasetPath("/train"));
    } catch (error) {
      if (token !== state.trainToken || name !== state.current) return;
      if (error.status === 404) {
        state.trainJob = null;
        renderTraining(null);
      } else if (error.status === 401 || error.status === 403) {
        showError(error, "Could not read the training job");
      } else {
        $("train-status").textContent = `Could not read the training job: ${error.detail || error.message}`;
        if (state.trainJob && TRAIN_UNFINISHED.has(state.trainJob.status)) {
          state.trainTimer = setTimeout(() => watchTraining(token), TRAIN_POLL_MS);
        }
      }
      return;
    }
    if (token !== state.trainToken || name !== state.current) return;
    const before = state.trainJob;
    state.trainJob = job;
    renderTraining(job);
    if (TRAIN_UNFINISHED.has(job.status)) {
      state.trainTimer = setTimeout(() => watchTraining(token), TRAIN_POLL_MS);
      return;
    }
    const justEnded = before && before.id === job.id && TRAIN_UNFINISHED.has(before.status);
    if (justEnded && job.status === "done" && job.adopted === true) {
      // The new version serves now: its counts, version and calibration, and the pairs it is unsure of.
      await loadDatasets();
      if (name === state.current) await loadQueue();
    }
  }

  function renderTraining(job) {
    const box = $("training");
    const status = $("train-status");
    const bar = $("train-progress");
    const outcome = $("train-outcome");
    const metrics = $("train-metrics");
    const cancel = $("train-cancel");
    if (!job) {
      delete box.dataset.status;
      delete box.dataset.job;
      status.textContent = "";
      bar.hidden = true;
      cancel.hidden = true;
      outcome.hidden = true;
      metrics.hidden = true;
      return;
    }
    box.dataset.status = job.status;
    box.dataset.job = job.id;
    const unfinished = TRAIN_UNFINISHED.has(job.status);
    const progress = Math.max(0, Math.min(1, Number(job.progress) || 0));
    status.textContent = unfinished
      ? `Training job ${job.id}: ${job.status}, ${Math.round(progress * 100)}%` +
        (job.cancel_requested ? " (cancelling…)" : "")
      : `Training job ${job.id}: ${job.status}`;
    bar.hidden = !unfinished;
    bar.firstChild.style.width = `${progress * 100}%`;
    bar.setAttribute("aria-valuenow", String(Math.round(progress * 100)));
    cancel.hidden = !unfinished;
    outcome.hidden = unfinished;
    outcome.replaceChildren();
    if (!unfinished) {
      const adopted = job.adopted === true ? "true" : job.adopted === false ? "false" : "null";
      outcome.dataset.adopted = adopted;
      outcome.append(
        el("span", { text: `status: ${job.status} · ` }),
        el("span", {
          class: job.adopted === true ? "adopted-yes" : job.adopted === false ? "adopted-no" : "",
          text: `adopted: ${adopted}`,
        }),
        el("span", { text: ` · version: ${job.version ?? "–"}` }),
      );
      if (job.error) outcome.append(el("span", { class: "error", text: ` · error: ${job.error}` }));
    }
    const rows = !unfinished && job.metrics ? metricRows(job.metrics) : [];
    const body = metrics.querySelector("tbody");
    body.replaceChildren(
      ...rows.map(([name, value]) =>
        el("tr", { dataset: { metric: name } }, el("td", { text: name }), el("td", { text: value })),
      ),
    );
    metrics.hidden = rows.length === 0;
  }

  // A job's metrics as [name, text] rows: nested objects flattened with dotted names, numbers to 3 decimals
  // (whole numbers, such as counts, as they are).
  function metricRows(value, prefix = "", rows = []) {
    if (value !== null && typeof value === "object" && !Array.isArray(value)) {
      for (const [name, inner] of Object.entries(value)) metricRows(inner, prefix ? `${prefix}.${name}` : name, rows);
    } else {
      rows.push([prefix, metricText(value)]);
    }
    return rows;
  }

  function metricText(value) {
    if (value === null || value === undefined) return "–";
    if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(3);
    if (Array.isArray(value)) return value.map(metricText).join(", ");
    return String(value);
  }

  // ---- entities --------------------------------------------------------------------------------------------

  async function loadEntities(reset) {
    const name = state.current;
    if (reset) state.entitiesOffset = 0;
    const list = $("entities");
    let data;
    try {
      data = await api("GET", datasetPath(`/entities?min_size=2&limit=${ENTITY_PAGE}&offset=${state.entitiesOffset}`));
    } catch (error) {
      if (name !== state.current) return;
      list.replaceChildren();
      $("entities-total").textContent = "";
      $("entities-empty").textContent = `No entities: ${error.detail || error.message}`;
      $("entities-empty").hidden = false;
      $("more-entities").hidden = true;
      if (error.status === 401 || error.status === 403) showError(error, "Could not list entities");
      return;
    }
    if (name !== state.current) return;
    if (reset) list.replaceChildren();
    const entities = data.entities || [];
    for (const entity of entities) list.append(entityItem(entity));
    state.entitiesOffset += entities.length;
    $("entities-total").textContent = `· ${data.total} with two or more records`;
    $("entities-total").dataset.total = String(data.total);
    const calibrated = $("calibration").dataset.threshold !== undefined;
    $("entities-empty").textContent = calibrated
      ? "No two records are linked by an accepted match yet."
      : "Entities appear once the dataset is calibrated: label pairs above, then press Recalibrate.";
    $("entities-empty").hidden = data.total > 0;
    $("more-entities").hidden = state.entitiesOffset >= data.total;
  }

  function entityItem(entity) {
    const members = (entity.records || []).map((r) => `${r.source}:${r.id}`);
    const shown = members.slice(0, 12).join("  ") + (members.length > 12 ? `  … ${members.length - 12} more` : "");
    const detail = el("div", { class: "detail", hidden: "" });
    const toggle = el("button", { type: "button", text: "details" });
    toggle.addEventListener("click", () => toggleEntity(entity.id, detail, toggle));
    return el(
      "li",
      { dataset: { entity: entity.id, size: String(entity.size) } },
      el(
        "div",
        { class: "head" },
        el("strong", { text: `${entity.size} records` }),
        el("code", { class: "muted", text: entity.id }),
        toggle,
      ),
      el("span", { class: "members", text: shown }),
      detail,
    );
  }

  const ENTITY_RECORDS_SHOWN = 20;

  async function toggleEntity(id, detail, toggle) {
    if (!detail.hidden) {
      detail.hidden = true;
      toggle.textContent = "details";
      return;
    }
    toggle.disabled = true;
    try {
      const entity = await api("GET", datasetPath(`/entities/${enc(id)}`));
      const shown = entity.records.slice(0, ENTITY_RECORDS_SHOWN);
      const texts = await Promise.all(
        shown.map((r) =>
          api("GET", `/records/${enc(state.current)}/${enc(r.source)}/${enc(r.id)}`).then(
            (record) => recordSummary(record),
            (error) => `(${error.detail || error.message})`,
          ),
        ),
      );
      detail.replaceChildren(...entityDetail(entity, shown, texts));
      detail.hidden = false;
      toggle.textContent = "hide";
    } catch (error) {
      showError(error, "Could not read the entity");
    } finally {
      toggle.disabled = false;
    }
  }

  // Two tables: the entity's records with their values, and the accepted matches that link them.
  function entityDetail(entity, shown, texts) {
    const table = (headings, rows) =>
      el(
        "table",
        {},
        el("thead", {}, el("tr", {}, ...headings.map((h) => el("th", { text: h })))),
        el("tbody", {}, ...rows.map((cells) => el("tr", {}, ...cells.map((c) => el("td", { text: c }))))),
      );
    const ref = (r) => `${r.source}:${r.id}`;
    const records = shown.map((r, i) => [ref(r), texts[i]]);
    const more = entity.records.length - shown.length;
    if (more > 0) records.push(["…", `${more} more records`]);
    const parts = [table(["record", "values"], records)];
    const links = (entity.links || []).map((link) => [ref(link.left), ref(link.right), fixed(link.score)]);
    if (links.length) parts.push(table(["linked", "to", "score"], links));
    return parts;
  }

  function recordSummary(record) {
    const values = Object.values(record.attributes || {})
      .map(valueText)
      .filter((v) => v !== null);
    const text = values.join(" · ");
    return text.length > 160 ? `${text.slice(0, 157)}…` : text;
  }

  // ---- API key ---------------------------------------------------------------------------------------------

  function renderKeyState() {
    const key = storedKey();
    $("key-state").textContent = key
      ? localStorage.getItem(KEY_NAME)
        ? "key set (remembered)"
        : "key set for this tab"
      : "no key";
    $("api-key").value = key ? "" : $("api-key").value;
    $("api-key").placeholder = key ? "•••••• (a key is set)" : "only if access control is on";
  }

  function useKey(event) {
    event.preventDefault();
    const key = $("api-key").value.trim();
    sessionStorage.removeItem(KEY_NAME);
    localStorage.removeItem(KEY_NAME);
    if (key) ($("remember-key").checked ? localStorage : sessionStorage).setItem(KEY_NAME, key);
    $("api-key").value = "";
    $("api-key").blur();
    clearMessage();
    renderKeyState();
    reloadAll();
  }

  function forgetKey() {
    sessionStorage.removeItem(KEY_NAME);
    localStorage.removeItem(KEY_NAME);
    $("api-key").value = "";
    renderKeyState();
    reloadAll();
  }

  // The dataset to show: the one asked for (if listed), else the first.
  function chosenDataset(wanted) {
    const found = state.datasets.find((d) => d.name === wanted) || state.datasets[0];
    return found ? found.name : null;
  }

  async function reloadAll() {
    await loadDatasets();
    const name = chosenDataset(state.current);
    if (name) await selectDataset(name);
  }

  // ---- keyboard and start-up -------------------------------------------------------------------------------

  function onKey(event) {
    const target = event.target;
    if (target && (target.closest("input, textarea, select") || target.isContentEditable)) return;
    if (event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    const kind = { y: "yes", n: "no", s: "skip" }[event.key.toLowerCase()];
    if (!kind || !currentPair()) return;
    event.preventDefault();
    act(kind);
  }

  async function refresh() {
    if (document.hidden) return;
    await loadDatasets({ quiet: true });
    // While records are being encoded the queue may be empty: look again.
    if (state.current && !currentPair() && !state.busy) await loadQueue();
  }

  async function start() {
    $("key-form").addEventListener("submit", useKey);
    $("forget-key").addEventListener("click", forgetKey);
    $("message-close").addEventListener("click", clearMessage);
    $("reload-datasets").addEventListener("click", () => loadDatasets());
    $("label-yes").addEventListener("click", () => act("yes"));
    $("label-no").addEventListener("click", () => act("no"));
    $("label-skip").addEventListener("click", () => act("skip"));
    $("recalibrate").addEventListener("click", recalibrate);
    $("train").addEventListener("click", startTraining);
    $("train-cancel").addEventListener("click", cancelTraining);
    $("reload-entities").addEventListener("click", () => loadEntities(true));
    $("more-entities").addEventListener("click", () => loadEntities(false));
    document.addEventListener("keydown", onKey);
    renderKeyState();
    await loadDatasets();
    const name = chosenDataset(decodeURIComponent(location.hash.slice(1)));
    if (name) await selectDataset(name);
    document.body.dataset.ready = "true";
    setInterval(refresh, REFRESH_MS);
  }

  start();
})();
