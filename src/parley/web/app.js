// Parley's page: the name prompt, the chat and the usage counters. Text is always put in
// the page with textContent, so nothing a user or the model writes can run as script.
"use strict";

const $ = (id) => document.getElementById(id);
const NAME_KEY = "parley.username";

function addMessage(content, isUser, extraClass) {
  const item = document.createElement("li");
  item.className = (isUser ? "user" : "bot") + (extraClass ? " " + extraClass : "");
  item.textContent = content;
  $("messages").append(item);
  item.scrollIntoView({ block: "end" });
  return item;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (typeof body.detail === "string") return body.detail;
    if (Array.isArray(body.detail)) return body.detail.map((d) => `${d.loc.at(-1)}: ${d.msg}`).join("; ");
  } catch { /* not JSON */ }
  return `The server answered ${response.status}.`;
}

async function loadHistory(name) {
  $("messages").replaceChildren();
  const response = await fetch(`/history/${encodeURIComponent(name)}`);
  if (!response.ok) return showError(await errorText(response));
  for (const message of await response.json()) addMessage(message.content, message.isUser);
}

function startChat(name) {
  localStorage.setItem(NAME_KEY, name);
  $("who").textContent = name;
  $("name-form").hidden = true;
  $("chat").hidden = false;
  showError("");
  loadHistory(name);
  $("message-input").focus();
}

async function send(event) {
  event.preventDefault();
  const input = $("message-input");
  const message = input.value;
  if (!message.trim()) return;
  const username = localStorage.getItem(NAME_KEY);
  showError("");
  $("send").disabled = true;
  const mine = addMessage(message, true);
  const pending = addMessage("…", false, "pending");
  input.value = "";
  try {
    const response = await fetch("/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json", "Idempotency-Key": crypto.randomUUID() },
      body: JSON.stringify({ message, username }),
    });
    if (!response.ok) {
      pending.remove();
      if (response.status === 422) { mine.remove(); input.value = message; }
      showError(await errorText(response));
      return;
    }
    const reply = await response.json();
    pending.classList.remove("pending");
    pending.textContent = reply.content;
  } catch {
    pending.remove();
    mine.remove();
    input.value = message;
    showError("Could not reach Parley. Your message is still in the box; send it again.");
  } finally {
    $("send").disabled = false;
  }
}

async function refreshTimes() {
  try {
    const response = await fetch("/times");
    if (!response.ok) return;
    const times = await response.json();
    $("cpu-time").textContent = `${times.cpu_time.toFixed(2)} s`;
    $("wall-time").textContent = `${times.wall_clock_time.toFixed(2)} s`;
    const local = typeof times.model_cpu_time === "number";
    $("model-cpu").hidden = !local;
    if (local) $("model-cpu-time").textContent = `${times.model_cpu_time.toFixed(2)} s`;
  } catch { /* the next tick tries again */ }
}

document.addEventListener("DOMContentLoaded", () => {
  $("name-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("name-input").value.trim();
    if (name) startChat(name);
  });
  $("switch-user").addEventListener("click", () => {
    localStorage.removeItem(NAME_KEY);
    $("chat").hidden = true;
    $("name-form").hidden = false;
    $("name-input").focus();
  });
  $("chat-form").addEventListener("submit", send);
  $("message-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  const saved = localStorage.getItem(NAME_KEY);
  if (saved) startChat(saved);
  else $("name-input").focus();
  refreshTimes();
  setInterval(refreshTimes, 1000);
});
