// internvl-edge chat page: talks to this server's /v1/chat/completions (streamed server-sent events).
// No build step and nothing from other hosts. Nothing the user or the model writes is ever parsed as
// HTML: every piece of text goes into the page through textContent and createElement only (the page's
// Content-Security-Policy also allows no inline script).
"use strict";

(() => {
  const KEY_STORAGE = "internvl-edge.api-key";
  const $ = (id) => document.getElementById(id);
  const state = {
    messages: [], // the conversation as OpenAI messages (user turns with their images, answers as text)
    attachments: [], // {kind: "image" | "video", url: data URL, name}
    model: null,
    controller: null, // aborts the answer being streamed
  };

  // -- the API key (kept in this browser's local storage) ------------------------------------------
  function storedKey() {
    try {
      return localStorage.getItem(KEY_STORAGE) || "";
    } catch (e) {
      return "";
    }
  }

  function authHeaders(key = storedKey()) {
    return key ? { Authorization: "Bearer " + key } : {};
  }

  async function errorMessage(resp) {
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) {
      // not JSON: fall through to the status line
    }
    return `the server answered ${resp.status} ${resp.statusText}`.trim();
  }

  function showKeyDialog(message) {
    $("key-dialog").hidden = false;
    $("key-error").textContent = message || "";
    $("api-key").focus();
  }

  async function loadModel(key) {
    const resp = await fetch("/v1/models", { headers: authHeaders(key) });
    if (!resp.ok) return { ok: false, status: resp.status, message: await errorMessage(resp) };
    const body = await resp.json();
    const id = body.data && body.data[0] ? body.data[0].id : null;
    return { ok: true, id };
  }

  function useModel(id) {
    state.model = id;
    $("model-name").textContent = id || "";
  }

  async function start() {
    try {
      const got = await loadModel();
      if (got.ok) {
        useModel(got.id);
      } else if (got.status === 401) {
        showKeyDialog(storedKey() ? got.message : ""); // a stored key that stopped working: say why
      } else {
        addError(got.message);
      }
    } catch (e) {
      addError("the server could not be reached (" + e.message + ")");
    }
    $("forget-key").hidden = !storedKey();
  }

  async function submitKey(event) {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) {
      $("key-error").textContent = "enter the key the server was started with (--api-key)";
      return;
    }
    $("key-submit").disabled = true;
    try {
      const got = await loadModel(key);
      if (got.ok) {
        try {
          localStorage.setItem(KEY_STORAGE, key);
        } catch (e) {
          // storage refused (private mode): the key is not kept
        }
        useModel(got.id);
        $("key-dialog").hidden = true;
        $("api-key").value = "";
        $("key-error").textContent = "";
        $("forget-key").hidden = false;
        $("prompt").focus();
      } else {
        $("key-error").textContent = got.message;
      }
    } catch (e) {
      $("key-error").textContent = "the server could not be reached (" + e.message + ")";
    } finally {
      $("key-submit").disabled = false;
    }
  }

  // -- light markdown, built as DOM nodes ------------------------------------------------------------
  function node(tag, className, text) {
    const n = document.createElement(tag);
    if (className) n.className = className;
    if (text !== undefined) n.textContent = text;
    return n;
  }

  // `code` and **bold** inside a paragraph or list item; everything else stays plain text
  function renderInline(parent, text) {
    const pattern = /(`[^`\n]+`|\*\*[^*\n]+\*\*)/g;
    let last = 0;
    for (const m of text.matchAll(pattern)) {
      if (m.index > last) parent.append(document.createTextNode(text.slice(last, m.index)));
      const token = m[0];
      const code = token.startsWith("`");
      parent.append(code ? node("code", "", token.slice(1, -1)) : node("strong", "", token.slice(2, -2)));
      last = m.index + token.length;
    }
    if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
  }

  const LIST_ITEM = /^\s*([-*+]|\d+[.)])\s+(.*)$/;

  // paragraphs (blank lines), ``` code blocks (an unclosed one runs to the end, as while streaming), lists
  function renderMarkdown(container, text) {
    const out = document.createDocumentFragment();
    const lines = text.split("\n");
    let para = [];
    const flush = () => {
      if (para.length) {
        const p = node("p");
        renderInline(p, para.join("\n"));
        out.append(p);
        para = [];
      }
    };
    for (let i = 0; i < lines.length; i++) {
      const line = lines[i];
      if (line.trimStart().startsWith("```")) {
        flush();
        const code = [];
        for (i++; i < lines.length && !lines[i].trimStart().startsWith("```"); i++) code.push(lines[i]);
        const pre = node("pre");
        pre.append(node("code", "", code.join("\n")));
        out.append(pre);
      } else if (LIST_ITEM.test(line)) {
        flush();
        const ordered = /^\s*\d/.test(line);
        const list = node(ordered ? "ol" : "ul");
        for (; i < lines.length && LIST_ITEM.test(lines[i]); i++) {
          const li = node("li");
          renderInline(li, LIST_ITEM.exec(lines[i])[2]);
          list.append(li);
        }
        i--;
        out.append(list);
      } else if (line.trim() === "") {
        flush();
      } else {
        para.push(line);
      }
    }
    flush();
    container.replaceChildren(out);
  }

  // -- the conversation ------------------------------------------------------------------------------
  function scrollDown() {
    const c = $("conversation");
    c.scrollTop = c.scrollHeight;
  }

  function thumbnails(items) {
    const box = node("div", "thumbs");
    for (const a of items) {
      const media = node(a.kind === "video" ? "video" : "img");
      media.src = a.url;
      if (a.kind === "video") {
        media.muted = true;
        media.preload = "metadata";
      } else {
        media.alt = a.name || "image";
      }
      media.title = a.name || "";
      box.append(media);
    }
    return box;
  }

  function addTurn(role, text, attachments = []) {
    const turn = node("div", "turn " + role);
    turn.append(node("div", "role", role === "user" ? "You" : "Assistant"));
    if (attachments.length) turn.append(thumbnails(attachments));
    const body = node("div", "body");
    renderMarkdown(body, text);
    turn.append(body);
    $("conversation").append(turn);
    scrollDown();
    return turn;
  }

  function addError(message) {
    const turn = node("div", "turn error");
    turn.append(node("div", "role", "Error"));
    turn.append(node("div", "body", message));
    $("conversation").append(turn);
    scrollDown();
    return turn;
  }

  function setBusy(busy) {
    $("send").hidden = busy;
    $("stop").hidden = !busy;
  }

  function number(id) {
    const v = $(id).value.trim();
    return v === "" ? null : Number(v);
  }

  function requestBody() {
    const messages = [];
    const system = $("system-prompt").value.trim();
    if (system) messages.push({ role: "system", content: system });
    const body = { messages: messages.concat(state.messages), stream: true, stream_options: { include_usage: true } };
    if (state.model) body.model = state.model;
    const temperature = number("temperature");
    if (temperature !== null && Number.isFinite(temperature)) body.temperature = temperature;
    const topP = number("top-p");
    if (topP !== null && Number.isFinite(topP) && topP < 1) body.top_p = topP;
    const maxTokens = number("max-tokens");
    if (maxTokens !== null && Number.isInteger(maxTokens) && maxTokens > 0) body.max_tokens = maxTokens;
    return body;
  }

  // server-sent events: `data: {json}` blocks separated by a blank line, the last `data: [DONE]`
  async function readEvents(resp, onEvent) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return;
          onEvent(JSON.parse(data));
        }
      }
    }
  }

  function statsText(usage, timings, finish, stopped) {
    const parts = [];
    if (usage) parts.push(`${usage.completion_tokens} tokens`);
    if (timings) {
      parts.push(`first token ${timings.ftl_s.toFixed(2)} s`);
      parts.push(`${timings.decode_tps.toFixed(1)} tokens/s`);
    }
    if (stopped) parts.push("stopped");
    else if (finish === "length") parts.push("max tokens reached");
    return parts.join(" · ");
  }

  async function answer() {
    const turn = addTurn("assistant", "");
    const body = turn.querySelector(".body");
    let raw = "";
    let usage = null;
    let timings = null;
    let finish = null;
    let failure = null;
    let stopped = false;
    let pending = false;
    const render = () => {
      pending = false;
      renderMarkdown(body, raw);
      scrollDown();
    };
    state.controller = new AbortController();
    setBusy(true);
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", ...authHeaders() },
        body: JSON.stringify(requestBody()),
        signal: state.controller.signal,
      });
      if (!resp.ok) {
        failure = await errorMessage(resp);
        if (resp.status === 401) showKeyDialog(failure);
      } else {
        await readEvents(resp, (event) => {
          if (event.error) {
            failure = event.error.message;
            return;
          }
          if (event.usage) usage = event.usage;
          for (const choice of event.choices || []) {
            if (choice.delta && choice.delta.content) {
              raw += choice.delta.content;
              if (!pending) {
                pending = true; // one render per frame, however many pieces arrive
                requestAnimationFrame(render);
              }
            }
            if (choice.finish_reason) finish = choice.finish_reason;
            if (choice.timings) timings = choice.timings;
          }
        });
      }
    } catch (e) {
      if (e.name === "AbortError") stopped = true;
      else failure = "the connection to the server failed (" + e.message + ")";
    } finally {
      state.controller = null;
      setBusy(false);
    }
    render();
    turn.dataset.raw = raw; // the answer as received, before the markdown view
    if (failure !== null && !raw) {
      turn.remove();
      addError(failure);
      return false;
    }
    if (failure !== null) addError(failure);
    turn.append(node("div", "stats", statsText(usage, timings, finish, stopped)));
    turn.dataset.done = stopped ? "stopped" : "done";
    state.messages.push({ role: "assistant", content: raw });
    return true;
  }

  async function send(event) {
    event.preventDefault();
    if (state.controller) return;
    const text = $("prompt").value.trim();
    const attachments = state.attachments.slice();
    if (!text && !attachments.length) return;
    const content = [];
    if (text) content.push({ type: "text", text });
    for (const a of attachments) {
      const part = a.kind === "video" ? { type: "video_url", video_url: { url: a.url } }
        : { type: "image_url", image_url: { url: a.url } };
      content.push(part);
    }
    const userTurn = addTurn("user", text, attachments);
    state.messages.push({ role: "user", content });
    $("prompt").value = "";
    setAttachments([]);
    note("");
    const answered = await answer();
    if (!answered) {
      // not answered (an error): take the question back so it can be sent again
      state.messages.pop();
      userTurn.classList.add("unsent");
      if (!$("prompt").value) $("prompt").value = text;
      if (!state.attachments.length) setAttachments(attachments);
    }
  }

  function stop() {
    if (state.controller) state.controller.abort(); // the server cancels the sequence when the stream closes
  }

  function newChat() {
    stop();
    state.messages = [];
    $("conversation").replaceChildren();
    setAttachments([]);
    note("");
    $("prompt").focus();
  }

  // -- attachments: picker, drag and drop, paste ----------------------------------------------------
  function note(text) {
    $("composer-note").textContent = text;
    $("composer-note").hidden = !text;
  }

  function setAttachments(items) {
    state.attachments = items;
    const box = $("attachments");
    box.replaceChildren();
    items.forEach((a, i) => {
      const item = node("div", "attachment");
      const media = thumbnails([a]).firstChild;
      item.append(media);
      const remove = node("button", "", "×");
      remove.type = "button";
      remove.title = "Remove " + (a.name || a.kind);
      remove.addEventListener("click", () => setAttachments(state.attachments.filter((_, j) => j !== i)));
      item.append(remove);
      box.append(item);
    });
  }

  function readAsDataURL(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  async function addFiles(files) {
    const added = [];
    const refused = [];
    for (const file of files) {
      const kind = file.type.startsWith("image/") ? "image" : file.type.startsWith("video/") ? "video" : null;
      if (!kind) {
        refused.push(`${file.name || "the file"} is not an image or a video`);
        continue;
      }
      try {
        added.push({ kind, url: await readAsDataURL(file), name: file.name });
      } catch (e) {
        refused.push(`${file.name} could not be read`);
      }
    }
    const all = state.attachments.concat(added);
    const videos = all.filter((a) => a.kind === "video");
    if (videos.length && (videos.length > 1 || all.length > 1)) {
      // as the server (and `run --video`): a question holds images or one video
      const last = videos[videos.length - 1];
      refused.push("a question holds images or one video, not both: kept the video " + (last.name || ""));
      setAttachments([last]);
    } else {
      setAttachments(all);
    }
    note(refused.join("; "));
  }

  function setupDrop() {
    let depth = 0;
    const hint = $("drop-hint");
    const hasFiles = (e) => e.dataTransfer && Array.from(e.dataTransfer.types || []).includes("Files");
    window.addEventListener("dragenter", (e) => {
      if (!hasFiles(e)) return;
      depth++;
      hint.hidden = false;
    });
    window.addEventListener("dragleave", () => {
      depth = Math.max(0, depth - 1);
      if (!depth) hint.hidden = true;
    });
    window.addEventListener("dragover", (e) => {
      if (hasFiles(e)) e.preventDefault();
    });
    window.addEventListener("drop", (e) => {
      e.preventDefault();
      depth = 0;
      hint.hidden = true;
      if (e.dataTransfer && e.dataTransfer.files.length) addFiles(Array.from(e.dataTransfer.files));
    });
  }

  function setup() {
    $("composer").addEventListener("submit", send);
    $("prompt").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        $("composer").requestSubmit();
      }
    });
    $("stop").addEventListener("click", stop);
    $("new-chat").addEventListener("click", newChat);
    $("toggle-settings").addEventListener("click", () => {
      const panel = $("settings");
      panel.hidden = !panel.hidden;
      $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
    });
    $("key-form").addEventListener("submit", submitKey);
    $("forget-key").addEventListener("click", () => {
      try {
        localStorage.removeItem(KEY_STORAGE);
      } catch (e) {
        // nothing kept
      }
      $("forget-key").hidden = true;
      start();
    });
    $("file-input").addEventListener("change", (e) => {
      addFiles(Array.from(e.target.files)); // copied: clearing the input empties its FileList
      e.target.value = "";
    });
    document.addEventListener("paste", (e) => {
      const files = e.clipboardData ? Array.from(e.clipboardData.files) : [];
      if (files.length) {
        e.preventDefault();
        addFiles(files);
      }
    });
    setupDrop();
    start();
  }

  setup();
})();
