// The pages' script: the token is kept in this tab's session storage and sent as a bearer
// token, as gRPC clients send it; every text from the server is set as text, never as HTML.
"use strict";

const tokenInput = document.getElementById("token");
tokenInput.value = sessionStorage.getItem("imagelsh-token") || "";
tokenInput.addEventListener("change", () => {
  sessionStorage.setItem("imagelsh-token", tokenInput.value.trim());
  load();
});

function headers() {
  const token = tokenInput.value.trim();
  return token ? { Authorization: "Bearer " + token } : {};
}

function say(text, isError) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.classList.toggle("error", Boolean(isError));
}

async function call(path, options) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options && options.headers) } });
  if (!response.ok) {
    const text = (await response.text()).trim();
    throw new Error(response.status === 401 ? "enter a valid token (" + text + ")" : text || response.statusText);
  }
  return response.json();
}

function cell(row, text, numeric) {
  const td = row.insertCell();
  td.textContent = text;
  if (numeric) td.className = "num";
}

async function loadIndexes() {
  try {
    const indexes = await call("/api/indexes");
    const body = document.querySelector("#indexes tbody");
    body.replaceChildren();
    for (const index of indexes) {
      const row = body.insertRow();
      row.dataset.index = index.name;
      cell(row, index.name);
      cell(row, index.items.toLocaleString("en"), true);
      cell(row, index.dim, true);
      cell(row, index.hash_bits, true);
      cell(row, index.tables, true);
      cell(row, index.model || "(vectors only)");
      cell(row, index.thumbnails ? "yes" : "no");
    }
    say(indexes.length + (indexes.length === 1 ? " index" : " indexes"));
  } catch (error) {
    say(error.message, true);
  }
}

async function loadChoices() {
  try {
    const indexes = await call("/api/indexes");
    const select = document.getElementById("index");
    const chosen = select.value || sessionStorage.getItem("imagelsh-index");
    select.replaceChildren(...indexes.map((index) => new Option(index.name + " (" + index.items + ")", index.name)));
    if (indexes.some((index) => index.name === chosen)) select.value = chosen;
    say(indexes.length ? "drop an image to find its matches" : "no index yet: ingest some images first");
  } catch (error) {
    say(error.message, true);
  }
}

function hitTile(hit) {
  const tile = document.createElement("figure");
  tile.className = "hit";
  tile.dataset.id = hit.id;
  let picture;
  if (hit.thumbnail) {
    picture = document.createElement("img");
    picture.src = hit.thumbnail;
    picture.alt = hit.label;
  } else {
    picture = document.createElement("div");
    picture.className = "none";
    picture.textContent = "no thumbnail";
  }
  const caption = document.createElement("figcaption");
  const label = document.createElement("div");
  label.className = "label";
  label.textContent = hit.label || "(no label)";
  const score = document.createElement("div");
  score.className = "score";
  score.textContent = "votes " + hit.votes + " · similarity " + hit.similarity.toFixed(3);
  const id = document.createElement("div");
  id.className = "id";
  id.textContent = hit.id;
  id.title = hit.source || hit.id;
  caption.append(label, score, id);
  tile.append(picture, caption);
  return tile;
}

async function search(file) {
  const index = document.getElementById("index").value;
  if (!index) return say("choose an index first", true);
  sessionStorage.setItem("imagelsh-index", index);
  const preview = document.getElementById("query-image");
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  const topK = Math.max(1, Math.min(100, Number(document.getElementById("top-k").value) || 12));
  say("searching " + index + " …");
  try {
    const path = "/api/indexes/" + encodeURIComponent(index) + "/query?top_k=" + topK;
    const answer = await call(path, { method: "POST", body: file, headers: { "Content-Type": "application/octet-stream" } });
    document.getElementById("grid").replaceChildren(...answer.hits.map(hitTile));
    say(answer.hits.length + " matches of " + answer.candidates + " candidates in " + answer.ms.toFixed(0) + " ms");
  } catch (error) {
    document.getElementById("grid").replaceChildren();
    say(error.message, true);
  }
}

function searchPage() {
  const drop = document.getElementById("drop");
  const file = document.getElementById("file");
  file.addEventListener("change", () => file.files[0] && search(file.files[0]));
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    const dropped = event.dataTransfer.files[0];
    if (dropped) search(dropped);
  });
}

function load() {
  if (document.body.dataset.page === "indexes") loadIndexes();
  else loadChoices();
}

if (document.body.dataset.page === "search") searchPage();
load();
