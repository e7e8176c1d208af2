// Parley's page: conversations, replies that stream and survive reloads, the usage panel.
// Everything it loads comes from this server; model output and user text never become
// markup that can run script or fetch anything (see render()).
import { Marked } from "./vendor/marked-18.2.1.esm.js";
import DOMPurify from "./vendor/purify-3.4.18.es.mjs";

const $ = (selector) => document.querySelector(selector);
// mode: "open" (a name, no password) or "accounts" (sign in; see /api/auth).
const state = { mode: "open", user: null, conversations: [], current: null, turn: null };

// --- Who is chatting ------------------------------------------------------------------

const USER_KEY = "parley.user";

function rememberUser(name) {
  localStorage.setItem(USER_KEY, name);
  // The API reads the name from this cookie (EventSource cannot send headers).
  document.cookie = `parley_user=${encodeURIComponent(name)}; path=/; max-age=31536000; SameSite=Strict`;
}

function forgetUser() {
  localStorage.removeItem(USER_KEY);
  document.cookie = "parley_user=; path=/; max-age=0; SameSite=Strict";
}

// --- The API ----------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

function cookie(name) {
  const found = document.cookie.split("; ").find((part) => part.startsWith(`${name}=`));
  return found ? decodeURIComponent(found.slice(name.length + 1)) : "";
}

async function api(method, path, body) {
  const headers = body === undefined ? {} : { "Content-Type": "application/json" };
  // Accounts mode: a change carries the session's CSRF token, which only this page can read.
  if (method !== "GET" && cookie("parley_csrf")) headers["X-CSRF-Token"] = cookie("parley_csrf");
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, "Parley could not be reached. Check the connection and retry.");
  }
  if (!response.ok) {
    let detail = `The server answered ${response.status}.`;
    try {
      const problem = await response.json();
      detail = Array.isArray(problem.detail)
        ? problem.detail.map((item) => `${item.loc.at(-1)} ${item.msg}`).join("; ")
        : problem.detail || detail;
    } catch {
      // not JSON: keep the status line
    }
    throw new ApiError(response.status, detail);
  }
  return response.status === 204 ? null : response.json();
}

// --- Markdown, made safe -----------------------------------------------------------------

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

const markdown = new Marked({
  gfm: true,
  renderer: {
    // Raw HTML in a message is shown as the text it is.
    html: ({ text }) => escapeHtml(text),
    // An image would be a request to somewhere else: show a link to it instead.
    image: ({ href, text }) => `<a href="${escapeHtml(href)}">${escapeHtml(text || href)}</a>`,
  },
});

const SANITIZE = {
  ALLOWED_TAGS: [
    "p", "br", "strong", "em", "del", "code", "pre", "blockquote", "ul", "ol", "li", "hr",
    "h1", "h2", "h3", "h4", "h5", "h6", "table", "thead", "tbody", "tr", "th", "td", "a",
  ],
  ALLOWED_ATTR: ["href", "title", "class", "start", "align"],
  ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#)/i,
};

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    node.setAttribute("target", "_blank");
    node.setAttribute("rel", "noopener noreferrer nofollow");
  }
});

function render(element, text) {
  element.innerHTML = DOMPurify.sanitize(markdown.parse(text), SANITIZE);
  for (const pre of element.querySelectorAll("pre")) {
    const copy = document.createElement("button");
    copy.type = "button";
    copy.className = "copy";
    copy.textContent = "Copy";
    copy.setAttribute("aria-label", "Copy code");
    copy.addEventListener("click", async () => {
      try {
        await navigator.clipboard.writeText(pre.querySelector("code")?.textContent ?? "");
        copy.textContent = "Copied";
      } catch {
        copy.textContent = "Copy failed";
      }
      setTimeout(() => (copy.textContent = "Copy"), 1500);
    });
    pre.append(copy);
  }
}

// --- Messages -----------------------------------------------------------------------------

function messageElement(message) {
  const item = document.createElement("li");
  item.className = `message ${message.role}`;
  item.dataset.status = message.status;
  if (message.turn_id) item.dataset.turn = message.turn_id;
  const who = document.createElement("span");
  who.className = "visually-hidden";
  who.textContent = message.role === "user" ? "You said:" : "Parley said:";
  const content = document.createElement("div");
  content.className = "content";
  item.append(who, content);
  if (message.role === "user") {
    content.textContent = message.content;
  } else {
    render(content, message.content);
  }
  return item;
}

function showMessage(message) {
  const item = messageElement(message);
  $("#messages").append(item);
  $("#empty").hidden = true;
  item.scrollIntoView({ block: "end" });
  return item;
}

function markEnded(item, status, note) {
  item.dataset.status = status;
  item.querySelector(".ended")?.remove();
  if (!note) return;
  const ended = document.createElement("p");
  ended.className = "ended";
  ended.textContent = note;
  item.append(ended);
}

function markFailed(item, detail, userText) {
  item.dataset.status = "failed";
  item.querySelector(".failure")?.remove();
  const failure = document.createElement("p");
  failure.className = "failure";
  failure.setAttribute("role", "alert");
  failure.textContent = detail;
  if (userText) {
    const retry = document.createElement("button");
    retry.type = "button";
    retry.className = "link";
    retry.textContent = "Retry";
    retry.addEventListener("click", () => send(userText));
    failure.append(" ", retry);
  }
  item.append(failure);
}

function showNotice(text, retry) {
  $("#notice-text").textContent = text;
  $("#notice-retry").hidden = !retry;
  $("#notice-retry").onclick = () => {
    $("#notice").hidden = true;
    retry();
  };
  $("#notice").hidden = false;
}

// --- Streaming a reply ------------------------------------------------------------------

function follow(turnId, item, userText) {
  stopFollowing();
  const content = item.querySelector(".content");
  const source = new EventSource(`/api/turns/${encodeURIComponent(turnId)}/stream`);
  const turn = { id: turnId, source, text: "", pending: false };
  state.turn = turn;
  setStreaming(true);

  const paint = () => {
    if (turn.pending) return;
    turn.pending = true;
    requestAnimationFrame(() => {
      turn.pending = false;
      render(content, turn.text);
      item.scrollIntoView({ block: "end" });
    });
  };
  // While the turn waits for the model (provider limits), a note says where it stands:
  // a status beside the reply, never part of it.
  const waiting = (position) => {
    item.querySelector(".waiting")?.remove();
    if (position === null || turn.text) return;
    const note = document.createElement("p");
    note.className = "waiting";
    note.textContent = `Waiting for the model (position ${position})`;
    content.after(note);
  };
  const end = () => {
    waiting(null);
    source.close();
    if (state.turn === turn) {
      state.turn = null;
      setStreaming(false);
    }
    connection(null);
    loadConversations();
  };

  source.addEventListener("open", () => connection(null));
  source.addEventListener("queued", (event) => waiting(JSON.parse(event.data).position));
  source.addEventListener("token", (event) => {
    waiting(null);
    turn.text += JSON.parse(event.data).text;
    paint();
  });
  source.addEventListener("reset", () => {
    waiting(null);
    turn.text = "";
    paint();
    connection("The model is answering again…");
  });
  for (const kind of ["done", "stopped"]) {
    source.addEventListener(kind, (event) => {
      const message = JSON.parse(event.data).message;
      turn.text = message ? message.content : turn.text;
      render(content, turn.text);
      markEnded(item, kind === "done" ? "complete" : "stopped", kind === "stopped" ? "Stopped." : "");
      end();
    });
  }
  source.addEventListener("error", (event) => {
    if (event.data) {
      // The turn failed: the server says why.
      render(content, turn.text);
      markFailed(item, JSON.parse(event.data).detail, userText);
      end();
    } else if (source.readyState === EventSource.CONNECTING) {
      connection("Connection lost; reconnecting…");
    } else {
      markFailed(item, "The reply could not be loaded.", userText);
      end();
    }
  });
}

function stopFollowing() {
  if (state.turn) {
    state.turn.source.close();
    state.turn = null;
  }
  setStreaming(false);
  connection(null);
}

function setStreaming(on) {
  $("#stop").hidden = !on;
  $("#send").hidden = on;
}

function connection(text) {
  $("#connection").textContent = text ?? "";
  $("#connection").hidden = !text;
}

async function stop() {
  if (!state.turn) return;
  try {
    await api("POST", `/api/turns/${encodeURIComponent(state.turn.id)}/cancel`);
  } catch (error) {
    showNotice(error.message);
  }
}

// --- Sending ------------------------------------------------------------------------------

async function send(text) {
  if (!text.trim() || state.turn) return;
  $("#notice").hidden = true;
  const input = $("#message-input");
  input.value = "";
  let sent = null;
  try {
    if (!state.current) {
      const created = await api("POST", "/api/conversations");
      await openConversation(created.id, { push: true });
    }
    sent = showMessage({ role: "user", content: text, status: "complete" });
    const turn = await api("POST", `/api/conversations/${state.current}/messages`, { content: text });
    sent.dataset.turn = turn.turn_id;
    const reply = showMessage({ role: "assistant", content: "", status: "streaming", turn_id: turn.turn_id });
    follow(turn.turn_id, reply, text);
  } catch (error) {
    sent?.remove();
    // The user's words are never lost: they go back where they were typed.
    if (!input.value) input.value = text;
    showNotice(error.message, () => send(input.value));
  }
}

// --- Conversations ----------------------------------------------------------------------

async function loadConversations() {
  try {
    const page = await api("GET", "/api/conversations?limit=200");
    state.conversations = page.conversations;
  } catch (error) {
    showNotice(error.message, loadConversations);
    return;
  }
  renderSidebar();
}

function renderSidebar() {
  const list = $("#conversation-list");
  list.replaceChildren();
  for (const conversation of state.conversations) {
    const item = document.createElement("li");
    item.className = "conversation-item";
    item.dataset.id = conversation.id;
    const open = document.createElement("a");
    open.className = "open";
    open.href = `?c=${conversation.id}`;
    open.textContent = conversation.title;
    if (conversation.id === state.current) open.setAttribute("aria-current", "page");
    open.addEventListener("click", (event) => {
      event.preventDefault();
      openConversation(conversation.id, { push: true });
      document.body.classList.remove("sidebar-open");
    });
    const rename = actionButton("✎", `Rename ${conversation.title}`, () => startRename(item, conversation));
    const remove = actionButton("✕", `Delete ${conversation.title}`, () => deleteConversation(conversation));
    item.append(open, rename, remove);
    list.append(item);
  }
  const current = state.conversations.find((c) => c.id === state.current);
  $("#title").textContent = current ? current.title : "Parley";
}

function actionButton(symbol, label, action) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "icon";
  button.textContent = symbol;
  button.setAttribute("aria-label", label);
  button.title = label;
  button.addEventListener("click", action);
  return button;
}

function startRename(item, conversation) {
  const input = document.createElement("input");
  input.className = "rename";
  input.value = conversation.title;
  input.maxLength = 200;
  input.setAttribute("aria-label", "New name");
  item.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title && title !== conversation.title) {
      try {
        await api("PATCH", `/api/conversations/${conversation.id}`, { title });
      } catch (error) {
        showNotice(error.message);
      }
    }
    loadConversations();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") {
      event.stopPropagation();
      finish(false);
    }
  });
  input.addEventListener("blur", () => finish(true));
}

async function deleteConversation(conversation) {
  if (!confirm(`Delete “${conversation.title}”? Its messages are gone for good.`)) return;
  try {
    await api("DELETE", `/api/conversations/${conversation.id}`);
  } catch (error) {
    showNotice(error.message);
    return;
  }
  if (conversation.id === state.current) {
    stopFollowing();
    state.current = null;
    history.pushState(null, "", location.pathname);
    $("#messages").replaceChildren();
    $("#empty").hidden = false;
  }
  loadConversations();
}

async function openConversation(id, { push }) {
  stopFollowing();
  state.current = id;
  const url = `?c=${id}`;
  if (push && location.search !== url) history.pushState(null, "", url);
  $("#messages").replaceChildren();
  $("#notice").hidden = true;
  renderSidebar();
  let page;
  try {
    page = await api("GET", `/api/conversations/${id}/messages?limit=200`);
  } catch (error) {
    state.current = null;
    showNotice(error.status === 404 ? "That conversation does not exist (or is not yours)." : error.message);
    return;
  }
  if (state.current !== id) return; // another one was opened meanwhile
  $("#empty").hidden = page.messages.length > 0;
  let lastUserText = "";
  for (const message of page.messages) {
    const item = showMessage(message);
    if (message.role === "user") lastUserText = message.content;
    else if (message.status === "stopped") markEnded(item, "stopped", "Stopped.");
    else if (message.status === "failed") markFailed(item, message.error, lastUserText);
    else if (message.status === "streaming") follow(message.turn_id, item, lastUserText);
  }
}

// --- Usage panel ----------------------------------------------------------------------------

function seconds(value) {
  return value === null || value === undefined ? "–" : `${value.toFixed(3)} s`;
}

function dollars(value) {
  return value < 0.01 ? `$${value.toFixed(7)}` : `$${value.toFixed(4)}`;
}

async function refreshUsage() {
  let usage;
  try {
    usage = await api("GET", "/api/usage");
  } catch {
    return; // the panel keeps its last figures; the next tick tries again
  }
  $("#cpu-time").textContent = seconds(usage.cpu_time);
  $("#wall-time").textContent = seconds(usage.wall_clock_time);
  const model = usage.model_cpu_time !== null;
  $("#model-cpu").hidden = !model;
  $("#legend-model").hidden = !model;
  if (model) $("#model-cpu-time").textContent = seconds(usage.model_cpu_time);
  const costs = usage.costs;
  $("#cost-cpu").textContent = dollars(costs.cpu_billed);
  $("#cost-duration").textContent = dollars(costs.duration_billed);
  $("#rates").textContent =
    `At ${dollars(costs.price_cpu_second)} per CPU-second and ` +
    `${dollars(costs.price_request_second)} per second of request time.`;
  drawChart(usage.series, model);
}

function drawChart(series, model) {
  const svg = $("#usage-chart");
  const width = 300;
  const height = 90;
  const peak = Math.max(
    0.001,
    ...series.flatMap((b) => [b.cpu_time, b.wall_clock_time, b.model_cpu_time ?? 0]),
  );
  const line = (pick, name) => {
    const points = series
      .map((bucket, i) => {
        const x = (i / Math.max(1, series.length - 1)) * width;
        const y = height - (pick(bucket) / peak) * (height - 4) - 2;
        return `${x.toFixed(1)},${y.toFixed(1)}`;
      })
      .join(" ");
    const polyline = document.createElementNS("http://www.w3.org/2000/svg", "polyline");
    polyline.setAttribute("points", points);
    polyline.setAttribute("class", name);
    return polyline;
  };
  const lines = [line((b) => b.wall_clock_time, "series-wall"), line((b) => b.cpu_time, "series-cpu")];
  if (model) lines.push(line((b) => b.model_cpu_time ?? 0, "series-model"));
  svg.replaceChildren(...lines);
}

// --- Start --------------------------------------------------------------------------------

function askName() {
  $("#app").hidden = true;
  $("#name-screen").hidden = false;
  $("#name-input").focus();
}

// The conversation in the URL (?c=<id>): only a conversation id, which is a UUID. Anything
// else is ignored, so that a crafted link cannot make the page call another route.
const CONVERSATION_ID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

function conversationInUrl() {
  const wanted = new URLSearchParams(location.search).get("c");
  return wanted && CONVERSATION_ID.test(wanted) ? wanted : null;
}

async function start(name) {
  state.user = name;
  $("#who").textContent = name;
  $("#name-screen").hidden = true;
  $("#app").hidden = false;
  await loadConversations();
  const wanted = conversationInUrl();
  if (wanted) await openConversation(wanted, { push: false });
  $("#message-input").focus();
}

async function signIn(path) {
  $("#sign-in-error").hidden = true;
  try {
    const me = await api("POST", path, {
      username: $("#name-input").value.trim(),
      password: $("#password-input").value,
    });
    $("#password-input").value = "";
    start(me.username);
  } catch (error) {
    $("#sign-in-error").textContent = error.message;
    $("#sign-in-error").hidden = false;
  }
}

$("#name-form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (state.mode === "accounts") {
    signIn("/api/auth/login");
    return;
  }
  const name = $("#name-input").value.trim();
  if (!name) return;
  rememberUser(name);
  start(name);
});

$("#sign-up").addEventListener("click", () => signIn("/api/auth/signup"));

$("#switch-user").addEventListener("click", async () => {
  stopFollowing();
  if (state.mode === "accounts") {
    try {
      await api("POST", "/api/auth/logout");
    } catch (error) {
      showNotice(error.message);
      return;
    }
  } else {
    forgetUser();
  }
  state.current = null;
  history.pushState(null, "", location.pathname);
  $("#messages").replaceChildren();
  askName();
});

$("#new-chat").addEventListener("click", async () => {
  try {
    const created = await api("POST", "/api/conversations");
    await loadConversations();
    await openConversation(created.id, { push: true });
    $("#message-input").focus();
  } catch (error) {
    showNotice(error.message);
  }
});

$("#composer").addEventListener("submit", (event) => {
  event.preventDefault();
  send($("#message-input").value);
});

$("#message-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send($("#message-input").value);
  }
});

document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && state.turn) stop();
});

$("#stop").addEventListener("click", stop);

$("#toggle-sidebar").addEventListener("click", () => {
  const open = document.body.classList.toggle("sidebar-open");
  $("#toggle-sidebar").setAttribute("aria-expanded", String(open));
});

window.addEventListener("popstate", () => {
  const wanted = conversationInUrl();
  if (wanted) openConversation(wanted, { push: false });
});

async function begin() {
  // Accounts mode answers /api/auth/me (401 when signed out); open mode answers 404.
  const me = await fetch("/api/auth/me");
  if (me.status !== 404) {
    state.mode = "accounts";
    $("#open-note").textContent = "Sign in, or create an account.";
    $("#password-field").hidden = false;
    $("#password-input").required = true;
    $("#start").textContent = "Sign in";
    $("#sign-up").hidden = false;
    $("#switch-user").textContent = "Sign out";
    if (me.ok) start((await me.json()).username);
    else askName();
    return;
  }
  const saved = localStorage.getItem(USER_KEY);
  if (saved) {
    rememberUser(saved);
    start(saved);
  } else {
    askName();
  }
}

begin();
refreshUsage();
setInterval(refreshUsage, 1000);
