"""Hugging Face Hub ids (`org/name` or `org/name@revision`) wherever a checkpoint or adapter is taken.

Resolved with `huggingface_hub.snapshot_download` into the standard cache (HF_HOME / HF_HUB_CACHE), only
the files this project reads (safetensors, config, tokenizer and chat template, PEFT adapter files: never
pickles). HF_TOKEN (gated repos such as meta-llama/*) and HF_HUB_OFFLINE (the cache only) are honoured by
huggingface_hub itself; its progress bars show the download.

A string is a Hub id only when it is not an existing local path, has no URL scheme, and is exactly
`owner/name` (Hub characters) with an optional `@revision`; anything else stays a path.
"""

from __future__ import annotations

import logging
import os
import re

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?$")
PATTERNS = ["*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
            "chat_template.json", "tokenizer.model", "original/tokenizer.model", "adapter_config.json"]


class HubError(ValueError):
    """A Hub id that cannot be resolved; the message names the repository (and revision)."""


def parse(spec: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when `spec` is a Hub id, else None (a local or remote path)."""
    s = str(spec)
    if "://" in s or s.startswith((".", "/", "~")) or os.path.exists(s):
        return None
    m = HUB_ID.match(s)
    if m is None or m["repo"].endswith((".", "-")) or ".." in m["repo"]:
        return None
    return m["repo"], m["revision"]


def resolve(spec):
    """`spec` itself for a path; for a Hub id, the local snapshot directory (downloaded when not cached)."""
    hub = parse(spec)
    if hub is None:
        return spec
    repo, revision = hub
    name = repo + (f"@{revision}" if revision else "")
    try:
        path = snapshot_download(repo, revision=revision, allow_patterns=PATTERNS)
    except RevisionNotFoundError:
        raise HubError(f"{name}: the Hugging Face Hub repository {repo} has no revision {revision!r}") from None
    except GatedRepoError:
        raise HubError(f"{name}: a gated Hugging Face Hub repository; accept its licence on the Hub and set "
                       f"HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubError(f"{name}: no such Hugging Face Hub repository (nor a local path); private repositories "
                       f"need HF_TOKEN") from None
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache" if offline else \
            "not in the local Hugging Face cache, and the Hub could not be reached"
        raise HubError(f"{name}: Hugging Face Hub repository not found ({why}; nor is it a local path)") from None
    except HfHubHTTPError as e:
        raise HubError(f"{name}: Hugging Face Hub error: {str(e).splitlines()[0]}") from None
    log.info("%s -> %s", name, path)
    return path
