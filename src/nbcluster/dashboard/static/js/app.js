// The dashboard: log in with a token, then draw what the event stream sends (overview
// snapshots and notices) without reloading. Plain ES modules, no build step.

import { ApiError, call, follow, saveToken, savedToken } from "./api.js";
import { gpuBar, lineChart } from "./charts.js";

const $ = (id) => document.getElementById(id);
const FEED_MAX = 200;
const samples = [];
let overview = null;
let stop = null;
const drawn = {}; // what each table was last drawn from (redrawn only when it changes)

function text(tag, content, cls) {
  const node = document.createElement(tag);
  if (content !== undefined && content !== null) node.textContent = String(content);
  if (cls) node.className = cls;
  return node;
}

function toast(message) {
  $("toast").textContent = message;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { $("toast").textContent = ""; }, 6000);
}

function short(id) {
  return id.length > 12 ? id.slice(0, 8) : id;
}

// -- confirmation -------------------------------------------------------------------------

function confirmAction(message, extra) {
  const dialog = $("confirm");
  $("confirm-text").textContent = message;
  $("confirm-extra").replaceChildren(...(extra ? [extra] : []));
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

async function act(description, method, path, body) {
  try {
    await call(method, path, body);
    toast(`${description}: done`);
  } catch (error) {
    toast(`${description} failed: ${error.message}`);
  }
}

function button(label, onClick, name) {
  const b = text("button", label);
  b.type = "button";
  b.dataset.action = name;
  b.addEventListener("click", onClick);
  return b;
}

async function checkpoint(kernel) {
  if (await confirmAction(`Write a checkpoint of kernel ${kernel.id} to the object store now?`)) {
    await act(`checkpoint of ${short(kernel.id)}`, "POST",
      `/api/cluster/kernels/${kernel.id}/checkpoint`);
  }
}

async function migrate(kernel) {
  const live = kernel.replicas.filter((r) => r.state === "running");
  if (!live.length) return toast(`kernel ${short(kernel.id)} has no running replica to move`);
  const form = document.createElement("div");
  const replicaLabel = text("label", "Replica");
  const replica = document.createElement("select");
  replica.id = "migrate-replica";
  for (const r of live) replica.appendChild(new Option(`${r.replica_id} on ${r.host}`, r.replica_id));
  replicaLabel.appendChild(replica);
  const hostLabel = text("label", "to host");
  const host = document.createElement("select");
  host.id = "migrate-host";
  host.appendChild(new Option("any with room", ""));
  for (const h of overview.hosts) if (h.state === "connected") host.appendChild(new Option(h.name, h.name));
  hostLabel.appendChild(host);
  form.append(replicaLabel, text("br"), hostLabel);
  if (await confirmAction(`Move a replica of kernel ${kernel.id}?`, form)) {
    await act(`migration of ${replica.value}`, "POST",
      `/api/cluster/kernels/${kernel.id}/replicas/${replica.value}/migrate`,
      { host: host.value || null });
  }
}

async function drain(host) {
  // Drained: no new replicas, cells or jobs go there; what runs there keeps running.
  const undo = Boolean(host.draining);
  const question = undo
    ? `Undrain host ${host.name}? It takes new replicas, cells and jobs again.`
    : `Drain host ${host.name}? No new replicas, cells or jobs will go there; its ` +
      `${host.replicas.length} replicas keep running (migrate them away before taking it down).`;
  if (await confirmAction(question)) {
    await act(`${undo ? "undrain" : "drain"} of ${host.name}`, undo ? "DELETE" : "POST",
      `/api/cluster/hosts/${encodeURIComponent(host.name)}/drain`);
  }
}

async function cancelJob(job) {
  if (await confirmAction(`Cancel job ${job.id} (${job.status})?`)) {
    await act(`cancel of job ${short(job.id)}`, "POST", `/api/jobs/${job.id}/cancel`);
  }
}

// -- drawing ------------------------------------------------------------------------------

function changed(name, data) {
  const key = JSON.stringify(data);
  if (drawn[name] === key) return false;
  drawn[name] = key;
  return true;
}

function drawTotals(o) {
  const items = [["Kernels", o.kernels.length], ["Jobs queued", (o.queues.cpu || 0) + (o.queues.gpu || 0)]];
  if (o.totals) {
    const t = o.totals;
    items.unshift(
      ["Hosts", t.hosts],
      ["GPUs committed", `${t.committed_gpus} / ${t.gpu_capacity}`],
      ["GPUs pending", t.pending_gpus],
      ["Cells waiting", t.waiting_cells],
      ["Subscription", `${t.subscription_ratio.toFixed(2)}×`],
    );
  }
  if (!changed("totals", items)) return;
  $("totals").replaceChildren(...items.map(([name, value]) => {
    const div = document.createElement("div");
    div.append(text("dt", name), text("dd", value));
    return div;
  }));
}

function drawHosts(o) {
  $("hosts-card").hidden = !o.admin;
  $("chart-card").hidden = !o.admin;
  if (!o.admin || !changed("hosts", o.hosts)) return;
  $("hosts").tBodies[0].replaceChildren(...o.hosts.map((h) => {
    const row = document.createElement("tr");
    row.dataset.host = h.name;
    const gpus = h.gpus.length;
    const bar = text("td");
    bar.append(gpuBar(h.gpus_committed || 0, h.gpus_pending || 0, gpus),
      text("span", ` ${h.gpus_committed || 0}/${gpus}`));
    row.append(
      text("th", h.name + (h.pool ? ` (${h.pool})` : "")),
      text("td", h.state + (h.draining ? ", draining" : ""), `state-${h.state}`),
      text("td", h.cpus),
      text("td", `${(h.memory_mb / 1024).toFixed(1)} GiB`),
      bar,
      text("td", h.subscription_ratio === undefined ? "–" : h.subscription_ratio.toFixed(2)),
      text("td", h.replicas.length),
    );
    const actions = text("td", null, "actions");
    actions.appendChild(h.draining
      ? button("Undrain", () => drain(h), "undrain")
      : button("Drain", () => drain(h), "drain"));
    row.appendChild(actions);
    row.firstChild.scope = "row";
    return row;
  }));
}

function drawKernels(o) {
  const rows = o.kernels.map((k) => [k.id, k.owner, k.execution_state, k.executor, k.replicas,
    k.waiting_cells, k.degraded, k.dead_reason]);
  $("kernels-empty").hidden = o.kernels.length > 0;
  if (!changed("kernels", [o.admin, rows])) return;
  $("kernels").tBodies[0].replaceChildren(...o.kernels.map((k) => {
    const row = document.createElement("tr");
    row.dataset.kernelId = k.id;
    const id = text("th", short(k.id));
    id.scope = "row";
    id.title = k.id;
    const replicas = text("td");
    for (const r of k.replicas) {
      const line = text("span", `${r.replica_id} @ ${r.host}: ${r.state}`,
        `replica state-${r.state}`);
      line.dataset.replicaId = r.replica_id;
      replicas.appendChild(line);
    }
    const actions = text("td", null, "actions");
    actions.appendChild(button("Checkpoint", () => checkpoint(k), "checkpoint"));
    if (o.admin) actions.appendChild(button("Migrate…", () => migrate(k), "migrate"));
    const state = k.execution_state + (k.degraded ? " (degraded)" : "");
    row.append(id, text("td", k.owner), text("td", state, `state-${k.execution_state}`),
      text("td", k.executor || "–"), replicas, text("td", k.waiting_cells), actions);
    if (k.dead_reason) row.title = k.dead_reason;
    return row;
  }));
}

function drawJobs(o) {
  const q = o.queues;
  $("queues").textContent = `Queued: ${q.cpu || 0} on cpu, ${q.gpu || 0} on gpu` +
    (o.admin ? ` · workers healthy: ${o.workers.filter((w) => w.healthy).length} of ${o.workers.length}` : "");
  $("jobs-empty").hidden = o.jobs.length > 0;
  if (!changed("jobs", [o.admin, o.jobs.map((j) => [j.id, j.status, j.worker, j.attempts])])) return;
  $("jobs").tBodies[0].replaceChildren(...o.jobs.map((j) => {
    const row = document.createElement("tr");
    row.dataset.jobId = j.id;
    const id = text("th", short(j.id));
    id.scope = "row";
    id.title = j.id;
    const actions = text("td", null, "actions");
    if (j.status === "queued" || j.status === "running") {
      actions.appendChild(button("Cancel", () => cancelJob(j), "cancel"));
    }
    row.append(id, text("td", j.spec.owner), text("td", j.spec.queue || "–"),
      text("td", j.status, `state-${j.status}`), text("td", j.worker || "–"),
      text("td", j.attempts), actions);
    return row;
  }));
}

function drawChart(o) {
  if (!o.totals) return;
  const t = Date.parse(o.time) / 1000;
  samples.push({ t, committed: o.totals.committed_gpus, pending: o.totals.pending_gpus,
    capacity: o.totals.gpu_capacity });
  while (samples.length && samples[0].t < t - 600) samples.shift();
  lineChart($("chart"), samples);
}

function draw(o) {
  overview = o;
  $("who").textContent = `${o.user || "?"} (${o.admin ? "admin" : "user"})`;
  drawTotals(o);
  drawHosts(o);
  drawKernels(o);
  drawJobs(o);
  drawChart(o);
}

function addNotice(n) {
  const item = document.createElement("li");
  item.dataset.kind = n.kind;
  item.dataset.seq = n.seq;
  const time = text("time", new Date(n.time).toLocaleTimeString());
  time.dateTime = n.time;
  item.append(time, text("span", n.severity, `sev sev-${n.severity}`), text("span", n.message));
  const feed = $("feed");
  feed.prepend(item);
  while (feed.children.length > FEED_MAX) feed.lastChild.remove();
}

// -- logging in ---------------------------------------------------------------------------

function setLink(state, error) {
  const link = $("link");
  link.className = `link ${state === "live" ? "live" : "down"}`;
  link.textContent = { live: "live", down: "reconnecting…", refused: "refused" }[state] || state;
  if (state === "refused") logout(error ? error.message : "the token was refused");
}

async function start() {
  let first;
  try {
    first = await call("GET", "/api/cluster/overview");
  } catch (error) {
    const why = error instanceof ApiError && error.status === 403
      ? "this token is not accepted here" : error.message;
    return logout(why);
  }
  $("login").hidden = true;
  $("board").hidden = false;
  $("logout").hidden = false;
  draw(first);
  const since = Math.max(0, first.last_seq - FEED_MAX);
  stop = follow((event, data) => {
    if (event === "overview") draw(data);
    else if (event === "notice") addNotice(data);
  }, setLink, since);
}

function logout(message) {
  if (stop) stop();
  stop = null;
  saveToken(null);
  $("board").hidden = true;
  $("login").hidden = false;
  $("logout").hidden = true;
  $("feed").replaceChildren();
  for (const key of Object.keys(drawn)) delete drawn[key];
  $("login-error").textContent = message || "";
  $("who").textContent = "";
  $("link").textContent = "not connected";
}

$("login-form").addEventListener("submit", (event) => {
  event.preventDefault();
  saveToken($("token").value.trim());
  $("token").value = "";
  start();
});
$("logout").addEventListener("click", () => logout());

// A link may carry the token in its fragment (never sent to the server): take it, drop it.
const fromFragment = new URLSearchParams(location.hash.slice(1)).get("token");
if (fromFragment) {
  saveToken(fromFragment);
  history.replaceState(null, "", location.pathname);
}
if (savedToken()) start();
