"""Where a model's files come from: a local folder, the Hugging Face cache, or the hub.

`from_pretrained` on an id the hub cannot serve retries each file for 30-60 s (several
components: minutes) and then blames a missing config.json. `model_source` asks first, in one
request with a short timeout, and says in one line what is wrong and what to do.
"""

from __future__ import annotations

import logging
from pathlib import Path

logger = logging.getLogger(__name__)

PROBE_TIMEOUT = 5.0  # seconds for the one request to the hub
HINT = "pass a local folder with the model, or download it where the hub is reachable and set HF_HUB_OFFLINE=1"


def model_source(model_id: str, flag: str = "--model_id") -> str:
    """What to load `model_id` from: the id itself (a local folder, an in-code tiny model, an
    id the hub serves), or the cached snapshot folder with HF_HUB_OFFLINE=1 or when the hub
    cannot be reached (so loading makes no request that would retry).
    Raises ValueError naming `flag` when the model cannot be had."""
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, HfHubHTTPError, RepositoryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    from .backends.tiny import is_tiny

    path = Path(model_id).expanduser()
    if is_tiny(model_id) or path.is_dir():
        return model_id
    if path.exists():
        raise ValueError(f"{flag} {model_id}: a file, not a model folder or a hub id")
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        raise ValueError(f"{flag} {model_id}: no such folder, and not a Hugging Face hub id") from None

    def cached() -> str | None:
        try:
            return snapshot_download(model_id, local_files_only=True)
        except Exception:  # not in the cache (LocalEntryNotFoundError), or a broken cache entry
            return None

    if constants.is_offline_mode():
        snapshot = cached()
        if snapshot is None:
            raise ValueError(f"{flag} {model_id}: not a local folder and not in the Hugging Face cache "
                             "(HF_HUB_OFFLINE=1 is set); pass a local folder with the model, or unset "
                             "HF_HUB_OFFLINE where the hub is reachable to download it")
        # The snapshot folder, not the id: offline, transformers takes a file the repo does not
        # have (a tokenizer's config.json, probed first) for a missing download and fails,
        # unless an online lookup once recorded it as absent; in a folder it is just absent.
        return snapshot
    try:
        HfApi().model_info(model_id, timeout=PROBE_TIMEOUT)
        return model_id
    except GatedRepoError:
        raise ValueError(f"{flag} {model_id}: a gated model; accept its licence on the hub and log in "
                         "(`hf auth login`), or pass a local folder with the model") from None
    except RepositoryNotFoundError:
        raise ValueError(f"{flag} {model_id}: no such folder, and no such model on the Hugging Face hub "
                         "(check the id; a private model needs `hf auth login`)") from None
    except HfHubHTTPError as error:
        reason = f"the hub answered {error.response.status_code if error.response is not None else error}"
    except Exception as error:  # no network, DNS, proxy, timeout: whatever the HTTP client raises
        reason = f"the Hugging Face hub cannot be reached ({type(error).__name__}: {error})"
    snapshot = cached()
    if snapshot is None:
        raise ValueError(f"{flag} {model_id}: {reason}, and the model is not in the cache; {HINT}")
    logger.info("%s %s: %s; loading the cached copy", flag, model_id, reason)
    return snapshot
