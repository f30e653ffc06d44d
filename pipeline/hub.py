"""Publishing `models/release/` to the Hugging Face Hub (or a private Hub deployment) with `huggingface_hub`.

    publish_release("models/release", "org/rlhf-tiny", token=..., gate_metrics=evaluation,
                    gate=("gold_win_rate", 0.5))

Before anything, `rlhf publish` checks the folder against dvc.lock (:func:`verify_release`): a release changed or
corrupted since the release stage wrote it is refused. Order of work: 1. the evaluation gate (no network before it
passes); 2. create the repo (private unless asked); 3. upload the folder, unless the remote `main` already holds
exactly these files; 4. tag the commit with a name traceable to the DVC lock (``run-<first 12 hex of the release's
md5 in dvc.lock>``). Publishing the same release twice makes no commit and no tag the second time. Transient
failures (connection errors, 429, 5xx) are retried with exponential backoff; other 4xx are not.

The token is passed to `HfApi` explicitly and is never logged, printed or written: logs name the repo, the
endpoint, the tag and the commit only. ``HF_ENDPOINT`` (or ``endpoint=``) selects the Hub deployment.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

# Both are read when huggingface_hub is imported. Telemetry would probe the endpoint offline; the classic LFS
# upload (rather than Xet) is what private deployments and the test stand-in speak (docs/design.md §7).
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_DISABLE_XET", "1")

from huggingface_hub import HfApi, constants  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError  # noqa: E402

from pipeline.lineage import LOCK_FILE, RELEASE_OUT, RELEASE_STAGE, release_md5  # noqa: E402
from pipeline.workspace import changed_outputs  # noqa: E402
from rlhf.files import path_digest  # noqa: E402

try:  # the HTTP client huggingface_hub 2.x uses; its transport errors are connection-level, worth a retry
    from httpx2 import TransportError as _TransportError
except ImportError:  # pragma: no cover
    _TransportError = ConnectionError  # type: ignore[assignment,misc]

logger = logging.getLogger(__name__)

TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
Gate = Callable[[Mapping[str, object]], bool] | tuple[str, float]
T = TypeVar("T")


class GateFailed(RuntimeError):
    """The evaluation does not pass the publishing gate (and ``force`` was not given)."""


@dataclass(frozen=True)
class PublishResult:
    commit_oid: str  # the commit on the Hub that holds the release
    tag: str  # the tag pointing at it, e.g. "run-3f2a9c0d1b7e"
    url: str  # the repository's URL on the endpoint
    created_commit: bool  # False when the remote already held exactly this release


def _sync_environment_into_constants() -> None:
    """huggingface_hub reads these at import; if it was imported first (e.g. by transformers), apply them now."""
    for name in ("HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_XET"):
        if os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}:
            setattr(constants, name, True)


def check_gate(metrics: Mapping[str, object], gate: Gate) -> str:
    """Returns why the gate passes; raises GateFailed otherwise. ``gate`` is a predicate or (metric, min_value)."""
    if callable(gate):
        if not gate(metrics):
            raise GateFailed(f"the evaluation gate {getattr(gate, '__name__', gate)!r} rejected the release")
        return f"gate {getattr(gate, '__name__', 'predicate')} passed"
    metric, min_value = gate
    if metric not in metrics or metrics[metric] is None:
        raise GateFailed(f"the evaluation has no {metric!r}; cannot check {metric} ≥ {min_value}")
    value = float(metrics[metric])  # type: ignore[arg-type]
    if value < min_value:
        raise GateFailed(f"{metric} = {value:.4f} < {min_value}")
    return f"{metric} = {value:.4f} ≥ {min_value}"


class ReleaseMismatch(RuntimeError):
    """The release folder is not what dvc.lock recorded: changed, truncated or corrupted since the release stage."""


def verify_release(release_dir: Path, repo_dir: Path = Path(".")) -> str:
    """Check ``release_dir`` against dvc.lock before anything is uploaded; returns how it was checked.

    Where the folder is the DVC output of the ``release`` stage of a DVC repository, DVC hashes its files again
    (``dvc status release``) and any difference (a file edited, truncated, bit-flipped or removed) raises
    :class:`ReleaseMismatch`. A folder outside a DVC repository (built without `dvc repro`) cannot be checked.
    """
    repo = repo_dir.resolve()
    if not (repo / ".dvc").is_dir() or release_md5(repo / LOCK_FILE) is None:
        return "not checked: no DVC repository or no release in dvc.lock"
    if release_dir.resolve() != repo / RELEASE_OUT:
        return f"not checked: {release_dir} is not the release stage's output {RELEASE_OUT}"
    changed = changed_outputs(RELEASE_STAGE, repo)
    if RELEASE_OUT in changed:
        raise ReleaseMismatch(
            f"{RELEASE_OUT}: {changed[RELEASE_OUT]} since `dvc repro` recorded it in dvc.lock (a file changed, "
            "truncated, corrupted or removed); nothing was uploaded. Fix: `dvc checkout release` restores it from "
            "the DVC cache, or `dvc repro release` rebuilds it"
        )
    return "matches dvc.lock"


def release_tag(release_dir: Path, lock_path: Path | None = None) -> str:
    """``run-<12 hex>``: the release's md5 in dvc.lock (so the tag traces to the lock), else a hash of the folder."""
    lock_path = lock_path if lock_path is not None else release_dir.resolve().parents[1] / LOCK_FILE
    md5 = release_md5(lock_path)
    return f"run-{(md5 or path_digest(release_dir))[:12]}"


def _is_transient(error: Exception) -> bool:
    if isinstance(error, HfHubHTTPError):
        return error.response is not None and error.response.status_code in TRANSIENT_STATUS
    return isinstance(error, (_TransportError, ConnectionError))


def with_retries(call: Callable[[], T], what: str, max_retries: int, delay_s: float) -> T:
    """Runs ``call``; on a transient error waits ``delay_s · 2^attempt`` and tries again, ``max_retries`` times."""
    for attempt in range(max_retries + 1):
        try:
            return call()
        except Exception as error:  # noqa: BLE001  (re-raised unless transient)
            if attempt == max_retries or not _is_transient(error):
                raise
            status = getattr(getattr(error, "response", None), "status_code", type(error).__name__)
            logger.warning(
                "%s failed (%s); retry %d/%d in %.1f s", what, status, attempt + 1, max_retries, delay_s * 2**attempt
            )
            time.sleep(delay_s * 2**attempt)
    raise AssertionError("unreachable")


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def remote_holds(api: HfApi, repo_id: str, folder: Path, revision: str = "main") -> bool:
    """True when ``revision`` holds every file of ``folder`` with identical content (LFS by sha256, else git sha1)."""
    remote = {}
    for entry in api.list_repo_tree(repo_id, revision=revision, recursive=True):
        if getattr(entry, "lfs", None) is not None:
            remote[entry.path] = ("sha256", entry.lfs.sha256)
        elif hasattr(entry, "blob_id"):
            remote[entry.path] = ("sha1", entry.blob_id)
    for path in (p for p in folder.rglob("*") if p.is_file()):
        kind, oid = remote.get(path.relative_to(folder).as_posix(), (None, None))
        data = path.read_bytes()
        local = hashlib.sha256(data).hexdigest() if kind == "sha256" else git_blob_sha1(data)
        if oid != local:
            return False
    return True


def publish_release(
    release_dir: str | Path,
    repo_id: str,
    *,
    token: str | None,
    endpoint: str | None = None,
    private: bool = True,
    gate_metrics: Mapping[str, object],
    gate: Gate,
    force: bool = False,
    revision_tag: str | None = None,
    lock_path: str | Path | None = None,
    max_retries: int = 3,
    retry_delay_s: float = 1.0,
) -> PublishResult:
    """Publish ``release_dir`` to ``repo_id`` if the evaluation passes ``gate`` (or ``force``); idempotent.

    ``revision_tag`` defaults to :func:`release_tag` (from ``lock_path``, default ``<repo>/dvc.lock``).
    """
    release_dir = Path(release_dir)
    # 1. the gate, before any network call
    try:
        reason = check_gate(gate_metrics, gate)
    except GateFailed as failure:
        if not force:
            raise
        reason = f"gate failed but forced: {failure}"
        logger.warning("publishing despite the evaluation gate: %s", failure)
    if not (release_dir / "config.json").exists():
        raise FileNotFoundError(f"{release_dir} is not a release folder (no config.json); run the release stage")
    tag = revision_tag or release_tag(release_dir, Path(lock_path) if lock_path else None)
    _sync_environment_into_constants()
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    logger.info("publishing %s to %s at %s as %s (%s)", release_dir, repo_id, endpoint, tag, reason)

    def retried(call: Callable[[], T], what: str) -> T:
        return with_retries(call, what, max_retries, retry_delay_s)

    # 2. the repository (exist_ok: a second publish finds it)
    url = str(retried(lambda: api.create_repo(repo_id, private=private, exist_ok=True), "create_repo"))
    # 3. the files, unless main already holds exactly them (the client also skips unchanged files itself)
    head = retried(lambda: api.repo_info(repo_id, revision="main").sha, "repo_info")
    if retried(lambda: remote_holds(api, repo_id, release_dir), "list_repo_tree"):
        commit_oid, created = head, False
    else:
        info = retried(
            lambda: api.upload_folder(
                repo_id=repo_id,
                folder_path=release_dir,
                commit_message=f"Release {tag}",
                commit_description=f"Published by `rlhf publish`; {reason}.",
            ),
            "upload_folder",
        )
        commit_oid = info.oid
        created = commit_oid != head
    # 4. the tag (kept if it exists: the same lock entry means the same release)
    refs = retried(lambda: api.list_repo_refs(repo_id), "list_repo_refs")
    existing = {ref.name: ref.target_commit for ref in refs.tags}
    if tag not in existing:
        retried(
            lambda: api.create_tag(
                repo_id, tag=tag, revision=commit_oid, tag_message=f"rlhf release {tag}", exist_ok=True
            ),
            "create_tag",
        )
    elif existing[tag] != commit_oid:
        logger.warning("tag %s already points at %s; left unchanged (main is at %s)", tag, existing[tag], commit_oid)
    logger.info("published %s: commit %s, tag %s, new commit: %s", repo_id, commit_oid, tag, created)
    return PublishResult(commit_oid=commit_oid, tag=tag, url=url, created_commit=created)
