"""Start the video endpoint on Ray Serve (POST /v1/videos, GET /v1/videos/{id}[/content], /healthz, /v1/models).

  python launch/serve.py --config configs/serve.toml [section.key=value ...] [--address auto]
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

from engine.errors import UserError
from engine.serving.config import DEFAULT_CONFIG, load_config
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
    a = p.parse_args(argv)
    try:
        cfg = load_config(a.config, a.overrides)
    except UserError as e:
        fail(str(e), "serve")

    import ray
    from ray import serve

    from engine.serving.ray_executor import serve_app

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


def _interrupt(*_):
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
