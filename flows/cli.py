"""Command line: ``distillery run|stage|repair-cache|serve|registry`` for runs outside the Prefect UI."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

from distill_core.config import RunConfig, load_config
from distill_core import errors
from distill_core.errors import ConfigError, DistilleryError
from distill_core.storage import Storage


def format_report(result: dict) -> str:
    """The registered student's location and its metrics beside the teacher's and the baseline's."""
    reg, metrics = result["registered"], result["metrics"]
    cols = ["val_ppl", "top1_agreement", "kl_to_teacher", "ece", "params", "cpu_tokens_per_s"]
    lines = [
        f"run {result['run_id']}: registered {reg['name']} v{reg['version']}"
        f"{' (champion)' if reg['champion'] else ''} at {reg['url']}",
        "",
        f"{'model':<10}" + "".join(f"{c:>18}" for c in cols),
    ]
    for name, m in metrics.items():
        cells = "".join(f"{_fmt(m.get(c)):>18}" for c in cols)
        lines.append(f"{name:<10}{cells}")
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return f"{v:,}" if isinstance(v, int) else str(v)


class QuietRefusals(logging.Filter):
    """Keeps Prefect's console logs of a refusal (a :class:`DistilleryError`) off the terminal.

    Prefect logs a failing task's and each enclosing flow's exception, with a traceback, before the
    CLI prints the refusal once as ``error: ...``. Records with a DistilleryError attached, and
    Prefect's "Finished in state Failed(...)" lines that quote one, are dropped from the console
    handler only: the Prefect API (the UI's logs) still gets them in full. Other errors keep theirs."""

    NAMES = tuple(sorted({cls.__name__ for cls in vars(errors).values()
                          if isinstance(cls, type) and issubclass(cls, DistilleryError)}))

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], DistilleryError):
            return False
        message = record.getMessage()
        return not any(f"{name}: " in message or f"{name}(" in message for name in self.NAMES)


def quiet_refusals() -> None:
    """Install :class:`QuietRefusals` on Prefect's console handlers (on the root logger once Prefect is imported)."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler) and not any(isinstance(f, QuietRefusals) for f in handler.filters):
            handler.addFilter(QuietRefusals())


REFRESH_HELP = (
    "ignore Prefect's task cache (e.g. after deleting part of the storage root); finished artifacts "
    "are still found by content and not recomputed"
)


# Prefect stops its temporary server at exit (atexit), which a process killed with SIGKILL never
# reaches. This watchdog blocks on a pipe that only the CLI process can write: end of file means the
# CLI is gone, however it ended, and the watchdog stops the server (SIGTERM, then SIGKILL after 5 s).
_WATCHDOG = """
import os, signal, sys, time
sys.stdin.buffer.read()
pid = int(sys.argv[1])
for sig in (signal.SIGTERM, signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        break
    for _ in range(50):
        time.sleep(0.1)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            sys.exit(0)
"""
_watchdogs: list[tuple[subprocess.Popen, int]] = []  # (watchdog, write end of its pipe), for the life of this process


STARTUP_TIMEOUT_S = 120


def server_ends_with_this_process() -> int | None:
    """When no Prefect API is configured, start Prefect's temporary server now (Prefect would on first
    use) with a watchdog that stops it when this process ends, even by SIGKILL; returns its pid.

    None when an API URL is set (a server this process does not own), ephemeral mode is off, or
    the system is not POSIX."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value() or os.name != "posix":
        return None
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's clients use when no API URL is set
    # Prefect's 20 s default is too short on a busy 2-core machine; a setting the user gives wins.
    set_by_user = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in os.environ
    server.start(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value() if set_by_user else STARTUP_TIMEOUT_S)
    pid = server.server_process.pid
    read, write = os.pipe()  # close-on-exec (PEP 446): programs this process starts do not hold `write`
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(pid)], stdin=read, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)  # own session: Ctrl-C does not reach it
    os.close(read)
    _watchdogs.append((watchdog, write))
    return pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distillery", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the nightly flow end to end")
    run.add_argument("config", help="YAML run config (see deployments/)")
    run.add_argument("--run-id", default=None)
    run.add_argument("--refresh-cache", action="store_true", help=REFRESH_HELP)
    stage = sub.add_parser("stage", help="run one stage on an existing run id")
    stage.add_argument("name", choices=["prepare_data", "cache_topk", "cache_samples", "cache_beams", "sample_round", "train_round",
                                        "train_student", "evaluate", "register"])
    stage.add_argument("config")
    stage.add_argument("--run-id", required=True)
    stage.add_argument("--refresh-cache", action="store_true", help=REFRESH_HELP)
    stage.add_argument("--round", type=int, default=None, help="sample_round / train_round: the on-policy round (1..train.rounds)")
    fidelity = sub.add_parser("fidelity", help="before a long capture: each top-k strategy's fidelity and projected size")
    fidelity.add_argument("config")
    fidelity.add_argument("--run-id", required=True)
    fidelity.add_argument("--sequences", type=int, default=16, help="train sequences sampled (default 16)")
    repair = sub.add_parser("repair-cache", help="recompute the damaged data and teacher-cache shards of a run")
    repair.add_argument("config")
    repair.add_argument("--run-id", required=True)
    serve = sub.add_parser("serve", help="serve the nightly and stage deployments (with schedules) from this process")
    serve.add_argument("--config", default=None, help="run config for the deployments' parameters (default deployments/demo.yaml)")
    serve.add_argument("--limit", type=int, default=1, help="flow runs at once (default 1)")
    reg = sub.add_parser("registry", help="list or show registered models")
    reg.add_argument("action", choices=["list", "show"])
    reg.add_argument("name", nargs="?")
    reg.add_argument("version", nargs="?", default="champion", help="version number or alias (default champion)")
    reg.add_argument("--root", default=None, help="storage root (default: ./runs, or the config's)")
    reg.add_argument("--config", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if getattr(args, "refresh_cache", False):
        os.environ["PREFECT_TASKS_REFRESH_CACHE"] = "true"  # read when Prefect is imported, below
    try:
        if args.command in ("run", "stage", "repair-cache"):
            quiet_refusals()
        if args.command == "run":
            from flows.nightly import nightly
            from flows.runners import configured

            config = load_config(args.config)
            server_ends_with_this_process()
            print(format_report(configured(nightly, config)(config, run_id=args.run_id)))
        elif args.command == "stage":
            from flows.runners import configured
            from flows.stages import STAGES

            config = load_config(args.config)
            rounds = args.name in ("sample_round", "train_round")
            if rounds != (args.round is not None):
                raise ConfigError(f"--round goes with the stages sample_round and train_round only; {args.name} "
                                  f"{'needs it' if rounds else 'takes none'}.")
            server_ends_with_this_process()
            out = configured(STAGES[args.name], config)(run_id=args.run_id, config=config, **({"round": args.round} if rounds else {}))
            print(json.dumps(out, indent=2, default=str))
        elif args.command == "fidelity":
            from flows.stages import topk_fidelity_flow

            config = load_config(args.config)
            print(json.dumps(topk_fidelity_flow(args.run_id, config, args.sequences), indent=2, default=str))
        elif args.command == "repair-cache":
            from flows.runners import configured
            from flows.stages import STAGES

            config = load_config(args.config)
            server_ends_with_this_process()
            out = {kind: configured(STAGES[f"cache_{kind}"], config)(run_id=args.run_id, config=config, recompute_damaged=True)
                   for kind in config.train.caches()}
            print(json.dumps(out, indent=2, default=str))
        elif args.command == "serve":
            from flows.serve import DEFAULT_CONFIG, serve

            server_ends_with_this_process()
            serve(args.config or DEFAULT_CONFIG, limit=args.limit)
        else:
            print(_registry(args))
    except DistilleryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _registry(args) -> str:
    from distill_core import registry

    cfg = load_config(args.config).storage if args.config else RunConfig().storage
    storage = Storage(args.root or cfg.root, cfg.options)
    if args.action == "list":
        if args.name:
            return json.dumps(registry.list_versions(storage, args.name), indent=2)
        return "\n".join(registry.list_models(storage)) or "(no models registered)"
    if not args.name:
        raise SystemExit("registry show needs a model name")
    return json.dumps(registry.get_version(storage, args.name, args.version), indent=2, default=str)


if __name__ == "__main__":
    sys.exit(main())
