"""`frontier-jax serve`: the OpenAI-compatible server over a training run's checkpoint or an
imported Hugging Face model.

    frontier-jax serve (--checkpoint RUN_DIR[/checkpoints/STEP] | --hf PATH) [--host 127.0.0.1]
        [--port 8000] [--served-model-name NAME] [--api-key KEY] [--dtype float32|bfloat16]
        [--chat-template PATH] [--distributed] [mesh.key=value ...] [infer.key=value ...]
        [impl.key=value ...] [serve.key=value ...]

The address is bound before the model loads (a port in use is one `error:` line, exit 2;
--port 0 takes a free one, printed).  SIGTERM (or SIGINT) stops admitting requests (503), lets
the running ones finish for serve.drain_timeout_s seconds, cancels the rest and exits 0 (SIGINT:
130).  Chats are rendered with --chat-template (a tokenizer directory or its
tokenizer_config.json), else the --hf directory's template, else the project's chat format.

mesh.* overrides (or --distributed) lay the model out on a mesh of all devices (mesh.data=-1 by
default: every device splits the batch).  --distributed joins the processes first
(`jax.distributed.initialize`, as train and eval): process 0 binds the address and serves HTTP,
the others follow its engine steps (`replicate.py`) and stop when it stops; signal process 0.
"""

from __future__ import annotations

import argparse
import signal
import socket
import sys
from pathlib import Path


def add_serve_parser(sub) -> None:
    serve = sub.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server over --checkpoint RUN_DIR or --hf PATH",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = serve.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="training run directory (latest step) or one checkpoints/STEP")
    source.add_argument("--hf", help="Hugging Face DeepseekV3 checkpoint directory")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port (0: a free one, printed)")
    serve.add_argument(
        "--served-model-name", default=None, help="the model name clients send (default: the path's name)"
    )
    serve.add_argument(
        "--api-key", default=None, help="require 'Authorization: Bearer KEY' (all but /health)"
    )
    serve.add_argument("--dtype", default=None, help="float32 or bfloat16 compute (default as generate)")
    serve.add_argument("--chat-template", default=None, help="tokenizer directory or tokenizer_config.json")
    serve.add_argument(
        "--distributed",
        action="store_true",
        help="multi-process: jax.distributed.initialize() first; process 0 serves, the others follow it",
    )
    serve.add_argument(
        "overrides",
        nargs="*",
        help="mesh.*, infer.*, impl.* and serve.* overrides, e.g. infer.max_seqs=16 serve.max_waiting=64",
    )
    serve.set_defaults(func=serve_command)


def section_config(overrides: list[str], section: str, cls, fields_in: str):
    """The `section.key=value` overrides -> a validated `cls` (ValueError naming the override and
    `fields_in`, the file that lists the fields)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    prefix = f"{section}."
    given = [o[len(prefix) :] for o in overrides if o.startswith(prefix)]
    try:
        merged = OmegaConf.merge(OmegaConf.structured(cls), OmegaConf.from_dotlist(given))
        return OmegaConf.to_object(merged).validate()
    except OmegaConfBaseException as err:
        raise ValueError(
            f"invalid override {prefix}{str(err).splitlines()[0]} (fields: {fields_in})"
        ) from err


def serve_config(overrides: list[str]):
    """serve.key=value overrides -> a validated ServeConfig."""
    from frontier_jax.serve.config import ServeConfig

    return section_config(overrides, "serve", ServeConfig, "frontier_jax/serve/config.py")


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (ValueError naming the address when it cannot be had)."""
    if not 0 <= port < 65536:
        raise ValueError(f"--port {port}: must be in [0, 65535]")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as err:
        raise ValueError(
            f"cannot listen on {host}:{port} ({err.strerror}): choose another --port or --host"
        ) from err
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def mesh_config(overrides: list[str]):
    """mesh.key=value overrides -> a validated MeshConfig."""
    from frontier_jax.parallel.config import MeshConfig

    return section_config(overrides, "mesh", MeshConfig, "frontier_jax/parallel/config.py")


def serve_command(args) -> int:
    if args.distributed:
        from frontier_jax.parallel.host import initialize_distributed

        initialize_distributed()
    import jax

    from frontier_jax.data.template import ChatTemplate
    from frontier_jax.infer import Engine
    from frontier_jax.infer.cli import _check_dtype, _impl_overrides, _infer_overrides
    from frontier_jax.parallel.mesh import build_mesh
    from frontier_jax.serve.app import Server
    from frontier_jax.serve.replicate import Leader

    config = serve_config(args.overrides)
    on_mesh = args.distributed or any(o.startswith("mesh.") for o in args.overrides)
    mesh = build_mesh(mesh_config(args.overrides)) if on_mesh else None
    others = [o for o in args.overrides if not o.startswith(("serve.", "mesh."))]
    infer, impl = _infer_overrides(others), _impl_overrides(others)
    _check_dtype(args.dtype)
    template_path = args.chat_template or args.hf
    template = ChatTemplate.load(template_path) if template_path else None
    leads = jax.process_index() == 0
    sock = bind(args.host, args.port) if leads else None
    source = args.hf or args.checkpoint
    if args.hf:
        engine = Engine.from_hf(args.hf, dtype=args.dtype or "float32", mesh=mesh, infer=infer, impl=impl)
    else:
        engine = Engine.from_checkpoint(args.checkpoint, mesh=mesh, dtype=args.dtype, infer=infer, impl=impl)
    if not leads:
        return follow_command(engine)
    name = args.served_model_name or Path(source).resolve().name
    server = Server(
        engine,
        config,
        model_name=name,
        root=str(source),
        api_key=args.api_key,
        template=template,
        leader=Leader(engine, config.follower_timeout_s) if jax.process_count() > 1 else None,
    )
    return run_server(server, sock)


def follow_command(engine) -> int:
    """A process other than 0: runs process 0's engine steps (`replicate.follow`) until it stops.
    Signals are left to process 0, which stops this one."""
    import jax

    from frontier_jax.serve.replicate import follow

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print(f"process {jax.process_index()}: following process 0's engine steps", file=sys.stderr, flush=True)
    follow(engine)
    print(f"process {jax.process_index()}: stopped with process 0", file=sys.stderr, flush=True)
    return 0


def run_server(server, sock: socket.socket) -> int:
    """Serves `server` (`app.Server`) on the listening `sock` until SIGTERM / SIGINT (module
    docstring); 0 once drained."""
    import uvicorn

    from frontier_jax.serve.app import create_app

    app = create_app(server)
    config = server.config

    class Uvicorn(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            server.draining = True  # new requests: 503 while the running ones finish
            super().handle_exit(sig, frame)

    uvicorn_config = uvicorn.Config(
        app, log_level="warning", timeout_graceful_shutdown=config.drain_timeout_s, access_log=False
    )
    host, port = sock.getsockname()[:2]
    print(
        f"serving {server.model_name} on http://{host}:{port} (/v1/completions, /v1/chat/completions, /metrics)",
        file=sys.stderr,
        flush=True,
    )
    # uvicorn restores the handlers it found and raises the signal it shut down for again: a
    # SIGTERM that was handled (drained) must not kill the process after that
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    Uvicorn(uvicorn_config).run(sockets=[sock])
    if server.loop.error is not None:
        raise RuntimeError(f"the engine thread failed: {server.loop.error!r}")
    print("server stopped", file=sys.stderr)
    return 0
