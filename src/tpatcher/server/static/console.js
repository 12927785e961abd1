// tpatcher console: list, try, add and roll back edits on the server that serves this page.
//
// Rules this file keeps:
// * Prompts, targets and every other server string are untrusted: they reach the page only
//   through textContent / attributes set by code, never through innerHTML.
// * Tokens stay in this tab's sessionStorage and go only into Authorization headers of
//   same-origin requests (relative URLs, so the server's own origin).
"use strict";

(() => {
  const POLL_MS = 3000;
  const ARM_MS = 5000; // how long a rollback button waits for its confirming click
  const KEYS = { api: "tpatcher.apiToken", edit: "tpatcher.editToken" };
  // Listing fields that may say which token made an edit, first found wins.
  const BY_FIELDS = [
    "who", "by", "created_by", "token_name", "token_label", "token_id", "author",
  ];

  const $ = (id) => document.getElementById(id);
  const state = {
    edits: [],
    health: null,
    armed: null, // id of the edit whose rollback button awaits confirmation
    armTimer: 0,
    busy: new Set(), // ids being rolled back
    signature: "",
    refreshing: false,
    listError: false,
  };

  // -- small helpers ---------------------------------------------------------------------
  function el(tag, options = {}, children = []) {
    const node = document.createElement(tag);
    if (options.text !== undefined) node.textContent = String(options.text);
    if (options.className) node.className = options.className;
    if (options.title) node.title = options.title;
    for (const [key, value] of Object.entries(options.data || {})) node.dataset[key] = value;
    for (const child of children) node.appendChild(child);
    return node;
  }

  function show(id, text, kind = "") {
    const node = $(id);
    node.textContent = text || "";
    node.dataset.kind = kind;
  }

  function token(kind) {
    try {
      return sessionStorage.getItem(KEYS[kind]) || "";
    } catch {
      return "";
    }
  }

  function saveTokens() {
    for (const kind of ["api", "edit"]) {
      const value = $(`${kind}-token`).value.trim();
      if (value) sessionStorage.setItem(KEYS[kind], value);
      else sessionStorage.removeItem(KEYS[kind]);
    }
  }

  class ApiError extends Error {
    constructor(status, message, type) {
      super(message);
      this.status = status;
      this.type = type;
    }
  }

  // One same-origin JSON request; `auth` picks the token ("api" or "edit") for the header.
  async function api(method, path, { auth = "api", body } = {}) {
    const headers = { Accept: "application/json" };
    const secret = auth ? token(auth) : "";
    if (secret) headers.Authorization = `Bearer ${secret}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      cache: "no-store",
      credentials: "same-origin",
      redirect: "error",
      referrerPolicy: "no-referrer",
    });
    let payload = null;
    try {
      payload = await response.json();
    } catch {
      payload = null;
    }
    if (!response.ok) {
      const error = (payload && payload.error) || {};
      const message = error.message || (payload && payload.detail) || response.statusText;
      throw new ApiError(response.status, String(message), error.type || "");
    }
    return { status: response.status, data: payload };
  }

  function describe(error) {
    if (error instanceof ApiError) {
      if (error.status === 401) return `${error.message} (check the tokens above)`;
      return `${error.status}: ${error.message}`;
    }
    return `server unreachable (${error.message || error})`;
  }

  function formatWhen(created) {
    const date = new Date(created);
    if (!created || Number.isNaN(date.getTime())) return String(created || "");
    const pad = (n) => String(n).padStart(2, "0");
    return (
      `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ` +
      `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`
    );
  }

  function byOf(edit) {
    for (const field of BY_FIELDS) {
      const value = edit[field];
      if (value !== undefined && value !== null && value !== "") return String(value);
    }
    return "";
  }

  // -- status and the edit list ----------------------------------------------------------
  function setStatus(live, text) {
    $("status").dataset.live = live;
    $("status-text").textContent = text;
  }

  function editingEnabled() {
    return !state.health || state.health.editing_enabled !== false;
  }

  function renderEdits(force = false) {
    const enabled = editingEnabled();
    const signature = JSON.stringify([state.edits, state.armed, [...state.busy], enabled]);
    if (!force && signature === state.signature) return; // keep focus and selection
    state.signature = signature;
    const showBy = state.edits.some((edit) => byOf(edit) !== "");
    $("by-header").hidden = !showBy;
    const rows = state.edits.map((edit) => {
      const id = String(edit.id);
      const cells = [
        el("td", { className: "text", text: edit.prompt, title: `edit ${id}` }),
        el("td", { className: "text", text: edit.target ?? "" }),
        el("td", { className: "when", text: formatWhen(edit.created), title: edit.created }),
        el("td", { className: "num", text: edit.neurons }),
      ];
      if (showBy) cells.push(el("td", { className: "by", text: byOf(edit) }));
      const tryButton = el("button", { text: "Try", className: "secondary small" });
      tryButton.type = "button";
      tryButton.addEventListener("click", () => {
        $("compare-prompt").value = edit.prompt;
        runCompare();
      });
      const rollback = el("button", { className: "danger small" });
      rollback.type = "button";
      rollback.dataset.action = "rollback";
      rollback.disabled = !enabled || state.busy.has(id);
      rollback.title = enabled ? "Remove this edit's neurons" : "editing is off on this server";
      if (state.busy.has(id)) rollback.textContent = "Rolling back…";
      else if (state.armed === id) {
        rollback.textContent = "Confirm rollback";
        rollback.dataset.armed = "true";
      } else rollback.textContent = "Roll back";
      rollback.addEventListener("click", () => onRollback(id));
      cells.push(el("td", { className: "actions" }, [tryButton, rollback]));
      return el("tr", { data: { editId: id } }, cells);
    });
    $("edits-body").replaceChildren(...rows);
    $("edits-empty").hidden = state.edits.length > 0;
  }

  async function refresh() {
    if (state.refreshing) return;
    state.refreshing = true;
    try {
      let health;
      try {
        health = (await api("GET", "healthz", { auth: null })).data;
      } catch (error) {
        setStatus("offline", describe(error));
        return;
      }
      state.health = health;
      $("edit-submit").disabled = health.editing_enabled === false;
      if (health.editing_enabled === false) {
        show("edit-message", "Editing is off on this server (start it with --edit-token).", "info");
      }
      const parts = [`${health.model}`, `${health.edits} edits`, `${health.neurons} neurons`];
      if (health.edit_in_progress) parts.push("an edit is training…");
      try {
        const list = (await api("GET", "v1/edits")).data;
        state.edits = Array.isArray(list.data) ? list.data : [];
        if (state.listError) show("edits-message", "");
        state.listError = false;
        $("edits-summary").textContent = `${state.edits.length} · ${list.neurons} neurons`;
        setStatus("live", `live · ${parts.join(" · ")}`);
      } catch (error) {
        state.edits = [];
        state.listError = true;
        show("edits-message", `Cannot list edits: ${describe(error)}`, "error");
        setStatus(error.status === 401 ? "locked" : "offline", `live · ${parts.join(" · ")}`);
      }
      renderEdits();
    } finally {
      state.refreshing = false;
    }
  }

  // -- actions ---------------------------------------------------------------------------
  function disarm() {
    clearTimeout(state.armTimer);
    state.armed = null;
  }

  async function onRollback(id) {
    if (state.armed !== id) {
      disarm();
      state.armed = id;
      state.armTimer = setTimeout(() => {
        disarm();
        renderEdits();
      }, ARM_MS);
      renderEdits();
      return;
    }
    disarm();
    if (!token("edit")) {
      show("edits-message", "Paste the edit token above to roll edits back.", "error");
      renderEdits(true);
      return;
    }
    state.busy.add(id);
    renderEdits();
    try {
      await api("DELETE", `v1/edits/${encodeURIComponent(id)}`, { auth: "edit" });
      show("edits-message", `Rolled back edit ${id}.`, "ok");
    } catch (error) {
      show("edits-message", `Rollback failed: ${describe(error)}`, "error");
    } finally {
      state.busy.delete(id);
      await refresh();
      renderEdits(true);
    }
  }

  async function onEdit(event) {
    event.preventDefault();
    const prompt = $("edit-prompt").value;
    const target = $("edit-target").value;
    if (!prompt.trim() || !target.trim()) {
      show("edit-message", "Give both a prompt and a target.", "error");
      return;
    }
    if (!token("edit")) {
      show("edit-message", "Paste the edit token above first.", "error");
      return;
    }
    const button = $("edit-submit");
    button.disabled = true;
    show("edit-message", "Training the patch…", "busy");
    try {
      const { status, data } = await api("POST", "v1/edits", {
        auth: "edit",
        body: { prompt, target },
      });
      if (status === 201 && data.id) {
        const secs = Number(data.seconds || 0).toFixed(1);
        show(
          "edit-message",
          `Applied edit ${data.id}: ${data.neurons} neurons, ${data.steps} steps, ${secs} s.`,
          "ok",
        );
        $("compare-prompt").value = prompt;
      } else {
        const why = data.already_correct ? "the model already answers this" : data.message;
        show("edit-message", `Nothing changed: ${why || "no edit was needed"}.`, "info");
      }
    } catch (error) {
      show("edit-message", `Edit failed: ${describe(error)}`, "error");
    } finally {
      button.disabled = !editingEnabled();
      await refresh();
    }
  }

  async function runCompare(event) {
    if (event) event.preventDefault();
    const prompt = $("compare-prompt").value;
    if (!prompt.trim()) {
      show("compare-message", "Type a prompt to try.", "error");
      return;
    }
    const maxTokens = Math.max(1, parseInt($("compare-max-tokens").value, 10) || 16);
    const result = $("compare-result");
    const patched = $("compare-patched");
    const base = $("compare-base");
    const button = $("compare-submit");
    button.disabled = true;
    result.dataset.state = "running";
    result.classList.remove("differs", "same");
    patched.textContent = "…";
    base.textContent = "…";
    show("compare-message", "Generating (greedy)…", "busy");
    try {
      let answer;
      try {
        answer = (await api("POST", "v1/compare", { body: { prompt, max_tokens: maxTokens } }))
          .data;
      } catch (error) {
        if (!(error instanceof ApiError) || (error.status !== 404 && error.status !== 405)) {
          throw error;
        }
        answer = null; // this server has no /v1/compare: show the patched answer only
      }
      if (answer) {
        patched.textContent = answer.patched;
        base.textContent = answer.base;
        const same = answer.patched === answer.base;
        result.classList.add(same ? "same" : "differs");
        result.dataset.state = "done";
        if (same) show("compare-message", "Same answer either way.", "info");
        else show("compare-message", "The patch changes the answer.", "ok");
      } else {
        const model = (state.health && state.health.model) || "";
        const body = { model, prompt, max_tokens: maxTokens, temperature: 0 };
        const data = (await api("POST", "v1/completions", { body })).data;
        patched.textContent = data.choices[0].text;
        base.textContent = "—";
        result.dataset.state = "partial";
        show("compare-message", "This server has no /v1/compare: patched answer only.", "info");
      }
    } catch (error) {
      patched.textContent = "";
      base.textContent = "";
      result.dataset.state = "error";
      show("compare-message", `Compare failed: ${describe(error)}`, "error");
    } finally {
      button.disabled = false;
    }
  }

  // -- wiring ----------------------------------------------------------------------------
  function start() {
    $("api-token").value = token("api");
    $("edit-token").value = token("edit");
    $("tokens-form").addEventListener("submit", (event) => {
      event.preventDefault();
      saveTokens();
      show("edits-message", "Tokens saved for this tab.", "ok");
      refresh();
    });
    for (const kind of ["api", "edit"]) $(`${kind}-token`).addEventListener("input", saveTokens);
    $("clear-tokens").addEventListener("click", () => {
      $("api-token").value = "";
      $("edit-token").value = "";
      saveTokens();
      show("edits-message", "Tokens forgotten.", "info");
      refresh();
    });
    $("edit-form").addEventListener("submit", onEdit);
    $("compare-form").addEventListener("submit", runCompare);
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden) refresh();
    });
    setInterval(() => {
      if (!document.hidden) refresh();
    }, POLL_MS);
    refresh();
  }

  start();
})();
