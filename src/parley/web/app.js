// Parley's page: conversations, replies that stream and survive reloads, the usage panel.
// Everything it loads comes from this server; model output and user text never become
// markup that can run script or fetch anything (see render()).
import { Marked } from "./vendor/marked-18.2.1.esm.js";
import DOMPurify from "./vendor/purify-3.4.18.es.mjs";
import hljs from "./vendor/highlight-11.12.0.min.js";

const $ = (selector) => document.querySelector(selector);
// mode: "open" (a name, no password) or "accounts" (sign in; see /api/auth).
const state = {
  mode: "open",
  user: null,
  conversations: [], // the sidebar's, most recently active first, as far as loaded
  moreConversations: false, // whether older ones exist (the sidebar loads them on scroll)
  loadingConversations: null, // the request for the next page, while it runs
  current: null, // the open conversation's id
  conversation: null, // the open conversation: {id, title, model, system_prompt, ...}
  olderMessages: false, // whether the branch on screen goes back further
  loadingOlder: null, // the request for older messages, while it runs
  models: [], // GET /api/models
  turn: null, // the reply being followed
};
const MESSAGE_PAGE = 50;
const CONVERSATION_PAGE = 50;

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
  // problems: a 422's list of {loc, msg, type}, when the server sent one.
  constructor(status, message, problems = null) {
    super(message);
    this.status = status;
    this.problems = problems;
  }
}

function cookie(name) {
  const found = document.cookie.split("; ").find((part) => part.startsWith(`${name}=`));
  return found ? decodeURIComponent(found.slice(name.length + 1)) : "";
}

// body: sent as JSON; a Blob (a file chosen to import) is sent as the bytes it holds.
async function api(method, path, body, extraHeaders = {}) {
  const headers = { ...extraHeaders };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  // Accounts mode: a change carries the session's CSRF token, which only this page can read.
  if (method !== "GET" && cookie("parley_csrf")) headers["X-CSRF-Token"] = cookie("parley_csrf");
  let response;
  try {
    response = await fetch(path, {
      method,
      headers,
      body: body === undefined || body instanceof Blob ? body : JSON.stringify(body),
    });
  } catch {
    throw new ApiError(0, "Parley could not be reached. Check the connection and retry.");
  }
  if (!response.ok) {
    let detail = `The server answered ${response.status}.`;
    let problems = null;
    try {
      const problem = await response.json();
      if (Array.isArray(problem.detail)) problems = problem.detail;
      detail = problems
        ? problems.map((item) => `${item.loc.at(-1)} ${item.msg}`).join("; ")
        : problem.detail || detail;
    } catch {
      // not JSON: keep the status line
    }
    throw new ApiError(response.status, detail, problems);
  }
  return response.status === 204 ? null : response.json();
}

// An Idempotency-Key for a request that starts a turn: sent again after its answer was
// lost, it starts one turn, not two. (crypto.randomUUID needs HTTPS; this does not.)
function newKey() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (byte) => byte.toString(16).padStart(2, "0")).join("");
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

// Code highlighting works on a sanitized block's text; what highlight.js makes of it (the
// text, escaped, in spans with classes) is sanitized again before it is shown. A block
// that names no language known here is only guessed at once the reply is complete.
const HIGHLIGHTED = { ALLOWED_TAGS: ["span"], ALLOWED_ATTR: ["class"] };
const GUESS_AT_MOST = 20_000;

function highlight(code, final) {
  const named = [...code.classList].find((name) => name.startsWith("language-"))?.slice(9);
  const language = named && hljs.getLanguage(named) ? named : null;
  const text = code.textContent;
  if (!language && (!final || text.length > GUESS_AT_MOST)) return;
  let result;
  try {
    result = language
      ? hljs.highlight(text, { language, ignoreIllegals: true })
      : hljs.highlightAuto(text);
  } catch {
    return; // left as plain text
  }
  if (!result.language) return;
  code.innerHTML = DOMPurify.sanitize(result.value, HIGHLIGHTED);
  code.classList.add("hljs");
}

function render(element, text, { final = true } = {}) {
  element.innerHTML = DOMPurify.sanitize(markdown.parse(text), SANITIZE);
  for (const code of element.querySelectorAll("pre > code")) highlight(code, final);
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

// Each message element's message, as the server sent it (a reply being written: as far
// as it is written), for its Copy, Edit, Regenerate and version buttons.
const shown = new WeakMap();

function messageElement(message) {
  const item = document.createElement("li");
  item.className = `message ${message.role}`;
  item.dataset.status = message.status;
  if (message.turn_id) item.dataset.turn = message.turn_id;
  if (message.id) item.dataset.id = message.id;
  shown.set(item, { ...message });
  const who = document.createElement("span");
  who.className = "visually-hidden";
  who.textContent = message.role === "user" ? "You said:" : "Parley said:";
  const content = document.createElement("div");
  content.className = "content";
  item.append(who, content, messageActions(item));
  if (message.role === "user") {
    content.textContent = message.content;
  } else {
    render(content, message.content, { final: message.status !== "streaming" });
  }
  return item;
}

function smallButton(text, label, action) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = text;
  if (label) button.setAttribute("aria-label", label);
  button.addEventListener("click", action);
  return button;
}

// A button that does nothing while a reply is being written (see setStreaming).
function whenIdle(button, unavailable = false) {
  button.classList.add("when-idle");
  button.dataset.unavailable = String(unavailable);
  button.disabled = unavailable || Boolean(state.turn);
  return button;
}

// Under a message: its versions (‹ 2/3 ›), Copy, and Edit (yours) or Regenerate (replies).
function messageActions(item) {
  const message = shown.get(item);
  const bar = document.createElement("div");
  bar.className = "actions";
  const siblings = message.siblings ?? [];
  const at = siblings.indexOf(message.id);
  if (message.id && siblings.length > 1 && at >= 0) {
    const versions = document.createElement("span");
    versions.className = "versions";
    const where = document.createElement("span");
    where.className = "version";
    where.textContent = `${at + 1}/${siblings.length}`;
    versions.append(
      whenIdle(smallButton("‹", "Previous version", () => showVersion(siblings[at - 1])), at === 0),
      where,
      whenIdle(
        smallButton("›", "Next version", () => showVersion(siblings[at + 1])),
        at === siblings.length - 1,
      ),
    );
    bar.append(versions);
  }
  const copy = smallButton("Copy", "Copy message", async () => {
    try {
      await navigator.clipboard.writeText(shown.get(item).content);
      copy.textContent = "Copied";
    } catch {
      copy.textContent = "Copy failed";
    }
    setTimeout(() => (copy.textContent = "Copy"), 1500);
  });
  bar.append(copy);
  if (message.id && message.role === "user") {
    bar.append(whenIdle(smallButton("Edit", null, () => startEdit(item))));
  } else if (message.id && message.status !== "streaming") {
    bar.append(whenIdle(smallButton("Regenerate", null, () => regenerate(message.id))));
  }
  return bar;
}

function refreshActions(item) {
  item.querySelector(":scope > .actions")?.replaceWith(messageActions(item));
}

// Notes about a message go under its text, above its buttons.
function addNote(item, note) {
  const actions = item.querySelector(":scope > .actions");
  if (actions) actions.before(note);
  else item.append(note);
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
  addNote(item, ended);
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
  addNote(item, failure);
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
  const turn = { id: turnId, source, text: "", pending: false, ended: false };
  const message = shown.get(item);
  state.turn = turn;
  setStreaming(true);

  const paint = () => {
    if (turn.pending) return;
    turn.pending = true;
    requestAnimationFrame(() => {
      turn.pending = false;
      if (turn.ended) return;
      // Kept in view while it grows, unless the reader scrolled up to read.
      const stick = nearBottom();
      render(content, turn.text, { final: false });
      if (message) message.content = turn.text;
      if (stick) item.scrollIntoView({ block: "end" });
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
  const end = (final) => {
    turn.ended = true;
    waiting(null);
    source.close();
    if (state.turn === turn) {
      state.turn = null;
      setStreaming(false);
    }
    connection(null);
    if (message) Object.assign(message, { content: turn.text }, final);
    refreshActions(item);
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
      const final = JSON.parse(event.data).message;
      turn.text = final ? final.content : turn.text;
      render(content, turn.text);
      const status = kind === "done" ? "complete" : "stopped";
      markEnded(item, status, kind === "stopped" ? "Stopped." : "");
      end({ status, ...final });
    });
  }
  source.addEventListener("error", (event) => {
    if (event.data) {
      // The turn failed: the server says why.
      render(content, turn.text);
      markFailed(item, JSON.parse(event.data).detail, userText);
      end({ status: "failed" });
    } else if (source.readyState === EventSource.CONNECTING) {
      connection("Connection lost; reconnecting…");
    } else {
      markFailed(item, "The reply could not be loaded.", userText);
      end({ status: "failed" });
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
  // One reply at a time: no regenerating, editing or switching versions meanwhile.
  for (const button of document.querySelectorAll("#messages .when-idle")) {
    button.disabled = on || button.dataset.unavailable === "true";
  }
}

function nearBottom() {
  const view = $("#conversation");
  return view.scrollHeight - view.scrollTop - view.clientHeight < 120;
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

// The key of a send whose answer was lost: sending the same text again reuses it.
let unanswered = null;

async function send(text) {
  if (!text.trim() || state.turn) return;
  $("#notice").hidden = true;
  const input = $("#message-input");
  input.value = "";
  let sent = null;
  let key = newKey();
  let turn;
  try {
    await ensureConversation();
    if (unanswered?.text === text && unanswered.conversation === state.current) key = unanswered.key;
    unanswered = null;
    sent = showMessage({ role: "user", content: text, status: "complete" });
    turn = await api("POST", `/api/conversations/${state.current}/messages`, { content: text }, {
      "Idempotency-Key": key,
    });
  } catch (error) {
    sent?.remove();
    if (error.status === 0) unanswered = { text, key, conversation: state.current };
    // The user's words are never lost: they go back where they were typed.
    if (!input.value) input.value = text;
    showNotice(error.message, () => send(input.value));
    return;
  }
  sent.dataset.turn = turn.turn_id;
  await showTurn(turn, text);
}

async function ensureConversation() {
  if (state.current) return;
  const created = await api("POST", "/api/conversations");
  await openConversation(created.id, { push: true });
}

// A turn was started (a message sent, edited or a reply regenerated): the branch is read
// again, now ending with its reply, which is followed as it is written.
async function showTurn(turn, userText) {
  const id = state.current;
  try {
    await reloadBranch();
  } catch {
    // Not shown afresh: the reply is followed all the same, below.
  }
  if (state.current !== id || state.turn?.id === turn.turn_id) return;
  const replies = [...document.querySelectorAll("#messages .message.assistant")];
  if (replies.some((item) => item.dataset.turn === turn.turn_id)) {
    // Ended before the branch was read: nothing to follow, but the sidebar (the title
    // a first message gives, the order) is read again as when a followed reply ends.
    loadConversations();
    return;
  }
  const reply = showMessage({ role: "assistant", content: "", status: "streaming", turn_id: turn.turn_id });
  follow(turn.turn_id, reply, userText);
}

async function regenerate(messageId, key = newKey()) {
  if (state.turn || !state.current) return;
  $("#notice").hidden = true;
  const path = `/api/conversations/${state.current}/messages/${messageId}/regenerate`;
  let turn;
  try {
    turn = await api("POST", path, undefined, { "Idempotency-Key": key });
  } catch (error) {
    showNotice(error.message, () => regenerate(messageId, error.status === 0 ? key : newKey()));
    return;
  }
  await showTurn(turn, "");
}

// Edit: the message becomes a box with Save and Cancel; Save sends the new version, which
// replaces it on a branch of its own (the old one stays, a version away).
function startEdit(item) {
  const message = shown.get(item);
  if (state.turn || item.querySelector(".editing")) return;
  const content = item.querySelector(".content");
  const actions = item.querySelector(":scope > .actions");
  const form = document.createElement("form");
  form.className = "editing";
  const box = document.createElement("textarea");
  box.value = message.content;
  box.rows = Math.min(12, message.content.split("\n").length + 1);
  box.setAttribute("aria-label", "Edit your message");
  const save = document.createElement("button");
  save.type = "submit";
  save.className = "primary";
  save.textContent = "Save";
  const cancel = smallButton("Cancel", null, () => close());
  const buttons = document.createElement("div");
  buttons.className = "editing-buttons";
  buttons.append(save, cancel);
  form.append(box, buttons);
  content.hidden = true;
  actions.hidden = true;
  content.after(form);
  box.focus();
  const close = () => {
    form.remove();
    content.hidden = false;
    actions.hidden = false;
  };
  box.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.stopPropagation();
      close();
    } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  let lost = null; // {text, key} of a save whose answer was lost
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = box.value;
    if (!text.trim() || state.turn) return;
    const key = lost?.text === text ? lost.key : newKey();
    save.disabled = true;
    $("#notice").hidden = true;
    let turn;
    try {
      turn = await api(
        "POST",
        `/api/conversations/${state.current}/messages`,
        { content: text, replaces: message.id },
        { "Idempotency-Key": key },
      );
    } catch (error) {
      save.disabled = false;
      lost = error.status === 0 ? { text, key } : null;
      showNotice(error.message);
      return;
    }
    await showTurn(turn, text);
  });
}

// The version ‹ › buttons: the branch through that version becomes the current one.
async function showVersion(messageId) {
  if (state.turn || messageId === undefined) return;
  $("#notice").hidden = true;
  try {
    await reloadBranch(`&leaf=${encodeURIComponent(messageId)}`);
  } catch (error) {
    showNotice(error.message);
    return;
  }
  // Keep the version chosen in view.
  (await reveal(messageId, { pages: 20 }))?.scrollIntoView({ block: "nearest" });
}

// A message of the branch on screen, loading older messages until it is there if the
// branch's last page does not reach back to it (up to ``pages`` pages): its element, or
// null (not on this branch, or another conversation was opened meanwhile).
async function reveal(messageId, { pages = Infinity } = {}) {
  const id = state.current;
  const find = () => document.querySelector(`#messages .message[data-id="${CSS.escape(String(messageId))}"]`);
  for (let loaded = 0; !find() && state.olderMessages && loaded < pages; loaded += 1) {
    if (!(await loadOlder()) || state.current !== id) break;
  }
  return state.current === id ? find() : null;
}

// --- Conversations ----------------------------------------------------------------------

// The sidebar's first page again (as long as what it shows: a reply moves its
// conversation to the top, and a rename changes a title).
// Loads may overlap (a conversation created, a reply ended): only the latest one asked
// is shown, or an older answer arriving last would show stale titles.
let conversationLoads = 0;

async function loadConversations() {
  const limit = Math.min(200, Math.max(CONVERSATION_PAGE, state.conversations.length));
  const load = ++conversationLoads;
  try {
    const page = await api("GET", `/api/conversations?limit=${limit}`);
    if (load !== conversationLoads) return;
    state.conversations = page.conversations;
    state.moreConversations = page.has_more;
  } catch (error) {
    showNotice(error.message, loadConversations);
    return;
  }
  renderSidebar();
  moreConversationsIfNeeded();
}

// Older conversations, as the sidebar is scrolled down to its end.
function moreConversationsIfNeeded() {
  const list = $("#conversation-list");
  if (list.hidden) return; // search results are shown instead
  const atEnd = list.scrollTop + list.clientHeight >= list.scrollHeight - 150;
  if (atEnd && state.moreConversations && !state.loadingConversations && !$("#app").hidden) {
    state.loadingConversations = moreConversations().finally(() => {
      state.loadingConversations = null;
    });
  }
}

async function moreConversations() {
  const last = state.conversations.at(-1);
  if (!last) return;
  const query = new URLSearchParams({
    limit: String(CONVERSATION_PAGE),
    before: last.updated_at,
    before_id: last.id,
  });
  let page;
  try {
    page = await api("GET", `/api/conversations?${query}`);
  } catch (error) {
    showNotice(error.message, moreConversationsIfNeeded);
    return;
  }
  const known = new Set(state.conversations.map((c) => c.id));
  state.conversations.push(...page.conversations.filter((c) => !known.has(c.id)));
  state.moreConversations = page.has_more;
  renderSidebar();
  setTimeout(moreConversationsIfNeeded);
}

function renderSidebar() {
  const list = $("#conversation-list");
  const scrolled = list.scrollTop;
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
      closeSidebar();
    });
    const rename = actionButton("✎", `Rename ${conversation.title}`, () => startRename(item, conversation));
    const remove = actionButton("✕", `Delete ${conversation.title}`, () => deleteConversation(conversation));
    item.append(open, rename, remove);
    list.append(item);
  }
  list.scrollTop = scrolled;
  const current = state.conversations.find((c) => c.id === state.current) ?? state.conversation;
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
    state.conversation = null;
    state.olderMessages = false;
    history.pushState(null, "", location.pathname);
    $("#messages").replaceChildren();
    $("#empty").hidden = false;
    showSettings();
  }
  loadConversations();
}

// push: a new entry in the browser's history; replace: the URL says which one is open;
// leaf: a message, whose branch is shown (and becomes the conversation's current one).
// Whether it was shown (not when it failed, or another was opened meanwhile).
let conversationOpens = 0;

async function openConversation(id, { push = false, replace = false, leaf = null } = {}) {
  const open = ++conversationOpens;
  stopFollowing();
  state.current = id;
  state.conversation = null;
  state.olderMessages = false;
  const url = `?c=${id}`;
  if (push && location.search !== url) history.pushState(null, "", url);
  if (replace) history.replaceState(null, "", url);
  $("#messages").replaceChildren();
  $("#notice").hidden = true;
  showInstructions(false);
  renderSidebar();
  showSettings();
  let page;
  let conversation;
  try {
    [page, conversation] = await Promise.all([
      api("GET", messagesPath(id, leaf === null ? "" : `&leaf=${encodeURIComponent(leaf)}`)),
      api("GET", `/api/conversations/${id}`),
    ]);
  } catch (error) {
    if (state.current !== id || open !== conversationOpens) return false;
    state.current = null;
    showSettings();
    showNotice(error.status === 404 ? "That conversation does not exist (or is not yours)." : error.message);
    return false;
  }
  if (state.current !== id || open !== conversationOpens) return false; // another one was opened meanwhile
  state.conversation = conversation;
  renderSidebar();
  showSettings();
  showBranch(page);
  return true;
}

function messagesPath(id, query = "") {
  return `/api/conversations/${id}/messages?limit=${MESSAGE_PAGE}${query}`;
}

// The open conversation's current branch, read again (query: "&leaf=<id>" makes the
// branch through that message the current one).
async function reloadBranch(query = "") {
  const id = state.current;
  const page = await api("GET", messagesPath(id, query));
  if (state.current === id) showBranch(page);
}

// Shows the latest page of a branch in place of what was shown, and follows its reply
// if one is still being written.
function showBranch(page) {
  stopFollowing();
  const list = $("#messages");
  list.replaceChildren();
  state.olderMessages = page.has_more;
  $("#empty").hidden = page.messages.length > 0;
  let lastUserText = "";
  let streaming = null;
  for (const message of page.messages) {
    const item = messageElement(message);
    list.append(item);
    if (message.role === "user") lastUserText = message.content;
    else if (message.status === "stopped") markEnded(item, "stopped", "Stopped.");
    else if (message.status === "failed") markFailed(item, message.error, lastUserText);
    else if (message.status === "streaming") streaming = [message.turn_id, item, lastUserText];
  }
  list.lastElementChild?.scrollIntoView({ block: "end" });
  if (streaming) follow(...streaming);
  olderIfNeeded();
}

// Older messages, as the conversation is scrolled up to its top: they go above, and what
// was on screen stays where it was.
function olderIfNeeded() {
  if ($("#conversation").scrollTop < 300) loadOlder();
}

function loadOlder() {
  if (!state.olderMessages) return Promise.resolve(false);
  if (!state.loadingOlder) {
    state.loadingOlder = fetchOlder().finally(() => {
      state.loadingOlder = null;
    });
    state.loadingOlder.then((loaded) => loaded && setTimeout(olderIfNeeded));
  }
  return state.loadingOlder;
}

async function fetchOlder() {
  const id = state.current;
  const oldest = $("#messages .message[data-id]");
  if (!id || !oldest) return false;
  let page;
  try {
    page = await api("GET", messagesPath(id, `&before=${oldest.dataset.id}`));
  } catch (error) {
    showNotice(error.message, loadOlder);
    return false;
  }
  if (state.current !== id || !oldest.isConnected) return false; // shown afresh meanwhile
  const view = $("#conversation");
  const fromBottom = view.scrollHeight - view.scrollTop;
  const on = new Set([...document.querySelectorAll("#messages .message[data-id]")].map((m) => m.dataset.id));
  const older = document.createDocumentFragment();
  let lastUserText = "";
  for (const message of page.messages) {
    if (message.role === "user") lastUserText = message.content;
    if (on.has(String(message.id))) continue;
    const item = messageElement(message);
    older.append(item);
    if (message.status === "stopped") markEnded(item, "stopped", "Stopped.");
    else if (message.status === "failed") markFailed(item, message.error, lastUserText);
  }
  $("#messages").prepend(older);
  view.scrollTop = view.scrollHeight - fromBottom;
  state.olderMessages = page.has_more;
  return true;
}

// --- The open conversation's model and instructions -------------------------------------

async function loadModels() {
  try {
    state.models = await api("GET", "/api/models");
  } catch {
    state.models = []; // no picker
  }
  showSettings();
}

function showSettings() {
  const select = $("#model");
  const models = Array.isArray(state.models) ? state.models : [];
  const fallback = models.find((model) => model.default) ?? models[0];
  const chosen = state.conversation?.model ?? fallback?.name;
  const options = models.map(
    (model) => new Option(model.default ? `${model.name} (default)` : model.name, model.name),
  );
  if (chosen && !models.some((model) => model.name === chosen)) {
    options.push(new Option(`${chosen} (unavailable)`, chosen));
  }
  select.replaceChildren(...options);
  if (chosen) select.value = chosen;
  select.hidden = models.length === 0;
  // Neither is changed while the open conversation's settings are still being read.
  const loading = Boolean(state.current) && !state.conversation;
  // Shown, but not to be changed, when there is one model: the user sees which answers.
  select.disabled = models.length < 2 || loading;
  $("#instructions-toggle").disabled = loading;
  const custom = typeof state.conversation?.system_prompt === "string";
  $("#instructions-toggle").classList.toggle("custom", custom);
  $("#instructions-toggle").title = custom
    ? "This conversation has instructions of its own"
    : "The default instructions apply";
  // Export: plain links (a GET needs only the cookie); the server names the file.
  const exportable = Boolean(state.current);
  $("#export").hidden = !exportable;
  if (!exportable) $("#export").open = false;
  for (const format of ["markdown", "json"]) {
    const link = $(`#export-${format}`);
    if (exportable) link.href = `/api/conversations/${state.current}/export?format=${format}`;
    else link.removeAttribute("href");
  }
}

// A change to the open conversation (made first if none is open): PATCH, then shown.
async function changeConversation(change) {
  try {
    const created = !state.current;
    await ensureConversation();
    state.conversation = await api("PATCH", `/api/conversations/${state.current}`, change);
    if (created) loadConversations();
    return true;
  } catch (error) {
    showNotice(error.message);
    return false;
  } finally {
    showSettings();
  }
}

function showInstructions(open) {
  $("#instructions").hidden = !open;
  $("#instructions-toggle").setAttribute("aria-expanded", String(open));
  if (!open) return;
  $("#instructions-input").value = state.conversation?.system_prompt ?? "";
  $("#instructions-input").focus();
}

// --- Searching messages -------------------------------------------------------------------

// While the box holds a query, the sidebar shows the messages that match it in place of
// the conversations. Searches may overlap (typing on, "More results"): only the latest
// one asked is shown.
const SEARCH_DELAY = 250;
const SEARCH_PAGE = 20;
const FOUND_FOR = 2500; // ms a message opened from a result stays highlighted
const searching = { query: "", nextOffset: null, runs: 0, timer: null, foundTimer: null };

function searchSoon() {
  clearTimeout(searching.timer);
  const query = $("#search-input").value.trim();
  if (!query) endSearch();
  else searching.timer = setTimeout(() => runSearch(query), SEARCH_DELAY);
}

function showSearch(on) {
  $("#search-results").hidden = !on;
  $("#conversation-list").hidden = on;
}

function endSearch() {
  clearTimeout(searching.timer);
  searching.runs += 1; // an answer still on its way is not shown
  searching.query = "";
  searching.nextOffset = null;
  $("#result-list").replaceChildren();
  searchStatus("");
  $("#search-more").hidden = true;
  showSearch(false);
  moreConversationsIfNeeded();
}

function searchStatus(text, failed = false) {
  $("#search-status").textContent = text;
  $("#search-status").classList.toggle("failure", failed);
}

// A refused query (422) says what is wrong with it, in words for the one who typed it.
function searchProblem(error) {
  const first = error.status === 422 ? error.problems?.[0] : null;
  if (!first) return error.message;
  return /^[a-z]/.test(first.msg) ? `The search ${first.msg}.` : first.msg;
}

// offset 0: the query's first page, in place of what was shown; more: the next page.
async function runSearch(query, offset = 0) {
  clearTimeout(searching.timer);
  const run = ++searching.runs;
  const latest = () => run === searching.runs;
  showSearch(true);
  $("#search-results").setAttribute("aria-busy", "true");
  $("#search-more").disabled = true;
  const params = new URLSearchParams({ q: query, limit: String(SEARCH_PAGE), offset: String(offset) });
  let page;
  try {
    page = await api("GET", `/api/search?${params}`);
  } catch (error) {
    if (!latest()) return;
    if (offset === 0) {
      searching.query = query;
      searching.nextOffset = null;
      $("#result-list").replaceChildren();
      $("#search-more").hidden = true;
    }
    searchStatus(searchProblem(error), true);
    return;
  } finally {
    if (latest()) {
      $("#search-results").removeAttribute("aria-busy");
      $("#search-more").disabled = false;
    }
  }
  if (!latest()) return;
  searching.query = query;
  searching.nextOffset = page.next_offset;
  const list = $("#result-list");
  if (offset === 0) {
    list.replaceChildren();
    $("#search-results").scrollTop = 0;
  }
  list.append(...page.results.map(resultElement));
  searchStatus(list.children.length ? "" : "No messages match");
  $("#search-more").hidden = page.next_offset === null;
}

// Only <mark> is kept of a snippet: the server escapes the text and marks the matches.
const SNIPPET = { ALLOWED_TAGS: ["mark"], ALLOWED_ATTR: [] };

function resultElement(result) {
  const item = document.createElement("li");
  item.className = "result";
  const open = document.createElement("a");
  open.className = "open";
  open.href = `?c=${encodeURIComponent(result.conversation_id)}`;
  const head = document.createElement("span");
  head.className = "result-head";
  const title = document.createElement("span");
  title.className = "result-title";
  title.textContent = result.title;
  const role = document.createElement("span");
  role.className = "result-role";
  role.textContent = result.role === "user" ? "You" : "Parley";
  head.append(title, " ", role);
  const snippet = document.createElement("span");
  snippet.className = "snippet";
  snippet.innerHTML = DOMPurify.sanitize(result.snippet, SNIPPET);
  open.append(head, snippet);
  open.addEventListener("click", (event) => {
    event.preventDefault();
    openResult(result);
  });
  item.append(open);
  return item;
}

// A result opens its conversation on the branch through the message, which is scrolled
// to and highlighted for a moment.
async function openResult(result) {
  closeSidebar();
  $("#notice").hidden = true;
  const id = result.conversation_id;
  if (!(await openConversation(id, { push: true, leaf: result.message_id }))) return;
  const item = await reveal(result.message_id);
  if (!item) {
    if (state.current === id) showNotice("That message is no longer there.");
    return;
  }
  item.scrollIntoView({ block: "center" });
  clearTimeout(searching.foundTimer);
  for (const earlier of document.querySelectorAll("#messages .message.found")) earlier.classList.remove("found");
  item.classList.add("found");
  searching.foundTimer = setTimeout(() => item.classList.remove("found"), FOUND_FOR);
}

function closeSidebar() {
  document.body.classList.remove("sidebar-open");
  $("#toggle-sidebar").setAttribute("aria-expanded", "false");
}

// --- Export and import ----------------------------------------------------------------------

async function importFile(file) {
  const status = $("#import-status");
  status.classList.remove("failure");
  status.textContent = `Importing ${file.name}…`;
  status.hidden = false;
  $("#import").disabled = true;
  let result;
  try {
    result = await api("POST", "/api/import", file);
  } catch (error) {
    status.textContent = importProblem(error);
    status.classList.add("failure");
    return;
  } finally {
    $("#import").disabled = false;
  }
  status.textContent = imported(result.created, result.skipped);
  await loadConversations();
}

function conversationCount(count) {
  return `${count} conversation${count === 1 ? "" : "s"}`;
}

function imported(created, skipped) {
  if (created) return `Imported ${conversationCount(created)}${skipped ? ` (${skipped} already here)` : ""}`;
  if (skipped) return `Nothing new: ${skipped === 1 ? "that conversation is" : `all ${skipped} are`} already here`;
  return "Nothing imported: the file holds no conversations";
}

// A refused file (422): its first problem, and where in the file (conversations[0].title).
function importProblem(error) {
  const first = error.status === 422 ? error.problems?.[0] : null;
  if (!first) return `Not imported: ${error.message}`;
  const where = (first.loc ?? [])
    .filter((part, at) => !(at === 0 && part === "body"))
    .map((part, at) => (typeof part === "number" ? `[${part}]` : at ? `.${part}` : String(part)))
    .join("");
  const more = error.problems.length > 1 ? ` (and ${error.problems.length - 1} more)` : "";
  return `Not imported: ${where ? `${where}: ` : "the file "}${first.msg}${more}`;
}

// --- Usage panel ----------------------------------------------------------------------------

function seconds(value) {
  return value === null || value === undefined ? "–" : `${value.toFixed(3)} s`;
}

// Amounts of money to a few significant digits ("$0.0000098", "$0.00021"), never a string
// of digits nobody reads; 0 is "$0".
function dollars(value, digits = 2) {
  if (value === null || value === undefined) return "–";
  return new Intl.NumberFormat("en-US", {
    style: "currency",
    currency: "USD",
    maximumSignificantDigits: digits,
  }).format(value);
}

// How many times cheaper (or dearer) billing by CPU time is than by request duration.
function verdict(costs, windowSeconds) {
  if (!(costs.duration_billed > 0)) return `No chat ran in the last ${windowSeconds} seconds.`;
  if (!(costs.cpu_billed > 0)) return "By CPU time, Parley costs nothing.";
  const ratio = costs.duration_billed / costs.cpu_billed;
  const times = (x) => (x >= 10 ? Math.round(x).toLocaleString("en-US") : x.toFixed(1));
  return ratio >= 1
    ? `By CPU time, Parley costs ${times(ratio)}× less.`
    : `By CPU time, Parley costs ${times(1 / ratio)}× more.`;
}

async function refreshUsage() {
  let usage;
  try {
    usage = await api("GET", "/api/usage");
  } catch {
    return; // the panel keeps its last figures; the next tick tries again
  }
  const windowSeconds = Math.round(usage.window_seconds);
  $("#usage-window").textContent = `Parley, last ${windowSeconds} seconds`;
  $("#cpu-time").textContent = seconds(usage.cpu_time);
  $("#wall-time").textContent = seconds(usage.wall_clock_time);
  const costs = usage.costs;
  $("#cost-cpu").textContent = dollars(costs.cpu_billed);
  $("#cost-duration").textContent = dollars(costs.duration_billed);
  $("#verdict").textContent = verdict(costs, windowSeconds);
  $("#rates").textContent =
    `At ${dollars(costs.price_cpu_second, 3)} per vCPU-second and ` +
    `${dollars(costs.price_request_second, 3)} per second of request time.`;
  // The model's compute, apart: whoever runs the model bills it, however Parley is hosted.
  const model = usage.model_cpu_time !== null;
  $("#model-cpu").hidden = !model;
  $("#legend-model").hidden = !model;
  if (model) {
    $("#model-cpu-time").textContent = seconds(usage.model_cpu_time);
    $("#cost-model").textContent = dollars(costs.model_cpu_billed);
  }
  $("#model-note").textContent = model
    ? "The embedded model's own CPU. Whoever runs a model bills it (a provider by tokens, " +
      "a machine by the hour), however Parley is hosted: it is not in the comparison above."
    : "The model runs at your provider, which bills it by tokens however Parley is hosted: " +
      "it is not in the comparison above.";
  drawChart(usage.series, usage.bucket_seconds, model);
}

const SVG = "http://www.w3.org/2000/svg";

function svgElement(name, attributes, text) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  if (text !== undefined) element.textContent = text;
  return element;
}

// The smallest of 1, 2, 2.5 and 5 times a power of ten at or above ``value``.
function niceCeiling(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  return [1, 2, 2.5, 5, 10].map((step) => step * power).find((top) => top >= value * 0.9999);
}

function tickLabel(value) {
  return String(Number(value.toPrecision(3)));
}

// The last minutes, a point per bucket: seconds per bucket (y) against minutes ago (x).
function drawChart(series, bucketSeconds, model) {
  const svg = $("#usage-chart");
  const [width, height] = [240, 124];
  const plot = { left: 28, right: width - 14, top: 16, bottom: height - 30 };
  const span = bucketSeconds * series.length;
  const peak = Math.max(
    0.01,
    ...series.flatMap((b) => [b.cpu_time, b.wall_clock_time, b.model_cpu_time ?? 0]),
  );
  const top = niceCeiling(peak);
  const x = (secondsAgo) => plot.left + (1 - secondsAgo / span) * (plot.right - plot.left);
  const y = (value) => plot.bottom - (value / top) * (plot.bottom - plot.top);
  const parts = [];
  // The y axis: seconds per bucket, with grid lines at 0, half and the top.
  for (const value of [0, top / 2, top]) {
    parts.push(
      svgElement("line", { x1: plot.left, x2: plot.right, y1: y(value), y2: y(value), class: "grid" }),
      svgElement("text", { x: plot.left - 4, y: y(value) + 3, class: "tick y" }, tickLabel(value)),
    );
  }
  parts.push(
    svgElement("text", { x: 2, y: 10, class: "axis-title" }, `seconds per ${bucketSeconds} s`),
  );
  // The x axis: minutes ago, now at the right.
  parts.push(
    svgElement("line", { x1: plot.left, x2: plot.right, y1: plot.bottom, y2: plot.bottom, class: "axis" }),
    svgElement("line", { x1: plot.left, x2: plot.left, y1: plot.top, y2: plot.bottom, class: "axis" }),
  );
  for (let minutes = Math.floor(span / 60); minutes >= 0; minutes -= 1) {
    const at = x(minutes * 60);
    parts.push(
      svgElement("line", { x1: at, x2: at, y1: plot.bottom, y2: plot.bottom + 3, class: "axis" }),
      svgElement("text", { x: at, y: plot.bottom + 13, class: "tick x" }, minutes ? String(minutes) : "now"),
    );
  }
  parts.push(
    svgElement("text", { x: (plot.left + plot.right) / 2, y: height - 3, class: "axis-title x" }, "minutes ago"),
  );
  const line = (pick, name) => {
    const points = series
      .map((bucket) => {
        const at = x(bucket.seconds_ago + bucketSeconds / 2);
        return `${at.toFixed(1)},${y(pick(bucket)).toFixed(1)}`;
      })
      .join(" ");
    return svgElement("polyline", { points, class: name });
  };
  parts.push(line((b) => b.wall_clock_time, "series-wall"), line((b) => b.cpu_time, "series-cpu"));
  if (model) parts.push(line((b) => b.model_cpu_time ?? 0, "series-model"));
  svg.setAttribute(
    "aria-label",
    `Seconds per ${bucketSeconds} s over the last ${Math.round(span / 60)} minutes: ` +
      `Parley's CPU time${model ? ", the local model's CPU time" : ""} and the chats' wall-clock time`,
  );
  svg.replaceChildren(...parts);
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
  loadModels();
  const wanted = conversationInUrl();
  const latest = state.conversations[0];
  // A returning user lands on their latest conversation.
  if (wanted) await openConversation(wanted);
  else if (latest) await openConversation(latest.id, { replace: true });
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
  state.conversation = null;
  state.conversations = [];
  state.moreConversations = false;
  history.pushState(null, "", location.pathname);
  $("#messages").replaceChildren();
  $("#search-input").value = "";
  endSearch();
  $("#import-status").hidden = true;
  showSettings();
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

$("#conversation").addEventListener("scroll", olderIfNeeded, { passive: true });
$("#conversation-list").addEventListener("scroll", moreConversationsIfNeeded, { passive: true });

$("#model").addEventListener("change", () => {
  const chosen = state.models.find((model) => model.name === $("#model").value);
  // The default model is null: the conversation follows the server's default.
  changeConversation({ model: chosen?.default ? null : $("#model").value });
});

$("#instructions-toggle").addEventListener("click", () => showInstructions($("#instructions").hidden));
$("#instructions-cancel").addEventListener("click", () => showInstructions(false));
$("#instructions").addEventListener("keydown", (event) => {
  if (event.key === "Escape") {
    event.stopPropagation();
    showInstructions(false);
  }
});
$("#instructions").addEventListener("submit", async (event) => {
  event.preventDefault();
  const text = $("#instructions-input").value;
  if (await changeConversation({ system_prompt: text.trim() ? text : null })) showInstructions(false);
});
$("#instructions-reset").addEventListener("click", async () => {
  if (await changeConversation({ system_prompt: null })) showInstructions(false);
});

$("#search-input").addEventListener("input", searchSoon);
$("#search").addEventListener("submit", (event) => {
  event.preventDefault();
  const query = $("#search-input").value.trim();
  if (query) runSearch(query);
  else endSearch();
});
$("#search-input").addEventListener("keydown", (event) => {
  if (event.key === "Escape" && $("#search-input").value) {
    // Clears the search; a reply being written goes on.
    event.preventDefault();
    event.stopPropagation();
    $("#search-input").value = "";
    endSearch();
  }
});
$("#search-more").addEventListener("click", () => {
  const query = $("#search-input").value.trim();
  if (!query) endSearch();
  else if (query !== searching.query) runSearch(query); // typed on meanwhile: that first
  else if (searching.nextOffset !== null) runSearch(query, searching.nextOffset);
});

$("#import").addEventListener("click", () => $("#import-file").click());
$("#import-file").addEventListener("change", () => {
  const file = $("#import-file").files[0];
  $("#import-file").value = ""; // the same file may be chosen again
  if (file) importFile(file);
});

// The export menu closes once a format is chosen, on Escape, and on a click elsewhere.
for (const link of document.querySelectorAll("#export a")) {
  link.addEventListener("click", () => ($("#export").open = false));
}
$("#export").addEventListener("keydown", (event) => {
  if (event.key === "Escape" && $("#export").open) {
    event.stopPropagation();
    $("#export").open = false;
    $("#export summary").focus();
  }
});
document.addEventListener("click", (event) => {
  if ($("#export").open && !$("#export").contains(event.target)) $("#export").open = false;
});

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
