"""gpu_validate's figures: predicted against measured per component of one load, and the tables
it prints. Pure: dicts in, dicts and text out."""

from __future__ import annotations

GiB, MiB = 1 << 30, 1 << 20


def compare(row: dict, measured_by: str) -> list[dict]:
    """Per component of a load: the plan's prediction (plan.memory on the model's card) against what
    the engine holds (its own tensor count) or what the sampler measured (`measured_by`)."""
    memory = [c for c in row["plan"].get("memory", []) if c["device"] == "gpu0"]
    part = {p: sum(c["bytes"] for c in memory if c.get("part") == p) for p in ("weights", "workspace", "load_peak")}
    sources = {p: ", ".join(sorted({f"{c['name']} ({c['source']})" for c in memory if c.get("part") == p}))
               for p in part}
    engine, kv = row["engine"], row["leased"].get("kv", 0)
    # The engine's own measurement (CUDA: torch's reserved bytes; CPU: its anonymous memory) per phase.
    own = engine.get("measured") or {}
    weights = own.get("weights_bytes") or engine["weights_tensor_bytes"]
    kv_held = own.get("kv_bytes") or engine["kv_tensor_bytes"]
    rest = row["steady_bytes"] - weights - kv_held
    return [
        _row("weights", part["weights"], weights, sources["weights"], "the engine, when its weights were in"),
        _row("kv", kv, kv_held, "the kv lease (kv_per_token x tokens)", "the engine, what allocating its cache added"),
        _row("workspace", part["workspace"], rest, sources["workspace"], f"steady {measured_by} - weights - kv"),
        _row("steady", part["weights"] + part["workspace"] + kv, row["steady_bytes"], "weights + workspace + kv",
             f"{measured_by}, median of 5 samples after ready"),
        _row("load peak", row["plan"].get("peak_bytes", {}).get("gpu0", 0), row["peak_bytes"], "the plan's peak_bytes",
             f"{measured_by}, highest sample during the load"),
    ]


def _row(name: str, predicted: int, measured: int, source: str, how: str) -> dict:
    return {"name": name, "predicted_bytes": predicted, "measured_bytes": measured,
            "ratio": measured / predicted if predicted else None, "source": source, "how": how}


def size(n: float | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / MiB:.1f} MiB"


def render(result: dict) -> str:
    lines = [f"gpu_validate ({result['mode']} mode{', SCALED DOWN' if result['scaled'] else ''})"]
    lines += [f"  note: {n}" for n in result["notes"]]
    bandwidth = result["bandwidth_bytes_per_s"]
    lines.append(f"  copy bandwidth measured in this run: {bandwidth / GiB:.2f} GiB/s")
    for phase in ("capped", "uncapped"):
        lines.append(f"\n== {phase} ==")
        for row in result[phase]["loads"]:
            lines += _load_lines(row)
        lines += [_chat_line(c) for c in result[phase]["router"]]
    lines += _budget_lines(result["budget"])
    capped = result["capped"]
    ev = capped["eviction"]
    lines.append(f"\neviction: {ev['kind']} - loading {ev['by']} removed {', '.join(ev['evicted']) or 'nothing'}"
                 + (f" ({ev['why']})" if ev.get("why") else ""))
    reload = next(r for r in capped["loads"] if r["step"] == "reload")
    lines.append(f"reload: {reload['model']} {'ready' if reload['loaded'] else 'FAILED'} in {reload['load_s']:.2f} s")
    lines += _fingerprint_lines(capped["fingerprints"])
    return "\n".join(lines)


def _load_lines(row: dict) -> list[str]:
    head = f"\n{row['model']} ({row['step']}):"
    if not row["loaded"]:
        lines = [f"{head} FAILED to load (HTTP {row['status']}): {row.get('error', '')}"]
        return lines + [f"    | {line}" for line in row.get("engine_log", "").splitlines()[-6:]]
    evicted = f"; evicted {', '.join(row['evicted'])}" if row["evicted"] else ""
    lines = [f"{head} ready in {row['load_s']:.2f} s = {row['load_s'] / row['expected_load_s']:.1f}x the time its "
             f"{size(row['engine']['weights_tensor_bytes'])} of weights take at the copy bandwidth "
             f"({row['expected_load_s']:.2f} s){evicted}; params {row['params']}",
             f"  {'component':<10} {'predicted':>11} {'measured':>11} {'meas/pred':>9}  predicted from / measured as"]
    for c in row["components"]:
        ratio = f"{c['ratio']:.2f}" if c["ratio"] is not None else "-"
        lines.append(f"  {c['name']:<10} {size(c['predicted_bytes']):>11} {size(c['measured_bytes']):>11} {ratio:>9}"
                     f"  {c['source']} / {c['how']}")
    return lines


def _chat_line(c: dict) -> str:
    if c["status"] == 200:
        return f"router: {c['model']} answered 200 with {c['completion_tokens']} tokens in {c['seconds']:.2f} s"
    if c.get("skipped"):
        return f"router: {c['model']} not asked: {c['skipped']}"
    return f"router: {c['model']} answered {c['status']}: {c.get('error', '')}"


def _budget_lines(b: dict) -> list[str]:
    return ["\npeak against the budget (capped phase, "
            f"{b['samples']} samples at 50 ms):",
            f"  cap {size(b['cap_bytes'])} - headroom {size(b['headroom_bytes'])} - foreign {size(b['foreign_bytes'])}"
            f" = budget {size(b['budget_bytes'])}",
            f"  engines together at their peak {size(b['engines_peak_bytes'])} = "
            f"{b['engines_peak_bytes'] / b['budget_bytes']:.2f} of the budget",
            f"  device used at its peak {size(b['device_used_peak_bytes'])} = "
            f"{b['device_used_peak_bytes'] / b['cap_bytes']:.2f} of the cap (foreign measured "
            f"{size(b['foreign_measured_peak_bytes'])})"]


def _fingerprint_lines(f: dict) -> list[str]:
    if not f["available"]:
        return [f"fingerprints: GET /admin/v1/fingerprints answered {f['status']}"]
    lines = ["fingerprints (GET /admin/v1/fingerprints: what lessord measured and will plan the next load of each key from):"]
    for row in f["rows"]:
        lines.append(f"  {row['model']:<18} {row['outcome']:<8} {row['loads']} load(s)  {row['engine_version']}  on {', '.join(row['devices'])}")
        for m in row["measured"]:
            told = "" if m["weights_bytes"] is None else f"  weights {size(m['weights_bytes'])}  kv {size(m['kv_bytes'] or 0)}"
            lines.append(f"    {m['device']:<6} {m['method']:<7} peak {size(m['peak_bytes'])}  steady {size(m['steady_bytes'])}{told}")
    return lines

