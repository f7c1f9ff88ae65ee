"""Start the video endpoint on Ray Serve (POST /v1/videos, GET /v1/videos/{id}[/content], /healthz, /v1/models, the
page at /).

  python launch/serve.py --config configs/serve.toml [section.key=value ...] [--address auto]
  python launch/serve.py --executor local     # one process, no Ray: one worker group of one rank (uvicorn)
  serve run launch.serve:build config=configs/serve.toml [section.key=value ...]
  serve run launch.serve:app          # configs/serve.toml as it is

Overrides use TOML values: serve.queue_size=32 parallel.ulysses=2 model.model=/models/wan-1.3b
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from engine.errors import UserError, one_line
from engine.serving.config import DEFAULT_CONFIG, load_config
from engine.serving.executor import ranks_of
from launch.common import Parser, fail


def build(args: dict):
    """`serve run` application builder: config=PATH plus section.key=value arguments."""
    from engine.serving.ray_executor import serve_app

    args = dict(args)
    path = args.pop("config", DEFAULT_CONFIG)
    return serve_app(load_config(path, [f"{k}={v}" for k, v in args.items()]))


def __getattr__(name: str):
    """`serve run launch.serve:app`: the application from configs/serve.toml, built only when asked for."""
    if name == "app":
        return build({})
    raise AttributeError(name)


def main(argv=None) -> int:
    p = Parser(prog="serve", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="TOML file (default: configs/serve.toml)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. serve.port=8080")
    p.add_argument("--address", help="Ray cluster to join, e.g. auto (default: start a local one)")
    p.add_argument(
        "--executor", default="ray", choices=["ray", "local"], help="ray (default) or local: this process, no Ray"
    )
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
        if a.executor == "local" and (cfg.serve.replicas != 1 or ranks_of(cfg.model) != 1):
            raise UserError("--executor local runs one replica of one rank: use Ray for replicas or parallelism")
    except UserError as e:
        fail(str(e), "serve")
    if a.executor == "local":
        return _serve_local(cfg)

    try:
        import ray
        from ray import serve

        from engine.serving.ray_executor import serve_app
    except Exception as e:  # not installed, or installed against other versions of its dependencies
        fail(
            f"Ray Serve cannot be imported ({one_line(e, 200)}): pip install 'fis-engine[serve]', or --executor local",
            "serve",
        )

    ray.init(address=a.address)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(serve_app(cfg), name="fis", route_prefix="/")
    print(
        f"serving {cfg.model_name} at http://{cfg.serve.host}:{cfg.serve.port}/v1/videos "
        f"(jobs and videos in {cfg.serve.output_dir}); Ctrl-C stops",
        flush=True,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()  # graceful: a running job is reported interrupted at once
    return 0


def _serve_local(cfg) -> int:
    """The same app without Ray: uvicorn over one VideoService with an in-process worker (LocalExecutor)."""
    import uvicorn

    from engine.serving.api import create_app
    from engine.serving.executor import LocalExecutor
    from engine.serving.service import VideoService

    service = VideoService(cfg, lambda: LocalExecutor(cfg.model))
    print(f"serving {cfg.model_name} at http://{cfg.serve.host}:{cfg.serve.port}/ (one process); Ctrl-C stops")
    try:
        uvicorn.run(create_app(service), host=cfg.serve.host, port=cfg.serve.port, log_level="warning")
    finally:
        service.close()
    return 0


def _interrupt(*_):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
