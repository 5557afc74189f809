"""The ``backchannel`` command: run a hub, publish to it, poll it."""

from __future__ import annotations

import argparse
import base64
import importlib
import os
import signal
import sys
from dataclasses import MISSING, fields
from typing import Any

import orjson

from . import __version__
from .client import (
    DEFAULT_URL,
    VIAS,
    Client,
    ClientError,
    HubUnreachable,
    Job,
    JobHandle,
    Published,
    Worker,
)
from .server.config import Settings, parse_value

EPILOG = """\
examples:
  backchannel serve                          # hub on 127.0.0.1:8000, SQLite in ./backchannel-data
  backchannel publish news 'hello'           # text message
  backchannel publish news '{"n": 1}' --json # JSON message
  backchannel poll news                      # everything retained
  backchannel poll news --after 0000000000000002 --wait 30   # long poll
  backchannel token --subscribe 'news' --ttl 3600  # a development token (HS256)
"""


def _serve_parser(sub: Any) -> argparse.ArgumentParser:
    parser = sub.add_parser(
        "serve",
        help="run the hub",
        description="Run the hub. Every flag can also be set with the environment variable "
        "shown; a flag wins over the variable.",
    )
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        env = Settings.env_name(f.name)
        help_text = f"{f.metadata['help']} [env {env}]"
        assert f.default is not MISSING
        if f.type == "bool":
            parser.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                flag,
                dest=f.name,
                metavar=f.name.upper(),
                type=lambda raw, name=f.name: parse_value(name, raw),
                choices=f.metadata.get("choices"),
                default=argparse.SUPPRESS,
                help=help_text + (f" (default: {f.default})" if f.default != "" else ""),
            )
    return parser  # type: ignore[no-any-return]


def _client_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--tcp-port",
        type=int,
        # A string default goes through type= too, so a bad variable is a usage error.
        default=os.environ.get("BACKCHANNEL_TCP_PORT", "7000"),
        help="the hub's TCP port, for --via tcp [env BACKCHANNEL_TCP_PORT] (default: 7000)",
    )
    parent.add_argument(
        "--url",
        default=os.environ.get("BACKCHANNEL_URL", DEFAULT_URL),
        help=f"the hub's address [env BACKCHANNEL_URL] (default: {DEFAULT_URL})",
    )
    parent.add_argument(
        "--token",
        default=None,
        help="bearer token for a hub with auth [env BACKCHANNEL_TOKEN, which keeps it out of "
        "the process list]",
    )
    return parent


def _token_parser(sub: Any) -> None:
    token = sub.add_parser(
        "token",
        help="mint an HS256 token for development",
        description="Print an HS256 token signed with the hub's shared secret, for development "
        "and tests (production tokens come from your identity provider). The secret is read "
        "from --secret-file, else BACKCHANNEL_AUTH_SECRET_FILE, else BACKCHANNEL_AUTH_SECRET: "
        "the same places `backchannel serve` reads it from. Patterns: see docs/auth.md.",
    )
    token.add_argument(
        "--secret-file",
        default=None,
        metavar="FILE",
        help="file holding the hub's shared secret [env BACKCHANNEL_AUTH_SECRET_FILE]",
    )
    for name, text in (
        ("publish", "channel pattern the token may publish to"),
        ("subscribe", "channel pattern the token may read (poll, stream, info)"),
        ("submit", "queue pattern the token may submit jobs to"),
        ("claim", "queue pattern the token may claim jobs from"),
    ):
        token.add_argument(
            f"--{name}", action="append", default=[], metavar="PATTERN", help=text + "; repeat"
        )
    token.add_argument("--admin", action="store_true", help="grant admin (channel retention)")
    token.add_argument(
        "--ttl",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="seconds until the token expires (default: 3600)",
    )
    token.add_argument("--subject", default=None, help="the sub claim: who the token is for")
    token.add_argument(
        "--audience",
        default=os.environ.get("BACKCHANNEL_AUTH_AUDIENCE", ""),
        help="the aud claim [env BACKCHANNEL_AUTH_AUDIENCE]",
    )
    token.add_argument(
        "--issuer",
        default=os.environ.get("BACKCHANNEL_AUTH_ISSUER", ""),
        help="the iss claim [env BACKCHANNEL_AUTH_ISSUER]",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="backchannel",
        description="A communication hub for Python backends: channels on a durable log, "
        "reached by publishing, short polling and long polling.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"backchannel {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parser.set_defaults(serve_parser=_serve_parser(sub))
    _token_parser(sub)
    client = _client_parent()

    publish = sub.add_parser(
        "publish",
        parents=[client],
        help="publish one message",
        description="Publish one message and print its id, channel and time as JSON.",
    )
    publish.add_argument("channel", metavar="CHANNEL")
    publish.add_argument("data", metavar="DATA", help="the message; - reads it from standard input")
    kind = publish.add_mutually_exclusive_group()
    kind.add_argument("--json", action="store_true", help="send DATA as application/json")
    kind.add_argument(
        "--content-type",
        default=None,
        help="send DATA with this content type (default: text/plain; charset=utf-8)",
    )
    publish.add_argument(
        "--idempotency-key",
        default=None,
        help="a retried publish with the same key returns the first result",
    )

    subscribe = sub.add_parser(
        "subscribe",
        parents=[client],
        help="follow a channel, printing one JSON line per message",
        description="Print each message of CHANNEL as one JSON line, from now (or after --after) "
        "until Ctrl-C. The subscription reconnects by itself and resumes where it was: no "
        "message is lost or printed twice.",
    )
    subscribe.add_argument("channel", metavar="CHANNEL")
    subscribe.add_argument(
        "--via", choices=VIAS, default="sse", help="how to listen (default: sse)"
    )
    subscribe.add_argument(
        "--after", default=None, metavar="ID", help="start after this message (default: from now)"
    )

    poll = sub.add_parser(
        "poll",
        parents=[client],
        help="read messages (short or long poll)",
        description="Print the messages after a cursor as JSON: {messages, next_after}. Pass "
        "next_after as --after next time to continue where you left off.",
    )
    poll.add_argument("channel", metavar="CHANNEL")
    poll.add_argument(
        "--after",
        default=None,
        metavar="ID",
        help="the id of the last message you saw (default: from the oldest retained)",
    )
    poll.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="long poll: wait up to SECONDS for a first new message",
    )
    poll.add_argument(
        "--limit",
        type=int,
        default=None,
        metavar="N",
        help="at most N messages (default: the hub's default_limit)",
    )

    job = sub.add_parser(
        "job",
        help="submit and watch jobs",
        description="Submit jobs and watch them. Every command prints the job as JSON.",
    )
    job_commands = job.add_subparsers(dest="job_command", metavar="ACTION", required=True)
    submit = job_commands.add_parser("submit", parents=[client], help="submit a job")
    submit.add_argument("queue", metavar="QUEUE")
    submit.add_argument("payload", metavar="JSON", help="the payload, as JSON; - reads stdin")
    submit.add_argument(
        "--wait",
        type=float,
        default=None,
        metavar="SECONDS",
        help="wait up to SECONDS for the job to finish (Prefer: wait)",
    )
    submit.add_argument("--max-attempts", type=int, default=None, metavar="N")
    submit.add_argument("--idempotency-key", default=None)
    for name, text in (("status", "the job now"), ("cancel", "cancel the job")):
        action = job_commands.add_parser(name, parents=[client], help=text)
        action.add_argument("id", metavar="ID")
    wait = job_commands.add_parser(
        "wait", parents=[client], help="wait for the job to finish; exit 1 unless it succeeded"
    )
    wait.add_argument("id", metavar="ID")
    wait.add_argument("--timeout", type=float, default=None, metavar="SECONDS")

    worker = sub.add_parser(
        "worker",
        parents=[client],
        help="run a Python function for every job of a queue",
        description="Import MODULE:FUNCTION and call it with each job's payload (and, if it "
        "takes two arguments, a JobContext); its return value completes the job, an exception "
        "fails it. SIGTERM or Ctrl-C stops taking jobs and lets the running ones finish.",
    )
    worker.add_argument("function", metavar="MODULE:FUNCTION")
    worker.add_argument("--queue", required=True, help="the queue to take jobs from")
    worker.add_argument(
        "--concurrency",
        type=int,
        default=1,
        metavar="N",
        help="jobs run at once, one thread each (default: 1)",
    )
    worker.add_argument(
        "--lease",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="lease per claim; heartbeats renew it (default: 30)",
    )
    worker.add_argument(
        "--prefetch",
        type=int,
        default=None,
        metavar="N",
        help="jobs claimed ahead of idle threads (default: follow the jobs: many for short "
        "ones, none for long ones)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(args, args.serve_parser)
    if args.command == "token":
        return _token(args)
    try:
        with Client(args.url, tcp_port=args.tcp_port, token=args.token) as client:
            if args.command == "subscribe":
                return _subscribe(client, args)
            if args.command == "job":
                return _job(client, args)
            if args.command == "worker":
                return _worker(client, args)
            if args.command == "publish":
                result = _publish(client, args)
            else:
                # The hub's own bytes, so JSON messages are printed exactly as published.
                raw = client.poll_raw(
                    args.channel, after=args.after, limit=args.limit, wait=args.wait
                )
                sys.stdout.write(raw.decode() + "\n")
                return 0
    except HubUnreachable as exc:
        print(f"backchannel: {exc} (is `backchannel serve` running?)", file=sys.stderr)
        return 2
    except ClientError as exc:
        print(f"backchannel: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # refused before anything was sent, e.g. a malformed cursor
        print(f"backchannel: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(orjson.dumps(result).decode() + "\n")
    return 0


def _token(args: argparse.Namespace) -> int:
    from .core.grants import InvalidGrants
    from .server.auth import AuthConfigError, mint

    path = args.secret_file or os.environ.get("BACKCHANNEL_AUTH_SECRET_FILE")
    if path:
        try:
            with open(path, "rb") as file:
                secret = file.read().rstrip(b"\r\n")
        except OSError as exc:
            raise SystemExit(f"backchannel: cannot read {path}: {exc.strerror}") from None
    elif os.environ.get("BACKCHANNEL_AUTH_SECRET"):
        secret = os.environ["BACKCHANNEL_AUTH_SECRET"].encode()
    else:
        raise SystemExit(
            "backchannel: no secret: pass --secret-file, or set BACKCHANNEL_AUTH_SECRET_FILE "
            "or BACKCHANNEL_AUTH_SECRET"
        )
    grants: dict[str, Any] = {
        name: getattr(args, name)
        for name in ("publish", "subscribe", "submit", "claim")
        if getattr(args, name)
    }
    if args.admin:
        grants["admin"] = True
    if args.ttl <= 0:
        raise SystemExit("backchannel: --ttl must be positive")
    try:
        token = mint(
            secret,
            grants=grants,
            ttl=args.ttl,
            subject=args.subject,
            audience=args.audience,
            issuer=args.issuer,
        )
    except (AuthConfigError, InvalidGrants) as exc:
        raise SystemExit(f"backchannel: {exc}") from None
    sys.stdout.write(token + "\n")
    return 0


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _print_job(job: Job) -> None:
    document = {field: getattr(job, field) for field in Job.__dataclass_fields__}
    sys.stdout.write(orjson.dumps(document).decode() + "\n")


def _job(client: Client, args: argparse.Namespace) -> int:
    if args.job_command == "submit":
        text = sys.stdin.read() if args.payload == "-" else args.payload
        try:
            payload = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise SystemExit(f"backchannel: the payload is not JSON: {exc}") from None
        handle = client.submit(
            args.queue,
            payload,
            idempotency_key=args.idempotency_key,
            max_attempts=args.max_attempts,
            wait=args.wait,
        )
        _print_job(handle.last)
        return 0
    if args.job_command == "status":
        _print_job(client.job(args.id))
        return 0
    if args.job_command == "cancel":
        _print_job(client.cancel(args.id))
        return 0
    handle = JobHandle(client, client.job(args.id))
    finished = handle.wait(args.timeout)
    _print_job(finished)
    return 0 if finished.state == "succeeded" else 1


def _worker(client: Client, args: argparse.Namespace) -> int:
    module_name, sep, name = args.function.partition(":")
    if not sep:
        raise SystemExit("backchannel: name the function as MODULE:FUNCTION")
    sys.path.insert(0, os.getcwd())
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise SystemExit(f"backchannel: cannot load {args.function}: {exc}") from None
    worker = Worker(
        client=client, concurrency=args.concurrency, lease=args.lease, prefetch=args.prefetch
    )
    worker.task(args.queue)(function)
    print(f"backchannel worker: {args.function} on queue {args.queue}", file=sys.stderr)
    worker.run()
    return 0


def _publish(client: Client, args: argparse.Namespace) -> dict[str, Any]:
    published = _send_publish(client, args)
    return {"id": published.id, "channel": published.channel, "time": published.time}


def _subscribe(client: Client, args: argparse.Namespace) -> int:
    """Print one JSON line per message until Ctrl-C or SIGTERM."""
    subscription = client.subscribe(args.channel, via=args.via, after=args.after)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for message in subscription:
            data = message.data
            if isinstance(data, bytes):
                data = base64.b64encode(data).decode()
            line = {
                "id": message.id,
                "channel": message.channel,
                "time": message.time,
                "content_type": message.content_type,
                "encoding": message.encoding,
                "data": data,
            }
            sys.stdout.write(orjson.dumps(line).decode() + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        subscription.close()
    return 0


def _send_publish(client: Client, args: argparse.Namespace) -> Published:
    data: bytes = sys.stdin.buffer.read() if args.data == "-" else os.fsencode(args.data)
    if args.json:
        content_type = "application/json"
    else:
        content_type = args.content_type or "text/plain; charset=utf-8"
    return client.publish(
        args.channel, content=data, content_type=content_type, idempotency_key=args.idempotency_key
    )


def _serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .server.run import serve

    overrides = {f.name: getattr(args, f.name) for f in fields(Settings) if hasattr(args, f.name)}
    try:
        settings = Settings.from_env(**overrides)
    except (TypeError, ValueError) as exc:
        parser.error(str(exc))
    serve(settings)
    return 0
