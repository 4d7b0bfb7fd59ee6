"""The labelling page: a FastAPI app over one run's blind sample and its label store.

The page shows one image at a time, large, with nothing that names its cell, prompt or score; keys label it
(``c`` concept, ``t`` trace, ``n`` none, ``u`` unusable), ``z`` or Backspace undoes the last label, and a count
says how far this labeller is. Each labeller (a name typed once, kept by the browser) labels the whole sample
in the same blind order, from the first image they have not labelled, so a reload or a restart resumes. The
server reads images from the run folder and writes only its label store there.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from relapse.review.labels import LABELS, LabelStore, check_labeller
from relapse.review.sample import Sample


class Label(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item: str  # the image's token
    label: str
    labeller: str


class Undo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    labeller: str

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>relapse review</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 46rem; color: #222; }
#image { width: 384px; height: 384px; image-rendering: pixelated; border: 1px solid #888; display: block; margin: 1rem 0; }
kbd { border: 1px solid #888; border-radius: 3px; padding: 0 .3rem; }
button { margin-right: .4rem; } #status { font-weight: bold; } .hidden { display: none; }
</style></head>
<body>
<h1>Label images, blind</h1>
<form id="who"><label>Your name (kept apart from other labellers') <input id="name" autocomplete="off" required></label>
<button type="submit">Start</button></form>
<div id="work" class="hidden">
<p id="status"></p>
<img id="image" alt="the image to label">
<p><button data-label="concept"><kbd>c</kbd> concept</button><button data-label="trace"><kbd>t</kbd> trace</button>
<button data-label="none"><kbd>n</kbd> none</button><button data-label="unusable"><kbd>u</kbd> unusable</button>
<button id="undo"><kbd>z</kbd> undo</button></p>
<p><b>concept</b>: the concept drawn clearly (on the toy model: a checker, cells that alternate in both directions over the
object). <b>trace</b>: any visible part of it, however faint, partial, irregular or dim (a few cells alternating both
ways). <b>none</b>: nothing of it (plain, stripes, dots, bands, smudges). <b>unusable</b>: nothing to judge.</p>
</div>
<p id="error" role="alert"></p>
<script>
const $ = id => document.getElementById(id);
let labeller = localStorage.getItem("relapse-labeller"), item = null, busy = false;
async function call(path, body) {
  const response = await fetch(path, body ? {method: "POST", headers: {"Content-Type": "application/json"},
                                             body: JSON.stringify(body)} : {});
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}
function show(data) {
  item = data.item;
  $("status").textContent = data.item ? `${data.done} of ${data.total} labelled` :
    `All ${data.total} images labelled. Stop the server (Ctrl-C): the report shows the labels.`;
  $("image").classList.toggle("hidden", !data.item);
  if (data.item) $("image").src = "/image/" + data.item;
}
async function step(promise) {
  if (busy) return;
  busy = true;
  try { show(await promise); $("error").textContent = ""; }
  catch (e) { $("error").textContent = e.message; }
  finally { busy = false; }
}
const next = () => call("/api/next?labeller=" + encodeURIComponent(labeller));
const label = value => item && step(call("/api/label", {item, label: value, labeller}));
const undo = () => step(call("/api/undo", {labeller}));
function start() {
  $("who").classList.add("hidden"); $("work").classList.remove("hidden");
  step(next());
}
$("who").addEventListener("submit", e => {
  e.preventDefault(); labeller = $("name").value.trim(); localStorage.setItem("relapse-labeller", labeller); start();
});
document.querySelectorAll("button[data-label]").forEach(b => b.addEventListener("click", () => label(b.dataset.label)));
$("undo").addEventListener("click", undo);
const KEYS = {c: "concept", t: "trace", n: "none", u: "unusable"};
document.addEventListener("keydown", e => {
  if (!labeller || e.target.tagName === "INPUT" || e.ctrlKey || e.metaKey || e.altKey) return;
  if (KEYS[e.key]) label(KEYS[e.key]);
  else if (e.key === "z" || e.key === "Backspace") { e.preventDefault(); undo(); }
});
if (labeller) start();
</script></body></html>
"""


def create_app(run_dir: Path, sample: Sample, store: LabelStore):
    """The app: ``GET /`` the page, ``GET /api/next``, ``POST /api/label``, ``POST /api/undo``, ``GET /image/{token}``.
    A bad request gets a 4xx and ``{"error": message}``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    from relapse.errors import UserError

    by_token = sample.by_token
    app = FastAPI(title="relapse review", docs_url=None, redoc_url=None, openapi_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        return error(400, f"{'.'.join(str(p) for p in first.get('loc', ()))}: {first.get('msg', 'invalid')}")

    @app.exception_handler(UserError)
    async def refused(_: Request, exc: UserError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(HTTPException)
    async def http(_: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    def progress(labeller: str) -> dict:
        """The first image of the blind order this labeller has not labelled, and how many they have."""
        labeller = check_labeller(labeller)
        mine = {image for image, by in store.current().items() if labeller in by}
        todo = [image for image in sample.images if image not in mine]
        total = len(sample.images)
        return {"item": sample.tokens[todo[0]] if todo else None, "done": total - len(todo), "total": total}

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/api/next")
    def next_item(labeller: str) -> dict:
        return progress(labeller)

    @app.post("/api/label")
    def add_label(body: Label) -> dict:
        if body.item not in by_token:
            raise HTTPException(404, f"no image {body.item!r} in this sample")
        if body.label not in LABELS:
            raise UserError(f"unknown label {body.label!r}; use one of: {', '.join(LABELS)}")
        store.add(by_token[body.item], body.label, check_labeller(body.labeller))
        return progress(body.labeller)

    @app.post("/api/undo")
    def undo(body: Undo) -> dict:
        store.undo(check_labeller(body.labeller))
        return progress(body.labeller)

    @app.get("/image/{token}")
    def image(token: str) -> FileResponse:
        if token not in by_token:
            raise HTTPException(404, f"no image {token!r} in this sample")
        return FileResponse(run_dir / by_token[token], media_type="image/png", headers={"Cache-Control": "no-store"})

    return app


def serve(run_dir: Path, sample: Sample, store: LabelStore, host: str, port: int) -> None:
    """Serve until Ctrl-C; a port already taken is a one-line error."""
    import socket

    import uvicorn

    from relapse.errors import UserError

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a restart may follow a stop at once
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise UserError(f"cannot serve on {host}:{port} ({exc.strerror}); pass another --port") from None
    uvicorn.run(create_app(run_dir, sample, store), host=host, port=port, log_level="warning", access_log=False)
