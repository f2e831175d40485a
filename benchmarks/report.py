"""Turn the benchmark JSON (``benchmarks/results/<device>.json``) into the README's tables and plots.

    python benchmarks/report.py                 # every results/*.json except *-partial.json
    python benchmarks/report.py --readme        # also splice the tables into README.md
    python benchmarks/report.py a.json b.json --out DIR

Writes ``results/README_tables.md`` (Markdown) and one ``results/<device kind>.png`` per JSON
(time and peak memory of PTL forward+backward against the number of patches and the feature size,
one line per backend; matplotlib when installed, else drawn with Pillow). ``--readme`` replaces
what lies between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` in README.md (the markers
are appended when missing). Every number comes from the JSON: nothing is typed by hand.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from regharm_ext.markdown_blocks import cell, replace_block, rewrite_files

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
README = os.path.join(os.path.dirname(HERE), "README.md")
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
BACKEND_ORDER = ("reference", "torch", "native", "triton")
MiB = 2 ** 20

sys.path.insert(0, HERE)
import floor as floor_mod  # noqa: E402


# ------------------------------------------------------------------------------------------ data
def load(path: str) -> Dict:
    with open(path) as f:
        data = json.load(f)
    data["_path"] = path
    return data


def records(data: Dict) -> List[Dict]:
    """The benchmarks' ``extra_info`` dicts (one per measured case)."""
    return [b["extra_info"] for b in data.get("benchmarks", []) if b.get("extra_info", {}).get("time_s") is not None]


def select(recs: Iterable[Dict], **where) -> List[Dict]:
    out = []
    for r in recs:
        ok = True
        for k, v in where.items():
            if k == "sweep":
                ok = v in r.get("sweeps", [])
            elif r.get(k) != v:
                ok = False
            if not ok:
                break
        if ok:
            out.append(r)
    return out


def backends_in(recs: Iterable[Dict]) -> List[str]:
    names = {r["backend"] for r in recs}
    return [b for b in BACKEND_ORDER if b in names] + sorted(names - set(BACKEND_ORDER))


# ------------------------------------------------------------------------------------ formatting
def _sig3(v: float) -> str:
    return f"{v:#.3g}".rstrip(".")


def fmt_time(seconds: Optional[float]) -> str:
    """Three significant digits in s, ms or µs."""
    if seconds is None:
        return "—"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{_sig3(seconds * 1e3)} ms"
    return f"{_sig3(seconds * 1e6)} µs"


def fmt_mib(nbytes: Optional[float]) -> str:
    if nbytes is None:
        return "—"
    mib = nbytes / MiB
    return f"{mib:.1f}" if mib < 10 else f"{mib:.0f}"


def fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g} {unit}"
    return f"{x:.3g}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _one(recs: List[Dict]) -> Optional[Dict]:
    return recs[0] if recs else None


def fastest(recs: List[Dict], exclude=("reference",)) -> Optional[Dict]:
    cands = [r for r in recs if r["backend"] not in exclude and r.get("time_s") is not None]
    return min(cands, key=lambda r: r["time_s"]) if cands else None


# -------------------------------------------------------------------------------------- sections
def header_section(data: Dict) -> str:
    f = data.get("regharm", {})
    commit = (f.get("commit") or "unknown")[:10] + (" (uncommitted changes)" if f.get("commit_dirty") else "")
    skipped = {k: v for k, v in f.get("backends", {}).items() if v != "available"}
    lines = [f"### {f.get('device_name', 'unknown device')}", "",
             f"torch {f.get('torch')}, triton {f.get('triton') or 'not installed'}, commit {commit}, "
             f"run {data.get('datetime', '?')[:19]}. Backends not run here: "
             + ("; ".join(f"`{k}` ({v})" for k, v in skipped.items()) if skipped else "none") + ".", "",
             f"- Time: {f.get('time_method', '?')}.",
             f"- Memory: {f.get('memory_method', '?')}. MiB = 2^20 bytes; inputs and parameters are not counted."]
    if f.get("load_start") is not None:
        lines.append(f"- System load average (1 min) at the start and end of the run: {f['load_start']:.1f} and "
                     f"{f.get('load_end', float('nan')):.1f} on {f.get('cpus', '?')} logical cores; a loaded CPU "
                     f"makes the times noisy (the memory figures are deterministic).")
    if f.get("interrupted"):
        lines.append("- The run was interrupted (a time limit): only the benchmarks that finished are "
                     "shown; rows missing here were not measured.")
    if f.get("paper_channels"):
        ch = ", ".join(f"{k}²: {v}" for k, v in f["paper_channels"].items())
        lines.append(f"- Channels of the paper's decoder features (width 1, 256² input): {ch} "
                     f"(from {f.get('paper_channels_source', '?')}).")
    return "\n".join(lines)


def paper_tables_section(recs: List[Dict]) -> str:
    """Tables 3 and 4 of the paper: its memory column beside ours, per backend."""
    out = []
    for tab, title, keycol in (("table3", "Table 3 — LTL (batch 4, 256² input), forward+backward of the layer(s)", "tokens L"),
                               ("table4", "Table 4 — PTL at 128² (batch 4, 256² input), forward+backward of the layer", "patches K")):
        rs = [r for r in recs if r.get("table") == tab]
        if not rs:
            continue
        bks = backends_in(rs)
        settings = []
        for r in rs:
            if r["setting"] not in settings:
                settings.append(r["setting"])
        rows = []
        for s in settings:
            here = [r for r in rs if r["setting"] == s]
            first = here[0]
            key = first["K"] if tab == "table4" else "+".join(str(x) for x in first["L"])
            row = [s if tab == "table4" else (f"{s}²" if s != "all" else "all three"), key, first["paper_mb"]]
            for b in bks:
                r = _one([x for x in here if x["backend"] == b])
                row.append(fmt_mib(r["peak_bytes"]) if r else "—")
            best = fastest(here)
            row.append(f"`{best['backend']}` {fmt_time(best['time_s'])}" if best else "—")
            rows.append(row)
        head = ["setting" if tab == "table4" else "level", keycol, "paper MB (2080 Ti)"] + \
               [f"`{b}` MiB" for b in bks] + ["fastest, time"]
        out.append(f"**{title}.** Peak memory; the paper's column is its whole measurement on a 2080 Ti "
                   f"(what it counted is not stated), ours is the layer's own forward+backward.\n\n"
                   + table(head, rows))
    return "\n\n".join(out)


def paper_point_section(recs: List[Dict]) -> str:
    """Each op and layer at the paper's PTL setting (LTL at 32²): fwd and fwd+bwd, per backend."""
    rows = []
    for name in ("patch_stats", "masked_attention", "PTL", "LTL"):
        rs = select(recs, name=name, sweep="paper", dtype="fp32")
        for b in backends_in(rs):
            f = _one(select(rs, backend=b, mode="fwd"))
            fb = _one(select(rs, backend=b, mode="fwdbwd"))
            any_r = f or fb
            shape = f"B={any_r['B']}, " + (f"{any_r['H']}², K={any_r['K']}" if name != "LTL" else f"{any_r['H'][0]}²")
            rows.append([f"`{name}`", shape, f"`{b}`",
                         fmt_time(f and f["time_s"]), fmt_time(fb and fb["time_s"]),
                         fmt_mib(f and f["peak_bytes"]), fmt_mib(fb and fb["peak_bytes"])])
    if not rows:
        return ""
    return ("**Ops and layers at the paper's setting** (C=64, 128², patch 16, stride 4, 20 % foreground; "
            "LTL at 32², C=256).\n\n"
            + table(["op / layer", "shape", "backend", "fwd time", "fwd+bwd time", "fwd MiB", "fwd+bwd MiB"], rows))


SWEEPS = {
    "size": ("feature size", lambda r: f"{r['H']}²" if not isinstance(r["H"], list) else "+".join(map(str, r["H"]))),
    "table4": ("patch, stride (K)", lambda r: f"{r['patch']}, {r['stride']} (K={r['K']})"),
    "fg": ("foreground", lambda r: f"{r['fg']:.0%}"),
    "dtype": ("dtype", lambda r: r["dtype"]),
}


def sweep_section(recs: List[Dict]) -> str:
    """Forward+backward time and memory per backend along each sweep."""
    out = []
    for name in ("patch_stats", "masked_attention", "PTL", "LTL"):
        for sweep, (label, key) in SWEEPS.items():
            rs = select([r for r in recs if r.get("table") is None], name=name, sweep=sweep, mode="fwdbwd")
            if sweep == "table4":
                rs = [r for r in rs if r.get("kind") == "op"]
            if len({key(r) for r in rs}) < 2:
                continue
            bks = backends_in(rs)
            keys = []
            for r in sorted(rs, key=_sort_key(sweep)):
                if key(r) not in keys:
                    keys.append(key(r))
            rows = []
            for k in keys:
                row = [k]
                for b in bks:
                    r = _one([x for x in rs if key(x) == k and x["backend"] == b])
                    row.append(f"{fmt_time(r['time_s'])} · {fmt_mib(r['peak_bytes'])}" if r else "—")
                rows.append(row)
            B = rs[0]["B"]
            out.append(f"**`{name}` forward+backward vs {label}** (batch {B}; time · MiB)\n\n"
                       + table([label] + [f"`{b}`" for b in bks], rows))
    return "\n\n".join(out)


def _sort_key(sweep):
    order = {"fp32": 0, "bf16": 1, "fp16": 2}
    if sweep == "size":
        return lambda r: r["H"] if not isinstance(r["H"], list) else sum(r["H"])
    if sweep == "table4":
        return lambda r: (-r["patch"], -r["stride"])
    if sweep == "fg":
        return lambda r: r["fg"]
    return lambda r: order.get(r["dtype"], 9)


def floor_section(recs: List[Dict], device: str) -> str:
    """Bytes and FLOPs that must move/run at the paper point, the H100 roofline time, and ours."""
    rows = []
    for name in ("patch_stats", "masked_attention"):
        for dt in ("fp32", "bf16", "fp16"):
            rs = select(recs, name=name, sweep="dtype", dtype=dt)   # the fp32 one is the paper point
            for mode in ("fwd", "fwdbwd"):
                ms = select(rs, mode=mode)
                if not ms:
                    continue
                fl = ms[0]["floor"]
                meas = ", ".join(f"`{r['backend']}` {fmt_time(r['time_s'])}"
                                 + (f" ({r['time_s'] / fl['floor_s']:.0f}×)" if device == "cuda" else "")
                                 for r in sorted(ms, key=lambda r: r["time_s"]))
                r0 = ms[0]
                shape = f"B={r0['B']}, {r0['H']}², K={r0['K']}" + (f", {r0['active']:.0%} active" if "active" in r0 else "")
                rows.append([f"`{name}`", shape, dt, mode, f"{fmt_count(fl['bytes'])}B", fmt_count(fl["flops"]),
                             f"{fmt_time(fl['floor_s'])} ({fl['bound']})", meas])
    if not rows:
        return ""
    note = ("measured here on the GPU; the factor is measured / floor" if device == "cuda" else
            "measured here **on the CPU**: not comparable with the GPU floor, listed for scale (no gap is computed)")
    return (f"**The floor** at the paper setting: the bytes that must move and the FLOPs that must run "
            f"(formulas in `benchmarks/floor.py`), the time they take on an {floor_mod.H100['name']}, "
            f"and our times ({note}).\n\n"
            + table(["op", "shape", "dtype", "pass", "bytes", "FLOPs", "H100 floor", "measured"], rows))


def e2e_section(recs: List[Dict]) -> str:
    rs = [r for r in recs if r.get("kind") == "e2e"]
    if not rs:
        return ""
    def layout_of(r):   # rows from before the layout was recorded ran NCHW, auto's choice then
        return r.get("memory_format", "contiguous")

    auto = {layout_of(r) for r in rs if r.get("memory_format_is_auto", True)}
    layouts = sorted({layout_of(r) for r in rs}, key=lambda m: m not in auto)
    rows = []
    for b in backends_in(rs):
        for layout in layouts:
            sel = [r for r in select(rs, backend=b) if layout_of(r) == layout]
            if not sel:
                continue
            tr = _one(select(sel, mode="train"))
            i256 = _one(select(sel, mode="infer256"))
            i1k = _one(select(sel, mode="infer1024"))
            rows.append([f"`{b}`"] + ([f"`{layout}`"] if len(layouts) > 1 else [])
                        + [f"{tr['B'] / tr['time_s']:.2f}" if tr else "—", fmt_mib(tr and tr["peak_bytes"]),
                           fmt_time(i256 and i256["time_s"]), fmt_time(i1k and i1k["time_s"]),
                           fmt_mib(i1k and i1k["peak_bytes"])])
    r0 = rs[0]
    weights = (f", weights `{layouts[0]}`" if len(layouts) == 1 else
               "; each backend's first row has the weights' layout that training and inference use on this "
               "device, the second the other one")
    return (f"**End to end**, the paper's model `{r0['variant']}` (width {r0['width']}, "
            f"{r0['params'] / 1e6:.2f} M parameters, network at {r0['network_input']}²{weights}): "
            f"training images/s (batch 4 at 256², forward + loss + backward + Adam) and inference latency "
            f"of one image (1024²: the full-resolution path, network at 256², residual upsampled).\n\n"
            + table(["backend"] + (["layout"] if len(layouts) > 1 else [])
                    + ["train images/s", "train MiB", "latency 256²", "latency 1024²", "1024² MiB"], rows))


def _short(kernel: str) -> str:
    """A kernel's name without its template arguments and signature."""
    name = kernel.split("(")[0].split("<")[0].strip()
    return (name.split("::")[-1] or kernel)[:60]


def _check_cell(r: Dict) -> str:
    """An entry's ``benchmarks/bench_check.py`` result in a table cell."""
    c = r.get("check")
    if not c:
        return "—"
    if c.get("ok"):
        return f"ok ({c['excess']:.2g} of tol.)"
    return "**wrong**: " + cell(c.get("error") or f"{c.get('worst')} {c.get('excess')}× tol.")[:60]


def _ratio_cell(a: Dict) -> str:
    """A criterion's ratio; with ``--pairs``, the median of the alternating pairs, their range
    and the ratio of the separate runs."""
    if not a.get("pairs"):
        return f"{a['ratio']:.3g}"
    lo, hi = a["ratio_range"]
    return (f"{a['ratio']:.3g} ({lo:.3g}–{hi:.3g} over {a['pairs']} pairs; "
            f"separate runs {a['ratio_separate']:.3g})")


def acceptance_section(gb: Dict) -> str:
    """One ``benchmarks/gpu_bench.py`` JSON: the issues' settings per backend and the criteria."""
    env = gb.get("environment", {})
    name = env.get("device_name", "unknown device")
    commit = (env.get("git_commit") or "unknown")[:10]
    lines = [f"### Acceptance settings on {name} (`benchmarks/gpu_bench.py`)", "",
             f"torch {env.get('torch')}, triton {env.get('triton') or 'not installed'}, commit {commit}, "
             f"run {str(env.get('date', '?'))[:19]}. Median of timed runs after warm-up "
             f"({'CUDA events' if env.get('device', '').startswith('cuda') else 'perf_counter'}); "
             f"peak = extra memory of one call above what was allocated before it.", ""]
    rows = []
    checked = any("check" in r for r in gb.get("results", []))  # runs before the check had none
    for r in gb.get("results", []):
        sizes = gb.get("settings", {}).get(r["bench"], {})
        size = ", ".join(f"{k}={v}" for k, v in sizes.items() if k not in ("dtype", "layer"))
        if "error" in r:
            rows.append([f"`{r['bench']}`", size, f"`{r['backend']}`", r.get("dtype", "").replace("torch.", ""),
                         "error: " + cell(r["error"].splitlines()[0][:80]), "", ""] + [""] * checked)
            continue
        mb = r.get("fwd_bwd_peak_mb")
        kernel = f" ({r['sdpa_kernel']})" if r.get("sdpa_kernel") else ""
        rows.append([f"`{r['bench']}`", size, f"`{r['backend']}`{kernel}", r.get("dtype", "").replace("torch.", ""),
                     fmt_time(r["fwd_ms"] / 1e3), fmt_time(r["fwd_bwd_ms"] / 1e3),
                     "—" if mb is None else fmt_mib(mb * MiB)] + ([_check_cell(r)] if checked else []))
    lines.append(table(["setting", "sizes", "backend", "dtype", "forward", "fwd+bwd", "fwd+bwd peak MiB"]
                       + (["result vs float64"] if checked else []), rows))
    crit = gb.get("acceptance", {})
    if crit:
        with_check = any("checked" in a for a in crit.values())
        lines += ["", table(["criterion", "measured / baseline", "bound"] + (["checked"] if with_check else [])
                            + ["holds"],
                            [[label, _ratio_cell(a), f"{a['bound']:.3g}"]
                             + ([cell(a.get("checked", "—"))] if with_check else [])
                             + ["yes" if a["holds"] else "**no**"] for label, a in crit.items()])]
    shares = []
    for r in gb.get("results", []):
        prof = r.get("fwd_bwd_profile")
        total = sum(us for _, _, us in prof or ())
        if prof and total > 0:
            top = ", ".join(f"`{_short(n)}` {100 * us / total:.0f} %" for n, _, us in prof[:3])
            busy = r.get("fwd_bwd_kernel_us")
            busy = (f"; all kernels {fmt_time(busy / 1e6)} of the {fmt_time(r['fwd_bwd_ms'] / 1e3)} measured"
                    if busy else "")
            shares.append(f"- `{r['bench']}` on `{r['backend']}`: {top}{busy}")
    if shares:
        lines += ["", "Where the fwd+bwd time goes (the 3 largest kernels, as shares of the 8 largest; "
                  "kernel time well under the measured time means launches and Python set the pace):",
                  *shares]
    if gb.get("skipped"):
        lines += ["", "Not run: " + "; ".join(f"`{s['bench']}`/`{s['backend']}` ({s['reason']})"
                                              for s in gb["skipped"][:6])
                  + (f"; and {len(gb['skipped']) - 6} more" if len(gb["skipped"]) > 6 else "") + "."]
    return "\n".join(lines)


def markdown(datasets: List[Dict], image_prefix: str = "", heading: bool = False, sweeps: bool = True,
             acceptance: Sequence[Dict] = ()) -> str:
    """The tables of every dataset and every gpu_bench JSON (``acceptance``); ``heading`` for the
    README (which links the sweeps instead of holding them when ``sweeps`` is False)."""
    parts = ["## Benchmarks"] if heading else []
    parts.append("_Generated by `python benchmarks/report.py --readme` from `benchmarks/results/*.json`, "
                 "which `pytest benchmarks/ --benchmark-only` writes (`pip install --no-build-isolation -e \".[bench]\"` "
                 "for the plots) and `benchmarks/gpu_bench.py` on a GPU; do not edit by hand._")
    on_gpu = [d for d in datasets if d.get("regharm", {}).get("device") == "cuda"] + \
        [g for g in acceptance if str(g.get("environment", {}).get("device", "")).startswith("cuda")]
    if not on_gpu:
        parts.append("**No GPU result yet**: the CUDA and Triton kernels have been compiled (and the CUDA "
                     "ones emulated) on CPU machines, not timed on a GPU. `bash benchmarks/gpu_check.sh` "
                     "on a GPU machine measures them.")
    for gb in acceptance:
        parts.append(acceptance_section(gb))
    for data in datasets:
        recs = records(data)
        dev = data.get("regharm", {}).get("device", "cpu")
        kind = data.get("regharm", {}).get("device_kind", "unknown")
        parts.append(header_section(data))
        plot = f"{image_prefix}{kind}.png"
        parts.append(f"![PTL forward+backward time and memory vs patches and feature size, {kind}]({plot})")
        for sec in (paper_tables_section(recs), paper_point_section(recs), floor_section(recs, dev),
                    e2e_section(recs)):
            if sec:
                parts.append(sec)
        if sweeps:
            sec = sweep_section(recs)
            if sec:
                parts.append(sec)
        else:
            parts.append(f"Sweeps over feature size, patch/stride, foreground fraction and dtype, per op and "
                         f"layer: [`{image_prefix}README_tables.md`]({image_prefix}README_tables.md).")
    return "\n\n".join(parts) + "\n"


def splice(text: str, block: str) -> str:
    """README text with ``block`` between the bench markers (appended at the end when absent)."""
    return replace_block(text, BEGIN, END, block, append=True)


# ------------------------------------------------------------------------------------------ plot
def plot_series(recs: List[Dict]):
    """Panels of the PTL plots: (title, x label, y label, series); a series is
    ``{"label", "group" (colour: the backend), "style" ("-", ":" or "--"), "pts": [(x, y)]}``.

    Against K (Table 4, batch 4) each backend has one line per patch size (solid: 16 = h/8, the
    paper's choice; dotted: 32 = h/4),
    with the paper's memory column dashed; against the feature size one line per backend."""
    panels = []
    t4 = [r for r in recs if r.get("table") == "table4"]
    size = select([r for r in recs if r.get("table") is None], name="PTL", sweep="size", mode="fwdbwd", dtype="fp32")
    for rs, what in ((t4, "K"), (size, "size")):
        if not rs:
            continue
        B = rs[0]["B"]
        for ykey, ylabel, scale in (("time_s", "forward+backward time (s)", 1.0),
                                    ("peak_bytes", "peak memory (MiB)", 1 / MiB)):
            series = []
            groups = sorted({r["patch"] for r in rs}) if what == "K" else [None]
            bks = backends_in(rs)
            for b in bks + (["paper (2080 Ti, MB)"] if what == "K" and ykey == "peak_bytes" else []):
                for g in groups:
                    src = [r for r in rs if (g is None or r["patch"] == g)]
                    if b.startswith("paper"):
                        pts = sorted({(r["K"], r["paper_mb"]) for r in src})
                        style = "--"
                    else:
                        pts = sorted((r["K"] if what == "K" else r["H"], r[ykey] * scale)
                                     for r in src if r["backend"] == b)
                        style = ":" if (g is not None and g != min(groups)) else "-"
                    label = b if g is None else f"{b}, patch {g} (h/{128 // g})"
                    if pts:
                        series.append({"label": label, "group": b, "style": style, "pts": pts})
            xlabel = ("patches K (PTL at 128², Table 4 patch/stride, batch 4)" if what == "K"
                      else "feature size H = W (patch H/8, stride H/32)")
            panels.append((f"PTL {'time' if ykey == 'time_s' else 'memory'} vs {what} (batch {B})",
                           xlabel, ylabel, series))
    return panels


def plot(recs: List[Dict], path: str, title: str, force_pillow: bool = False) -> Optional[str]:
    panels = plot_series(recs)
    if not panels:
        return None
    try:
        if force_pillow:
            raise ImportError("Pillow drawing requested")
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, NullFormatter
    except ImportError:
        _plot_pillow(panels, path, title)
        return path
    cols = 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(11, 4.3 * rows), squeeze=False)
    groups = []
    for _, _, _, series in panels:
        for s in series:
            if s["group"] not in groups:
                groups.append(s["group"])
    colour = {g: f"C{i}" for i, g in enumerate(groups)}
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    for ax, (ptitle, xl, yl, series) in zip(axes.flat, panels):
        xs_all = set()
        for s in series:
            xs, ys = zip(*s["pts"])
            xs_all.update(xs)
            ax.plot(xs, ys, s["style"], marker="o", color=colour[s["group"]], label=s["label"])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sorted(xs_all))
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_major_formatter(plain)
        ax.set_title(ptitle, fontsize=10)
        ax.set_xlabel(xl, fontsize=9)
        ax.set_ylabel(yl, fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (127, 127, 127)]


def _plot_pillow(panels, path: str, title: str) -> None:
    """The same panels drawn with Pillow: log-log axes, one colour per backend, a legend
    (dotted and dashed lines are drawn thinner, as Pillow has no dash patterns)."""
    from PIL import Image, ImageDraw

    pw, ph, cols = 560, 380, 2
    rows = math.ceil(len(panels) / cols)
    img = Image.new("RGB", (pw * cols, ph * rows + 30), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), title, fill="black")
    groups = []
    for _, _, _, series in panels:
        for s in series:
            if s["group"] not in groups:
                groups.append(s["group"])
    for i, (ptitle, xl, yl, series) in enumerate(panels):
        ox, oy = (i % cols) * pw, 30 + (i // cols) * ph
        x0, y0, x1, y1 = ox + 70, oy + 30, ox + pw - 20, oy + ph - 50
        pts = [p for s in series for p in s["pts"] if p[0] > 0 and p[1] > 0]
        if not pts:
            continue
        lx = [math.log(p[0]) for p in pts]
        ly = [math.log(p[1]) for p in pts]
        ax0, ax1 = min(lx), (max(lx) if max(lx) > min(lx) else min(lx) + 1)
        ay0, ay1 = min(ly), (max(ly) if max(ly) > min(ly) else min(ly) + 1)
        ax0, ax1 = ax0 - 0.05 * (ax1 - ax0), ax1 + 0.05 * (ax1 - ax0)
        ay0, ay1 = ay0 - 0.05 * (ay1 - ay0), ay1 + 0.05 * (ay1 - ay0)

        def to_px(x, y):
            return (x0 + (math.log(x) - ax0) / (ax1 - ax0) * (x1 - x0),
                    y1 - (math.log(y) - ay0) / (ay1 - ay0) * (y1 - y0))

        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text((ox + 10, oy + 8), ptitle, fill="black")
        d.text((x0, y1 + 28), xl + " (log)", fill="black")
        d.text((ox + 4, y0 - 14), yl + " (log)", fill="black")
        for v in sorted({p[0] for p in pts}):
            px, _ = to_px(v, math.exp(ay0))
            d.line([px, y1, px, y1 + 4], fill="black")
            d.text((px - 8, y1 + 8), f"{v:g}", fill="black")
        for k in range(5):
            yv = math.exp(ay0 + (ay1 - ay0) * k / 4)
            _, py = to_px(math.exp(ax0), yv)
            d.line([x0 - 4, py, x0, py], fill="black")
            d.text((ox + 8, py - 6), f"{yv:.3g}", fill="black")
        for j, s in enumerate(series):
            col = _COLORS[groups.index(s["group"]) % len(_COLORS)]
            xy = [to_px(x, y) for x, y in s["pts"] if x > 0 and y > 0]
            if len(xy) > 1:
                d.line(xy, fill=col, width=2 if s["style"] == "-" else 1)
            for px, py in xy:
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=col)
            d.text((x0 + 8, y0 + 6 + 12 * j), s["label"], fill=col)
    img.save(path)


# ------------------------------------------------------------------------------------------- cli
def default_inputs(results: str = RESULTS) -> List[str]:
    files = sorted(p for p in glob.glob(os.path.join(results, "*.json")) if not p.endswith("-partial.json"))
    # CPU first, then GPUs by name
    return sorted(files, key=lambda p: (not os.path.basename(p).startswith("cpu"), p))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="*", help="benchmark JSON files (default: results/*.json, no -partial)")
    ap.add_argument("--out", default=RESULTS, help="where README_tables.md and the PNGs go")
    ap.add_argument("--readme", nargs="?", const=README, default=None,
                    help="splice the tables into this README (default README.md) between the bench markers")
    ap.add_argument("--pillow", action="store_true", help="draw the plots with Pillow even if matplotlib is there")
    args = ap.parse_args(argv)
    paths = args.json or default_inputs()
    if not paths:
        print("no benchmark JSON found; run `pytest benchmarks/ --benchmark-only` first", file=sys.stderr)
        return 1
    datasets, acceptance = [], []
    for p in paths:
        data = load(p)
        if "benchmarks" in data and "regharm" in data:
            datasets.append(data)
        elif "results" in data and "environment" in data:   # benchmarks/gpu_bench.py
            acceptance.append(data)
        elif args.json:
            print(f"{p}: not a JSON of this suite or of gpu_bench.py", file=sys.stderr)
            return 1
    if not datasets:
        print("no JSON of this suite found; run `pytest benchmarks/ --benchmark-only` first", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    for data in datasets:
        f = data.get("regharm", {})
        kind = f.get("device_kind", os.path.splitext(os.path.basename(data["_path"]))[0])
        png = plot(records(data), os.path.join(args.out, f"{kind}.png"),
                   f"regharm_ext PTL benchmarks on {f.get('device_name', kind)}", force_pillow=args.pillow)
        if png:
            print(f"wrote {png}")
    md_path = os.path.join(args.out, "README_tables.md")
    with open(md_path, "w") as fh:
        fh.write(markdown(datasets, acceptance=acceptance))
    print(f"wrote {md_path}")
    if args.readme:
        rel = os.path.relpath(args.out, os.path.dirname(os.path.abspath(args.readme)))
        block = markdown(datasets, image_prefix=rel.replace(os.sep, "/") + "/", heading=True, sweeps=False,
                         acceptance=acceptance)
        return rewrite_files([Path(args.readme)], lambda text: splice(text, block))
    return 0


if __name__ == "__main__":
    sys.exit(main())
