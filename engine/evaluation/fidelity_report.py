"""The fidelity harness's outputs (engine/evaluation/fidelity.py): eval.md (table + targets) and three PNG plots,
the last the speed-quality frontier (one point per operator x stride)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from fis import anchor_frames

from .fidelity import DENSE, PSNR_CAP, measured_speedup

FRAME_PLOT = ("FIS-Balanced", "FIS-Fast", "FIS-Balanced-fixed", "FIS-Fast-fixed")


def _f(v, fmt=".2f", none="n/a"):
    return none if v is None else format(v, fmt)


def markdown(report: dict, figures: list[str]) -> str:
    r, s = report["request"], report["summary"]
    lines = [
        f"# FIS fidelity: {report['model']['model']}",
        "",
        (
            f"{len(report['prompts'])} prompts x {len(report['seeds'])} seed(s) {report['seeds']}, {r['steps']} steps, "
            f"{r['num_frames']} frames ({r['latent_frames']} latent), {r['width']}x{r['height']}, guidance "
            f"{r['guidance']}, on {report['model']['device']} ({report['model']['dtype']}); {report['date']}. "
            f"Every configuration is compared with Dense on the same prompt and seed (PSNR of identical videos "
            f"counts as {PSNR_CAP:.0f} dB). Adherence is read from the frames of the "
            f"{s[DENSE]['adherence_samples']} samples whose prompt the shapes grammar parses. Raw numbers: `eval.json`."
        ),
        "",
        "```",
        report["command"],
        "```",
        "",
        "## Results",
        "",
        (
            "Speckle: high-frequency energy of the interior frames vs dense (1 = dense). Eq. 6: the paper's per-block "
            "error of the configuration's operator at its stride, mean over the skipped frames of its sparse blocks "
            "and steps"
            + (f" ({len(report['eq6']['prompts'])} prompts)" if report.get("eq6") else " (not measured)")
            + ". A14B: the speedup on Wan 2.2 A14B (40 blocks, 4 steps, 81 frames), estimated from FLOPs "
            "(fis/flops.py counts what each operator computes) and measured on the real-size block "
            + (
                f"({report['measured'].get('device', 'GPU')}, launch/bench_operators.py)"
                if report.get("measured")
                else "(slot: not measured yet, launch/bench_operators.py on the GPU)"
            )
            + "."
        ),
        "",
        (
            "| config | stride | interleave | dense head/tail | dense steps | operator | PSNR dB mean (min) | "
            "SSIM mean (min) | speckle mean (max) | Eq. 6 | latent err mean (max) | flicker (vs dense) | "
            "adherence % colour / dir / both | FLOPs (P) | speedup est. | A14B est. 480p / 720p | "
            "A14B measured 480p / 720p | wall s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, x in s.items():
        fis = x["fis"]
        knobs = (
            ["-"] * 5
            if fis is None
            else [
                fis["stride"],
                "yes" if fis["interleave"] else "no",
                f"{fis['dense_head']}/{fis['dense_tail']}",
                fis["dense_steps"],
                fis["operator"],
            ]
        )
        adh = " / ".join(_f(x[f"adherence_{k}_pct"], ".0f") for k in ("colour", "direction", "both"))
        est = x.get("a14b_speedup_estimate") or {}
        got = {r: measured_speedup(report.get("measured"), fis, r) for r in ("480p", "720p")}
        speckle = "n/a" if "speckle_mean" not in x else f"{x['speckle_mean']:.2f} ({x['speckle_max']:.2f})"
        lines.append(
            f"| {name} | "
            + " | ".join(map(str, knobs))
            + f" | {x['psnr_mean']:.2f} ({x['psnr_min']:.2f}) | {x['ssim_mean']:.4f} ({x['ssim_min']:.4f}) | "
            f"{speckle} | {_f(x.get('eq6'), '.3f', '-')} | "
            f"{x['latent_error_mean']:.4f} ({x['latent_error_max']:.4f}) | {x['flicker_mean']:.2f} "
            f"({x['flicker_delta_mean']:+.2f}) | {adh} | {x['flops_P']:.4g} | {x['speedup_estimate']:.2f}x | "
            f"{_f(est.get('480p'))}x / {_f(est.get('720p'))}x | {_f(got['480p'], none='-')} / "
            f"{_f(got['720p'], none='-')} | {x['latency_s']:.2f} |"
        )
    lines += ["", "## Targets", ""]
    for t in report["targets"]:
        verdict = {True: "**met**", False: "**missed**", None: "reported"}[t["met"]]
        ref = "" if t["threshold"] is None else f" vs {t['threshold']:.2f} {t['unit']}"
        unit = "points" if t["unit"] == "%" else t["unit"]  # a difference of percentages
        margin = "" if t["margin"] is None else f", margin {t['margin']:+.2f} {unit}"
        lines.append(f"- {verdict}: {t['target']}: {_f(t['value'])} {t['unit']}{ref}{margin}")
    lines += ["", "## Plots", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def fig_psnr(summary: dict, path: Path) -> Path:
    """Mean PSNR vs dense per configuration (bar), the worst sample (dot), the 35 dB target (line)."""
    names = [n for n in summary if n != DENSE]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(names), 4))
    bars = ax.bar(names, [summary[n]["psnr_mean"] for n in names], color="tab:blue", label="mean")
    ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.plot(names, [summary[n]["psnr_min"] for n in names], "k.", label="min")
    ax.axhline(35.0, color="tab:red", ls="--", lw=1, label="35 dB target (Balanced)")
    ax.set_ylabel("PSNR vs dense (dB)")
    ax.tick_params(axis="x", rotation=40)
    plt.setp(ax.get_xticklabels(), ha="right")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def fig_frame_psnr(summary: dict, request: dict, path: Path) -> Path:
    """Mean PSNR per decoded frame; shaded: the frames decoded from the fixed anchors of FIS-Balanced-fixed
    (every block computes those latent frames, so error should dip between them)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for name in (n for n in FRAME_PLOT if n in summary):
        ax.plot(summary[name]["frame_psnr_mean"], lw=1.2, label=f"{name} (s={summary[name]['fis']['stride']})")
    fixed = summary.get("FIS-Balanced-fixed")
    if fixed:
        t = request["vae_t"]  # latent frame k decodes to frames 4k-3..4k (frame 0 alone for k = 0)
        for k in anchor_frames(request["latent_frames"], fixed["fis"]["stride"], 0):
            ax.axvspan(max(0, t * k - t + 1) - 0.5, t * k + 0.5, color="0.85", lw=0)
    ax.set_xlabel("frame (shaded: fixed anchors of FIS-Balanced-fixed)")
    ax.set_ylabel("PSNR vs dense (dB)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


FRONTIER_MARKERS = {"residual": "o", "linear": "v", "attn": "s", "kv": "D"}


def frontier_points(report: dict) -> dict[str, list[tuple]]:
    """Per operator: (stride, A14B 720p FLOPs-estimated speedup, measured speedup or None, mean PSNR, name) of the
    configurations with the default protection (one head and tail block, last step dense, interleaved)."""
    out: dict[str, list[tuple]] = {}
    for name, x in report["summary"].items():
        fis = x["fis"]
        if fis is None or (fis["dense_head"], fis["dense_tail"], fis["dense_steps"], fis["interleave"]) != (
            1,
            1,
            1,
            True,
        ):
            continue
        if fis["blocks"] != "auto" or "a14b_speedup_estimate" not in x:
            continue
        point = (
            fis["stride"],
            x["a14b_speedup_estimate"]["720p"],
            measured_speedup(report.get("measured"), fis, "720p"),
            x["psnr_mean"],
            name,
        )
        out.setdefault(fis["operator"], []).append(point)
    return {op: sorted(points) for op, points in out.items()}


def fig_frontier(report: dict, path: Path) -> Path:
    """Speedup (x: Wan 2.2 A14B at 720p, FLOPs estimate; hollow: measured on the real-size block when given) vs
    mean PSNR vs dense on this model, one point per operator x stride; the issue-16 target corner dashed."""
    s = report["summary"]
    fig, ax = plt.subplots(figsize=(7, 4.6))
    measured_any = False
    for op, points in frontier_points(report).items():
        xs, ys = [p[1] for p in points], [p[3] for p in points]
        (line,) = ax.plot(xs, ys, "-", marker=FRONTIER_MARKERS.get(op, "o"), label=op)
        for stride, x, m, y, _ in points:
            ax.annotate(f"s={stride}", (x, y), textcoords="offset points", xytext=(4, 3), fontsize=7)
            if m is not None:
                measured_any = True
                ax.plot([m], [y], marker=FRONTIER_MARKERS.get(op, "o"), mfc="none", color=line.get_color(), ls="")
                ax.annotate("", (m, y), (x, y), arrowprops=dict(arrowstyle="->", color=line.get_color(), lw=0.6))
    if "FIS-Balanced" in s:
        ax.axhline(s["FIS-Balanced"]["psnr_mean"] + 4, color="tab:red", ls="--", lw=0.8, label="FIS-Balanced + 4 dB")
    ax.axvline(1.6, color="tab:red", ls=":", lw=0.8, label="1.6x")
    ax.set_xlabel(
        "speedup on Wan 2.2 A14B, 720p (filled: FLOPs estimate"
        + ("; hollow: measured)" if measured_any else "; measured: slot, not run yet)")
    )
    ax.set_ylabel("PSNR vs dense on this model (dB)")
    ax.set_title(f"FIS operators: speed vs fidelity ({report['model']['model']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write(report: dict, out: Path) -> Path:
    figs = [
        fig_psnr(report["summary"], out / "eval_psnr.png").name,
        fig_frame_psnr(report["summary"], report["request"], out / "eval_frame_psnr.png").name,
        fig_frontier(report, out / "eval_frontier.png").name,
    ]
    path = out / "eval.md"
    path.write_text(markdown(report, figs))
    return path
