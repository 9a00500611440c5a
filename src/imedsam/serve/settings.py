"""Typed settings of ``imedsam serve`` (every limit the server enforces, in one place)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from imedsam.errors import ImedsamError


@dataclass(frozen=True)
class ServeSettings:
    """What the server offers and the limits it keeps.

    Attributes:
        model: the default model (registry name), used when ``adapter`` is None.
        adapter: a trained run (folder or ``adapter.safetensors``) served as the default model instead.
        runs: a folder whose complete runs (sub-folders with ``adapter.safetensors``) are offered too; the client
            chooses among them by name, never by path.
        token: when set, every ``/api`` call needs ``Authorization: Bearer <token>``.
        device, precision: as for ``imedsam segment``.
        max_upload_mb: uploads above this are refused with 413 (also the cap on a zip's unpacked size x 4).
        max_inflight: inferences (embedding, prompt, propagation) running at once.
        max_queue: requests allowed to wait for an inference slot; beyond it the answer is 503 + Retry-After.
        request_timeout_s: an inference request waiting or running longer than this gets 504.
        cache_mb: memory budget of the cached embeddings (least recently used evicted first).
        max_sessions: open images/volumes at once; the least recently used is closed beyond it.
        session_ttl_s: a session idle this long is closed.
        max_voxels: largest image/volume accepted (after reading), so that one upload cannot exhaust memory.
    """

    model: str = "litemedsam"
    adapter: str | None = None
    runs: Path | None = None
    token: str | None = None
    device: str = "auto"
    precision: str = "auto"
    max_upload_mb: float = 512.0
    max_inflight: int = 2
    max_queue: int = 32
    request_timeout_s: float = 120.0
    cache_mb: float = 1024.0
    max_sessions: int = 16
    session_ttl_s: float = 3600.0
    max_voxels: int = 600 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("max_upload_mb", "request_timeout_s", "cache_mb", "session_ttl_s"):
            if not getattr(self, name) > 0:
                raise ImedsamError(f"--{name.replace('_', '-')}: must be positive, got {getattr(self, name)}")
        for name in ("max_inflight", "max_sessions", "max_voxels"):
            if int(getattr(self, name)) < 1:
                raise ImedsamError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise ImedsamError(f"--max-queue: must be >= 0, got {self.max_queue}")
        if self.runs is not None and not Path(self.runs).is_dir():
            raise ImedsamError(f"--runs {self.runs}: not a folder; give the folder holding your training runs")
        if self.token is not None and not self.token.strip():
            raise ImedsamError("--token: must not be empty")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)
