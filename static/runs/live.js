// The run page's live view. It follows the run's feed (apps/live/README.md) over a
// WebSocket, or over SSE when a WebSocket will not open, and applies every frame once and
// in order: token text into a panel per step, failed steps into an alert list, the run's
// status into its badge. Step and run frames ask the htmx partials to reload themselves
// (a `sluice:refresh` event on <body>). A run older than its tenant's feed retention has
// one `pruned` frame instead: its note and final outputs replace the token panels.
// Plain ES2020, no framework, no build step.
(() => {
  "use strict";

  const root = document.getElementById("run-live");
  if (!root) return;

  const TERMINAL = new Set(["succeeded", "failed", "cancelled", "budget_exceeded"]);
  const NO_RETRY_CODES = new Set([4401, 4404]); // unauthorized, not found: retrying cannot help
  const ACK_DELAY_MS = 50; // the server wants an ack at least every 100 ms...
  const ACK_EVERY_FRAMES = 64; // ...or 64 frames, whichever comes first
  const REFRESH_DEBOUNCE_MS = 250;
  const REFRESH_MAX_WAIT_MS = 1000; // a steady stream of step frames still refreshes
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 5000;
  const FAILED_OPENS_BEFORE_SSE = 3;
  const MAX_PANELS = 50;
  // After connecting, the server replays what we missed, then goes live. We call it caught
  // up when frames stop for a moment or the latest one was published just now.
  const QUIET_MS = 400;
  const RECENT_S = 2;

  const byId = (id) => document.getElementById(id);

  const state = {
    lastSeq: Number(root.dataset.lastSeq) || 0,
    ackedSeq: 0,
    finished: false,
    transport: "ws",
    socket: null,
    source: null,
    failedOpens: 0, // WebSocket connections in a row that never opened
    backoff: BACKOFF_FIRST_MS,
    reconnectTimer: 0,
    ackTimer: 0,
    refreshTimer: 0,
    refreshSince: 0,
    catchingUp: false,
    quietTimer: 0,
    // While catching up, run status changes wait: a replay can pass through an old
    // terminal status (a failed run whose dead steps were replayed) before the live one.
    pendingRunStatus: "",
    refreshWanted: false,
    finishing: false, // a terminal run or pruned frame came in the batch being applied
    pruned: false, // the feed was a pruned run's summary
    lastRunStatus: "", // from the latest run frame applied
    helloStatus: "", // the run's status when the server last said hello
    renderedStatus: root.dataset.status || "", // when the page was rendered
    gapStrikes: 0,
    panels: new Map(), // step id -> panel
    overflow: new Set(), // steps streaming beyond MAX_PANELS
    failures: new Map(), // step id -> <li>
  };

  // -- page parts ------------------------------------------------------------------------

  function setLiveState(text) {
    const node = byId("live-state");
    if (node && node.textContent !== text) {
      node.textContent = text;
      node.dataset.state = text;
    }
  }

  function showError(text) {
    const node = byId("live-error");
    if (!node) return;
    node.textContent = `Live updates stopped: ${text}`;
    node.hidden = false;
  }

  function stepUrl(stepId) {
    const template = root.dataset.stepUrl || "";
    return template ? template.replace("00000000-0000-0000-0000-000000000000", stepId) : "";
  }

  // A link that loads a step's details into the details area (or, without htmx, goes there).
  function stepLink(stepId, text) {
    const url = stepUrl(stepId);
    if (!url) return document.createTextNode("");
    const link = document.createElement("a");
    link.className = "step-link";
    link.href = url;
    link.textContent = text;
    link.dataset.step = stepId;
    link.setAttribute("hx-get", url);
    link.setAttribute("hx-target", "#step-detail");
    link.setAttribute("hx-swap", "innerHTML");
    if (window.htmx) window.htmx.process(link);
    return link;
  }

  function code(text) {
    const node = document.createElement("code");
    node.textContent = text;
    return node;
  }

  function requestRefresh() {
    if (state.catchingUp) {
      state.refreshWanted = true;
      return;
    }
    const now = performance.now();
    if (!state.refreshSince) state.refreshSince = now;
    clearTimeout(state.refreshTimer);
    const wait = Math.min(REFRESH_DEBOUNCE_MS, state.refreshSince + REFRESH_MAX_WAIT_MS - now);
    state.refreshTimer = setTimeout(fireRefresh, Math.max(0, wait));
  }

  function fireRefresh() {
    clearTimeout(state.refreshTimer);
    state.refreshTimer = 0;
    state.refreshSince = 0;
    document.body.dispatchEvent(new CustomEvent("sluice:refresh"));
  }

  function setRunStatus(status) {
    root.dataset.status = status;
    const node = byId("run-status");
    if (!node) return;
    node.dataset.status = status;
    const badge = node.querySelector(".badge");
    if (badge) {
      badge.className = `badge badge-${status}`;
      badge.textContent = status;
    } else {
      node.textContent = status;
    }
  }

  // -- token panels ------------------------------------------------------------------------

  function createPanel(frame, stepId) {
    const container = byId("token-panels");
    if (!container) return null;
    const section = document.createElement("section");
    section.className = "token-panel";
    section.dataset.step = stepId;
    section.dataset.node = String(frame.node ?? "");
    const heading = document.createElement("h3");
    heading.append(code(String(frame.node ?? "")));
    if (frame.item !== null && frame.item !== undefined) {
      heading.append(document.createTextNode(` item ${frame.item}`));
    }
    const attempt = document.createElement("span");
    attempt.className = "muted token-attempt";
    heading.append(" ", attempt, " ", stepLink(stepId, "Details"));
    const pre = document.createElement("pre");
    pre.className = "token-text";
    pre.tabIndex = 0; // a scrollable region must be reachable by keyboard
    pre.setAttribute("aria-label", `Text of step ${frame.node ?? ""}`);
    const text = document.createTextNode("");
    pre.append(text);
    section.append(heading, pre);
    container.append(section);
    const panel = { section, pre, text, attempt: -1, attemptLabel: attempt, length: 0, stick: true };
    // Follow the text while the reader is at the bottom; leave them be once they scroll up.
    pre.addEventListener("scroll", () => {
      panel.stick = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 4;
    });
    const empty = byId("token-empty");
    if (empty) empty.hidden = true;
    return panel;
  }

  function setAttempt(panel, attempt) {
    panel.attempt = attempt;
    panel.section.dataset.attempt = String(attempt);
    panel.attemptLabel.textContent = `attempt ${attempt}`;
    panel.text.data = "";
    panel.length = 0;
  }

  function updateOverflow() {
    const node = byId("token-overflow");
    if (!node) return;
    const n = state.overflow.size;
    node.textContent = `${n} more streaming step${n === 1 ? "" : "s"} not shown: only the first ${MAX_PANELS} steps to stream get a panel.`;
    node.hidden = n === 0;
  }

  // Offsets count characters (code points, as the server counts them), not UTF-16 units.
  function applyTokens(frame) {
    const stepId = String(frame.step);
    let panel = state.panels.get(stepId);
    if (!panel) {
      if (state.panels.size >= MAX_PANELS || state.overflow.has(stepId)) {
        state.overflow.add(stepId);
        updateOverflow();
        return true;
      }
      panel = createPanel(frame, stepId);
      if (!panel) return true;
      state.panels.set(stepId, panel);
    }
    const attempt = Number(frame.attempt) || 0;
    if (attempt < panel.attempt) return true; // a superseded attempt: its text is gone
    if (attempt > panel.attempt) setAttempt(panel, attempt);
    let offset = Number(frame.offset) || 0;
    const chars = Array.from(String(frame.text ?? ""));
    if (offset > panel.length) {
      if (!acceptGap(`step ${stepId} text at ${offset}, ${panel.length} characters shown`)) {
        return false;
      }
      panel.section.dataset.gap = "true";
      panel.text.appendData(" […] ");
      offset = panel.length;
    }
    const fresh = chars.slice(panel.length - offset);
    if (fresh.length) {
      panel.text.appendData(fresh.join(""));
      panel.length += fresh.length;
      panel.dirty = true;
    }
    return true;
  }

  function scrollPanels() {
    for (const panel of state.panels.values()) {
      if (panel.dirty && panel.stick) panel.pre.scrollTop = panel.pre.scrollHeight;
      panel.dirty = false;
    }
  }

  // -- step and run frames -------------------------------------------------------------------

  function applyStep(frame) {
    requestRefresh();
    const stepId = String(frame.step);
    const status = String(frame.status ?? "");
    if (status === "failed" || status === "dead") {
      recordFailure(frame, stepId, status);
      return;
    }
    const item = state.failures.get(stepId);
    if (item) {
      item.dataset.status = status;
      const outcome = item.querySelector(".step-failure-outcome");
      const later = { done: "since done", running: "retrying", queued: "queued again" };
      if (outcome) outcome.textContent = later[status] ? ` (${later[status]})` : ` (now ${status})`;
    }
  }

  function recordFailure(frame, stepId, status) {
    const list = byId("step-failures");
    if (!list) return;
    let item = state.failures.get(stepId);
    if (!item) {
      item = document.createElement("li");
      item.className = "step-failure";
      item.dataset.step = stepId;
      item.setAttribute("role", "alert");
      list.append(item);
      state.failures.set(stepId, item);
    }
    item.dataset.status = status;
    item.dataset.attempt = String(frame.attempt ?? "");
    item.replaceChildren();
    item.append(code(String(frame.node ?? "")));
    const where = frame.item !== null && frame.item !== undefined ? ` item ${frame.item}` : "";
    const what = status === "dead" ? "failed; the step is dead" : "failed; it will be retried";
    item.append(document.createTextNode(`${where}, attempt ${frame.attempt}, ${what}: `));
    const error = document.createElement("span");
    error.className = "step-failure-error";
    error.textContent = String(frame.error || "no error text");
    const outcome = document.createElement("span");
    outcome.className = "step-failure-outcome muted";
    item.append(error, outcome, document.createTextNode(" "), stepLink(stepId, "Details"));
    const panel = byId("step-failures-panel");
    if (panel) panel.hidden = false;
  }

  function applyRun(frame) {
    const status = String(frame.status ?? "");
    state.lastRunStatus = status;
    if (state.catchingUp) {
      state.pendingRunStatus = status;
      state.refreshWanted = true;
      return;
    }
    setRunStatus(status);
    requestRefresh();
    if (TERMINAL.has(status)) state.finishing = true; // once the rest of this batch is in
  }

  // -- a pruned run's summary ---------------------------------------------------------------

  // The run finished longer ago than its tenant keeps feeds: its frames were deleted, and
  // its feed says only how it ended and what its terminal nodes produced.
  function applyPruned(frame) {
    state.pruned = true;
    const status = String(frame.status ?? "");
    state.lastRunStatus = status;
    if (status) setRunStatus(status); // the run's final word: no replay can come after it
    const note = byId("token-empty");
    if (note) {
      note.textContent = String(frame.detail ?? "This run's live feed was pruned.");
      note.dataset.pruned = "true";
      note.hidden = false;
    }
    const container = byId("token-panels");
    const outputs = Array.isArray(frame.outputs) ? frame.outputs : [];
    if (container) for (const output of outputs) container.append(outputPanel(output));
    const more = byId("token-overflow");
    if (more && frame.outputs_truncated) {
      more.textContent = `Only the first ${outputs.length} outputs are shown; the steps table below has them all.`;
      more.hidden = false;
    }
    state.finishing = true;
  }

  function outputPanel(output) {
    const node = String(output?.node ?? "");
    const section = document.createElement("section");
    section.className = "token-panel pruned-output";
    section.dataset.node = node;
    const heading = document.createElement("h3");
    heading.append(code(node));
    const pre = document.createElement("pre");
    pre.className = "json";
    pre.tabIndex = 0; // a scrollable region must be reachable by keyboard
    pre.setAttribute("aria-label", `Output of ${node}`);
    pre.textContent = JSON.stringify(output?.payload ?? null, null, 2);
    section.append(heading, pre);
    return section;
  }

  // -- frames in order ---------------------------------------------------------------------

  // A gap should never happen. The first time, reconnect from the last frame applied; if
  // the same gap comes back, it will not go away: show what there is rather than loop.
  function acceptGap(what) {
    if (state.gapStrikes > 0) {
      console.error(`live: gap again after reconnecting (${what}); going on without it`);
      return true;
    }
    state.gapStrikes += 1;
    console.warn(`live: gap (${what}); reconnecting after ${state.lastSeq}`);
    return false;
  }

  // Returns false when a gap calls for a reconnect (the frame was not applied).
  function applyFrame(frame) {
    const seq = Number(frame.seq);
    if (!Number.isFinite(seq) || seq <= state.lastSeq) return true; // seen already
    // A pruned frame is numbered like the run's last frame: those before it are gone on
    // purpose, not a gap.
    const jumps = frame.type === "pruned";
    if (!jumps && seq > state.lastSeq + 1 && !acceptGap(`frame ${seq} after ${state.lastSeq}`)) {
      return false;
    }
    try {
      if (frame.type === "tokens") {
        if (!applyTokens(frame)) return false;
      } else if (frame.type === "step") {
        applyStep(frame);
      } else if (frame.type === "run") {
        applyRun(frame);
      } else if (frame.type === "pruned") {
        applyPruned(frame);
      }
    } catch (err) {
      console.error("live: could not apply frame", frame, err); // and go on: never stall
    }
    state.lastSeq = seq;
    state.gapStrikes = 0;
    return true;
  }

  function applyFrames(frames) {
    let complete = true;
    const before = state.lastSeq;
    for (const frame of frames) {
      if (!applyFrame(frame)) {
        complete = false;
        break;
      }
      if (state.lastSeq - state.ackedSeq >= ACK_EVERY_FRAMES) sendAck();
    }
    root.dataset.lastSeq = String(state.lastSeq);
    if (state.lastSeq > before) state.backoff = BACKOFF_FIRST_MS; // this connection works
    scrollPanels();
    if (!complete) {
      restart();
      return;
    }
    if (state.finishing) {
      finish();
      return;
    }
    scheduleAck();
    if (state.catchingUp) {
      const last = frames[frames.length - 1];
      const recent = last && Date.now() / 1000 - Number(last.at) < RECENT_S;
      if (recent) caughtUp();
      else quietSoon();
    }
  }

  // -- acks ----------------------------------------------------------------------------------

  function sendAck() {
    clearTimeout(state.ackTimer);
    state.ackTimer = 0;
    const ws = state.socket;
    if (!ws || ws.readyState !== WebSocket.OPEN || state.lastSeq <= state.ackedSeq) return;
    ws.send(JSON.stringify({ type: "ack", seq: state.lastSeq }));
    state.ackedSeq = state.lastSeq;
  }

  function scheduleAck() {
    if (!state.socket || state.lastSeq <= state.ackedSeq || state.ackTimer) return;
    state.ackTimer = setTimeout(sendAck, ACK_DELAY_MS);
  }

  // -- catching up -------------------------------------------------------------------------

  function startCatchingUp() {
    state.catchingUp = true;
    setLiveState("catching up");
    quietSoon();
  }

  function quietSoon() {
    clearTimeout(state.quietTimer);
    state.quietTimer = setTimeout(caughtUp, QUIET_MS);
  }

  // The newest word on the run's status. A run that finished before its feed began has no
  // run frame: the hello, or the page itself, says how it ended.
  function knownStatus() {
    return state.lastRunStatus || state.helloStatus || state.renderedStatus;
  }

  function caughtUp() {
    clearTimeout(state.quietTimer);
    if (!state.catchingUp) return;
    state.catchingUp = false;
    const status = state.pendingRunStatus;
    state.pendingRunStatus = "";
    if (status && status !== root.dataset.status) setRunStatus(status);
    if (TERMINAL.has(knownStatus())) {
      finish();
      return;
    }
    setLiveState("live");
    if (state.refreshWanted) {
      state.refreshWanted = false;
      requestRefresh();
    }
  }

  // -- connections -----------------------------------------------------------------------------

  function finish() {
    if (state.finished) return;
    sendAck();
    state.finished = true;
    clearTimeout(state.reconnectTimer);
    clearTimeout(state.quietTimer);
    state.catchingUp = false;
    closeTransports();
    setLiveState("finished");
    if (state.refreshWanted) {
      state.refreshWanted = false;
      requestRefresh();
    }
    const empty = byId("token-empty");
    if (empty && !state.pruned && !state.panels.size && !state.overflow.size) {
      empty.textContent = "No step streamed text in this run.";
    }
  }

  function closeTransports() {
    clearTimeout(state.ackTimer);
    state.ackTimer = 0;
    const ws = state.socket;
    state.socket = null; // first, so its close handler knows it was ours
    if (ws) ws.close(1000);
    const source = state.source;
    state.source = null;
    if (source) source.close();
  }

  function restart() {
    closeTransports();
    connect();
  }

  // The connection ended. If the run has ended too, nothing more will come; else reconnect.
  function endedOrRetry() {
    if (state.finished) return;
    if (TERMINAL.has(knownStatus())) {
      state.catchingUp = false;
      if (knownStatus() !== root.dataset.status) setRunStatus(knownStatus());
      state.refreshWanted = true;
      finish();
      return;
    }
    scheduleReconnect();
  }

  function scheduleReconnect() {
    if (state.finished || state.reconnectTimer) return;
    state.catchingUp = false;
    clearTimeout(state.quietTimer);
    setLiveState("reconnecting");
    // Jitter over the upper half of the backoff: the followers a dead web process dropped
    // all at once come back spread out rather than in one storm.
    const delay = state.backoff / 2 + Math.random() * (state.backoff / 2);
    state.backoff = Math.min(state.backoff * 2, BACKOFF_MAX_MS);
    state.reconnectTimer = setTimeout(() => {
      state.reconnectTimer = 0;
      connect();
    }, delay);
  }

  function connect() {
    if (state.finished) return;
    if (state.transport === "ws" && state.failedOpens >= FAILED_OPENS_BEFORE_SSE) {
      console.warn("live: the WebSocket would not open; following the run over SSE");
      state.transport = "sse";
    }
    if (state.transport === "ws" && "WebSocket" in window) connectSocket();
    else connectEventSource();
  }

  function connectSocket() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const url = `${scheme}//${location.host}${root.dataset.wsUrl}?after=${state.lastSeq}`;
    let ws;
    try {
      ws = new WebSocket(url);
    } catch (err) {
      console.error("live: cannot open a WebSocket", err);
      state.failedOpens += 1;
      scheduleReconnect();
      return;
    }
    let opened = false;
    let openedAt = 0;
    state.socket = ws;
    state.ackedSeq = state.lastSeq; // the server counts un-acked frames from `after`
    ws.addEventListener("open", () => {
      opened = true;
      openedAt = performance.now();
      if (state.socket === ws) state.failedOpens = 0;
    });
    ws.addEventListener("message", (event) => {
      if (state.socket === ws) onSocketMessage(event.data);
    });
    ws.addEventListener("close", (event) => {
      if (state.socket !== ws) return;
      state.socket = null;
      clearTimeout(state.ackTimer);
      state.ackTimer = 0;
      if (!opened) state.failedOpens += 1;
      // A connection that stayed up a while was a good one, even with nothing to say.
      else if (performance.now() - openedAt > BACKOFF_MAX_MS) state.backoff = BACKOFF_FIRST_MS;
      if (NO_RETRY_CODES.has(event.code)) {
        if (byId("live-error")?.hidden) showError(event.reason || `closed (${event.code})`);
        setLiveState("stopped");
        state.finished = true;
        return;
      }
      endedOrRetry();
    });
  }

  function onSocketMessage(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch (err) {
      console.error("live: a message that is not JSON", data);
      return;
    }
    if (message.type === "hello") {
      state.helloStatus = String(message.status ?? "");
      startCatchingUp();
    } else if (message.type === "frames") {
      applyFrames(Array.isArray(message.frames) ? message.frames : []);
    } else if (message.type === "error") {
      showError(message.detail || message.code || "error");
    }
  }

  function connectEventSource() {
    if (!("EventSource" in window) || !root.dataset.sseUrl) return;
    const source = new EventSource(`${root.dataset.sseUrl}?after=${state.lastSeq}`);
    state.source = source;
    source.addEventListener("open", () => {
      if (state.source === source) startCatchingUp();
    });
    for (const type of ["tokens", "step", "run", "pruned"]) {
      source.addEventListener(type, (event) => {
        if (state.source !== source) return;
        let frame;
        try {
          frame = JSON.parse(event.data);
        } catch (err) {
          console.error("live: an event that is not JSON", event.data);
          return;
        }
        if (frame.seq === undefined && event.lastEventId) frame.seq = Number(event.lastEventId);
        applyFrames([frame]);
      });
    }
    // EventSource would retry by itself, but from its first URL's `after`: take over, so
    // every reconnect starts from the last frame applied, with our backoff.
    source.addEventListener("error", () => {
      if (state.source !== source) return;
      state.source = null;
      source.close();
      endedOrRetry();
    });
  }

  // A step's details, loaded by a link, get the focus, so keyboard and screen reader users
  // land on what they asked for.
  document.body.addEventListener("htmx:afterSwap", (event) => {
    if (event.detail?.target?.id === "step-detail") byId("step-detail-heading")?.focus();
  });

  for (const node of root.querySelectorAll("[data-live-only]")) node.hidden = false;
  setLiveState("connecting");
  connect();
})();
