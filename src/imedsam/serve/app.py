"""The FastAPI application of ``imedsam serve``: the JSON API under ``/api`` (OpenAPI at ``/docs``) and the page.

Status codes: 400 bad input (the same one-line messages as the CLI), 401 missing/wrong token, 404 unknown session,
413 upload over the limit, 503 + Retry-After when the inference queue is full, 504 past the request time limit.
Images returned inside JSON are PNG data URLs: ``labels`` is the slice's uint8 label plane (object ids, 0 is
background); ``uncertainty`` is the implicit decoder's per-pixel variance of MC-dropout probabilities mapped
linearly from [0, 0.25] (the largest variance of a probability) to 0..255.
"""

from __future__ import annotations

import base64
import io as _io
import os
import secrets
import tempfile
import time
from pathlib import Path

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, Field

from imedsam.errors import ImedsamError
from imedsam.infer.segmenter import Segmenter
from imedsam.serve.cache import EmbeddingCache
from imedsam.serve.gate import Busy, InferenceGate, TimedOut
from imedsam.serve.models import ModelCatalog
from imedsam.serve.sessions import Result, Session, SessionStore
from imedsam.serve.settings import ServeSettings
from imedsam.serve.uploads import UploadTooLarge, read_upload

STATIC = Path(__file__).parent / "static"
MAX_JSON_BYTES = 1 << 20


# ----------------------------------------------------------------------------------------------- schemas
class Target(BaseModel):
    slice: int = Field(0, ge=0, description="slice index along the volume's first array axis (0 for images)")
    model: str | None = Field(None, description="a name from GET /api/models; default: the server's model")
    window: str = Field("auto", description="display window the model sees: auto or a CT window name")


class SegmentRequest(Target):
    object: int = Field(1, ge=1, le=255, description="object id (label value) 1..255")
    box: tuple[float, float, float, float] | None = Field(
        None, description="x0 y0 x1 y1, half-open, slice pixels; starts the object's interaction on this slice anew")
    point: tuple[float, float] | None = Field(None, description="x y of a click, slice pixels")
    label: int = Field(1, ge=0, le=1, description="1 foreground click, 0 background click")
    uncertainty: bool = Field(False, description="also return the uncertainty map (implicit decoders)")


class ObjectRequest(Target):
    object: int = Field(1, ge=1, le=255)


class Box3dRequest(ObjectRequest):
    box3d: tuple[float, float, float, float, float, float] = Field(
        ..., description="i0 j0 k0 i1 j1 k1: half-open voxel indices along the file's first, second, third axes")


class ClearRequest(BaseModel):
    slice: int = Field(0, ge=0)
    object: int | None = Field(None, ge=1, le=255, description="one object, or every object when omitted")


class SliceRequest(BaseModel):
    slice: int = Field(0, ge=0)


class LabelsResponse(BaseModel):
    slice: int
    labels: str = Field(..., description="PNG data URL of the slice's uint8 label plane")
    score: float | None = None
    area: int | None = Field(None, description="foreground pixels (voxels for 3-D operations) of the object")
    uncertainty: str | None = None
    changed_slices: list[int] = []
    objects: list[int] = []
    seconds: float = Field(..., description="server time of the request")
    embedded: bool = Field(False, description="the slice's embedding was computed by this request")


# ----------------------------------------------------------------------------------------------- helpers
def png_bytes(array: np.ndarray) -> bytes:
    buf = _io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def data_url(array: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(array)).decode("ascii")


def uncertainty_u8(u: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(u, np.float32) / 0.25 * 255.0), 0, 255).astype(np.uint8)


def _response(result: Result, started: float, embedded: bool) -> LabelsResponse:
    return LabelsResponse(slice=result.slice, labels=data_url(result.labels), score=result.score, area=result.area,
                          uncertainty=None if result.uncertainty is None else data_url(
                              uncertainty_u8(result.uncertainty)),
                          changed_slices=result.changed_slices, objects=result.objects,
                          seconds=round(time.perf_counter() - started, 4), embedded=embedded)


# ---------------------------------------------------------------------------------------------- the app
def create_app(settings: ServeSettings | None = None, *, segmenters: dict[str, Segmenter] | None = None) -> FastAPI:
    """The application for ``settings``. ``segmenters`` pre-loads models by their offered name (tests)."""
    settings = settings or ServeSettings()
    catalog = ModelCatalog(settings, loaded=segmenters)
    cache: EmbeddingCache = EmbeddingCache(int(settings.cache_mb * 2**20), lambda state: state.nbytes)
    store = SessionStore(cache, settings.max_sessions, settings.session_ttl_s)
    gate: InferenceGate | None = None

    app = FastAPI(title="imedsam", summary="Interactive medical image segmentation (SAM-family models)",
                  version=_version())
    app.state.settings, app.state.catalog, app.state.cache, app.state.sessions = settings, catalog, cache, store
    bearer = HTTPBearer(auto_error=False)

    def authorize(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.token is None:
            return
        if credentials is None or not secrets.compare_digest(credentials.credentials.encode(),
                                                             settings.token.encode()):
            raise HTTPException(401, "a bearer token is required: send Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})

    def the_gate() -> InferenceGate:
        nonlocal gate
        if gate is None:  # created inside the event loop
            gate = InferenceGate(settings.max_inflight, settings.max_queue, settings.request_timeout_s)
            app.state.gate = gate
        return gate

    def session(sid: str) -> Session:
        try:
            return store.get(sid)
        except KeyError:
            raise HTTPException(404, f"session {sid!r} not found (closed or expired); open the file again") from None

    @app.exception_handler(ImedsamError)
    async def _bad_input(request: Request, exc: ImedsamError):
        code = 413 if isinstance(exc, UploadTooLarge) else 400
        return JSONResponse({"detail": str(exc)}, status_code=code)

    @app.exception_handler(Busy)
    async def _busy(request: Request, exc: Busy):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(TimedOut)
    async def _timed_out(request: Request, exc: TimedOut):
        return JSONResponse({"detail": str(exc)}, status_code=504)

    @app.middleware("http")
    async def _bounded_bodies(request: Request, call_next):
        length = request.headers.get("content-length")
        limit = settings.max_upload_bytes if request.url.path == "/api/sessions" else MAX_JSON_BYTES
        if length is not None and length.isdigit() and int(length) > limit:
            return JSONResponse({"detail": f"request body of {int(length)} bytes is over this server's limit of "
                                           f"{limit} bytes"}, status_code=413)
        return await call_next(request)

    api = dict(dependencies=[Depends(authorize)])

    @app.get("/api/health", **api)
    async def health() -> dict:
        g = the_gate()
        return {"status": "ok", "sessions": len(store), "cached_embeddings": len(cache),
                "cache_mb": round(cache.used / 2**20, 1), "inflight": g.admitted, "rejected": g.rejected}

    @app.get("/api/models", **api)
    async def models() -> dict:
        return {"default": catalog.default, "models": [e.public() for e in catalog.entries.values()]}

    @app.post("/api/sessions", status_code=201, **api,
              openapi_extra={"requestBody": {"content": {"application/octet-stream": {
                  "schema": {"type": "string", "format": "binary"}}}, "required": True}})
    async def open_session(request: Request, filename: str = Query(..., description="the file's name; its "
                           "suffix picks the reader (.png .jpg .tif .dcm .nii.gz .mha .nrrd, .zip of a DICOM "
                           "series)")) -> dict:
        """Upload an image or volume as the raw request body; returns the session id and the image's facts."""
        limit = settings.max_upload_bytes
        fd, tmp = tempfile.mkstemp(prefix="imedsam-upload-")
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise UploadTooLarge(f"{Path(filename).name}: upload over this server's limit of "
                                             f"{settings.max_upload_mb:g} MB (--max-upload-mb)")
                    out.write(chunk)
            if size == 0:
                raise ImedsamError(f"{Path(filename).name}: the upload is empty")
            upload = await the_gate().run(lambda: read_upload(Path(tmp), filename, max_unpacked=4 * limit,
                                                              max_voxels=settings.max_voxels))
        finally:
            Path(tmp).unlink(missing_ok=True)
        s = Session(upload.sample, Path(str(filename).replace("\\", "/")).name, cache,
                    dicom_headers=upload.dicom_headers)
        store.add(s)
        return s.describe()

    @app.get("/api/sessions/{sid}", **api)
    async def describe(sid: str) -> dict:
        return session(sid).describe()

    @app.delete("/api/sessions/{sid}", status_code=204, **api)
    async def close(sid: str) -> Response:
        if not store.close(sid):
            raise HTTPException(404, f"session {sid!r} not found")
        return Response(status_code=204)

    @app.get("/api/sessions/{sid}/slices/{k}/image.png", **api,
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def slice_image(sid: str, k: int, window: str = "auto") -> Response:
        s = session(sid)
        plane = await the_gate().run(lambda: s.plane_gray_or_rgb(k, window))
        return Response(png_bytes(plane), media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/api/sessions/{sid}/slices/{k}/labels.png", **api,
             response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def slice_labels(sid: str, k: int) -> Response:
        s = session(sid)
        return Response(png_bytes(s.labels[s.check_slice(k)]), media_type="image/png",
                        headers={"Cache-Control": "no-store"})

    def model_work(s: Session, req: Target, fn):
        """Run ``fn(segmenter, model_name)`` gated; tells whether it computed the slice's embedding."""
        entry = catalog.entry(req.model)

        def work():
            started = time.perf_counter()
            seg = catalog.segmenter(entry.name)
            fresh = not s.is_embedded(entry.name, req.slice, req.window)
            return fn(seg, entry), started, fresh

        return the_gate().run(work)

    async def answer(s: Session, req: Target, fn) -> LabelsResponse:
        """``fn(segmenter, entry)`` on slice ``req.slice`` of session ``s``, gated, answered with the labels."""
        s.check_slice(req.slice)
        result, started, fresh = await model_work(s, req, fn)
        return _response(result, started, fresh)

    @app.post("/api/sessions/{sid}/segment", response_model=LabelsResponse, **api)
    async def segment(sid: str, req: SegmentRequest) -> LabelsResponse:
        """A box and/or a click for one object on one slice; the object's mask there becomes the prediction."""
        s = session(sid)
        if req.box is None and req.point is None:
            raise ImedsamError("segment: give a box (x0, y0, x1, y1) and/or a point (x, y) with its label")
        entry = catalog.entry(req.model)
        kinds = [k for k, v in (("box", req.box), ("points", req.point)) if v is not None]
        if any(k not in entry.prompt_types for k in kinds):
            raise ImedsamError(f"model {entry.name!r} takes {', '.join(entry.prompt_types) or 'no'} prompts, "
                               f"not {' + '.join(kinds)}")
        if req.uncertainty and not entry.has_uncertainty:
            raise ImedsamError(f"model {entry.name!r} has no uncertainty map (implicit decoders have one)")
        return await answer(s, req, lambda seg, e: s.interact(
            seg, e.name, req.slice, req.object, window=req.window, box=req.box, point=req.point, label=req.label,
            uncertainty=req.uncertainty))

    @app.post("/api/sessions/{sid}/embed", **api)
    async def embed(sid: str, req: Target) -> dict:
        """Compute a slice's embedding ahead of its first prompt (the page asks when the user rests on a slice);
        a no-op when it is cached already."""
        s = session(sid)
        s.check_slice(req.slice)
        if catalog.entry(req.model).volume:  # it segments whole volumes: no per-slice embedding to make
            return {"slice": req.slice, "embedded": False, "seconds": 0.0}
        _, started, fresh = await model_work(s, req, lambda seg, e: s.state(seg, e.name, req.slice, req.window))
        return {"slice": req.slice, "embedded": fresh, "seconds": round(time.perf_counter() - started, 4)}

    @app.post("/api/sessions/{sid}/auto", response_model=LabelsResponse, **api)
    async def automatic(sid: str, req: Target) -> LabelsResponse:
        """Automatic masks of a slice (a grid of point prompts, SAM's generator), each a new object."""
        s = session(sid)
        return await answer(s, req, lambda seg, e: s.auto(seg, e.name, req.slice, window=req.window))

    @app.post("/api/sessions/{sid}/propagate", response_model=LabelsResponse, **api)
    async def propagate(sid: str, req: ObjectRequest) -> LabelsResponse:
        """Follow an object from this slice through the volume (each slice prompted by the previous mask's box)."""
        s = session(sid)
        return await answer(s, req, lambda seg, e: s.propagate(seg, e.name, req.slice, req.object,
                                                               window=req.window))

    @app.post("/api/sessions/{sid}/box3d", response_model=LabelsResponse, **api)
    async def box3d(sid: str, req: Box3dRequest) -> LabelsResponse:
        """An object from a 3-D box: a box on every slice of its range. Returns the current slice's plane."""
        s = session(sid)
        return await answer(s, req, lambda seg, e: s.box3d(seg, e.name, req.object, req.box3d, window=req.window,
                                                           current=req.slice))

    @app.post("/api/sessions/{sid}/undo", response_model=LabelsResponse, **api)
    async def undo(sid: str, req: SliceRequest) -> LabelsResponse:
        started = time.perf_counter()
        return _response(session(sid).undo(req.slice), started, False)

    @app.post("/api/sessions/{sid}/clear", response_model=LabelsResponse, **api)
    async def clear(sid: str, req: ClearRequest) -> LabelsResponse:
        started = time.perf_counter()
        return _response(session(sid).clear(req.slice, req.object), started, False)

    @app.get("/api/sessions/{sid}/download", **api, response_class=Response,
             responses={200: {"content": {"image/png": {}, "application/gzip": {}}}})
    async def download(sid: str, format: str = Query("auto", description="png (2-D images, or one slice with "
                       "?slice=) | nifti (volumes, in the input's geometry) | dicom-seg (DICOM inputs) | auto"),
                       slice: int | None = None) -> Response:
        """The label map: PNG for images (values are object ids), NIfTI with the input's geometry for volumes,
        or a DICOM-SEG referring to the DICOM slices it segments (one segment per object)."""
        s = session(sid)
        fmt = ("nifti" if s.is_volume and slice is None else "png") if format == "auto" else format
        stem = _stem(s.name)
        if fmt == "dicom-seg":
            if "dicom-seg" not in s.download_formats():
                raise ImedsamError("download dicom-seg: needs a DICOM input (a .dcm file or a zip of a series) and "
                                   "highdicom on the server; use " + " or ".join(s.download_formats()))
            data = await the_gate().run(lambda: _dicom_seg_bytes(s))
            return Response(data, media_type="application/dicom",
                            headers={"Content-Disposition": f'attachment; filename="{stem}_seg.dcm"'})
        if fmt == "png":
            if s.is_volume and slice is None:
                raise ImedsamError("download png: a volume's labels are one PNG per slice; pass ?slice=K or "
                                   "format=nifti")
            plane = s.labels[s.check_slice(slice or 0)]
            return Response(png_bytes(plane), media_type="image/png",
                            headers={"Content-Disposition": f'attachment; filename="{stem}_labels.png"'})
        if fmt != "nifti":
            raise ImedsamError(f"download: format {format!r}; use png, nifti, dicom-seg or auto")
        if not s.is_volume:
            raise ImedsamError("download nifti: this session is a 2-D image; use format=png")
        data = await the_gate().run(lambda: _nifti_bytes(s))
        return Response(data, media_type="application/gzip",
                        headers={"Content-Disposition": f'attachment; filename="{stem}_labels.nii.gz"'})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    return app


def _stem(name: str) -> str:
    stem = Path(name).name
    for suffix in (".nii.gz", ".nii", ".mha", ".nrrd", ".zip", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dcm"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) or "image"


def _nifti_bytes(s: Session) -> bytes:
    from imedsam import io

    with tempfile.TemporaryDirectory(prefix="imedsam-download-") as tmp:
        path = io.write_volume(Path(tmp) / "labels.nii.gz", s.label_volume(), like=s.sample)
        return path.read_bytes()


def _dicom_seg_bytes(s: Session) -> bytes:
    from imedsam.io.dicom_seg import write_dicom_seg

    with tempfile.TemporaryDirectory(prefix="imedsam-download-") as tmp:
        return write_dicom_seg(Path(tmp) / "seg.dcm", s.labels, s.dicom_headers).read_bytes()


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("imedsam")
    except Exception:  # noqa: BLE001 - a source checkout without metadata
        return "0"
