"""lessor: the command-line client. It talks to the admin API; `plan --config` and `check-config`
run the daemon's own code locally (same controller path), so they work without a daemon."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ..daemon.config import LessorConfig, load_config
from ..daemon.errors import ConfigError, LessorError
from ..daemon.units import format_bytes, parse_size
from .auth import ENV_TOKEN

DEFAULT_ADMIN = "http://127.0.0.1:8470"
KIND_CHARS = {"weights": "W", "kv": "K", "load_peak": "P", "reserve": "R"}


class ApiError(Exception):
    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status, self.body = status, body
        error = body.get("error", {}) if isinstance(body, dict) else {}
        super().__init__(f"{status} {error.get('type', 'error')}: {error.get('message', body)}")


class Client:
    def __init__(self, base: str, token: str | None) -> None:
        self.base, self.token = base.rstrip("/"), token

    def call(self, method: str, path: str, body: dict | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.base + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=3600) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                payload = json.loads(exc.read())
            except json.JSONDecodeError:
                payload = {"error": {"message": exc.reason}}
            raise ApiError(exc.code, payload) from None
        except urllib.error.URLError as exc:
            raise SystemExit(f"lessor: cannot reach the admin API at {self.base}: {exc.reason} (is lessord running?)")


def _config(path: str | None) -> LessorConfig | None:
    return load_config(path) if path else None


def make_client(args: argparse.Namespace) -> Client:
    config = _config(args.config)
    base = args.admin or os.environ.get("LESSOR_ADMIN_URL") or (f"http://{config.admin.listen}" if config else DEFAULT_ADMIN)
    token = args.token or os.environ.get(ENV_TOKEN)
    if not token:
        path = config.token_path() if config else Path(os.environ.get("STATE_DIRECTORY", "var/lessor")) / "admin.token"
        token = path.read_text().strip() if path.is_file() and os.access(path, os.R_OK) else None
    return Client(base, token)


# -- rendering -------------------------------------------------------------------------------

def bar(device: dict[str, Any], width: int = 60) -> str:
    """One character per slice of the capacity: foreign #, headroom !, leases by kind, free ."""
    cap = max(device["capacity_bytes"], 1)
    segments = [("#", device["foreign_bytes"]), ("!", device["headroom_bytes"])]
    for kinds in device["models"].values():
        segments += [(KIND_CHARS[k], b) for k, b in kinds.items()]
    out, used = "", 0
    for char, b in segments:
        n = round(b * width / cap)
        n = min(n, width - used)
        out, used = out + char * n, used + n
    return "[" + out + "." * (width - used) + "]"


def render_status(status: dict[str, Any]) -> str:
    lines = [f"lessor {status['version']}  probe: {status['probe']}  policy: {status['policy']}", ""]
    for d in status["devices"]:
        lines.append(f"{d['id']}  {d['name']}  total {format_bytes(d['total_bytes'])}"
                     + (f"  capacity {format_bytes(d['capacity_bytes'])}" if d["capacity_bytes"] != d["total_bytes"] else ""))
        lines.append("  " + bar(d))
        lines.append(f"  {'foreign':<22}{format_bytes(d['foreign_bytes']):>12}")
        lines.append(f"  {'headroom':<22}{format_bytes(d['headroom_bytes']):>12}")
        for model, kinds in d["models"].items():
            detail = ", ".join(f"{k} {format_bytes(b)}" for k, b in kinds.items())
            lines.append(f"  {model:<22}{format_bytes(sum(kinds.values())):>12}   ({detail})")
        lines.append(f"  {'leasable':<22}{format_bytes(d['leasable_bytes']):>12}")
        lines.append(f"  {'free':<22}{format_bytes(d['free_bytes']):>12}")
        lines.append("")
    lines.append("legend: # foreign  ! headroom  W weights  K kv  P load_peak  R reserve  . free")
    lines.append("")
    return "\n".join(lines) + "\n" + render_models(status["models"])


def render_models(models: list[dict[str, Any]]) -> str:
    lines = [f"{'MODEL':<24}{'STATE':<11}{'ENGINE':<14}{'PRIO':>5}  PINNED"]
    for m in models:
        lines.append(f"{m['name']:<24}{m['state']:<11}{m['engine']:<14}{m['priority']:>5}  {'yes' if m['pinned'] else 'no'}")
        if m.get("error"):
            lines.append(f"  error: {m['error']}")
    return "\n".join(lines)


def render_fingerprints(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no fingerprints yet: every load records one"
    lines = []
    for f in rows:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(f["measured_at_s"]))
        lines.append(f"{f['key']}  {f['model']}  {f['engine']} ({f['engine_version']})  on {', '.join(f['devices'])}"
                     f"  {f['outcome']}, {f['loads']} load(s), {when}{'  [applies now]' if f.get('applies') else ''}")
        for m in f["measured"]:
            parts = [f"peak {format_bytes(m['peak_bytes'])}", f"steady {format_bytes(m['steady_bytes'])}"]
            parts += [f"weights {format_bytes(m['weights_bytes'])}"] if m["weights_bytes"] is not None else []
            parts += [f"kv {format_bytes(m['kv_bytes'])} for {m['kv_tokens']} tokens"] if m["kv_bytes"] is not None else []
            lines.append(f"    {m['device']:<6} {m['method']:<7} " + ", ".join(parts) + f"; leased {format_bytes(m['leased_bytes'])}")
    return "\n".join(lines)


def render_plan(plan: dict[str, Any]) -> str:
    lines = [f"model {plan['model']}: {'fits' if plan['fits'] else 'does NOT fit'}"]
    if plan["evictions"]:
        lines.append(f"  after evicting: {', '.join(plan['evictions'])}")
    lines.append("  params: " + ", ".join(f"{k}={v}" for k, v in plan["params"].items()))
    for lease in plan["leases"]:
        lines.append(f"  {lease['kind']:<10} {lease['device']:<6} {format_bytes(lease['bytes']):>12}")
    for reason in plan["reasons"]:
        lines.append(f"  why: {reason}")
    for warning in plan.get("warnings", []):
        lines.append(f"  warning: {warning}")
    if plan.get("memory"):
        lines.append("  memory model (bytes on each device, and where each number comes from):")
        for m in plan["memory"]:
            size = f"{m['bytes']} B/token" if m["part"] == "kv" else format_bytes(m["bytes"])
            grows = f" + {m['per_kv_token']:g} B/token" if m.get("per_kv_token") else ""
            lines.append(f"    {m['device']:<6} {m['name']:<18} {size + grows:>16}  {m['source']:<9} {m['basis']}")
    lines += _render_fingerprint_use(plan.get("fingerprint"))
    return "\n".join(lines)


def _render_fingerprint_use(use: dict[str, Any] | None) -> list[str]:
    if not use:
        return []
    used = use.get("used")
    when = (lambda t: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t)))
    lines = [f"  measured: fingerprint {use['key'][:8]} ({use['engine_version']} on {', '.join(use['devices'])}): "
             + (f"used, {used['outcome']} on {when(used['measured_at_s'])}, {used['loads']} load(s), "
                f"+{used['margin']:.0%} margin" if used else "none yet (the first load measures it)")]
    for other in use.get("not_used", []):
        lines.append(f"  not used: fingerprint {other['key'][:8]} of {when(other['measured_at_s'])}: {'; '.join(other['why'])}")
    return lines


def render_leases(leases: list[dict[str, Any]]) -> str:
    lines = [f"{'MODEL':<24}{'DEVICE':<8}{'KIND':<11}{'BYTES':>12}  OWNER  ID"]
    for lease in leases:
        lines.append(f"{lease['model']:<24}{lease['device']:<8}{lease['kind']:<11}{format_bytes(lease['bytes']):>12}"
                     f"  {lease['owner_pid'] or '-':<5}  {lease['id']}")
    return "\n".join(lines)


# -- commands --------------------------------------------------------------------------------

def _parse_overrides(pairs: list[str]) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"lessor: --set takes KEY=VALUE (got '{pair}')")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_plan(args: argparse.Namespace) -> int:
    overrides = _parse_overrides(args.set)
    if args.config and not args.admin:
        plan = asyncio.run(_local_plan(load_config(args.config), args.model, overrides, args.sim))
    else:
        plan = make_client(args).call("POST", "/admin/v1/plan", {"model": args.model, "overrides": overrides})
    print(json.dumps(plan, indent=2) if args.json else render_plan(plan))
    return 0 if plan["fits"] else 1


async def _local_plan(config: LessorConfig, model: str, overrides: dict[str, Any], sim: bool) -> dict[str, Any]:
    from ..daemon.runtime import runtime

    async with runtime(config, force_sim=sim, engines={}, reconcile=False) as controller:
        return controller.plan(model, overrides)


def cmd_fingerprints(args: argparse.Namespace) -> int:
    client = make_client(args)
    if args.delete:
        gone = client.call("DELETE", f"/admin/v1/fingerprints/{args.delete}")
        print(json.dumps(gone, indent=2) if args.json else f"forgot fingerprint {gone['key']} of {gone['model']}")
        return 0
    query = f"?model={urllib.parse.quote(args.model)}" if args.model else ""
    rows = client.call("GET", f"/admin/v1/fingerprints{query}")
    print(json.dumps(rows, indent=2) if args.json else render_fingerprints(rows))
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from ..daemon.checks import check

    config = load_config(args.file)  # a schema problem is a ConfigError: main() lists them all
    report = check(config)
    for finding in report.findings:
        print(f"{args.file}: {finding}", file=sys.stderr if finding.error else sys.stdout)
    verdict = f"{report.errors} error(s)" if report.errors else "OK"
    print(f"{args.file}: {verdict} ({len(config.models)} model(s), policy {config.policy.name}; checked against "
          f"{report.devices})")
    return 1 if report.errors else 0


def cmd_load(args: argparse.Namespace) -> int:
    client = make_client(args)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["model"] = client.call("POST", f"/admin/v1/models/{args.model}",
                                          {"action": "load", "overrides": _parse_overrides(args.set)})
        except ApiError as exc:
            result["error"] = exc

    worker = threading.Thread(target=run, daemon=True)
    started = time.monotonic()
    worker.start()
    while worker.is_alive():
        worker.join(0.5)
        if worker.is_alive() and sys.stderr.isatty():
            print(f"\rloading {args.model} ... {time.monotonic() - started:5.1f} s", end="", file=sys.stderr, flush=True)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if "error" in result:
        raise result["error"]
    model = result["model"]
    print(f"{model['name']}: {model['state']} in {time.monotonic() - started:.1f} s")
    return 0


def cmd_simple(method: str, path: str, render=None, body=None):
    def run(args: argparse.Namespace) -> int:
        data = make_client(args).call(method, path.format(**vars(args)), body(args) if body else None)
        print(json.dumps(data, indent=2) if args.json or render is None else render(data))
        return 0
    return run


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--admin", help=f"admin API URL (default: the config's admin.listen, $LESSOR_ADMIN_URL or {DEFAULT_ADMIN})")
    common.add_argument("--token", help=f"admin bearer token (default ${ENV_TOKEN} or the token file)")
    common.add_argument("--config", help="the daemon's config file (finds the API address and token file)")
    common.add_argument("--json", action="store_true", help="print JSON")
    p = argparse.ArgumentParser(prog="lessor", description="lessor CLI: devices, leases and models of a running lessord")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", parents=[common], help="devices with a lease bar, and models").set_defaults(
        func=cmd_simple("GET", "/admin/v1/status", render_status))
    leases = sub.add_parser("leases", parents=[common], help="granted leases")
    leases.set_defaults(func=cmd_simple("GET", "/admin/v1/leases", render_leases))
    sub.add_parser("models", parents=[common], help="configured models").set_defaults(
        func=cmd_simple("GET", "/admin/v1/models", render_models))
    load = sub.add_parser("load", parents=[common], help="load a model (waits, showing progress)")
    load.add_argument("model")
    load.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="engine argument override")
    load.set_defaults(func=cmd_load)
    unload = sub.add_parser("unload", parents=[common], help="unload a model")
    unload.add_argument("model")
    unload.set_defaults(func=cmd_simple("POST", "/admin/v1/models/{model}", lambda m: f"{m['name']}: {m['state']}",
                                        body=lambda a: {"action": "unload"}))
    plan = sub.add_parser("plan", parents=[common], help="would this model fit now? (with --config: computed locally)")
    plan.add_argument("model")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="engine argument to try, e.g. max_batch_size=2")
    plan.add_argument("--sim", action="store_true", help="with --config: use the simulated devices even if NVML works")
    plan.set_defaults(func=cmd_plan)
    prints = sub.add_parser("fingerprints", parents=[common], help="what lessor measured per model, engine version and devices")
    prints.add_argument("--model", default=None, help="only this model's")
    prints.add_argument("--delete", metavar="KEY", default=None, help="forget this fingerprint (its plans go back to the memory model)")
    prints.set_defaults(func=cmd_fingerprints)
    check = sub.add_parser("check-config", help="validate a config file and list every problem")
    check.add_argument("file")
    check.set_defaults(func=cmd_check_config)
    foreign = sub.add_parser("set-foreign", parents=[common], help="simulated devices: set foreign usage")
    foreign.add_argument("device")
    foreign.add_argument("size", type=parse_size)
    foreign.set_defaults(func=cmd_simple("PUT", "/admin/v1/devices/{device}/foreign", None,
                                         body=lambda a: {"foreign_bytes": a.size}))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"lessor: invalid config {exc}", file=sys.stderr)
        return 2
    except ApiError as exc:
        print(f"lessor: {exc}", file=sys.stderr)
        return 1
    except LessorError as exc:
        print(f"lessor: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
