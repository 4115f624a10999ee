"""Turn a pytest-benchmark JSON of the flowkern suites into BENCHMARKS.md.

    .venv/bin/python bench/report.py [bench/results/training.json ...] [BENCHMARKS.md]

Several JSON files (e.g. one per op family) give one section each; the last
argument, when it ends in .md, is the output (default: BENCHMARKS.md at the
repository root).

Every number written comes from the JSON: the candidates' timing statistics,
and what bench/conftest.py stored beside them (per benchmark `extra_info`:
op, size, pass, candidate, bytes counted and roofline time; per run
`machine_info["flowkern"]`: command, copy bandwidth, load average, versions).
Nothing is typed in by hand; the targets are the issue's thresholds, and
whether they are met is computed here.

bench/bench_overhead.py's rows (extra_info["overhead_op"]: host overhead per
call on tiny tensors) get their own table, "Host overhead", with times
relative to a native torch.add; JSON files without them (older runs) give
the report as before.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_JSON = os.path.join(HERE, "results", "training.json")
DEFAULT_OUT = os.path.join(ROOT, "BENCHMARKS.md")

BASELINE = "flowkern"
OUT_CANDIDATE = "flowkern out="
COMPILE = "torch.compile(eager)"
EAGER = "eager"
FLOW_MATCHING = "flow_matching AffineProbPath.sample"
COPY = "copy_ roofline (x0, x1 -> 2 buffers)"
OP_ORDER = {"interpolate": 0, "flow_matching_loss": 1}
PASS_ORDER = {"fwd": 0, "fwd+bwd": 1}
SLACK = 0.25  # cores of oversubscription tolerated before a group is called noisy


def noise_limit(doc):
    """Other-process load (cores) above which the run's own threads no longer
    had a core each: nproc - torch threads + SLACK (0.25 for a default run on
    an otherwise idle machine)."""
    fk = doc.get("machine_info", {}).get("flowkern", {})
    nproc, threads = fk.get("nproc"), fk.get("torch_threads")
    if not nproc or not threads:
        return SLACK
    return max(0, nproc - threads) + SLACK


def other_load(b):
    return b.get("extra_info", {}).get("other_load")


def group_noise(rows):
    loads = [other_load(b) for b in rows if other_load(b) is not None]
    return max(loads) if loads else None


def fmt_time(s):
    if s is None:
        return "—"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.3g} ms" if s < 1e-2 else f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def fmt_ratio(x):
    return "—" if x is None else f"{x:.2f}×"


def fmt_bytes(b):
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= k:
            return f"{b / k:.3g} {unit}"
    return f"{b} B"


def load(path):
    with open(path) as f:
        return json.load(f)


def groups_of(doc):
    """OrderedDict group -> list of benchmark rows, in (op, size, pass) order,
    candidates in the suite's order."""
    groups = {}
    for b in doc["benchmarks"]:
        ex = b.get("extra_info", {})
        if "candidate" not in ex:
            continue
        groups.setdefault(b["group"], []).append(b)

    def key(item):
        ex = item[1][0]["extra_info"]
        return (OP_ORDER.get(ex["op"], 99), ex["op"], PASS_ORDER.get(ex["pass_"], 99), ex["n"])

    out = OrderedDict()
    for g, rows in sorted(groups.items(), key=key):
        out[g] = sorted(rows, key=lambda b: b["extra_info"]["order"])
    return out


def median(rows, candidate):
    for b in rows:
        if b["extra_info"]["candidate"] == candidate:
            return b["stats"]["median"]
    return None


def run_section(doc, json_path):
    """The '## Run' part of one JSON: machine, versions, load, roofline, command."""
    mi = doc.get("machine_info", {})
    fk = mi.get("flowkern", {})
    cpu = mi.get("cpu", {}) or {}
    brand = cpu.get("brand_raw") or mi.get("processor") or "unknown CPU"
    peers = fk.get("peers", {}) or {}
    peer_txt = ", ".join(f"{k} {v}" if v else f"{k} not installed (its rows are skipped)"
                         for k, v in peers.items()) or "none recorded"
    la0, la1 = fk.get("loadavg_start"), fk.get("loadavg_end")
    nproc = fk.get("nproc")
    ops = sorted({b["extra_info"]["op"] for b in doc["benchmarks"]
                  if "candidate" in b.get("extra_info", {})}, key=lambda o: OP_ORDER.get(o, 99))
    if overhead_rows(doc):
        ops.append("host overhead")
    lines = [
        f"## {', '.join(ops) or 'no labelled benchmarks'} — `{os.path.relpath(json_path, ROOT)}`",
        "",
        "### Run",
        "",
        f"- Machine: {brand}, nproc = {nproc}, torch threads = {fk.get('torch_threads')} "
        f"({'set by --bench-threads' if fk.get('threads_set') else 'torch default'}), "
        f"{mi.get('system', '')} {mi.get('release', '')}".rstrip(),
        f"- Device: {fk.get('device', 'cpu')}" + (f" ({fk['gpu']})" if fk.get("gpu") else ""),
        f"- Software: torch {fk.get('torch')}, flowkern {fk.get('flowkern')} (auto backend for "
        f"these tensors: `{fk.get('flowkern_backend_auto')}`), Python {mi.get('python_version')}; "
        f"peers: {peer_txt}",
        f"- Date: {doc.get('datetime', fk.get('started'))}; benchmark session wall time "
        f"{fk.get('wall_s', 0):.0f} s",
    ]
    if la0 and la1:
        lines.append(f"- Load average (1 min) at start / end: {la0[0]:.2f} / {la1[0]:.2f}")
        lines[-1] += " (this run's own threads included; see *other load* per row)"
    if fk.get("copy_gbps"):
        lines.append(f"- Copy bandwidth (the roofline): {fk['copy_gbps']:.1f} GB/s = (bytes read "
                     f"+ bytes written) / best time of `dst.copy_(src)` on "
                     f"{fmt_bytes(fk['copy_buffer_bytes'])} fp32 buffers, measured in this run "
                     f"(best of {len(fk.get('copy_samples_s', []))})")
    lines += [f"- Benchmark command (from the repository root): "
              f"`{fk.get('command', '(not recorded)')}`", ""]
    return lines


def group_table(name, rows, limit):
    ex0 = rows[0]["extra_info"]
    base = median(rows, BASELINE)
    lines = [
        f"#### {ex0['op']} — {ex0['size']} elements ({ex0['n']:,} fp32), {ex0['pass_']}",
        "",
        f"Roofline: {ex0['bytes_per_elem']} B/elem ({ex0['counted']}) = "
        f"{fmt_bytes(ex0['bytes'])} → {fmt_time(ex0['roofline_s'])} at "
        f"{ex0['copy_gbps']:.1f} GB/s." + (f" Note: {ex0['note']}." if ex0.get("note") else ""),
        "",
        "| candidate | median | min | IQR | rounds | other load | flowkern speedup over it "
        "| time ÷ roofline |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b in rows:
        ex, st = b["extra_info"], b["stats"]
        speed = st["median"] / base if base else None
        cand = f"**{ex['candidate']}**" if ex["candidate"] == BASELINE else ex["candidate"]
        load_ = other_load(b)
        lines.append(f"| {cand} | {fmt_time(st['median'])} | {fmt_time(st['min'])} | "
                     f"{fmt_time(st['iqr'])} | {st['rounds']} | "
                     f"{'—' if load_ is None else f'{load_:.2f}'} | {fmt_ratio(speed)} | "
                     f"{fmt_ratio(st['median'] / ex['roofline_s'])} |")
    noise = group_noise(rows)
    if noise is not None and noise > limit:
        lines += ["", f"**Noisy:** other processes kept up to {noise:.2f} cores busy while this "
                  "group was timed, so the run's threads did not have a core each; its ratios "
                  "are unreliable."]
    lines.append("")
    return lines


def targets(groups):
    """(target, group, measured, threshold, met) rows; the thresholds are the
    issue's targets for the training ops (issue 2)."""
    rows = []
    for g, bs in groups.items():
        ex = bs[0]["extra_info"]
        fk = median(bs, BASELINE)
        if fk is None or ex["op"] not in OP_ORDER:  # the training ops' targets only
            continue
        if ex["op"] == "interpolate" and ex["size"] in ("4M", "16M"):
            fm = median(bs, FLOW_MATCHING)
            if fm is not None:
                rows.append(("interpolate ≥ 4× flow_matching AffineProbPath.sample", g,
                             f"{fm / fk:.2f}×", "≥ 4×", fm / fk >= 4))
            else:
                rows.append(("interpolate ≥ 4× flow_matching AffineProbPath.sample", g,
                             "not measured (flow_matching missing)", "≥ 4×", None))
        comp = median(bs, COMPILE)
        if comp is not None:
            rows.append(("never slower than torch.compile of the reference", g,
                         f"{comp / fk:.2f}× (compile ÷ flowkern)", "≥ 1×", comp / fk >= 1))
        if ex["op"] == "interpolate":
            out = next((b for b in bs if b["extra_info"]["candidate"] == OUT_CANDIDATE), None)
            if out is not None:
                r = out["stats"]["median"] / out["extra_info"]["roofline_s"]
                copy = median(bs, COPY)
                extra = (f"; {out['stats']['median'] / copy:.2f}× the copy_ row at this size"
                         if copy else "")
                rows.append(("interpolate out= within 1.5× of the copy roofline", g,
                             f"{r:.2f}× roofline{extra}", "≤ 1.5×", r <= 1.5))
        if ex["op"] == "flow_matching_loss" and ex["pass_"] == "fwd+bwd":
            eager = median(bs, EAGER)
            if eager is not None:
                rows.append(("flow_matching_loss fwd+bwd ≥ 3× eager", g,
                             f"{eager / fk:.2f}×", "≥ 3×", eager / fk >= 3))
    return rows


STEP_BASELINES = ("flowkern", "flowkern (both stages)")
LOOP = "20-step loop, trivial model"
# Peer steps that make two passes or fewer over the state (exempt from the
# >= 3x target, issue 3): diffusers' FlowMatchEuler step (a multiply-add and
# a cast).
TWO_PASS_PEERS = ("diffusers FlowMatchEulerDiscreteScheduler.step",)


def step_targets(groups):
    """Issue 3's targets: every fused step within 1.5x of its copy roofline and
    >= 3x every multi-pass peer step; the sampler loop's non-model overhead
    <= 10% above its fused steps, and >= 3x the peers' loops."""
    rows = []
    for g, bs in groups.items():
        ex = bs[0]["extra_info"]
        if ex["op"] == LOOP:
            loop = median(bs, "flowkern.sample euler")
            floor = median(bs, "fused euler steps alone (floor)")
            if loop is not None and floor is not None:
                rows.append(("sample loop overhead ≤ 10% above its fused steps", g,
                             f"{loop / floor:.3f}× the steps alone", "≤ 1.10×", loop / floor <= 1.10))
            for method in ("euler", "heun", "dpmpp_2m"):
                fk, peer = median(bs, f"flowkern.sample {method}"), median(
                    bs, f"k-diffusion sample_{method}")
                if fk is not None and peer is not None:
                    rows.append((f"≥ 3× k-diffusion sample_{method} (whole loop)", g,
                                 f"{peer / fk:.2f}×", "≥ 3×", peer / fk >= 3))
            # issue 10: the adapter's DPM-Solver samplers vs k-diffusion's (>= 3x
            # wherever the peer makes more than two passes per step: all of these)
            for method in ("dpm_2", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde",
                           "dpmpp_2m_sde", "dpmpp_3m_sde", "lms", "dpm_fast", "dpm_adaptive"):
                fk, peer = median(bs, f"flowkern adapter sample_{method}"), median(
                    bs, f"k-diffusion sample_{method}")
                if fk is not None and peer is not None:
                    rows.append((f"≥ 3× k-diffusion sample_{method} (adapter, whole loop)", g,
                                 f"{peer / fk:.2f}×", "≥ 3×", peer / fk >= 3))
            for b in bs:  # issue 10: flowkern's diffusers schedulers vs diffusers' own
                c = b["extra_info"]["candidate"]
                if c.startswith("flowkern ") and c.endswith(" loop") and "Scheduler" in c:
                    name = c[len("flowkern "):-len(" loop")]
                    fk, peer = median(bs, c), median(bs, f"diffusers {name} loop")
                    if fk is not None and peer is not None:
                        rows.append((f"≥ 3× diffusers {name} (whole loop)", g,
                                     f"{peer / fk:.2f}×", "≥ 3×", peer / fk >= 3))
            continue
        if not ex["op"].endswith(" step"):
            continue
        base = next((b for b in bs if b["extra_info"]["candidate"] in STEP_BASELINES), None)
        if base is None:
            continue
        fk = base["stats"]["median"]
        r = fk / base["extra_info"]["roofline_s"]
        rows.append(("fused step within 1.5× of its copy roofline", g, f"{r:.2f}× roofline",
                     "≤ 1.5×", r <= 1.5))
        for b in bs:
            c = b["extra_info"]["candidate"]
            # the peers' own steps: diffusers' step(), k-diffusion's step as it writes it
            if (c.startswith("diffusers") or c.startswith("eager (k-diffusion")) \
                    and c not in TWO_PASS_PEERS:
                ratio = b["stats"]["median"] / fk
                rows.append((f"≥ 3× {c}", g, f"{ratio:.2f}×", "≥ 3×", ratio >= 3))
    return rows


def _field_row(doc, group, label):
    for b in doc["benchmarks"]:
        if b.get("group") == group and b["name"].startswith(f"test_poisson_field[{label}-"):
            return b
    return None


def field_targets(doc):
    """Issue 4's targets for poisson_field (CPU, fp32): >= 100x the PFGM
    reference formulation with <= 1/50 of its peak memory at B=64, R=1024,
    N=3072; within 3x of two sgemms at B=128, R=4096, N=3072."""
    rows = []
    g = "poisson_field · B=64 R=1024 N=3072"
    fk, ref = _field_row(doc, g, "flowkern"), _field_row(doc, g, "pfgm reference")
    if fk and ref:
        ratio = ref["stats"]["median"] / fk["stats"]["median"]
        rows.append(("poisson_field ≥ 100× the PFGM reference formulation", g, f"{ratio:.0f}×",
                     "≥ 100×", ratio >= 100))
        pf, pr = fk["extra_info"].get("peak_bytes"), ref["extra_info"].get("peak_bytes")
        if pf and pr:
            rows.append(("poisson_field peak memory ≤ 1/50 of the PFGM reference", g,
                         f"1/{pr / pf:.0f} ({fmt_bytes(pf)} vs {fmt_bytes(pr)})", "≤ 1/50",
                         pr / pf >= 50))
    g = "poisson_field · B=128 R=4096 N=3072"
    fk, mm = _field_row(doc, g, "flowkern"), _field_row(doc, g, "two sgemms")
    if fk and mm:
        ratio = fk["stats"]["median"] / mm["stats"]["median"]
        rows.append(("poisson_field within 3× of two sgemms", g, f"{ratio:.2f}×", "≤ 3×",
                     ratio <= 3))
    return rows


def unlabelled_tables(doc):
    """Benchmarks a suite did not label with roofline.label: median table per
    pytest-benchmark group, no ratios."""
    groups = OrderedDict()
    for b in doc["benchmarks"]:
        ex = b.get("extra_info", {})
        if "candidate" not in ex and "overhead_op" not in ex:
            groups.setdefault(b.get("group") or b["fullname"].split("[")[0], []).append(b)
    lines = []
    for g, rows in groups.items():
        # what a suite stored beside its timings (bench_fields.py: peak memory
        # of a fresh process running one call, error against float64)
        extra = [k for k in ("peak_bytes", "rel_error_vs_fp64")
                 if any(k in b.get("extra_info", {}) for b in rows)]
        head = {"peak_bytes": "peak memory", "rel_error_vs_fp64": "max rel. error vs fp64"}
        lines += [f"#### {g}", "", "| benchmark | median | min | IQR | rounds |"
                  + "".join(f" {head[k]} |" for k in extra),
                  "|---|---:|---:|---:|---:|" + "---:|" * len(extra)]
        for b in rows:
            st, ex = b["stats"], b.get("extra_info", {})
            cells = []
            for k in extra:
                v = ex.get(k)
                cells.append("—" if v is None else fmt_bytes(v) if k == "peak_bytes" else f"{v:.1e}")
            lines.append(f"| {b['name']} | {fmt_time(st['median'])} | {fmt_time(st['min'])} | "
                         f"{fmt_time(st['iqr'])} | {st['rounds']} |" + "".join(f" {c} |" for c in cells))
        lines.append("")
    return lines


# ---------------------------------------------------------------------------
# host overhead (bench/bench_overhead.py): tiny tensors, times vs torch.add

OVH_FLOOR = "floor"               # overhead_role of torch.add(a, b)
OVH_RAW = "raw op"                # the bare torch.ops.flowkern call
OVH_FK_ROLES = ("flowkern", "adapter", "plan rebuilt")
# shown, no target: k-diffusion's loop is timed with its sigmas precomputed,
# as fk.sample's repeated calls reuse their plan
OVH_NO_TARGET = ("plan rebuilt",)
OVH_PEER_ROLES = ("eager", "peer")
OVH_MAX_VS_ADD = 2.5              # every single-call op and step: flowkern <= 2.5x torch.add
OVH_FWD_BWD = "flow_matching_loss fwd+bwd"
OVH_LAYER = ("layer dispatcher", "layer direct")  # the triton ops' custom-op layer
OVH_ROW_NAMES = {"adapter": "k-diffusion adapter sample_euler (per step)",
                 "plan rebuilt": "fk.sample, plan rebuilt every call (per step)"}


def overhead_rows(doc):
    return [b for b in doc.get("benchmarks", []) if "overhead_op" in b.get("extra_info", {})]


def overhead_groups(rows):
    """group -> rows, in the order the suite ran them."""
    out = OrderedDict()
    for b in rows:
        out.setdefault(b["group"], []).append(b)
    return out


def overhead_noise_limit(doc, rows):
    """As noise_limit, with the thread count the overhead rows ran with."""
    fk = doc.get("machine_info", {}).get("flowkern", {})
    nproc = fk.get("nproc")
    threads = next((b["extra_info"].get("threads") for b in rows), None)
    if not nproc or not threads:
        return SLACK
    return max(0, nproc - threads) + SLACK


def _per(b, stat):
    """A statistic of one row per call (per step for the sampling loops), seconds."""
    return b["stats"][stat] / (b["extra_info"].get("steps") or 1)


def _ovh_floor(rows):
    return next((b for b in rows if b["extra_info"]["overhead_role"] == OVH_FLOOR), None)


def _ovh_pairs(rows):
    """(row name, group, flowkern row, eager/peer row or None) per flowkern
    candidate, in the suite's order."""
    out = []
    for g, bs in overhead_groups(rows).items():
        peer = next((b for b in bs if b["extra_info"]["overhead_role"] in OVH_PEER_ROLES), None)
        for b in bs:
            role = b["extra_info"]["overhead_role"]
            if role in OVH_FK_ROLES:
                out.append((OVH_ROW_NAMES.get(role, b["extra_info"]["overhead_op"]), g, b, peer))
    return out


def _ratio_cell(a, b):
    """'x.xx× (median y.yy×)' of rows a over b, or —."""
    if a is None or b is None:
        return "—"
    r_min = _per(a, "min") / _per(b, "min")
    r_med = _per(a, "median") / _per(b, "median")
    return f"{r_min:.2f}× (med {r_med:.2f}×)"


def overhead_targets(rows):
    """The host-overhead targets: every single-call training op and sampler
    step <= 2.5x torch.add; flow_matching_loss fwd+bwd <= eager fwd+bwd;
    fk.sample and the k-diffusion adapter per step <= k-diffusion's own
    sample_euler per step. Compared on the min (the noise-free estimate of a
    fixed cost; the median is given beside it)."""
    out = []
    add = _ovh_floor(rows)
    for name, g, fk, peer in _ovh_pairs(rows):
        kind = fk["extra_info"].get("kind")
        if fk["extra_info"]["overhead_role"] in OVH_NO_TARGET:
            continue
        if kind == "sampler":
            if peer is None:
                out.append((f"{name} ≤ k-diffusion sample_euler per step", g,
                            "not measured (k-diffusion missing)", "≤ 1×", None))
                continue
            r = _per(fk, "min") / _per(peer, "min")
            out.append((f"{name} ≤ k-diffusion sample_euler per step", g,
                        f"{_ratio_cell(fk, peer)} k-diffusion's "
                        f"({fmt_time(_per(fk, 'min'))} vs {fmt_time(_per(peer, 'min'))} min)",
                        "≤ 1×", r <= 1))
            continue
        if fk["extra_info"]["overhead_op"] == OVH_FWD_BWD:
            if peer is not None:
                r = _per(fk, "min") / _per(peer, "min")
                out.append(("flow_matching_loss fwd+bwd ≤ eager fwd+bwd (host overhead)", g,
                            f"{_ratio_cell(fk, peer)} eager's", "≤ 1×", r <= 1))
            continue
        if add is None:
            out.append((f"host overhead ≤ {OVH_MAX_VS_ADD}× torch.add", g,
                        "not measured (no torch.add row)", f"≤ {OVH_MAX_VS_ADD}×", None))
        else:
            r = _per(fk, "min") / _per(add, "min")
            out.append((f"host overhead ≤ {OVH_MAX_VS_ADD}× torch.add", g,
                        f"{_ratio_cell(fk, add)} torch.add", f"≤ {OVH_MAX_VS_ADD}×",
                        r <= OVH_MAX_VS_ADD))
    return out


def overhead_table(rows, limit):
    """The 'Host overhead' section: per op flowkern and eager time per call and
    both relative to torch.add. Empty when the JSON has no overhead rows."""
    if not rows:
        return []
    ex0 = rows[0]["extra_info"]
    dtype = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}.get(
        ex0.get("dtype"), ex0.get("dtype"))
    threads = ex0.get("threads")
    title = (f"### Host overhead ({ex0.get('shape')} {dtype}, {threads} "
             f"thread{'s' if threads != 1 else ''})")
    add = _ovh_floor(rows)
    raw = next((b for b in rows if b["extra_info"]["overhead_role"] == OVH_RAW), None)
    lines = [title, "",
             "Tiny tensors, where the arithmetic is negligible: these times are each call's "
             "fixed cost (Python wrapper, validation, coefficient table, dispatch, allocation). "
             "Time = min over rounds, median in parentheses; ratios are taken on the min "
             "(the noise-free estimate of a fixed cost; medians on a shared machine swing by up "
             "to 2× between runs) with the median-based ratio beside it. The sampling loops "
             "(20 steps, model `x * 0`) are per step. *other load*: cores that other processes "
             "(and hypervisor steal) kept busy while the row was timed, from /proc/stat (the "
             f"larger of its two candidates'); above {limit:.2f} the row's thread had no core "
             "of its own (*noisy*).", ""]
    if add is not None:
        floor = (f"Floor: `torch.add(a, b)` {fmt_time(_per(add, 'min'))} "
                 f"({fmt_time(_per(add, 'median'))})")
        if raw is not None:
            floor += (f"; the bare C++ op `{raw['extra_info']['overhead_op']}` (what a public "
                      f"call runs, without its Python) {fmt_time(_per(raw, 'min'))} "
                      f"({fmt_time(_per(raw, 'median'))}) = {_ratio_cell(raw, add)} torch.add")
        else:
            floor += "; the bare C++ op row is missing (skipped: flowkern._C not built)"
        layer = {b["extra_info"]["overhead_role"]: b for b in rows
                 if b["extra_info"]["overhead_role"] in OVH_LAYER}
        if layer.get(OVH_LAYER[0]) is not None:
            via = layer[OVH_LAYER[0]]
            floor += (f". The triton backend's op layer (a torch.library custom op of "
                      f"euler_step's schema with a no-op body; the Triton launch needs a GPU): "
                      f"{fmt_time(_per(via, 'min'))} ({fmt_time(_per(via, 'median'))}) "
                      f"through the dispatcher")
            if layer.get(OVH_LAYER[1]) is not None:
                d = layer[OVH_LAYER[1]]
                floor += (f", {fmt_time(_per(d, 'min'))} ({fmt_time(_per(d, 'median'))}) "
                          f"through flowkern._fastcall's direct caller, which the eager "
                          f"triton calls take")
        lines += [floor + ".", ""]
    else:
        lines += ["No `torch.add` floor row in this JSON: the ratios to it are omitted.", ""]
    lines += ["| op | flowkern call | flowkern | eager / peer | eager / peer time "
              "| flowkern ÷ torch.add | eager ÷ torch.add | flowkern ÷ eager | other load |",
              "|---|---|---:|---|---:|---:|---:|---:|---:|"]
    for name, g, fk, peer in _ovh_pairs(rows):
        loads = [other_load(b) for b in (fk, peer)
                 if b is not None and other_load(b) is not None]
        load_ = max(loads) if loads else None
        noisy = load_ is not None and load_ > limit
        lines.append(
            f"| {name} | {fk['name']} | {fmt_time(_per(fk, 'min'))} "
            f"({fmt_time(_per(fk, 'median'))}) | {peer['name'] if peer else '—'} | "
            + (f"{fmt_time(_per(peer, 'min'))} ({fmt_time(_per(peer, 'median'))})"
               if peer else "—")
            + f" | {_ratio_cell(fk, add)} | {_ratio_cell(peer, add)} | "
            f"{_ratio_cell(fk, peer)} | {'—' if load_ is None else f'{load_:.2f}'}"
            f"{' (*noisy*)' if noisy else ''} |")
    notes = list(OrderedDict.fromkeys(
        f"- {fk['extra_info']['overhead_op']}: {fk['extra_info']['note']}"
        for _, _, fk, _ in _ovh_pairs(rows) if fk["extra_info"].get("note")))
    missing = [g for g, bs in overhead_groups(rows).items()
               if g != (add or {}).get("group") and not any(
                   b["extra_info"]["overhead_role"] in OVH_FK_ROLES for b in bs)]
    if missing:
        notes.append("- no flowkern row (skipped) in: " + ", ".join(missing))
    if notes:
        lines += ["", "Notes:", ""] + notes
    lines.append("")
    return lines


def doc_section(doc, json_path):
    groups = groups_of(doc)
    limit = noise_limit(doc)
    lines = run_section(doc, json_path)
    ovh = overhead_rows(doc)
    ovh_groups = overhead_groups(ovh)
    o_limit = overhead_noise_limit(doc, ovh)
    trows = targets(groups) + step_targets(groups) + field_targets(doc) + overhead_targets(ovh)
    if trows:
        missed = [r for r in trows if r[4] is False]
        unmeasured = [r for r in trows if r[4] is None]
        noisy = {g for g, rows in groups.items() if (group_noise(rows) or 0) > limit}
        noisy |= {g for g, rows in ovh_groups.items() if (group_noise(rows) or 0) > o_limit}
        n_groups = len(groups) + len(ovh_groups)
        recorded = any(group_noise(r) is not None
                       for r in list(groups.values()) + list(ovh_groups.values()))
        if not ovh_groups:
            limits = f"{limit:.2f} cores"
        elif not groups:
            limits = f"{o_limit:.2f} cores"
        else:
            limits = (f"{limit:.2f} cores, or {o_limit:.2f} for the "
                      f"{ovh[0]['extra_info'].get('threads')}-thread host-overhead rows")
        lines += ["### Targets", "",
                  f"{len(trows) - len(missed) - len(unmeasured)} of {len(trows)} checks met"
                  + (f"; **{len(missed)} missed**" if missed else "")
                  + (f"; {len(unmeasured)} not measured" if unmeasured else "") + "."
                  + (f" {len(noisy)} of {n_groups} groups were timed while other processes "
                     f"used more than {limits} (marked *noisy*: fewer free cores than "
                     "the run's threads)." if noisy else
                     f" No group saw other processes use more than {limits} "
                     "(every thread of the run had a core)."
                     if recorded else " (Other-process load was not recorded.)"), "",
                  "| target | group | measured | threshold | met |", "|---|---|---|---|---|"]
        for t, g, m, th, ok in trows:
            flag = " (*noisy*)" if g in noisy else ""
            lines.append(f"| {t} | {g}{flag} | {m} | {th} | "
                         f"{'yes' if ok else ('—' if ok is None else '**NO**')} |")
        lines.append("")
    if groups:
        lines += ["### Results", "",
                  "Median time per call. *flowkern speedup over it* = that candidate's median "
                  "÷ flowkern's (above 1: flowkern is faster). *time ÷ roofline* = the median ÷ "
                  "the time the counted bytes take at the measured copy bandwidth (1 = streaming "
                  "at copy speed; below 1 is possible when the working set fits in cache, as at "
                  "256k). *other load* = cores that other processes (and hypervisor steal) kept "
                  "busy while that row was timed, from /proc/stat.",
                  ""]
    for g, rows in groups.items():
        lines += group_table(g, rows, limit)
    lines += overhead_table(ovh, o_limit)
    return lines + unlabelled_tables(doc)


def render(docs, report_cmd):
    """docs: [(absolute json path, parsed json)]."""
    names = ", ".join(f"`{os.path.relpath(p, ROOT)}`" for p, _ in docs)
    lines = ["# flowkern benchmarks", "",
             f"Generated by `bench/report.py` from {names}; every number below is read from "
             f"{'that file' if len(docs) == 1 else 'those files'} (pytest-benchmark medians; "
             "ratios computed from them"
             + ("; the host-overhead table: min and median" if any(
                 overhead_rows(d) for _, d in docs) else "")
             + "). Report command "
             f"(from the repository root): `{report_cmd}`", ""]
    for path, doc in docs:
        lines += doc_section(doc, path)
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="report.py [JSON ...] [OUT.md]  (default: %s %s)" % (
            os.path.relpath(DEFAULT_JSON, ROOT), os.path.relpath(DEFAULT_OUT, ROOT)))
    p.add_argument("paths", nargs="*")
    a = p.parse_args(argv)
    paths = list(a.paths)
    out = paths.pop() if paths and paths[-1].endswith(".md") else DEFAULT_OUT
    paths = paths or [DEFAULT_JSON]
    docs = [(os.path.abspath(q), load(q)) for q in paths]
    exe = sys.executable
    if exe.startswith(os.getcwd() + os.sep):
        exe = os.path.relpath(exe, os.getcwd())
    cmd = shlex.join([exe, os.path.relpath(os.path.abspath(__file__), os.getcwd()), *argv])
    with open(out, "w") as f:
        f.write(render(docs, cmd))
    n_ovh = sum(len(overhead_groups(overhead_rows(d))) for _, d in docs)
    print(f"wrote {out} ({sum(len(groups_of(d)) for _, d in docs)} groups"
          + (f", {n_ovh} host-overhead groups)" if n_ovh else ")"))


if __name__ == "__main__":
    main()
