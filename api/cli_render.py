"""What the `lessor` command prints: pure functions from the admin API's dicts to text. No I/O
here (the terminal's width and whether to colour are arguments), so each is tested on a dict."""

from __future__ import annotations

import textwrap
import time
from typing import Any

from ..daemon.units import format_bytes

KIND_CHARS = {"weights": "W", "kv": "K", "load_peak": "P", "reserve": "R"}
KIND_LEGEND = "# foreign  ! headroom  W weights  K kv  P load_peak  R reserve  . free"
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
# ANSI foreground colours a model's cells get on a terminal: green, blue, magenta, cyan, yellow, red.
COLOURS = ("32", "34", "35", "36", "33", "31")


def _paint(text: str, code: str | None) -> str:
    return f"\x1b[{code}m{text}\x1b[0m" if code and text.strip() else text


def duration(seconds: float | None) -> str:
    """12s, 4m05s, 2h03m, 3d04h; '-' for none."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(width - 3, 1)] + "..."


# -- the status: devices with a bar each, then the models ----------------------------------------

def model_letters(status: dict[str, Any]) -> dict[str, str]:
    """A letter per model holding memory on some device, in the config's order: the bar's second row."""
    holding = {m for d in status["devices"] for m in d["models"]}
    order = [m["name"] for m in status.get("models", []) if m["name"] in holding]
    order += sorted(holding - set(order))
    return {name: LETTERS[i % len(LETTERS)] for i, name in enumerate(order)}


def _cells(device: dict[str, Any], letters: dict[str, str], width: int) -> tuple[list[tuple[str, str]], bool]:
    """(kind char, owner letter) per slice of the capacity; True when the segments overflow it."""
    cap = max(device["capacity_bytes"], 1)
    segments = [("#", " ", device["foreign_bytes"]), ("!", " ", device["headroom_bytes"])]
    for model, kinds in device["models"].items():
        segments += [(KIND_CHARS.get(k, "?"), letters.get(model, "?"), b) for k, b in kinds.items()]
    cells: list[tuple[str, str]] = []
    for char, owner, b in segments:
        n = min(round(b * width / cap), width - len(cells))
        cells += [(char, owner)] * n
    overflow = sum(b for *_, b in segments) > cap
    return cells + [(".", " ")] * (width - len(cells)), overflow


def bar(device: dict[str, Any], letters: dict[str, str] | None = None, width: int = 60,
        colour: bool = False) -> list[str]:
    """The bar (foreign #, headroom !, leases by kind, free .) and under it whose lease each cell is.
    An overcommitted device ends its bar with '>' (it spills over) instead of ']'."""
    letters = letters if letters is not None else {m: LETTERS[i % len(LETTERS)] for i, m in enumerate(device["models"])}
    cells, overflow = _cells(device, letters, width)
    codes = {letter: COLOURS[i % len(COLOURS)] for i, letter in enumerate(LETTERS)} if colour else {}
    top = "".join(_paint(char, codes.get(owner)) for char, owner in cells)
    lines = ["[" + top + (">" if overflow else "]")]
    if device["models"]:
        lines.append(" " + "".join(_paint(owner, codes.get(owner)) for _, owner in cells).rstrip())
    return lines


def _device_lines(d: dict[str, Any], letters: dict[str, str], colour: bool) -> list[str]:
    capacity = f"  capacity {format_bytes(d['capacity_bytes'])}" if d["capacity_bytes"] != d["total_bytes"] else ""
    lines = [f"{d['id']}  {d['name']}  total {format_bytes(d['total_bytes'])}{capacity}"]
    lines += ["  " + line for line in bar(d, letters, colour=colour)]
    lines.append(f"  {'foreign':<22}{format_bytes(d['foreign_bytes']):>12}")
    lines.append(f"  {'headroom':<22}{format_bytes(d['headroom_bytes']):>12}")
    for model, kinds in d["models"].items():
        detail = ", ".join(f"{k} {format_bytes(b)}" for k, b in kinds.items())
        label = f"{letters.get(model, '?')} {model}"
        lines.append(f"  {label:<22}{format_bytes(sum(kinds.values())):>12}   ({detail})")
    lines.append(f"  {'leasable':<22}{format_bytes(d['leasable_bytes']):>12}")
    lines.append(f"  {'free':<22}{format_bytes(d['free_bytes']):>12}" if d["free_bytes"] >= 0 else
                 f"  OVERCOMMITTED by {format_bytes(-d['free_bytes'])}: leases + foreign + headroom exceed "
                 f"the capacity ({format_bytes(d['capacity_bytes'])})")
    return lines


def render_status(status: dict[str, Any], colour: bool = False, width: int = 100) -> str:
    source = status.get("config")
    lines = [f"lessor {status['version']}  probe: {status['probe']}  policy: {status['policy']}"
             + (f"  config: {source['path']} ({source['digest']})" if source else ""), ""]
    letters = model_letters(status)
    for d in status["devices"]:
        lines += _device_lines(d, letters, colour) + [""]
    lines.append("legend: " + KIND_LEGEND)
    if letters:
        lines.append("        " + "  ".join(f"{letter} = {model}" for model, letter in letters.items()))
    lines.append("")
    return "\n".join(lines) + "\n" + render_models(status["models"], width)


ERROR_LINES = 4


def until(model: dict[str, Any]) -> str:
    """When keep_alive unloads it (Ollama's UNTIL): in how long, `never` for a serving model it
    never unloads (pinned, keep_alive -1), `-` otherwise (not serving, or a daemon that does not say)."""
    if model.get("keep_alive_ends_in_s") is not None:
        return duration(model["keep_alive_ends_in_s"])
    return "never" if "keep_alive_ends_in_s" in model and model.get("idle_s") is not None else "-"


def waiting_line(waiting: dict[str, Any]) -> str:
    """What a waiting model waits for, in words: the reason, then whichever figures the daemon gave."""
    parts = [" ".join(str(waiting.get("reason") or "no reason given").split())]
    if waiting.get("requests") is not None:
        parts.append(f"{waiting['requests']} request(s) waiting")
    if waiting.get("blockers"):
        parts.append("held up by " + ", ".join(waiting["blockers"]))
    if waiting.get("recheck_in_s") is not None:
        parts.append(f"weighed again in {duration(waiting['recheck_in_s'])}")
    return "waiting: " + "; ".join(parts)


def _under(text: str, width: int) -> tuple[list[str], bool]:
    """A line under a model's row, wrapped to the terminal's width (at most ERROR_LINES lines
    there; True when cut); whole when the width is 0 (not a terminal: a pipe or a log gets it all)."""
    wrapped = textwrap.wrap(text, max(width - 2, 20)) if width > 0 else [text]
    return ["  " + line for line in wrapped[:ERROR_LINES]], len(wrapped) > ERROR_LINES


def render_models(models: list[dict[str, Any]], width: int = 100) -> str:
    """The table; under a model's row what it waits for and a failed model's reason."""
    lines = [f"{'MODEL':<24}{'STATE':<11}{'ENGINE':<14}{'PRIO':>5}  {'PINNED':<7}{'IDLE':>7}{'INFL':>6}{'UNTIL':>8}{'PID':>9}"]
    cut = False
    for m in models:
        pid = m.get("pid") or "-"
        lines.append(f"{m['name']:<24}{m['state']:<11}{m['engine']:<14}{m['priority']:>5}  "
                     f"{'yes' if m['pinned'] else 'no':<7}{duration(m.get('idle_s')):>7}{m.get('in_flight', 0):>6}"
                     f"{until(m):>8}{pid:>9}")
        for text in ([waiting_line(m["waiting"])] if m.get("waiting") else []) + \
                    ([f"error: {' '.join(m['error'].split())}"] if m.get("error") else []):
            under, was_cut = _under(text, width)
            lines += under
            cut = cut or was_cut
    if cut:
        lines.append(f"(lines cut to {ERROR_LINES}: `lessor models --json` has them whole)")
    return "\n".join(lines)


def render_names(models: list[dict[str, Any]]) -> str:
    """Names and aliases, one a line (what shell completion offers)."""
    return "\n".join(name for m in models for name in [m["name"], *m.get("aliases", [])])


def render_budget(device: dict[str, Any]) -> str:
    """One line after set-foreign: the device's new budget."""
    line = (f"{device['id']}: foreign {format_bytes(device['foreign_bytes'])}, "
            f"leasable {format_bytes(device['leasable_bytes'])}, ")
    if device["free_bytes"] < 0:
        return line + f"OVERCOMMITTED by {format_bytes(-device['free_bytes'])} (leased {format_bytes(device['leased_bytes'])})"
    return line + f"free {format_bytes(device['free_bytes'])}"


# -- plans, leases, fingerprints ---------------------------------------------------------------

def _holding(current: Any) -> str:
    """What a loaded model holds: a list of leases ({kind, device, bytes}) or {device: {kind: bytes}}."""
    per_device: dict[str, int] = {}
    if isinstance(current, dict):
        for device, kinds in current.items():
            per_device[device] = sum(kinds.values()) if isinstance(kinds, dict) else int(kinds)
    for lease in current if isinstance(current, list) else []:
        per_device[lease["device"]] = per_device.get(lease["device"], 0) + lease["bytes"]
    return ", ".join(f"{format_bytes(b)} on {device}" for device, b in per_device.items()) or "no leases"


def render_plan(plan: dict[str, Any]) -> str:
    verdict = "fits" if plan["fits"] else "does NOT fit"
    if plan.get("loaded"):
        first = f"model {plan['model']}: loaded (holds {_holding(plan.get('current'))}); a fresh load would: {verdict}"
    else:
        first = f"model {plan['model']}: {verdict}"
    lines = [first]
    if plan["evictions"]:
        lines.append(f"  after evicting: {', '.join(plan['evictions'])}")
    lines.append("  params: " + ", ".join(f"{k}={v}" for k, v in plan["params"].items()))
    for lease in plan["leases"]:
        lines.append(f"  {lease['kind']:<10} {lease['device']:<6} {format_bytes(lease['bytes']):>12}")
    lines += [f"  sizing: {line}" for line in plan.get("sizing", [])]
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


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t))


def _render_fingerprint_use(use: dict[str, Any] | None) -> list[str]:
    if not use:
        return []
    used = use.get("used")
    lines = [f"  measured: fingerprint {use['key'][:8]} ({use['engine_version']} on {', '.join(use['devices'])}): "
             + (f"used, {used['outcome']} on {_utc(used['measured_at_s'])}, {used['loads']} load(s), "
                f"+{used['margin']:.0%} margin" if used else "none yet (the first load measures it)")]
    for other in use.get("not_used", []):
        lines.append(f"  not used: fingerprint {other['key'][:8]} of {_utc(other['measured_at_s'])}: {'; '.join(other['why'])}")
    return lines


def render_fingerprints(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no fingerprints yet: every load records one"
    lines = []
    for f in rows:
        lines.append(f"{f['key']}  {f['model']}  {f['engine']} ({f['engine_version']})  on {', '.join(f['devices'])}"
                     f"  {f['outcome']}, {f['loads']} load(s), {_utc(f['measured_at_s'])}{'  [applies now]' if f.get('applies') else ''}")
        for m in f["measured"]:
            parts = [f"peak {format_bytes(m['peak_bytes'])}", f"steady {format_bytes(m['steady_bytes'])}"]
            parts += [f"weights {format_bytes(m['weights_bytes'])}"] if m["weights_bytes"] is not None else []
            parts += [f"kv {format_bytes(m['kv_bytes'])} for {m['kv_tokens']} tokens"] if m["kv_bytes"] is not None else []
            lines.append(f"    {m['device']:<6} {m['method']:<7} " + ", ".join(parts) + f"; leased {format_bytes(m['leased_bytes'])}")
    return "\n".join(lines)


def render_leases(leases: list[dict[str, Any]]) -> str:
    lines = [f"{'MODEL':<24}{'DEVICE':<8}{'KIND':<11}{'BYTES':>12}  OWNER  ID"]
    for lease in leases:
        lines.append(f"{lease['model']:<24}{lease['device']:<8}{lease['kind']:<11}{format_bytes(lease['bytes']):>12}"
                     f"  {lease['owner_pid'] or '-':<5}  {lease['id']}")
    return "\n".join(lines)


# -- events: one line each -----------------------------------------------------------------------

def _because(reason: str) -> str:
    return f": {reason}" if reason else ""


# Where the daemon appends an engine's last log lines to an exit's reason (engines/process.py).
LOG_LINES = "; last log lines: "
REASON_CHARS = 160


def _briefly(reason: str, model: str) -> str:
    """A crash's reason as its event line gives it: without the engine's last log lines (the event's
    JSON keeps them, `lessor logs MODEL` shows the log) and at most REASON_CHARS characters."""
    head, cut, _ = (reason or "").partition(LOG_LINES)
    text = clip(" ".join(head.split()), REASON_CHARS)
    return _because(text) + (f" (its log: lessor logs {model})" if cut else "")


def reload_text(done: dict) -> str:
    """`lessor reload`'s answer: what was applied, or that it is pending and what for; then the warnings."""
    path = done["config"]["path"] if done.get("config") else "the config"
    pending = done.get("pending")
    if pending:
        digest = (pending.get("config") or {}).get("digest")
        head = (f"reload of {path}{f' ({digest})' if digest else ''} pending: {pending['reason']}; it applies when "
                f"that ends (a newer reload replaces it), and `lessor status` says the digest in force")
    else:
        said = [f"{what} {', '.join(done[what])}" for what in ("added", "removed", "changed") if done[what]]
        head = f"reloaded {path}: {'; '.join(said) or 'no model added, removed or changed'}"
    return "\n".join([head, *(f"  {warning}" for warning in done["warnings"])])


REFUSAL_CHARS = 120  # the line's other words take ~70: the whole stays under 200


def _refusal(reason: str) -> str:
    """A refused reload's reason on one line: the config's first problem, clipped, and how many more
    (a ConfigError's text is a line per problem; the event's JSON keeps them all)."""
    lines = [line.strip() for line in (reason or "").splitlines() if line.strip()]
    problems = lines[1:] if len(lines) > 1 and lines[0].endswith("problem(s)") else [" ".join(lines)]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return _because(clip(problems[0], REFUSAL_CHARS) + more) + "; running config kept"


EVENT_LINES = {
    "lease_granted": lambda e: f"{e['model']} {e['device']} {e['kind']} {format_bytes(e['bytes'])}",
    "lease_released": lambda e: f"{e['model']} {e['device']} {e['kind']} {format_bytes(e['bytes'])}{_because(e['reason'])}",
    "lease_resized": lambda e: f"{e['model']} {e['device']} {e['kind']} {format_bytes(e['from_bytes'])} -> "
                               f"{format_bytes(e['bytes'])}{_because(e['reason'])}",
    "model_state": lambda e: f"{e['model']} {e['previous']} -> {e['state']}{_briefly(e.get('reason', ''), e['model'])}",
    "engine_exited": lambda e: f"{e['model']} pid {e['pid']} exited {e['returncode']}{_briefly(e['reason'], e['model'])}; "
                               + ("no restart" if e.get("restart_in_s") is None else f"restart in {e['restart_in_s']:g} s"),
    "admission": lambda e: f"{e['model']} {e['result']}"
                           + (f" evicting {', '.join(e['victims'])}" if e.get("victims") else "") + _because(e.get("reason", "")),
    "foreign_usage": lambda e: f"{e['device']} foreign {format_bytes(e['previous_bytes'])} -> {format_bytes(e['foreign_bytes'])}",
    "config_reloaded": lambda e: ("applied" if e["ok"] else f"pending{_because(e.get('reason', ''))}" if e.get("waiting_for")
                                  else "refused" + _refusal(e.get("reason", "")))
                                 + "".join(f"; {k} {', '.join(e[k])}" for k in ("added", "removed", "changed") if e.get(k)),
    "engine_adopted": lambda e: f"{e['model']} pid {e['pid']} {'adopted' if e['adopted'] else 'stopped'}{_because(e['reason'])}",
    "lease_overrun": lambda e: f"{e['model']} {e['device']} uses {format_bytes(e['used_bytes'])} of "
                               f"{format_bytes(e['leased_bytes'])} leased: {'over' if e['over'] else 'back within'}, {e['action']}",
    "fingerprint_recorded": lambda e: f"{e['model']} {e['key'][:8]} {e['outcome']}, {e['loads']} load(s)",
    "load_retried": lambda e: f"{e['model']} attempt {e['attempt']} {e['outcome']}{_because(e['reason'])}",
    "memory_lingering": lambda e: f"{e['model']} {e['device']} {format_bytes(e['bytes'])} "
                                  + ("gone" if e["gone"] else f"still held by pid(s) {', '.join(map(str, e['pids']))}"),
    "budget_overcommitted": lambda e: f"{e['device']} short {format_bytes(e['short_bytes'])}; "
                                      + (f"evicting {', '.join(e['victims'])}" if e.get("victims") else "no idle model to evict")
                                      + _because(e.get("reason", "")),
}


def render_event(event: dict[str, Any]) -> str:
    """`HH:MM:SS type  what happened` (local time); an event type this CLI does not know shows its fields."""
    kind = event.get("type", "event")
    when = time.strftime("%H:%M:%S", time.localtime(event["at_s"])) if "at_s" in event else "--:--:--"
    try:
        what = EVENT_LINES[kind](event)
    except (KeyError, TypeError, ValueError):  # a newer daemon's event, or fields this CLI does not know
        what = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("type", "at_s"))
    return f"{when} {kind:<20} {what}"
