/* The graph editor's canvas (AntV X6, vendored by `make setup`).
 *
 * The browser holds the unsaved graph; the server holds the rules. Every node keeps its
 * spec JSON (id, type, config, label...) in the cell's data; the canvas adds positions and
 * edges. Forms, validation, layout and saving are round trips that carry the whole spec, so
 * the server keeps nothing between requests and checks everything on save.
 *
 * Ports: "in" on the left (every node but a source); one "out:<port>" per output port on the
 * right. An edge from port "out:urgent" is the spec edge [from, to, "urgent"].
 */
(function () {
  "use strict";

  var NODE_W = 200;
  var NODE_H = 58;
  var OPERATOR_MIME = "application/x-sluice-operator";

  var data = JSON.parse(document.getElementById("editor-data").textContent);
  var root = document.getElementById("editor");
  var canvasEl = document.getElementById("canvas");
  var statusEl = document.getElementById("editor-status");
  var problemsEl = document.getElementById("problems");
  var editable = data.canEdit;
  var csrf = JSON.parse(root.getAttribute("hx-headers"))["X-CSRFToken"];
  var basePolicies = data.spec.policies;
  var dirty = false;
  var loading = true;
  var lastCheckedEdges = [];

  var PORT_CIRCLE = { r: 6, magnet: true, stroke: "#1f5fbf", strokeWidth: 1.5, fill: "#fff" };
  var PORT_GROUPS = {
    in: { position: "left", attrs: { circle: PORT_CIRCLE } },
    out: {
      position: "right",
      attrs: { circle: PORT_CIRCLE },
      label: { position: { name: "right", args: { x: 10 } } },
    },
  };

  var graph = new X6.Graph({
    container: canvasEl,
    autoResize: true,
    grid: { visible: true, size: 10 },
    panning: { enabled: true },
    mousewheel: { enabled: true, modifiers: ["ctrl", "meta"], minScale: 0.3, maxScale: 2 },
    interacting: editable ? true : { nodeMovable: false, edgeMovable: false, magnetConnectable: false },
    connecting: {
      snap: { radius: 24 },
      allowBlank: false,
      allowLoop: false,
      allowNode: false,
      allowEdge: false,
      allowMulti: false,
      highlight: true,
      connector: { name: "smooth" },
      createEdge: function () {
        return this.createEdge(edgeStyle());
      },
      validateMagnet: function (args) {
        return editable && args.magnet.getAttribute("port-group") === "out";
      },
      validateConnection: function (args) {
        return (
          args.sourceCell !== args.targetCell &&
          !!args.targetMagnet &&
          args.targetMagnet.getAttribute("port-group") === "in"
        );
      },
    },
  });
  // The browser build has no Graph.prototype shortcuts for plugins: call the plugins.
  var selection = new X6.Selection({ enabled: true, multiple: true, rubberband: false, showNodeSelectionBox: true });
  var keyboard = new X6.Keyboard({ enabled: true });
  var history = new X6.History({ enabled: editable });
  graph.use(selection);
  graph.use(keyboard);
  graph.use(new X6.Snapline({ enabled: true }));
  graph.use(history);

  function edgeStyle() {
    return {
      shape: "edge",
      zIndex: 0,
      connector: { name: "smooth" },
      attrs: { line: { stroke: "#8593a3", strokeWidth: 1.6, targetMarker: { name: "block", width: 9, height: 7 } } },
    };
  }

  // -- nodes ------------------------------------------------------------------------------

  function operatorOf(type) {
    return data.palette[type] || { has_input: true, outputs: ["out"], description: "Unknown operator" };
  }

  function portItems(node, outputs) {
    var items = [];
    if (operatorOf(node.type).has_input) items.push({ id: "in", group: "in" });
    outputs.forEach(function (port) {
      items.push({ id: "out:" + port, group: "out", attrs: { text: { text: port === "out" ? "" : port, fontSize: 11 } } });
    });
    return items;
  }

  function labelText(node) {
    var title = node.label ? node.label + " (" + node.id + ")" : node.id;
    return title + "\n" + node.type;
  }

  function specNode(node) {
    var copy = Object.assign({}, node);
    delete copy.position;
    return copy;
  }

  function addNode(node, x, y, outputs) {
    return graph.addNode({
      shape: "rect",
      x: x,
      y: y,
      width: NODE_W,
      height: NODE_H,
      attrs: {
        // data-node-id: the spec id, for tests and for finding a node in the DOM.
        body: { fill: "#fff", stroke: "#9aa7b6", strokeWidth: 1.5, rx: 6, ry: 6, "data-node-id": node.id },
        label: { text: labelText(node), fontSize: 12, fill: "#1f2328" },
      },
      ports: { groups: PORT_GROUPS, items: portItems(node, outputs || operatorOf(node.type).outputs) },
      data: { node: specNode(node) },
    });
  }

  function nodeOf(cell) {
    return cell.getData().node;
  }

  function cellByNodeId(id) {
    return graph.getNodes().filter(function (cell) { return nodeOf(cell).id === id; })[0];
  }

  function freshId(type) {
    var base = type.indexOf(".") >= 0 ? type.split(".").pop() : type;
    base = base.replace(/[^a-z0-9_-]/g, "_");
    if (!/^[a-z]/.test(base)) base = "n_" + base;
    var taken = {};
    graph.getNodes().forEach(function (cell) { taken[nodeOf(cell).id] = true; });
    if (!taken[base]) return base;
    for (var i = 2; ; i++) if (!taken[base + "_" + i]) return base + "_" + i;
  }

  function createNode(type, x, y) {
    var cell = addNode({ id: freshId(type), type: type }, x, y);
    selection.clean();
    selection.select(cell);
    say("Added " + nodeOf(cell).id + ". Set it up in the panel on the right.");
    return cell;
  }

  function setOutputs(cell, outputs) {
    var node = nodeOf(cell);
    var wanted = {};
    outputs.forEach(function (port) { wanted["out:" + port] = true; });
    cell.getPorts().forEach(function (port) {
      if (port.group === "out" && !wanted[port.id]) cell.removePort(port.id);
    });
    var have = {};
    cell.getPorts().forEach(function (port) { have[port.id] = true; });
    portItems(node, outputs).forEach(function (item) {
      if (!have[item.id]) cell.addPort(item);
    });
  }

  // -- the spec ---------------------------------------------------------------------------

  function currentSpec() {
    var nodes = graph.getNodes().map(function (cell) {
      var node = Object.assign({}, nodeOf(cell));
      var p = cell.getPosition();
      node.position = { x: Math.round(p.x), y: Math.round(p.y) };
      return node;
    });
    lastCheckedEdges = graph.getEdges().filter(function (edge) {
      return edge.getSourceCell() && edge.getTargetCell();
    });
    var edges = lastCheckedEdges.map(function (edge) {
      var port = (edge.getSourcePortId() || "out:out").slice(4);
      var item = [nodeOf(edge.getSourceCell()).id, nodeOf(edge.getTargetCell()).id];
      if (port !== "out") item.push(port);
      return item;
    });
    var spec = { nodes: nodes, edges: edges };
    if (basePolicies) spec.policies = basePolicies;
    return spec;
  }

  function load(spec) {
    var byId = {};
    var unplaced = false;
    spec.nodes.forEach(function (node, i) {
      var p = node.position;
      if (!p) unplaced = true;
      byId[node.id] = addNode(node, p ? p.x : 40 + i * 240, p ? p.y : 40, data.outputs[node.id]);
    });
    (spec.edges || []).forEach(function (item) {
      var source = byId[item[0]];
      var target = byId[item[1]];
      if (!source || !target) return;
      var edge = edgeStyle();
      edge.source = { cell: source.id, port: "out:" + (item[2] || "out") };
      edge.target = { cell: target.id, port: "in" };
      graph.addEdge(edge);
    });
    return unplaced;
  }

  // -- requests ---------------------------------------------------------------------------

  function postJson(url, body) {
    return fetch(url, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrf, Accept: "application/json" },
      credentials: "same-origin",
      body: JSON.stringify(body),
    }).then(function (response) {
      return response.json().then(
        function (json) { return { status: response.status, body: json }; },
        function () { return { status: response.status, body: { title: "The server answered " + response.status + "." } }; }
      );
    });
  }

  function say(text, kind) {
    statusEl.textContent = text;
    statusEl.className = "editor-status" + (kind ? " status-" + kind : "");
  }

  // -- problems ---------------------------------------------------------------------------

  function clearMarks() {
    graph.getCells().forEach(function (cell) {
      var view = graph.findViewByCell(cell);
      if (view) view.container.classList.remove("has-error");
    });
  }

  function mark(cell) {
    var view = cell && graph.findViewByCell(cell);
    if (view) view.container.classList.add("has-error");
  }

  function cellOfError(error) {
    var node = /^node '(.+)'$/.exec(error.where);
    if (node) return cellByNodeId(node[1]);
    var edge = /^edge (\d+)$/.exec(error.where);
    if (edge) return lastCheckedEdges[Number(edge[1])];
    return null;
  }

  function showProblems(errors) {
    clearMarks();
    problemsEl.textContent = "";
    if (!errors.length) {
      var ok = document.createElement("li");
      ok.className = "problem-none";
      ok.textContent = "No problems found.";
      problemsEl.appendChild(ok);
      return;
    }
    errors.forEach(function (error) {
      var cell = cellOfError(error);
      mark(cell);
      var li = document.createElement("li");
      li.className = "problem";
      var text = error.where + (error.field ? ": " + error.field : "") + ": " + error.message;
      if (cell) {
        var button = document.createElement("button");
        button.type = "button";
        button.className = "link-button";
        button.textContent = text;
        button.addEventListener("click", function () {
          selection.clean();
          selection.select(cell);
          graph.centerCell(cell);
        });
        li.appendChild(button);
      } else {
        li.textContent = text;
      }
      problemsEl.appendChild(li);
    });
  }

  function validate() {
    return postJson(data.urls.validate, { spec: currentSpec() }).then(function (result) {
      var errors = result.body.errors || [];
      showProblems(errors);
      say(errors.length ? errors.length + " problem(s): see the list on the right." : "The graph is valid.", errors.length ? "error" : "ok");
    });
  }

  // -- saving -----------------------------------------------------------------------------

  function setDirty(value) {
    dirty = value;
    document.getElementById("dirty-flag").hidden = !value;
  }

  function save() {
    var noteEl = document.getElementById("save-note");
    var body = { spec: currentSpec(), note: noteEl.value, based_on: data.basedOn };
    say("Saving…");
    postJson(data.urls.save, body).then(function (result) {
      if (result.status === 201) {
        data.basedOn = result.body.number;
        data.version = result.body.number;
        setDirty(false);
        noteEl.value = "";
        showProblems([]);
        document.getElementById("editor-version").textContent =
          "v" + result.body.number + (result.body.deployed ? " · deployed" : "");
        var runButton = root.querySelector('[data-action="run"]');
        if (runButton) { runButton.disabled = false; runButton.removeAttribute("title"); }
        window.history.replaceState(null, "", result.body.editor_url);
        say(result.body.message + ".", "ok");
        return;
      }
      if (result.body.errors) showProblems(result.body.errors);
      say(result.body.title || "Not saved.", "error");
    }, function () {
      say("Not saved: the server could not be reached. Your changes are still here; try again.", "error");
    });
  }

  // -- the node panel (htmx) --------------------------------------------------------------

  function showNodeForm(cell) {
    htmx.ajax("POST", data.urls.node_form, {
      target: "#inspector",
      swap: "innerHTML",
      headers: { "X-CSRFToken": csrf },
      values: { cell: cell.id, node: JSON.stringify(nodeOf(cell)), spec: JSON.stringify(currentSpec()) },
    });
  }

  function showNothing() {
    document.getElementById("inspector").innerHTML = '<p class="muted">Select a node to see its settings.</p>';
  }

  // The config form's own submit carries the node and the spec as the canvas has them.
  document.body.addEventListener("htmx:configRequest", function (event) {
    var form = event.detail.elt;
    if (!form || form.id !== "node-form") return;
    var cell = graph.getCellById(form.getAttribute("data-cell"));
    if (!cell) return;
    event.detail.parameters.node = JSON.stringify(nodeOf(cell));
    event.detail.parameters.spec = JSON.stringify(currentSpec());
  });

  document.body.addEventListener("sluice:node-config", function (event) {
    var detail = event.detail;
    var cell = graph.getCellById(detail.cell);
    if (!cell) return;
    var view = graph.findViewByCell(cell);
    if (!detail.valid) {
      mark(cell);
      say("Not applied: fix the fields marked in the panel.", "error");
      return;
    }
    graph.startBatch("configure");
    cell.setData({ node: detail.node }, { overwrite: true });
    cell.attr("label/text", labelText(detail.node));
    cell.attr("body/data-node-id", detail.node.id);
    setOutputs(cell, detail.outputs);
    graph.stopBatch("configure");
    if (view) view.container.classList.remove("has-error");
    say("Applied to " + detail.node.id + ".", "ok");
  });

  // Connecting without a pointer: under a selected node's form, pick one of its output
  // ports and a node to send it to. The edge is the same as one drawn on the canvas.
  function addConnectControls(cell) {
    var outputs = cell.getPorts().filter(function (port) { return port.group === "out"; });
    var targets = graph.getNodes().filter(function (other) {
      return other !== cell && other.getPorts().some(function (port) { return port.id === "in"; });
    });
    if (!outputs.length || !targets.length) return;
    var box = document.createElement("fieldset");
    box.className = "connect-controls";
    box.innerHTML =
      '<legend>Connect</legend><label for="connect-port">From port</label><select id="connect-port"></select>' +
      '<label for="connect-target">To node</label><select id="connect-target"></select>' +
      '<button type="button" class="button small">Add edge</button>';
    var portSelect = box.querySelector("#connect-port");
    var targetSelect = box.querySelector("#connect-target");
    outputs.forEach(function (port) { portSelect.add(new Option(port.id.slice(4), port.id)); });
    targets.forEach(function (other) { targetSelect.add(new Option(nodeOf(other).id, other.id)); });
    box.querySelector("button").addEventListener("click", function () {
      var edge = edgeStyle();
      edge.source = { cell: cell.id, port: portSelect.value };
      edge.target = { cell: targetSelect.value, port: "in" };
      graph.addEdge(edge);
      say("Connected " + nodeOf(cell).id + " to " + nodeOf(graph.getCellById(targetSelect.value)).id + ".", "ok");
    });
    document.getElementById("inspector").appendChild(box);
  }

  document.body.addEventListener("htmx:afterSwap", function (event) {
    if (!editable || event.target.id !== "inspector") return;
    var form = document.getElementById("node-form");
    var cell = form && graph.getCellById(form.getAttribute("data-cell"));
    if (cell) addConnectControls(cell);
  });

  // The graph's policies live outside the canvas model, so undo does not cover them.
  function showPolicies() {
    selection.clean();
    htmx.ajax("POST", data.urls.policies_form, {
      target: "#inspector",
      swap: "innerHTML",
      headers: { "X-CSRFToken": csrf },
      values: { policies: JSON.stringify(basePolicies || {}) },
    });
  }

  document.body.addEventListener("sluice:policies", function (event) {
    if (!event.detail.valid) {
      say("Not applied: fix the fields marked in the panel.", "error");
      return;
    }
    var policies = event.detail.policies;
    basePolicies = Object.keys(policies).length ? policies : undefined;
    setDirty(true);
    say("Graph settings applied.", "ok");
  });

  // -- palette ----------------------------------------------------------------------------

  function visibleCentre() {
    var box = canvasEl.getBoundingClientRect();
    var p = graph.clientToLocal(box.left + box.width / 2, box.top + box.height / 2);
    var n = graph.getNodes().length;
    return { x: p.x - NODE_W / 2 + (n % 5) * 16, y: p.y - NODE_H / 2 + (n % 5) * 16 };
  }

  function setUpPalette() {
    var items = Array.prototype.slice.call(document.querySelectorAll(".palette-item"));
    items.forEach(function (item) {
      item.addEventListener("dragstart", function (event) {
        event.dataTransfer.setData(OPERATOR_MIME, item.getAttribute("data-type"));
        event.dataTransfer.setData("text/plain", item.getAttribute("data-type"));
        event.dataTransfer.effectAllowed = "copy";
      });
      item.addEventListener("keydown", function (event) {
        if (event.key !== "Enter" && event.key !== " ") return;
        event.preventDefault();
        var p = visibleCentre();
        createNode(item.getAttribute("data-type"), p.x, p.y);
      });
    });
    canvasEl.addEventListener("dragover", function (event) {
      event.preventDefault();
      event.dataTransfer.dropEffect = "copy";
    });
    canvasEl.addEventListener("drop", function (event) {
      event.preventDefault();
      var type = event.dataTransfer.getData(OPERATOR_MIME) || event.dataTransfer.getData("text/plain");
      if (!data.palette[type]) return;
      var p = graph.clientToLocal(event.clientX, event.clientY);
      createNode(type, p.x - NODE_W / 2, p.y - NODE_H / 2);
    });
    var search = document.getElementById("palette-search");
    search.addEventListener("input", function () {
      var words = search.value.toLowerCase().split(/\s+/).filter(Boolean);
      var shown = 0;
      items.forEach(function (item) {
        var text = item.textContent.toLowerCase();
        var match = words.every(function (word) { return text.indexOf(word) >= 0; });
        item.hidden = !match;
        if (match) shown++;
      });
      document.querySelectorAll(".palette-group").forEach(function (group) {
        group.hidden = !group.querySelector(".palette-item:not([hidden])");
      });
      document.querySelector(".palette-empty").hidden = shown > 0;
    });
  }

  // -- toolbar ----------------------------------------------------------------------------

  function autoLayout() {
    return postJson(data.urls.layout, { spec: currentSpec() }).then(function (result) {
      var positions = result.body.positions || {};
      graph.startBatch("layout");
      graph.getNodes().forEach(function (cell) {
        var p = positions[nodeOf(cell).id];
        if (p) cell.position(p.x + 20, p.y + 20);
      });
      graph.stopBatch("layout");
      graph.zoomToFit({ padding: 40, maxScale: 1, minScale: 0.7 });
    });
  }

  function deleteSelection() {
    var cells = selection.getSelectedCells();
    if (!cells.length) return;
    graph.removeCells(cells);
    showNothing();
  }

  function openRunDialog() {
    if (dirty) {
      say("Save your changes first: a run uses a saved version.", "error");
      return;
    }
    var dialog = document.getElementById("run-dialog");
    htmx.ajax("GET", data.urls.run_form + "?version=" + data.version, { target: "#run-dialog-body", swap: "innerHTML" }).then(function () {
      dialog.showModal();
    });
  }

  var actions = {
    undo: function () { history.undo(); },
    redo: function () { history.redo(); },
    delete: deleteSelection,
    layout: autoLayout,
    "zoom-in": function () { graph.zoom(0.1); },
    "zoom-out": function () { graph.zoom(-0.1); },
    fit: function () { graph.zoomToFit({ padding: 40, maxScale: 1, minScale: 0.7 }); },
    validate: validate,
    settings: showPolicies,
    save: save,
    run: openRunDialog,
  };

  root.addEventListener("click", function (event) {
    var button = event.target.closest("[data-action]");
    if (button && actions[button.getAttribute("data-action")]) actions[button.getAttribute("data-action")]();
  });
  document.addEventListener("click", function (event) {
    if (event.target.closest('[data-action="close-dialog"]')) document.getElementById("run-dialog").close();
  });

  function updateButtons() {
    var undo = root.querySelector('[data-action="undo"]');
    if (!undo) return;
    undo.disabled = !history.canUndo();
    root.querySelector('[data-action="redo"]').disabled = !history.canRedo();
    root.querySelector('[data-action="delete"]').disabled = selection.getSelectedCellCount() === 0;
  }

  // -- events -----------------------------------------------------------------------------

  graph.on("selection:changed", function (args) {
    updateButtons();
    var selected = args.selected.filter(function (cell) { return cell.isNode(); });
    if (selected.length === 1 && args.selected.length === 1) showNodeForm(selected[0]);
    else if (!args.selected.length) showNothing();
  });
  graph.on("history:change", function () {
    updateButtons();
    if (!loading) setDirty(true);
  });
  function focusCanvas() { canvasEl.focus({ preventScroll: true }); }
  function updateEmptyHint() {
    document.getElementById("canvas-empty").hidden = graph.getNodes().length > 0;
  }
  graph.on("cell:mousedown", focusCanvas);
  graph.on("blank:mousedown", focusCanvas);
  graph.on("node:added", updateEmptyHint);
  graph.on("node:removed", updateEmptyHint);

  if (editable) {
    keyboard.bindKey(["ctrl+z", "meta+z"], function () { history.undo(); return false; });
    keyboard.bindKey(["ctrl+shift+z", "meta+shift+z", "ctrl+y"], function () { history.redo(); return false; });
    keyboard.bindKey(["delete", "backspace"], function () { deleteSelection(); return false; });
    setUpPalette();
    window.addEventListener("beforeunload", function (event) {
      if (dirty) { event.preventDefault(); event.returnValue = ""; }
    });
  }

  function finishLoading() {
    history.clean();
    loading = false;
    updateButtons();
    root.setAttribute("data-ready", "true");
  }

  var unplaced = load(data.spec);
  updateEmptyHint();
  if (unplaced) {
    // Graphs made through the API or the JSON form have no positions: lay them out once.
    autoLayout().then(finishLoading, finishLoading);
  } else {
    if (graph.getNodes().length) graph.zoomToFit({ padding: 40, maxScale: 1, minScale: 0.7 });
    finishLoading();
  }

  // For tests and the curious: the spec as the canvas has it now.
  window.sluiceEditor = { spec: currentSpec, graph: graph };
})();
