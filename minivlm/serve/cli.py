"""`minivlm serve MODEL`: the HTTP API and web page of `minivlm.serve.app` on uvicorn.

    minivlm serve runs/demo/model [--host 127.0.0.1] [--port 8000] [--backend auto|torch|onnx]
                  [--max-batch 8] [--max-wait-ms 10] [--api-key KEY] [--index DIR] [...every ServeConfig field]

It binds to loopback unless told otherwise: the API has no per-user accounts, only the optional shared
key. The model loads after the port is open (/health answers "loading" until it is ready); if it cannot
load, the server stops and the command exits 1 with the reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing

from minivlm.errors import MiniVLMError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from minivlm.inference import add_backend_arguments
    from minivlm.serve.config import ServeConfig

    parser.add_argument("model", help="model folder (MiniVLM.save_pretrained / the demo's model/)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port)")
    parser.add_argument("--index", default=None, help="image folder indexed at start for /v1/retrieve")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_backend_arguments(parser)
    hints = typing.get_type_hints(ServeConfig)
    for f in dataclasses.fields(ServeConfig):  # one flag per field: --max-batch, --max-wait-ms, ...
        kind = str if f.name in ("api_key", "model_name") else hints[f.name]
        parser.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default,
                            help=f"{f.metadata['help']} (default: {f.default})")


def run(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    import uvicorn

    from minivlm.backend import choose
    from minivlm.serve.app import create_app
    from minivlm.serve.config import ServeConfig

    if not (Path(args.model) / "config.json").is_file():
        raise MiniVLMError(f"{args.model}: not a model folder (config.json not found)")
    choose(args.model, "onnx" if args.int8 or args.int4 or args.bf16 else args.backend, args.device)  # a refused backend fails now
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)}
    values["api_key"] = values["api_key"] or os.environ.get("MINIVLM_API_KEY") or None
    try:
        config = ServeConfig(**values)
    except ValueError as err:
        raise MiniVLMError(str(err)) from None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    failure: list[str] = []
    server: uvicorn.Server | None = None

    def stop(message: str) -> None:  # from the loading thread: shut the server down
        failure.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(args.model, config, backend=args.backend, device=args.device, int8=args.int8,
                     bf16=args.bf16, int4=args.int4, index=args.index, on_load_failure=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown: the normal way to stop
        pass
    if failure:
        raise MiniVLMError(f"the model failed to load: {failure[0]}")
    return 0
