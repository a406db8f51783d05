"""`pyhyvectl`: talk to a running VM through its control socket."""

from __future__ import annotations

import json
import os
import sys

from ..control.client import ClientError, ControlClient
from .common import Parser, fail

PROG = "pyhyvectl"


def build_parser() -> Parser:
    p = Parser(prog=PROG, description="Control a running pyhyve VM.")
    p.add_argument("--vm", required=True, help="VM name")
    acts = p.add_mutually_exclusive_group(required=True)
    acts.add_argument("--status", action="store_true", help="show the VM's state")
    acts.add_argument("--pause", action="store_true", help="pause every vCPU")
    acts.add_argument("--resume", action="store_true", help="resume a paused VM")
    acts.add_argument("--destroy", action="store_true", help="stop the VM and its process")
    acts.add_argument("--suspend", metavar="FILE", help="save to FILE (+.kern, .meta); the VM exits")
    acts.add_argument("--checkpoint", metavar="FILE", help="save to FILE; the VM keeps running")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cmd = next(c for c in ("status", "pause", "resume", "destroy", "suspend", "checkpoint")
               if getattr(args, c))
    extra = {}
    if cmd in ("suspend", "checkpoint"):
        extra["path"] = os.path.abspath(getattr(args, cmd))  # the VMM has its own cwd
    try:
        with ControlClient(args.vm, timeout=None if extra else 30.0) as c:
            reply = c.call(cmd, **extra)
    except ClientError as e:
        fail(PROG, str(e))
    reply.pop("ok", None)
    if args.json:
        print(json.dumps(reply, indent=2))
    elif "line" in reply:
        print(f"{args.vm}: {reply['line']}")
    elif cmd == "status":
        for k, v in reply.items():
            print(f"{k}: {v}")
    else:
        print(f"{args.vm}: {reply.get('state', 'done')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
