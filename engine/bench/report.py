"""Benchmark output: JSON, the console table, and the dated Markdown section appended to docs/benchmarks.md."""

from __future__ import annotations

import datetime as dt
import platform
import shutil
from pathlib import Path

import torch

DOCS_HEADER = """# Benchmarks

Results of `launch/bench.py`: real-size Wan architectures with random weights, one process per
resolution, every row on the same inputs. Each run appends a dated section below; earlier results are never
edited or removed. The raw JSON of each run is in `docs/bench/`.
"""

# Issue 3 targets: (row, resolution) -> minimum speedup vs dense, same run.
SPEEDUP_TARGETS = {
    ("FIS-Balanced", "480p"): 1.96,
    ("FIS-Balanced", "720p"): 2.15,
    ("FIS-Fast", "480p"): 2.3,
    ("FIS-Fast", "720p"): 2.5,
}


def environment(device: torch.device, command: str) -> dict:
    import diffusers

    from engine.runtime.timing import gpu_info

    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "gpu": gpu_info(device),
        "device": str(device),
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
    }


def save(report: dict, path: str | None) -> None:
    """Write the JSON (after every stage, so a run cut short still leaves its rows)."""
    if not path:
        return
    from engine.runtime.io import write_json  # temp + rename: a run killed mid-write leaves the previous whole file

    rows = [{k: v for k, v in r.items() if k != "latents"} for r in report["rows"]]
    write_json({**report, "rows": rows}, path)


def _f(v, digits: int = 2, suffix: str = "") -> str:
    """Fixed digits for normal magnitudes, 3 significant ones for the tiny model's microscopic FLOPs."""
    if v is None:
        return "-"
    if isinstance(v, float) and v and abs(v) < 10**-digits:
        return f"{v:.3g}{suffix}"
    return f"{v:.{digits}f}{suffix}"


def _rows(report: dict, ablation: bool | None = None) -> list[dict]:
    return [r for r in report["rows"] if ablation is None or r.get("ablation") == ablation]


def _cells(r: dict) -> list[str]:
    if r["status"] != "ok":
        return [r["name"], r["status"]] + ["-"] * 8
    err = "-" if "frame_err_mean" not in r else f"{r['frame_err_mean']:.4f} / {r['frame_err_max']:.4f}"
    return [
        r["name"],
        _f(r["flops_P"]),
        _f(r["latency_s"], 3),
        _f(r.get("speedup"), 2, "x"),
        _f(r["tflops"], 0),
        _f(r.get("peak_gib")),
        _f(r.get("peak_vs_dense_pct"), 1, "%"),
        _f(r.get("rel_l2"), 4),
        err,
        ",".join(map(str, r["skipped_steps"])) or "-",
    ]


TABLE1 = [
    "Method",
    "FLOPs (P)",
    "Latency (s)",
    "Speedup",
    "TFLOP/s",
    "Peak (GiB)",
    "Peak vs dense",
    "Rel. L2 vs dense",
    "Per-frame err mean / max",
    "Skipped steps",
]


def console_table(report: dict) -> str:
    rows = [TABLE1] + [_cells(r) for r in report["rows"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(TABLE1))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    head = (
        f"{report['model']} {report['resolution']}: {report['frames']} frames ({report['latent_frames']} latent, "
        f"{report['tokens']:,} tokens), {report['steps']} steps, attention {report.get('attention_backend')}, "
        f"compile {report['compile']}"
    )
    return "\n".join([head, *lines, *[f"target: {t}" for t in targets(report)]])


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def targets(report: dict) -> list[str]:
    """Issue 3 targets that this run can check, each with its verdict."""
    by = {r["name"]: r for r in report["rows"] if r["status"] == "ok"}
    out = []
    for (name, res), goal in SPEEDUP_TARGETS.items():
        if res == report["resolution"] and "speedup" in by.get(name, {}):
            sp = by[name]["speedup"]
            out.append(f"{name} speedup {sp:.2f}x >= {goal}x: {'met' if sp >= goal else 'MISSED'}")
    for r in by.values():
        if r.get("fis") and not r["magcache"] and r.get("peak_vs_dense_pct") is not None and not r["ablation"]:
            p = r["peak_vs_dense_pct"]
            out.append(f"{r['name']} peak memory {p:+.1f}% vs dense <= +1%: {'met' if p <= 1 else 'MISSED'}")
    if "Dense" in by and report["resolution"] == "720p":
        tf = by["Dense"]["tflops"]
        out.append(f"Dense {tf:.0f} TFLOP/s >= 600: {'met' if tf >= 600 else 'MISSED'}")
    prof = report.get("profile") or {}
    if prof.get("glue_pct") is not None:
        g = prof["glue_pct"]
        out.append(f"FIS glue {g:.2f}% of a sparse step <= 3%: {'met' if g <= 3 else 'MISSED'}")
    if prof.get("host_syncs") is not None:
        out.append(f"host syncs in a sparse step: {prof['host_syncs']} (target 0)")
    return out


def markdown_section(report: dict) -> str:
    gpu = report.get("gpu") or {}
    name = gpu.get("name", "CPU")
    lines = [
        f"## {report['date']} · {report['model']} {report['resolution']} · {name}",
        "",
        f"- Versions: torch {report['torch']} (CUDA {gpu.get('torch_cuda', '-')}, cuDNN "
        f"{report.get('cudnn') or '-'}), diffusers {report['diffusers']}, Python {report['python']}",
        f"- Command: `{report['command']}`",
        f"- Setup: {report['frames']} frames {report['width']}x{report['height']} ({report['latent_frames']} "
        f"latent frames, {report['tokens']:,} tokens), {report['steps']} steps flow-match Euler (shift 5), "
        f"guidance 1.0, random weights; warm-up {report['warmup']}, median of {report['repeats']} "
        f"(ablations {report['ablation_repeats']}); expert per step {report.get('route')}",
        f"- Attention backend: `{report.get('attention_backend')}` ({report.get('attention_backend_choice')}); "
        f"torch.compile: {report['compile']}; dense {_f(report.get('flops_dense_P'))} PFLOP",
        "- Fidelity columns compare final latents with the Dense row of the same run (random weights, random "
        "noise): a consistency check, not a quality score. MagCache-Force is diffusers' MagCache forced to skip "
        "one step in four, never the last (`MAGCACHE_FORCE` in engine/bench/run.py), as in the paper's row.",
        "",
    ]
    lines += ["### Table 1: methods", "", _md_table(TABLE1, [_cells(r) for r in _rows(report, False)]), ""]
    lines += _ablation_tables(report)
    if report.get("sweep"):
        lines += _sweep_tables(report["sweep"])
    if report.get("profile"):
        lines += _profile_lines(report["profile"])
    if report.get("vae"):
        v = report["vae"]
        lines += [
            "### VAE decode",
            "",
            f"{v['status']}: {_f(v.get('decode_s'), 2)} s ({v['dtype']}, peak {_f(v.get('peak_gib'))} GiB)",
            "",
        ]
    t = targets(report)
    if t:
        lines += ["### Targets", "", *[f"- {x}" for x in t], ""]
    return "\n".join(lines)


def _ablation_tables(report: dict) -> list[str]:
    by = {r["name"]: r for r in report["rows"]}

    def cells(label: list[str], name: str) -> list[str]:
        r = by.get(name)
        if r is None:
            return label + ["not run", "-", "-", "-"]
        if r["status"] != "ok":
            return label + [r["status"], "-", "-", "-"]
        return label + [
            _f(r["latency_s"], 3),
            _f(r.get("speedup"), 2, "x"),
            _f(r.get("rel_l2"), 4),
            _f(r.get("frame_err_max"), 4),
        ]

    if not _rows(report, True):
        return []
    tail = ["Latency (s)", "Speedup", "Rel. L2", "Max frame err"]
    t2 = [
        cells([str(s), sched], name)
        for s, pair in (
            (3, ("FIS-s3-fixed", "FIS-Balanced")),
            (4, ("FIS-s4-fixed", "FIS-s4")),
            (5, ("FIS-s5-fixed", "FIS-Fast")),
        )
        for sched, name in zip(("fixed", "interleaved"), pair)
    ]
    t3 = [
        cells([label], name)
        for label, name in (
            ("w/o block protection", "FIS-no-block-protection"),
            ("w/o step protection", "FIS-no-step-protection"),
            ("w/o both (no risk-aware deployment)", "FIS-no-protection"),
            ("linear operator (paper Eq. 10)", "FIS-linear"),
            ("FIS-Balanced (residual operator)", "FIS-Balanced"),
        )
    ]
    return [
        "### Table 2: interleaved vs fixed anchors",
        "",
        _md_table(["Stride", "Anchors", *tail], t2),
        "",
        "### Table 3: risk-aware deployment and operator",
        "",
        _md_table(["Configuration", *tail], t3),
        "",
    ]


def _sweep_tables(sweep: dict) -> list[str]:
    rows = [
        [
            e["resolution"],
            str(e["frames"]),
            f"{e['tokens']:,}",
            f"`{e['backend']}`",
            _f(e.get("block_ms"), 1),
            _f(e.get("block_tflops"), 0),
            _f(e.get("attn_ms"), 1),
            _f(e.get("attn_tflops"), 0),
            e["status"],
        ]
        for e in sweep["entries"]
    ]
    out = [
        "### Attention backends (one block)",
        "",
        _md_table(
            [
                "Res.",
                "Frames",
                "Tokens",
                "Backend",
                "Block (ms)",
                "Block TFLOP/s",
                "Attention (ms)",
                "Attention TFLOP/s",
                "Status",
            ],
            rows,
        ),
        "",
    ]
    c = sweep.get("compile")
    if c:
        rows = [
            [
                str(x["frames"]),
                f"{x['tokens']:,}",
                _f(x["compile_s"], 1),
                _f(x["eager_ms"], 1),
                _f(x["compiled_ms"], 1),
                _f(x["speedup"], 2, "x"),
                str(x["new_graphs"]),
            ]
            for x in c["shapes"]
        ]
        out += [
            f"### torch.compile of the block ({c['mode']}, `{c['backend']}`, {c['resolution']})"
            + (f": {c['status']}" if c.get("status") else ""),
            "",
            _md_table(
                ["Frames", "Tokens", "Compile (s)", "Eager (ms)", "Compiled (ms)", "Speedup", "New graphs"], rows
            ),
            "",
        ]
    return out


def _profile_lines(p: dict) -> list[str]:
    if p["status"] != "ok":
        return ["### Profile of one sparse step", "", p["status"], ""]
    rows = [[f"`{t['name']}`", str(t["calls"]), _f(t["self_ms"], 2), _f(t["pct"], 1, "%")] for t in p["top"][:12]]
    return [
        "### Profile of one sparse step (FIS-Balanced, step 0)",
        "",
        f"FIS glue (frame selection + reconstruction) {_f(p['glue_ms'], 2)} ms = {_f(p['glue_pct'], 2)}% of "
        f"{_f(p['step_ms'], 1)} ms ({p['time_basis']} time); host syncs in the step: "
        f"{p.get('host_syncs', '-')}.",
        "",
        _md_table(["Kernel / op", "Calls", "Self (ms)", "Share"], rows),
        "",
    ]


def append_docs(report: dict, docs: str, json_path: str | None = None, section=None) -> Path:
    """Append this run's dated section to docs (created with a header if missing); copy its JSON (and profile
    table) to docs/bench/. section: report -> Markdown (default: the Table 1 benchmark's)."""
    path = Path(docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        path.write_text(DOCS_HEADER)
    with path.open("a") as f:
        f.write("\n" + (section or markdown_section)(report) + "\n")
    if json_path:
        for src in (Path(json_path), Path(json_path).with_suffix(".profile.txt")):
            dest = path.parent / "bench" / src.name
            if src.exists() and dest.parent.resolve() not in src.resolve().parents:  # not already kept there
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)
    return path


# ---- the end-to-end benchmark (launch/bench_e2e.py, issue 14) ----------------------------------------------------
# Issue 14 targets on 1 x H200 (same-run ratios; reference = the eager bf16 Dense row)
E2E_TARGETS = dict(
    dense_tflops_720p=650.0, fp8_dense=1.35, fp8_balanced=2.9, e2e_balanced_720p_s=20.0, shard4=3.0, vs_cache_dit=2.0
)


def _e2e_rows(report: dict):
    for ph in report.get("phases", []):
        for r in ph.get("rows", []):
            yield ph, r


def _find(report: dict, phase: str, row: str, kind: str = "rows") -> dict | None:
    for ph in report.get("phases", []):
        if ph["phase"] == phase:
            return next((r for r in ph.get(kind, []) if r["name"] == row and r.get("status") == "ok"), None)
    return None


def e2e_targets(report: dict) -> list[str]:
    """Issue 14 targets this run can check, each with its verdict and numbers."""
    t, out, res720 = E2E_TARGETS, [], report.get("resolution") == "720p"

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    d = _find(report, "fa3-compile", "Dense")
    if d and res720:
        out.append(
            f"Dense FA3 + compile {d['tflops']:.0f} TFLOP/s >= {t['dense_tflops_720p']:.0f}: "
            f"{verdict(d['tflops'] >= t['dense_tflops_720p'])}"
        )
    for row, key in (("Dense", "fp8_dense"), ("FIS-Balanced", "fp8_balanced")):
        r = _find(report, "fp8-fa3-compile", row)
        if r and "speedup" in r and res720:
            out.append(
                f"{row} + FP8 + FA3 + compile {r['speedup']:.2f}x vs eager bf16 Dense >= {t[key]}x: "
                f"{verdict(r['speedup'] >= t[key])}"
            )
    vae = report.get("parts", {}).get("vae", {})
    quarter = next((x for x in vae.get("shards", []) if x["ranks"] == 4), None)
    if quarter:
        out.append(
            f"VAE 1/4 shard {quarter['speedup']:.2f}x faster than the full decode >= {t['shard4']}x: "
            f"{verdict(quarter['speedup'] >= t['shard4'])} (one GPU, halos aside)"
        )
    ours = [(ph["phase"], r) for ph, r in _e2e_rows(report) if r["name"] == "FIS-Balanced" and r.get("status") == "ok"]
    ours = [x for x in ours if x[0] != "cache-dit"]
    best = min(ours, key=lambda x: x[1]["denoise_s"])[0] if ours else None  # our fastest measured FIS-Balanced
    if best:
        whole = _find(report, best, "FIS-Balanced", "whole")
        est = _find(report, best, "FIS-Balanced")
        total, how = (whole["total_s"], "whole generation") if whole else (est and est.get("total_s"), "per-step")
        if total and res720:
            goal = t["e2e_balanced_720p_s"]
            out.append(
                f"720p FIS-Balanced ({best}) end to end {total:.2f} s ({how}) <= {goal:.0f} s: {verdict(total <= goal)}"
            )
        cd_whole = _find(report, "cache-dit", "Dense", "whole")
        if whole and cd_whole:
            ratio, how = cd_whole["total_s"] / whole["total_s"], "whole generations, end to end"
        elif est and "vs_cache_dit" in est:
            ratio, how = est["vs_cache_dit"], "per-step, denoise"
        else:
            ratio = None
        if ratio is not None:
            out.append(
                f"FIS-Balanced ({best}) {ratio:.2f}x faster than cache-dit's fastest dense ({how}) >= "
                f"{t['vs_cache_dit']}x: {verdict(ratio >= t['vs_cache_dit'])}"
            )
    return out


def _e2e_parts_lines(report: dict) -> list[str]:
    p = report.get("parts", {})
    rows = []
    for name in ("text", "qwen"):
        if name in p:
            x = p[name]
            rows.append([f"text encode: {x.get('encoder', name)}", x["status"], _f(x.get("text_s"), 3)])
    v = p.get("vae")
    if v:
        ok = v["status"] == "ok"
        rows.append(["VAE decode fp32 (whole video)", v["status"], _f(v.get("decode_fp32_s"), 3)])
        if ok:
            rows.append(
                [
                    f"VAE decode bf16 (PSNR vs fp32 {_f(v.get('bf16_psnr_db'), 1)} dB)",
                    "ok",
                    _f(v.get("decode_bf16_s"), 3),
                ]
            )
            rows.append(["postprocess to frames", "ok", _f(v.get("postprocess_s"), 3)])
            for x in v.get("shards", []):
                rows.append(
                    [
                        f"VAE decode of a 1/{x['ranks']} band ({x['latent_rows']} latent rows), fp32",
                        f"{x['speedup']:.2f}x vs whole",
                        _f(x["decode_s"], 3),
                    ]
                )
    if "mp4" in p:
        rows.append(["mp4 write", p["mp4"]["status"], _f(p["mp4"].get("mp4_s"), 3)])
    if not rows:
        return []
    return ["### Parts", "", _md_table(["Part", "Status", "Seconds"], rows), ""]


E2E_TABLE = [
    "Phase",
    "Row",
    "Dense step (s)",
    "Sparse step (s)",
    "Denoise (s)",
    "TFLOP/s",
    "Speedup (DiT)",
    "End to end (s)",
    "Speedup (e2e)",
    "vs cache-dit (e2e)",
]


def _e2e_cells(ph: dict, r: dict) -> list[str]:
    return [
        ph["phase"],
        r["name"],
        _f(r.get("dense_step_s"), 3),
        _f(r.get("sparse_step_s"), 3),
        _f(r.get("denoise_s"), 3),
        _f(r.get("tflops"), 0),
        _f(r.get("speedup"), 2, "x"),
        _f(r.get("total_s"), 2),
        _f(r.get("speedup_e2e"), 2, "x"),
        _f(r.get("vs_cache_dit_e2e"), 2, "x"),
    ]


def _whole_lines(report: dict) -> list[str]:
    rows = []
    for ph in report.get("phases", []):
        for w in ph.get("whole", []):
            if w.get("status") != "ok":
                rows.append([ph["phase"], w["name"], w.get("status", "-")] + ["-"] * 5)
                continue
            steps = ", ".join(f"{x:.2f}" for x in w["step_s"])
            rows.append(
                [
                    ph["phase"],
                    w["name"],
                    _f(w["text_s"], 2),
                    f"{_f(w['denoise_s'], 2)} ({steps})",
                    _f(w["decode_s"], 2),
                    _f(w["mp4_s"], 2),
                    _f(w["total_s"], 2),
                    _f(w.get("vs_cache_dit"), 2, "x"),
                ]
            )
    if not rows:
        return []
    head = ["Phase", "Row", "Text (s)", "Denoise (s) (per step)", "Decode (s)", "mp4 (s)", "Total (s)", "vs cache-dit"]
    return ["### Whole generations (measured)", "", _md_table(head, rows), ""]


def _config_lines(report: dict) -> list[str]:
    out = []
    for ph in report.get("phases", []):
        c = ph.get("config") or {}
        bits = [f"attention {c.get('attention_backend') or 'default'}"]
        if c.get("attention_backend_choice") and c["attention_backend_choice"] != "--attention-backend":
            bits.append(c["attention_backend_choice"])
        bits.append(f"compile {c.get('compile', '-')}")
        q = c.get("quantized")
        if q:
            bits.append(f"quantize {q['mode']} ({q['layers']} linear layers, bf16 blocks {q['kept_blocks'] or 'none'})")
        if ph.get("cache_dit"):
            bits = [
                f"cache-dit {ph['cache_dit'].get('version')}: "
                + "; ".join(f"{k} {v}" for k, v in ph["cache_dit"].items() if k != "version")
            ]
        line = f"- `{ph['phase']}`: {ph['status']}" + (f" ({', '.join(bits)})" if ph["status"] == "ok" else "")
        if ph.get("wall_s") is not None:
            line += f", wall {ph['wall_s']:.0f} s"
        out.append(line)
    return out


def e2e_section(report: dict) -> str:
    gpu = report.get("gpu") or {}
    pk = report.get("packages") or {}
    versions = ", ".join(f"{k} {v}" for k, v in pk.items() if v) or "-"
    lines = [
        f"## {report['date']} · end to end · {report['model']} {report['resolution']} · {gpu.get('name', 'CPU')}",
        "",
        f"- Versions: torch {report['torch']} (CUDA {gpu.get('torch_cuda', '-')}, cuDNN {report.get('cudnn') or '-'}),"
        f" diffusers {report['diffusers']}, {versions}, Python {report['python']}",
        f"- Command: `{report['command']}`",
        f"- Setup: {report['frames']} frames {report['width']}x{report['height']} ({report['latent_frames']} latent "
        f"frames, {report['tokens']:,} tokens), {report['steps']} steps flow-match Euler (shift 5), guidance 1.0; the "
        f"real umT5-XXL text encoder and VAE config; random weights, built on the device; dense "
        f"{_f(report.get('flops_dense_P'))} PFLOP",
        f"- Timing: device-synchronised; per step: warm-up {report['warmup']}, median of {report['repeats']}; the "
        "phase/row table is a **per-step extrapolation** (sparse steps x sparse step + dense steps x dense step; "
        "every sparse step of a plan has the same anchors), end to end = text + denoise + "
        f"{report['vae_dtype']} decode + postprocess + mp4 of this run's parts ({_f(report.get('fixed_s'), 2)} s); "
        "whole generations are measured once after the per-step rows warmed them up. Speedups are same-run "
        "ratios against the eager bf16 Dense row; `vs cache-dit` against cache-dit's dense row of this run.",
        f"- compile mode {report['compile_mode']}; elapsed {_f(report.get('elapsed_s'), 0)} s of a "
        f"{report['max_seconds']:.0f} s budget",
        "",
    ]
    lines += _e2e_parts_lines(report)
    rows = [_e2e_cells(ph, r) for ph, r in _e2e_rows(report) if r.get("status") == "ok"]
    if rows:
        lines += ["### DiT configurations (per-step extrapolation)", "", _md_table(E2E_TABLE, rows), ""]
    lines += _whole_lines(report)
    lines += ["### Phases", "", *_config_lines(report), ""]
    t = e2e_targets(report)
    if t:
        lines += ["### Targets (issue 14)", "", *[f"- {x}" for x in t], ""]
    return "\n".join(lines)


def e2e_console(report: dict) -> str:
    rows = [E2E_TABLE] + [_e2e_cells(ph, r) for ph, r in _e2e_rows(report) if r.get("status") == "ok"]
    widths = [max(len(row[i]) for row in rows) for i in range(len(E2E_TABLE))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    skipped = [f"{ph['phase']}: {ph['status']}" for ph in report.get("phases", []) if ph["status"] != "ok"]
    head = f"{report['model']} {report['resolution']}: end to end, per-step extrapolation"
    return "\n".join([head, *lines, *skipped, *[f"target: {x}" for x in e2e_targets(report)]])
