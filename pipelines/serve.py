"""``specvlm serve``: run the OpenAI-compatible endpoint (`actors.serving`) in the foreground.

Reads a Serve config file (``configs/serve.yaml``) or runs the demo model's defaults, reaches Ray by the
rule in `pipelines.ray_cluster` (a private local Ray unless ``--address`` / ``$RAY_ADDRESS``), deploys one
application and waits for SIGINT/SIGTERM. On exit it deletes only the application it deployed; Serve's
controller and proxies stay up on a shared cluster, and a private Ray is stopped with everything in it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading

from .ray_cluster import add_address_flag, init_ray


def main(argv: list[str] | None = None) -> int:
    from actors.serve_config import ServeFile, load_serve_file
    from specvlm.config import ConfigError, config_yaml, parse_config

    ap = argparse.ArgumentParser(prog="specvlm serve", description="OpenAI-compatible endpoint on Ray Serve")
    ap.add_argument("--config", help="a Serve config file (configs/serve.yaml) or a ServeAppConfig YAML; "
                    "default: the demo model")  # fmt: skip
    ap.add_argument("--app", help="application name in a Serve config file with several")
    ap.add_argument("--host", help="HTTP host (default: the file's http_options.host, else 127.0.0.1)")
    ap.add_argument("--port", type=int, help="HTTP port (default: the file's http_options.port, else 8000)")
    ap.add_argument("--print-config", action="store_true",
                    help="print the Serve config file this would run (every default, with --config, --app, --host "
                    "and --port applied) and exit")  # fmt: skip
    add_address_flag(ap)
    args = ap.parse_args(argv)
    try:
        spec = load_serve_file(args.config, args.app) if args.config else ServeFile()
        flags = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
        spec = parse_config({**dict(spec), **flags}, ServeFile, source="command line")
    except ConfigError as e:
        raise SystemExit(str(e)) from None
    if args.print_config:
        print(config_yaml(spec.serve_config()), end="")
        return 0
    from actors.serving import application

    name, prefix, http = spec.name, spec.route_prefix, spec.http_options()
    app = application(spec.app)

    import ray
    from ray import serve

    started = init_ray(args.address)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    deployed = False
    try:
        serve.start(http_options=http)
        serve.run(app, name=name, route_prefix=prefix, blocking=False)
        deployed = True
        base = f"http://{http['host']}:{http['port']}{prefix.rstrip('/')}"
        print(f"specvlm serve: {base}/v1/chat/completions (GET {base}/v1/models, {base}/health); Ctrl+C stops",
              flush=True)  # fmt: skip
        stop.wait()
        print("specvlm serve: shutting down", flush=True)
    finally:
        if started:  # our own Ray: everything in it goes
            serve.shutdown()
            ray.shutdown()
        elif deployed:  # a shared cluster: remove only this application
            serve.delete(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
