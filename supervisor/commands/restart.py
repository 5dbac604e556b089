"""`hermes-gateway restart`: ask the running gateway to hand everything to a new broker (docs/restart.md).

Exit codes: 0 restarted; 1 the new broker could not start (the running one goes on serving, the
reason is printed); 3 no gateway running (as hermes-ps).
"""

from __future__ import annotations

import argparse
import os
import sys

from supervisor.commands import ps


def main(args: argparse.Namespace) -> int:
    root = os.path.abspath(os.path.expanduser(args.runtime_dir)) if args.runtime_dir else ps.default_runtime_dir()
    try:
        reply = ps.request(root, "restart", timeout=args.timeout)
    except ps.NotRunning as exc:
        print(f"hermes-gateway: {exc}", file=sys.stderr)
        return 3
    except ps.ControlError as exc:
        print(f"hermes-gateway: restart failed: {exc}", file=sys.stderr)
        return 1
    r = reply["restarted"]
    print(f"hermes-gateway: restarted: pid {r['pid']} serves {r['sessions']} sessions on {r['workers']} workers "
          f"(cut {r['cut'] * 1000:.0f} ms, {r['took']:.2f}s in all)")
    if r.get("not_held"):
        print(f"  workers that did not answer the hand-over in time: {r['not_held']}", file=sys.stderr)
    return 0
