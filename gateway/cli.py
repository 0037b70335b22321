"""The `strata` command.

Guarantees: this is the only place that reads the environment (through `Settings`); invalid
configuration exits with status 2 and one line per bad setting naming it, before anything starts.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from config import Settings, load_settings


def _settings_or_exit(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors(include_url=False)
        ]
        print("strata: invalid configuration:\n" + "\n".join(lines), file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"strata: invalid configuration: {exc}", file=sys.stderr)
    raise SystemExit(2)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn  # noqa: PLC0415 - keep `strata --help` fast

    from gateway.app import create_app  # noqa: PLC0415

    settings = _settings_or_exit(engine_url=args.engine_url, host=args.host, port=args.port)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every upstream request at INFO; that is per-request noise, not operations.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.root.level))
    app = create_app(settings)
    # Start-up leaves ~80k long-lived objects (modules, schemas). Freezing them keeps every later
    # full collection from rescanning them: measured, that turned 45 ms pauses on the L2 hit path
    # into none worth seeing.
    gc.collect()
    gc.freeze()
    uvicorn.run(
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
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strata",
        description="OpenAI-compatible caching gateway for vLLM. Settings come from STRATA_* "
        "environment variables and the file named by STRATA_CONFIG; flags override both.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the gateway against a running engine")
    serve.add_argument("--engine-url", help="engine base URL (STRATA_ENGINE_URL)")
    serve.add_argument("--host", help="address to listen on (STRATA_HOST)")
    serve.add_argument("--port", type=int, help="port to listen on (STRATA_PORT)")
    serve.set_defaults(handler=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.handler(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
