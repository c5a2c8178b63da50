"""Watching the configuration file: an edit (however many events the editor writes it in)
becomes one reload, CONFIG_DEBOUNCE seconds after the last event."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

CONFIG_DEBOUNCE = 0.3


class ConfigWatcher:
    """Calls ``reload(source)`` once an edit of ``path`` settles."""

    def __init__(self, path: Path, reload: Callable[[str], Any]) -> None:
        self.path, self._reload = path, reload
        self._timer: threading.Timer | None = None
        self._observer: Any = None

    def start(self) -> None:
        target = str(self.path.resolve())
        debounced = self._debounced

        class Handler(FileSystemEventHandler):
            def on_any_event(self, ev: FileSystemEvent) -> None:
                paths = {str(getattr(ev, "src_path", "")), str(getattr(ev, "dest_path", "") or "")}
                if target in paths and ev.event_type in ("modified", "created", "moved", "closed"):
                    debounced()

        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.path.resolve().parent), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()

    def _debounced(self) -> None:
        # Editors write a file in several events; act once when they are done.
        if self._timer is not None:
            self._timer.cancel()
        self._timer = threading.Timer(CONFIG_DEBOUNCE, self._reload, args=("file changed",))
        self._timer.daemon = True
        self._timer.start()
