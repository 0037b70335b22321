"""The `strata` command.

Guarantees: this is the only place that reads the environment (through `Settings`); invalid
configuration exits with status 2 and one line per bad setting naming it, before anything starts.
`strata serve` launches vLLM (preparing the default model if needed; `--engines N` launches N
replicas) unless engine URLs are given (several: routed over, see `engine.pool`); a launch that
fails exits non-zero with vLLM's own last words.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from config import Settings, load_settings
from engine.fleet import EngineFleet, parse_cores, replica_specs
from engine.launcher import EngineLaunchError, EngineSupervisor, LaunchSpec, detect_device
from engine.model import (
    DEFAULT_SERVED_NAME,
    ModelError,
    check_model,
    default_model_dir,
    has_vllm,
    looks_like_path,
    prepare_default_model,
)
from engine.plan import KVPlan, PlanError, load_shape, parse_size, render

log = logging.getLogger("strata")


def _fail(message: str, code: int = 2) -> SystemExit:
    print(f"strata: {message}", file=sys.stderr)
    return SystemExit(code)


def _settings_or_exit(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors(include_url=False)
        ]
        raise _fail("invalid configuration:\n" + "\n".join(lines)) from None
    except (OSError, ValueError) as exc:
        raise _fail(f"invalid configuration: {exc}") from None


def _logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every upstream request at INFO; that is per-request noise, not operations.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.root.level))


def _engine_python(settings: Settings) -> str:
    python = settings.engine_python or sys.executable
    if not has_vllm(python):
        raise _fail(
            f"vLLM is not installed for {python}. Install it (pip install 'strata-gateway[cpu]' "
            "or '[gpu]'), point STRATA_ENGINE_PYTHON at an interpreter that has it, or use "
            "--engine-url for an engine that is already running."
        )
    return python


def build_supervisor(settings: Settings) -> EngineSupervisor:
    """Everything needed to launch vLLM: checked now, so a bad setting fails before any start."""
    python = _engine_python(settings)
    model = settings.engine_model
    try:
        if model is None:
            dest = default_model_dir(settings.data_dir)
            log.info("preparing the default model in %s", dest)
            model = str(prepare_default_model(python, dest))
            served = settings.engine_served_model_name or DEFAULT_SERVED_NAME
        else:
            check_model(model)
            served = settings.engine_served_model_name or model
    except ModelError as exc:
        raise _fail(str(exc), 1) from None
    spec = LaunchSpec(
        python=python,
        model=model,
        served_model_name=served,
        device=detect_device(settings.engine_device),
        host=settings.engine_host,
        port=settings.engine_port,
        max_model_len=settings.engine_max_model_len,
        dtype=settings.engine_dtype,
        block_size=settings.engine_block_size,
        gpu_memory_utilization=settings.engine_gpu_memory_utilization,
        cpu_kv_cache_gib=settings.engine_cpu_kv_cache_gib,
        extra_args=tuple(settings.engine_extra_args),
        log_path=settings.data_dir / "logs" / f"vllm-{settings.engine_port}.log",
        # A model path is served as it is; a hub name is the operator's choice to fetch.
        offline=looks_like_path(model),
    )
    return EngineSupervisor(
        spec,
        start_timeout=settings.engine_start_timeout,
        max_backoff=settings.engine_restart_max_backoff,
    )


def build_launcher(settings: Settings) -> EngineSupervisor | EngineFleet:
    """One vLLM, or `engines` of them with their own ports, cores or GPU and KV cache."""
    one = build_supervisor(settings)
    if settings.engines == 1:
        return one
    cores = parse_cores(settings.engine_cpu_cores) if settings.engine_cpu_cores else None
    try:
        specs = replica_specs(one.spec, settings.engines, cores=cores)
    except ValueError as exc:
        raise _fail(f"invalid configuration: engines: {exc}") from None
    for spec in specs:
        where = spec.cpu_cores if spec.device == "cpu" else spec.gpus
        log.info("engine replica on port %d: %s %s", spec.port, spec.device, where)
    return EngineFleet(
        [
            EngineSupervisor(
                spec,
                start_timeout=settings.engine_start_timeout,
                max_backoff=settings.engine_restart_max_backoff,
            )
            for spec in specs
        ]
    )


def _serve(args: argparse.Namespace) -> int:
    import uvicorn  # noqa: PLC0415 - keep `strata --help` fast

    from gateway.app import create_app  # noqa: PLC0415

    urls: list[str] = args.engine_url or []
    settings = _settings_or_exit(
        engine_url=urls[0] if len(urls) == 1 else None,
        engine_urls=urls if len(urls) > 1 else None,
        engines=args.engines,
        host=args.host,
        port=args.port,
    )
    _logging(settings)
    launcher = build_launcher(settings) if settings.launches_engine else None
    app = create_app(settings, launcher=launcher)
    # Start-up leaves ~80k long-lived objects (modules, schemas). Freezing them keeps every later
    # full collection from rescanning them: measured, that turned 45 ms pauses on the L2 hit path
    # into none worth seeing.
    gc.collect()
    gc.freeze()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level=settings.log_level,
        server_header=False,
        timeout_graceful_shutdown=30,
    )
    server = uvicorn.Server(config)
    server.run()
    # uvicorn returns normally when start-up failed (e.g. vLLM would not start): say so.
    return 0 if server.started else 1


def _prepare_model(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    _logging(settings)
    python = _engine_python(settings)
    dest = args.dest or default_model_dir(settings.data_dir)
    try:
        prepare_default_model(python, dest, force=args.force)
    except ModelError as exc:
        raise _fail(str(exc), 1) from None
    print(dest)
    return 0


def _plan(args: argparse.Namespace) -> int:
    try:
        shape = load_shape(args.model)
        plan = KVPlan(
            shape=shape,
            kv_dtype=args.kv_dtype or shape.dtype,
            memory_bytes=parse_size(args.memory),
            block_size=args.block_size,
            max_len=args.max_len or shape.max_position or 4096,
        )
        print(render(plan))
    except PlanError as exc:
        raise _fail(str(exc), 1) from None
    return 0


def _engine_serve(args: argparse.Namespace) -> int:
    settings = _settings_or_exit()
    _logging(settings)
    launcher = build_launcher(settings)
    first = launcher.supervisors[0] if isinstance(launcher, EngineFleet) else launcher
    urls = launcher.urls if isinstance(launcher, EngineFleet) else [launcher.url]

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await launcher.start()
        except EngineLaunchError as exc:
            print(f"strata: {exc}", file=sys.stderr)
            await launcher.stop()
            return 1
        print(f"vLLM serving {first.spec.served_model_name} on {', '.join(urls)}", flush=True)
        await stop.wait()
        await launcher.stop()
        return 0

    return asyncio.run(run())


def _semantic_eval(args: argparse.Namespace) -> int:
    try:
        from caches.embedder import SentenceTransformerEmbedder  # noqa: PLC0415
        from caches.semantic_eval import evaluate  # noqa: PLC0415
        from caches.verifier import Verifier  # noqa: PLC0415

        embedder = SentenceTransformerEmbedder(args.model, dtype=args.dtype)
    except (ImportError, RuntimeError) as exc:
        raise _fail(f"the semantic cache needs its packages: {exc}", 1) from None
    if not args.pairs.is_file():
        raise _fail(f"{args.pairs}: no such file", 1)
    report = evaluate(
        args.pairs,
        embed=embedder.embed_many,
        verifier=None if args.no_verifier else Verifier.default(),
        threshold=args.threshold,
    )
    print(report.render())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strata",
        description="OpenAI-compatible caching gateway for vLLM. Settings come from STRATA_* "
        "environment variables and the file named by STRATA_CONFIG; flags override both.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the gateway; launches vLLM unless --engine-url is given"
    )
    serve.add_argument(
        "--engine-url",
        action="append",
        help="use this running engine (STRATA_ENGINE_URL); repeat it for several replicas of "
        "one engine, routed over by prefix (STRATA_ENGINE_URLS)",
    )
    serve.add_argument(
        "--engines",
        type=_positive_int,
        help="launch this many vLLM replicas on consecutive ports, each with its own cores or "
        "GPU and KV cache (STRATA_ENGINES; default 1)",
    )
    serve.add_argument("--host", help="address to listen on (STRATA_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (STRATA_PORT)")
    serve.set_defaults(handler=_serve)

    engine = commands.add_parser("engine", help="the colocated vLLM engine")
    engine_commands = engine.add_subparsers(dest="engine_command", required=True, metavar="ACTION")
    prepare = engine_commands.add_parser(
        "prepare-model", help="prepare the default model (SmolLM2-135M-Instruct) for vLLM"
    )
    prepare.add_argument("--dest", type=Path, help="folder (default: in STRATA_DATA_DIR)")
    prepare.add_argument("--force", action="store_true", help="rebuild even if it verifies")
    prepare.set_defaults(handler=_prepare_model)
    plan = engine_commands.add_parser("plan", help="KV-cache capacity for a model and memory")
    plan.add_argument("--model", required=True, help="model folder, config.json, or HF name")
    plan.add_argument("--memory", required=True, help="memory for the KV cache, e.g. 80GiB")
    plan.add_argument("--max-len", type=int, help="sequence length to count (default: model max)")
    plan.add_argument("--block-size", type=int, default=16, help="KV block size in tokens")
    plan.add_argument("--kv-dtype", help="KV element type (default: the model's dtype)")
    plan.set_defaults(handler=_plan)
    engine_serve = engine_commands.add_parser(
        "serve", help="run only vLLM (STRATA_ENGINES replicas of it), as `serve` would"
    )
    engine_serve.set_defaults(handler=_engine_serve)

    semantic = commands.add_parser("semantic", help="the semantic cache (L3)")
    semantic_commands = semantic.add_subparsers(dest="semantic_command", required=True,
                                                metavar="ACTION")  # fmt: skip
    evaluate = semantic_commands.add_parser(
        "eval", help='precision / recall / false hits on pairs {"a", "b", "duplicate"}'
    )
    evaluate.add_argument("pairs", type=Path, help="JSON lines; a is cached, b is the query")
    evaluate.add_argument("--threshold", type=float, help="override the operating point")
    evaluate.add_argument("--no-verifier", action="store_true", help="cosine similarity alone")
    evaluate.add_argument("--model", help="sentence-transformers folder (default: MiniLM-L6)")
    evaluate.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="the embedding model's arithmetic, as STRATA_SEMANTIC_EMBED_DTYPE (default: auto)",
    )
    evaluate.set_defaults(handler=_semantic_eval)

    _cache_parser(commands)

    warm = commands.add_parser(
        "warm", help="fill a running gateway's cache from a JSON-lines file (see gateway.warm)"
    )
    warm.add_argument(
        "file", type=Path, help='one request, or {"request": ..., "response": ...}, per line'
    )
    warm.add_argument(
        "--concurrency", type=_positive_int, default=8, help="requests in flight (default 8)"
    )
    warm.add_argument(
        "--timeout", type=float, default=120.0, help="seconds per request (default 120)"
    )
    warm.add_argument("--dry-run", action="store_true", help="check the file, send nothing")
    _remote_flags(warm)
    warm.add_argument("--api-key", help="tenant API key (STRATA_API_KEY; prefer the variable)")
    warm.set_defaults(handler=_warm)
    return parser


def _cache_parser(commands: Any) -> None:
    """`strata cache stats | invalidate | forget`: a running gateway's caches, by its admin API."""
    cache = commands.add_parser("cache", help="a running gateway's caches (admin API)")
    cache_commands = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    stats = cache_commands.add_parser(
        "stats", help="per layer: entries, bytes, hits, misses, errors, hit ratio, tokens saved"
    )
    stats.add_argument("--json", action="store_true", help="print the admin API's JSON as it is")
    _remote_flags(stats)
    stats.set_defaults(handler=_cache_stats)
    invalidate = cache_commands.add_parser(
        "invalidate",
        help="stop serving every entry of a tenant, a model, a namespace, or all of them "
        "(every replica, at once)",
    )
    which = invalidate.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="every entry (keeps the storage)")
    which.add_argument("--tenant", help="every entry of this tenant")
    which.add_argument("--model", help="every entry for this model (as requests name it)")
    which.add_argument("--namespace", help="every entry filed under this X-Strata-Namespace")
    _remote_flags(invalidate)
    invalidate.set_defaults(handler=_cache_invalidate)
    forget = cache_commands.add_parser(
        "forget", help="remove a bad answer, and in L3 every entry that would serve it again"
    )
    forget.add_argument("request", type=Path, help="the request body (JSON file, - for stdin)")
    forget.add_argument("--route", choices=("chat", "completions"), help="default: from the body")
    forget.add_argument("--namespace", help="the request's X-Strata-Namespace, if it had one")
    _remote_flags(forget)
    forget.add_argument("--api-key", help="the tenant's API key (STRATA_API_KEY)")
    forget.set_defaults(handler=_cache_forget)


def _remote_flags(parser: argparse.ArgumentParser) -> None:
    """Where the gateway is and how to be let in (see `gateway.remote`)."""
    parser.add_argument("--url", help="the gateway (STRATA_URL; default http://127.0.0.1:8080)")
    parser.add_argument("--admin-key", help="admin key (STRATA_ADMIN_KEY; prefer the variable)")


def _cache_stats(args: argparse.Namespace) -> int:
    from gateway.remote import RemoteError, Target, admin_call  # noqa: PLC0415 - fast --help
    from gateway.stats_table import render  # noqa: PLC0415

    try:
        stats = admin_call(Target.resolve(args.url, args.admin_key), "GET", "/admin/cache/stats")
        print(json.dumps(stats, indent=2) if args.json else render(stats))
    except (RemoteError, ValueError) as exc:
        raise _fail(str(exc), 1) from None
    return 0


def _cache_invalidate(args: argparse.Namespace) -> int:
    from gateway.remote import RemoteError, Target, admin_call  # noqa: PLC0415

    scope, value = "all", None
    for name in ("tenant", "model", "namespace"):
        if getattr(args, name):
            scope, value = name, getattr(args, name)
    body = {"scope": scope} if value is None else {"scope": scope, "value": value}
    try:
        answer = admin_call(
            Target.resolve(args.url, args.admin_key), "POST", "/admin/cache/invalidate", body=body
        )
    except RemoteError as exc:
        raise _fail(str(exc), 1) from None
    what = "every entry" if scope == "all" else f"{scope} {value!r}"
    print(f"invalidated {what}: generation {answer['generation']}, on every replica")
    return 0


def _cache_forget(args: argparse.Namespace) -> int:
    from gateway.remote import RemoteError, Target, admin_call  # noqa: PLC0415

    try:
        text = sys.stdin.read() if str(args.request) == "-" else args.request.read_text("utf-8")
        request = json.loads(text)
    except (OSError, ValueError) as exc:
        raise _fail(f"{args.request}: {exc}") from None
    body: dict[str, object] = {"request": request}
    if args.route:
        body["route"] = args.route
    target = Target.resolve(args.url, args.admin_key, args.api_key)
    headers = {"x-strata-namespace": args.namespace} if args.namespace else None
    try:
        answer = admin_call(target, "POST", "/admin/cache/forget", body=body, headers=headers)
    except RemoteError as exc:
        raise _fail(str(exc), 1) from None
    print(
        f"forgot entry {answer['key'][:16]}: removed from {answer['layers']} layer(s), "
        f"{answer['semantic']} semantic entr{'y' if answer['semantic'] == 1 else 'ies'}"
    )
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1024:
        raise argparse.ArgumentTypeError("must be between 1 and 1024")
    return value


def _warm(args: argparse.Namespace) -> int:
    from gateway.remote import Target  # noqa: PLC0415 - keep `strata --help` fast
    from gateway.warm import run  # noqa: PLC0415

    if not args.file.is_file():
        raise _fail(f"{args.file}: no such file")
    target = Target.resolve(args.url, args.admin_key, args.api_key)
    return run(
        args.file, target, concurrency=args.concurrency, timeout=args.timeout, dry_run=args.dry_run
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
