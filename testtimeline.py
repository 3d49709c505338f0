"""A history check's timeline, as one self-contained SVG (not part of the package).

The history check (``pytest -k randomized_history``) leaves ``history.json``: the
nemesis's faults (``events``), every guarded body (``bodies``: its keys, worker pid,
start and end, fencing token, which keys it saw lost or had broken) and what each
check found (``violations``). :func:`render` draws it as Jepsen's timelines do: one
lane per key, grouped by kind, a bar per hold coloured by the worker process that ran
it, faults as shaded bands across every lane, lost and broken leases hatched with a
red end, and the holds a violation names outlined in red. Hovering a bar or a band
shows its details (an SVG ``<title>``); nothing is fetched, no script runs.

    python -m testtimeline history.json [out.svg] [--from S] [--to S]

writes ``timeline.svg`` beside the history unless told where; ``--from``/``--to``
keep a window (seconds from the start), for a long run. Only the standard library:
the tests import it, and it runs where pytest is not installed.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

SVG = "http://www.w3.org/2000/svg"

#: Pixels: the label column, a sub-row of a lane, the plot's width by default.
LABELS, ROW, WIDTH = 190, 12, 1000

#: Fill of a fault's band, by its action or else the action's first word (the rest: grey):
#: ZooKeeper servers blue, worker processes red, keys and nodes orange and purple.
FAULT_FILLS = {
    "kill leader": "#3c78d8",
    "stop follower": "#6d9eeb",
    "pause": "#6d9eeb",
    "partition": "#76a5af",
    "kill": "#e06666",
    "start": "#93c47d",
    "rm": "#f6b26b",
    "delete": "#b4a7d6",
}


def _fault_fill(action: str) -> str:
    return FAULT_FILLS.get(action, FAULT_FILLS.get(action.split(" ")[0], "#999"))


#: The marks, for the legend: (class, what it means).
MARKS = (
    ("lost", "lease lost (the body saw lease.lost)"),
    ("broken", "key broken by rm while held"),
    ("killed", "process SIGKILLed in the body"),
    ("open", "never ended"),
)


def _finite(value: Any) -> float | None:
    """A time, or None for none (a never-ended body's ``until`` is infinite)."""
    if value is None or not math.isfinite(float(value)):
        return None
    return float(value)


def _lane_of(res: str) -> tuple[str, str]:
    """(group, key label) of a lock key: ``testtasks.history_lock('k0')`` is (lock, 'k0')."""
    match = re.fullmatch(r"(?:[\w.]*?\.)?(?:history_)?(\w+)\((.*)\)", res)
    return (match.group(1), match.group(2)) if match else ("", res)


def _colour(index: int) -> str:
    """The ``index``-th worker's colour: hues a golden angle apart, distinct side by side,
    none of them red (the colour of the marks)."""
    hue = 30 + (170 + index * 137.508) % 300
    return f"hsl({hue:.0f},60%,{52 + 10 * (index % 3)}%)"


def _step(span: float, ticks: int = 12) -> float:
    """A round tick step (1, 2 or 5 times a power of ten) giving about ``ticks`` ticks."""
    raw = max(span, 1e-6) / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _sub(parent: ET.Element, tag: str, text: str | None = None, **attrs: Any) -> ET.Element:
    element = ET.SubElement(
        parent, tag, {k.rstrip("_").replace("_", "-"): str(v) for k, v in attrs.items()}
    )
    if text is not None:
        element.text = text
    return element


class _Plot:
    """Times to x pixels over the window [lo, hi] (seconds from t0)."""

    def __init__(self, lo: float, hi: float, width: int) -> None:
        self.lo, self.hi, self.width = lo, hi, width

    def x(self, t: float) -> float:
        t = min(max(t, self.lo), self.hi)
        return round(LABELS + (t - self.lo) / (self.hi - self.lo) * self.width, 1)


def _holds(bodies: list[dict], t0: float, lo: float, hi: float) -> dict[str, list[tuple]]:
    """Per key, (start, end, body, part) of each hold in the window, in start order;
    ``end`` None: the body never ended nor was killed."""
    lanes: dict[str, list[tuple]] = {}
    for b in bodies:
        start = float(b["start"]) - t0
        end = _finite(b.get("until", b.get("end")))
        end = None if end is None else end - t0
        if start > hi or (end is not None and end < lo):
            continue
        for part in b.get("parts") or [{"res": str(b.get("key"))}]:
            lanes.setdefault(part["res"], []).append((start, end, b, part))
    for holds in lanes.values():
        holds.sort(key=lambda h: h[0])
    return lanes


def _pack(holds: list[tuple], hi: float) -> list[int]:
    """A sub-row for each hold so that none overlaps another in its row (first that fits)."""
    ends: list[float] = []
    rows = []
    for start, end, _, _ in holds:
        row = next((i for i, e in enumerate(ends) if e <= start), len(ends))
        if row == len(ends):
            ends.append(0.0)
        ends[row] = hi if end is None else end
        rows.append(row)
    return rows


def render(
    history: dict, start: float | None = None, stop: float | None = None, width: int = WIDTH
) -> str:
    """The SVG text of ``history`` (the dict the history check writes to history.json),
    over seconds ``start``..``stop`` from its t0 (by default: all of it)."""
    t0 = float(history["t0"])
    bodies: list[dict] = history.get("bodies") or []
    events: list[dict] = history.get("events") or []
    times = [float(b["start"]) - t0 for b in bodies]
    times += [t - t0 for b in bodies for t in (_finite(b.get("until")), _finite(b.get("end"))) if t]
    times += [float(e[k]) - t0 for e in events for k in ("t0", "t", "t1") if k in e]
    lo = min([0.0, *times]) if start is None else start
    hi = max([lo + 1.0, *times]) if stop is None else stop
    hi += 0.02 * (hi - lo) if stop is None else 0.0  # room for an open body's arrow
    hi = max(hi, lo + 1e-3)
    plot = _Plot(lo, hi, width)

    flagged: dict[str, list[str]] = {}  # body id: the checks that name it
    found = {check: vs for check, vs in (history.get("violations") or {}).items() if vs}
    for check, violations in found.items():
        for v in violations:
            for body in v.get("bodies") or []:
                flagged.setdefault(body, []).append(check)

    # The lanes: by group, then key; a lane has as many sub-rows as its holds overlap.
    lanes = _holds(bodies, t0, lo, hi)
    pids: dict[Any, int] = {}  # the workers seen in the window, by their first hold
    for _, _, b, _ in sorted((h for holds in lanes.values() for h in holds), key=lambda h: h[0]):
        pids.setdefault(b.get("pid"), len(pids))
    shown = [
        e
        for e in events
        if float(e.get("t1", e["t"])) - t0 >= lo and float(e.get("t0", e["t"])) - t0 <= hi
    ]
    order = sorted(lanes, key=lambda res: (*_lane_of(res), res))
    top = 64 + 14 * len(_summary_lines(history, width))
    headers: list[tuple[str, int]] = []  # (group, y)
    layout: list[tuple[str, int, list[int], int]] = []  # (res, y, each hold's sub-row, rows)
    y, group = top + 18, None
    for res in order:
        name = _lane_of(res)[0]
        if name != group:
            group = name
            y += 16  # the group's title
            headers.append((name or "keys", y))
        rows = _pack(lanes[res], hi)
        layout.append((res, y, rows, max(rows) + 1))
        y += (max(rows) + 1) * ROW + 4
    bottom = y + 4

    root = ET.Element(
        "svg", {"xmlns": SVG, "version": "1.1", "font-family": "sans-serif", "font-size": "10"}
    )
    defs = _sub(root, "defs")
    hatch = _sub(defs, "pattern", id="hatch", width=4, height=4, patternUnits="userSpaceOnUse")
    _sub(hatch, "path", d="M0,4 l4,-4", stroke="#000", stroke_width=1, opacity=0.55)
    _sub(root, "rect", width="100%", height="100%", fill="#fff")
    title = f"History seed {history.get('seed', '?')}"
    if start is not None or stop is not None:
        title += f", {lo:g} to {hi:g} s of it"
    _sub(root, "text", title, x=10, y=20, font_size=14, font_weight="bold")
    for i, line in enumerate(_summary_lines(history, width)):
        _sub(root, "text", line, x=10, y=38 + 14 * i, fill="#444")

    # Time axis and grid, seconds from t0.
    axis = _sub(root, "g", class_="axis", stroke="#ddd")
    step = _step(hi - lo)
    tick = math.ceil(lo / step) * step
    while tick <= hi + 1e-9:
        x = plot.x(tick)
        _sub(axis, "line", x1=x, x2=x, y1=top + 8, y2=bottom)
        label = f"{tick:.{max(0, -math.floor(math.log10(step)))}f}"
        _sub(axis, "text", label, x=x, y=top + 4, stroke="none", fill="#444", text_anchor="middle")
        tick += step
    _sub(root, "text", "s from start", x=10, y=top + 4, fill="#444")

    # Each lane's stripe, under the faults' bands; its holds go over them.
    stripes = _sub(root, "g", class_="stripes", fill="#eee", fill_opacity=0.5)
    for _res, ly, _rows, height in layout:
        _sub(stripes, "rect", x=LABELS, y=ly, width=width, height=height * ROW)

    # Faults: a band from when each began to when it was over (a kill: a thin line).
    faults = _sub(root, "g", class_="faults")
    for n, e in enumerate(shown):
        began = float(e.get("t0", e["t"])) - t0
        over = float(e.get("t1", e["t"])) - t0
        action = str(e.get("action", "?"))
        x1, x2 = plot.x(began), plot.x(over)
        band = _sub(faults, "g", class_="fault", data_action=action)
        _sub(band, "title", _fault_title(e, t0))
        _sub(
            band,
            "rect",
            x=x1,
            y=top + 8,
            width=max(x2 - x1, 2),
            height=bottom - top - 8,
            fill=_fault_fill(action),
            fill_opacity=0.25 if x2 - x1 > 4 else 0.6,
        )
        _sub(band, "text", _short(action), x=x1, y=top + 16 + 9 * (n % 2), fill="#333", font_size=8)

    # The lanes and their holds.
    held = _sub(root, "g", class_="lanes")
    for name, hy in headers:
        _sub(held, "text", name, x=8, y=hy - 3, font_weight="bold", class_="group")
    for res, ly, rows, _height in layout:
        lane = _sub(held, "g", class_="lane", data_key=res)
        _sub(lane, "title", res)
        _sub(lane, "text", _lane_of(res)[1] or res, x=18, y=ly + ROW - 3)
        for (start, end, b, part), row in zip(lanes[res], rows):
            _hold(lane, plot, b, part, start, end, ly + row * ROW, pids, flagged.get(b["body"]))

    # The legend: workers, marks, faults, and what each check found.
    legend_y = _legend(root, bottom + 14, width, pids, shown, found)
    root.set("width", str(LABELS + width + 20))
    root.set("height", str(legend_y + 10))
    root.set("viewBox", f"0 0 {LABELS + width + 20} {legend_y + 10}")
    ET.indent(root, space="")
    return ET.tostring(root, encoding="unicode") + "\n"


def _summary_lines(history: dict, width: int) -> list[str]:
    summary = str(history.get("summary") or "")
    return textwrap.wrap(summary, max(40, (LABELS + width) // 6))[:6]


def _short(action: str) -> str:
    words = action.replace(",", "").split()
    return " ".join(words[:2])


def _fault_title(e: dict, t0: float) -> str:
    when = f"{float(e['t']) - t0:.3f} s"
    if "t0" in e and "t1" in e:
        when = f"{float(e['t0']) - t0:.3f} .. {float(e['t1']) - t0:.3f} s"
    skip = ("action", "t", "t0", "t1", "out", "witnesses")
    rest = ", ".join(
        f"{k} {str(v).rsplit('/', 2)[-1] if k == 'path' else v}"
        for k, v in e.items()
        if k not in skip
    )
    return f"{e.get('action')} {when}" + (f": {rest}" if rest else "")


def _hold(
    lane: ET.Element,
    plot: _Plot,
    b: dict,
    part: dict,
    start: float,
    end: float | None,
    y: float,
    pids: dict[Any, int],
    checks: list[str] | None,
) -> None:
    """One body's hold of one key: a bar, its token, its marks, its details on hover."""
    x1 = plot.x(start)
    x2 = plot.x(plot.hi if end is None else end)
    w = max(x2 - x1, 1.0)
    token = b.get("token")
    lost, broken = bool(part.get("lost")), bool(part.get("broken"))
    killed = _finite(b.get("killed"))
    classes = ["hold"]
    classes += [name for name, on in (("lost", lost), ("broken", broken)) if on]
    if killed is not None and (b.get("end") is None or killed < float(b["end"])):
        classes.append("killed")
    if end is None:
        classes.append("open")
    if checks:
        classes.append("violation")
    attrs = {"class": " ".join(classes), "data-body": str(b["body"])[:8], "data-token": str(token)}
    if checks:
        attrs["data-check"] = "; ".join(sorted(set(checks)))
    g = ET.SubElement(lane, "g", attrs)
    ended = "open" if end is None else f"{end:.3f}"
    notes = [c for c in classes[1:] if c != "violation"]
    keys = len(b.get("parts") or [])
    _sub(
        g,
        "title",
        (
            f"{b.get('kind')} {b.get('key')}{f' ({keys} keys)' if keys > 1 else ''}: "
            f"{start:.3f} .. {ended} s, token {token}, pid {b.get('pid')}, "
            f"task {str(b.get('task_id', ''))[:8]}"
            + (f"; {', '.join(notes)}" if notes else "")
            + (f"; VIOLATION: {', '.join(sorted(set(checks)))}" if checks else "")
        ),
    )
    h = ROW - 2 if b.get("kind") != "read" else ROW - 5
    fill = _colour(pids.get(b.get("pid"), 0))
    bar = _sub(g, "rect", x=x1, y=y + 1, width=round(w, 1), height=h, fill=fill)
    if checks:
        bar.set("stroke", "#d00")
        bar.set("stroke-width", "2")
    if lost or broken:
        _sub(g, "rect", x=x1, y=y + 1, width=round(w, 1), height=h, fill="url(#hatch)")
    if lost:
        _sub(g, "rect", x=round(x1 + w - 2, 1), y=y + 1, width=2, height=h, fill="#d00")
    if "killed" in classes:
        _sub(g, "rect", x=round(x1 + w - 2, 1), y=y + 1, width=2, height=h, fill="#000")
    if end is None:
        _sub(g, "path", d=f"M{x1 + w},{y + 1} l4,{h / 2} l-4,{h / 2}z", fill=fill)
    if token is not None and w > 7 * len(str(token)) + 4:
        _sub(g, "text", str(token), x=round(x1 + 2, 1), y=y + ROW - 3, font_size=8, fill="#000")


def _legend(
    root: ET.Element,
    y: float,
    width: int,
    pids: dict[Any, int],
    events: list[dict],
    found: dict[str, list[dict]],
) -> float:
    """Draw the legend from ``y`` down; returns where it ends."""
    legend = _sub(root, "g", class_="legend")
    x = 10.0

    def item(mark: ET.Element, label: str, cls: str) -> None:
        nonlocal x, y
        if x + 24 + 6 * len(label) > LABELS + width:
            x, y = 10.0, y + 16
        entry = _sub(legend, "g", class_=cls)
        mark.set("transform", f"translate({x},{y - 9})")
        entry.append(mark)
        _sub(entry, "text", label, x=x + 18, y=y)
        x += 30 + 5.6 * len(label)

    def swatch(fill: str, **attrs: Any) -> ET.Element:
        g = ET.Element("g")
        _sub(g, "rect", width=14, height=10, fill=fill, **attrs)
        return g

    _sub(legend, "text", "workers (pid):", x=10, y=y, font_weight="bold")
    y += 16
    for pid, index in pids.items():
        item(swatch(_colour(index)), f"pid {pid}", "worker")
    y, x = y + 22, 10.0
    _sub(legend, "text", "marks:", x=10, y=y, font_weight="bold")
    y += 16
    for cls, label in MARKS:
        mark = swatch("#bbb")
        if cls in ("lost", "broken"):
            _sub(mark, "rect", width=14, height=10, fill="url(#hatch)")
        if cls in ("lost", "killed"):
            _sub(mark, "rect", x=12, width=2, height=10, fill="#d00" if cls == "lost" else "#000")
        if cls == "open":
            _sub(mark, "path", d="M14,0 l4,5 l-4,5z", fill="#bbb")
        item(mark, label, f"mark-{cls}")
    item(swatch("#fff", stroke="#d00", stroke_width=2), "named by a violation", "mark-violation")
    counts: dict[str, int] = {}
    for e in events:
        counts[str(e.get("action"))] = counts.get(str(e.get("action")), 0) + 1
    if counts:
        y, x = y + 22, 10.0
        _sub(legend, "text", "faults (bands; hover for details):", x=10, y=y, font_weight="bold")
        y += 16
        for action, count in sorted(counts.items()):
            fill = _fault_fill(action)
            item(swatch(fill, fill_opacity=0.5), f"{action} x{count}", "fault-kind")
    y, x = y + 22, 10.0
    if not found:
        _sub(legend, "text", "violations: none", x=10, y=y, font_weight="bold", class_="checks")
        return y
    _sub(legend, "text", "violations:", x=10, y=y, font_weight="bold", fill="#d00")
    for check, violations in found.items():
        y += 16
        entry = _sub(legend, "g", class_="check", data_check=check)
        _sub(
            entry,
            "rect",
            x=10,
            y=y - 9,
            width=14,
            height=10,
            fill="#fff",
            stroke="#d00",
            stroke_width=2,
        )
        _sub(entry, "text", f"{check}: {len(violations)}", x=30, y=y, fill="#d00")
        for v in violations[:3]:
            for line in textwrap.wrap(str(v.get("what", "")), (LABELS + width) // 6)[:2]:
                y += 13
                _sub(entry, "text", line, x=40, y=y, fill="#444", font_size=9)
    return y


def write(history: dict, path: Path, **window: Any) -> Path:
    """Render ``history`` into ``path``; returns the path."""
    path.write_text(render(history, **window))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m testtimeline", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("history", type=Path, help="a history.json the history check left")
    parser.add_argument("out", type=Path, nargs="?", help="default: timeline.svg beside it")
    parser.add_argument("--from", dest="start", type=float, help="window start, s from t0")
    parser.add_argument("--to", dest="stop", type=float, help="window end, s from t0")
    parser.add_argument("--width", type=int, default=WIDTH, help="plot width in pixels")
    args = parser.parse_args(argv)
    out = args.out or args.history.with_name("timeline.svg")
    history = json.loads(args.history.read_text())
    write(history, out, start=args.start, stop=args.stop, width=args.width)
    print(out)


if __name__ == "__main__":
    main()
