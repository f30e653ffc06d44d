"""`rlhf`: the command-line front door.

    rlhf run [--verbose]       run the pipeline as the Prefect flow `rlhf-lifecycle` (DVC decides what reruns): per
                               stage a start line, a progress bar and a summary; each stage's whole output in
                               .rlhf/logs/STAGE.log (--verbose: here too, with Prefect's own log lines)
    rlhf repro                 the same without Prefect: plain `dvc repro`
    rlhf stage NAME            reproduce one stage and its out-of-date upstream stages (`dvc repro NAME`)
    rlhf status                out-of-date stages (`dvc status`)
    rlhf serve --cron EXPR     serve the scheduled retraining deployment `rlhf-retrain` [--gc-cache: `dvc gc
                               --workspace` after each retrain; --label-batches N]
    rlhf label                 label pending pairs in the Prefect UI (flow `rlhf-human-labels`)
    rlhf verify [--repair]     hash every DVC cache object dvc.lock names again; name the corrupted or missing ones
                               (--repair: restore each from its workspace file, or remove it so `rlhf run` rebuilds)
    rlhf publish --repo-id ORG/NAME [--public] [--force] [--metric M --min-value V]
                               upload models/release to the Hub (HF_TOKEN, HF_ENDPOINT) if metrics/evaluate.json
                               passes the gate and its files still match dvc.lock; tagged run-<release md5 in
                               dvc.lock>; a second publish is a no-op

One run per workspace: `run`, `repro`, `stage` and `publish` hold the lock .rlhf/lifecycle.lock (pipeline/lock.py);
while another run holds it they refuse at once, naming its pid, or wait with --wait-for-lock SECONDS.

Prefect: with PREFECT_API_URL set the runs go to that server (start one with `prefect server start`, UI at
http://127.0.0.1:4200); otherwise a temporary local server is started for the run. A server that does not answer
ends `rlhf run` with one line and exit code 75: before any stage, or once the stage it was running has ended (the
stage runs on without it: flows/stages.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.lock import WorkspaceBusy, workspace_lock
from pipeline.workspace import dvc, heal_dvc_rwlock, stage_names


def prefect_defaults(verbose: bool = False) -> None:
    """Offline-friendly Prefect settings (no telemetry lookups); explicit user settings win.

    Without ``verbose`` Prefect's console handler shows only critical records: the console belongs to flows/console.py
    (start, progress, summary and failure lines) while every log line still reaches the Prefect UI.
    """
    if verbose:
        os.environ["RLHF_VERBOSE"] = "1"  # the stages keep their libraries' progress bars, the console draws no bar
    else:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")  # the client side of the same (Prefect prints a notice in a terminal)
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    # Prefect gives its temporary server 20 s to start; on a busy 2-core machine it took longer and the run failed
    # before any stage ("Timed out while attempting to connect to ephemeral Prefect API server")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    # Prefect's client retries a failed request 5 times, waiting 2, 4, … 32 s: ≈ 1 min per call, and a run whose server
    # died makes several such calls before it ends. 3 retries (≈ 20 s in all) still ride out a restart of the server
    # (9-13 s measured on 2 busy cores)
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "3")


def publish_command(args: argparse.Namespace) -> int:
    """`rlhf publish`: the token comes from HF_TOKEN only and is never echoed."""
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_DISABLE_XET", "1")  # before huggingface_hub is imported: classic LFS upload
    import json
    import logging

    from pipeline.hub import GateFailed, ReleaseMismatch, publish_release, verify_release

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:  # before the gate and before any network: never upload a release that is not the one DVC recorded
        logging.getLogger("pipeline.hub").info(
            "release %s: %s", args.release_dir, verify_release(Path(args.release_dir))
        )
    except ReleaseMismatch as mismatch:
        print(f"error: {mismatch}", file=sys.stderr)
        return 2
    metrics_path = Path("metrics/evaluate.json")
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    token = os.environ.get("HF_TOKEN") or None
    try:
        result = publish_release(
            args.release_dir,
            args.repo_id,
            token=token,
            private=not args.public,
            gate_metrics=metrics,
            gate=(args.metric, args.min_value),
            force=args.force,
        )
    except GateFailed as failure:
        print(f"not published: {failure} (use --force to publish anyway)", file=sys.stderr)
        return 2
    state = "new commit" if result.created_commit else "unchanged, no new commit"
    print(f"published {result.url} @ {result.commit_oid} tag {result.tag} ({state})")
    return 0


def verify_command(repair_objects: bool) -> int:
    """`rlhf verify`: exit 1 when a corrupted cache object is left (none after --repair)."""
    from pipeline.cache import repair, verify_cache

    checked, problems = verify_cache(".")
    corrupted = [problem for problem in problems if problem.corrupted]
    for problem in problems:
        entry, where = problem.entry, problem.object_path.relative_to(Path.cwd())
        if not problem.corrupted:
            print(f"verify: {entry.path} (stage {entry.stage}) is not in the cache ({where}): `dvc pull` or a rerun")
        elif repair_objects:
            print(f"repaired: {repair('.', problem)}")
        else:
            print(
                f"error: {entry.path} (stage {entry.stage}): its cache object {where} is corrupted (its bytes hash to "
                f"{problem.found_md5}, dvc.lock says {entry.md5}); run `rlhf verify --repair`",
                file=sys.stderr,
            )
    stages = len({entry.stage for entry in checked})
    print(
        f"verify: {len({entry.md5 for entry in checked})} cache objects of {stages} stages hashed again: "
        f"{len(corrupted)} corrupted{' (repaired)' if corrupted and repair_objects else ''}, "
        f"{len(problems) - len(corrupted)} missing"
    )
    return 1 if corrupted and not repair_objects else 0


def healed_dvc(*args: str) -> int:
    """`dvc ARGS`, after removing a DVC lock record a full disk cut off (it would stop every DVC command)."""
    healed = heal_dvc_rwlock(".")
    if healed:
        print(f"rlhf: {healed}", file=sys.stderr)
    return dvc(*args)


def add_lock_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait-for-lock",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="if another run holds this workspace (.rlhf/lifecycle.lock), wait up to SECONDS for it "
        "instead of refusing at once",
    )


def locked(command: Callable[[], int], wait_s: float, what: str) -> int:
    """Run ``command`` holding the workspace lock; exit 2 with one ``error:`` line if another run holds it."""
    try:
        with workspace_lock(".", wait_s, what):
            return command()
    except WorkspaceBusy as busy:
        print(f"error: {busy}", file=sys.stderr, flush=True)
        return 2


EX_TEMPFAIL = 75  # sysexits.h: a temporary failure (here: the Prefect API), to be retried later


def run_lifecycle(stage_timeout_s: float | None) -> int:
    import time

    from flows.console import console, duration
    from flows.lifecycle import lifecycle
    from flows.stages import api_loss, unreachable_api

    unreachable = unreachable_api()
    if unreachable:
        console().line(f"rlhf run: {unreachable}")
        return EX_TEMPFAIL
    started = time.monotonic()
    try:
        state = lifecycle(repo_dir=".", stage_timeout_s=stage_timeout_s, return_state=True)
    except Exception as error:  # the engine raises when it cannot record a state: the API is gone
        lost = api_loss(error)
        if lost is None:
            raise
        console().line(f"rlhf run: FAILED after {duration(time.monotonic() - started)}: {lost}")
        return EX_TEMPFAIL
    took = duration(time.monotonic() - started)
    if state.is_completed():
        console().line(f"rlhf run: done in {took}. {run_summary(state.result())}")
        return 0
    console().line(
        f"rlhf run: FAILED after {took} ({state.message or state.name}). Fix the cause and run `rlhf run` again: "
        "finished stages are skipped and ppo resumes from its last checkpoint."
    )
    return 1


def run_summary(results: dict[str, dict]) -> str:
    """What a finished run produced: the evaluation's key results and where the release is."""
    from flows.artifacts import stage_summary

    evaluation = results.get("evaluate", {}).get("metrics", {})
    text = f"Policy vs SFT: {stage_summary('evaluate', evaluation)}. " if evaluation else ""
    return text + "Metrics: `dvc metrics show`; curves: `dvc plots show`; release: models/release."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rlhf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pipeline as a Prefect flow")
    run.add_argument("--stage-timeout", type=float, default=None, help="seconds before a stage's task times out")
    run.add_argument("--verbose", action="store_true", help="also show each stage's own output and Prefect's log lines")
    add_lock_option(run)
    add_lock_option(commands.add_parser("repro", help="run the pipeline with plain dvc repro"))
    stage = commands.add_parser("stage", help="reproduce one stage (and its out-of-date upstream stages)")
    stage.add_argument("name", choices=stage_names(".") or None)  # the stages of ./dvc.yaml
    add_lock_option(stage)
    commands.add_parser("status", help="show out-of-date stages")
    serve = commands.add_parser("serve", help="serve the scheduled retraining deployment")
    serve.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * *"')
    serve.add_argument("--metric", default="gold_win_rate", help="evaluation metric the gate compares")
    serve.add_argument("--margin", type=float, default=0.0, help="how much better a new model must be to be promoted")
    serve.add_argument(
        "--publish-repo-id", default="", help="publish each promoted release to this Hub repo (HF_TOKEN)"
    )
    serve.add_argument(
        "--label-batches", type=int, default=1, help="human labels: batches each run pauses for (0: from `rlhf label`)"
    )
    serve.add_argument(
        "--gc-cache", action="store_true", help="`dvc gc --workspace` after each retrain: a bounded DVC cache"
    )
    add_lock_option(serve)  # each scheduled run waits this long for a run already in progress
    label = commands.add_parser("label", help="collect human preference labels through the Prefect UI")
    label.add_argument("--batch-size", type=int, default=8)
    label.add_argument("--batches", type=int, default=1)
    publish = commands.add_parser("publish", help="upload models/release to the Hugging Face Hub, gated on evaluation")
    publish.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub (or the HF_ENDPOINT deployment)")
    publish.add_argument("--public", action="store_true", help="create the repository public (default: private)")
    publish.add_argument("--force", action="store_true", help="publish even if the evaluation gate fails")
    publish.add_argument("--metric", default="gold_win_rate", help="metrics/evaluate.json key the gate checks")
    publish.add_argument("--min-value", type=float, default=0.5, help="the gate: metric must be at least this")
    publish.add_argument("--release-dir", default="models/release")
    add_lock_option(publish)  # a run in progress may be rewriting models/release
    verify = commands.add_parser("verify", help="check the DVC cache objects of dvc.lock against their MD5")
    verify.add_argument("--repair", action="store_true", help="restore or remove the corrupted objects")
    add_lock_option(verify)  # a run in progress writes the cache
    args = parser.parse_args(argv)
    if args.command == "publish":
        return locked(lambda: publish_command(args), args.wait_for_lock, "rlhf publish")
    if args.command == "repro":
        return locked(lambda: healed_dvc("repro"), args.wait_for_lock, "rlhf repro")
    if args.command == "stage":
        return locked(lambda: healed_dvc("repro", args.name), args.wait_for_lock, f"rlhf stage {args.name}")
    if args.command == "verify":
        return locked(lambda: verify_command(args.repair), args.wait_for_lock, "rlhf verify")
    if args.command == "status":
        return dvc("status")
    prefect_defaults(verbose=getattr(args, "verbose", False))
    if args.command == "run":
        # the lock is taken here, before a temporary Prefect server starts; the flow takes it again (re-entrant)
        return locked(lambda: run_lifecycle(args.stage_timeout), args.wait_for_lock, "rlhf run (rlhf-lifecycle flow)")
    if args.command == "serve":
        from flows.retrain import serve as serve_retrain

        serve_retrain(
            args.cron,
            ".",
            args.metric,
            args.margin,
            args.publish_repo_id,
            args.wait_for_lock,
            label_batches=args.label_batches,
            gc_cache=args.gc_cache,
        )
        return 0
    from flows.labeling import collect_human_labels

    state = collect_human_labels(repo_dir=".", batch_size=args.batch_size, n_batches=args.batches, return_state=True)
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
