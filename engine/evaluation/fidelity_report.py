"""The fidelity harness's outputs (engine/evaluation/fidelity.py): eval.md (table + targets) and two PNG plots."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from fis import anchor_frames

from .fidelity import DENSE, PSNR_CAP

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
            "| config | stride | interleave | dense head/tail | dense steps | operator | PSNR dB mean (min) | "
            "SSIM mean (min) | latent err mean (max) | flicker (vs dense) | adherence % colour / dir / both | "
            "FLOPs (P) | speedup est. | wall s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
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
        lines.append(
            f"| {name} | "
            + " | ".join(map(str, knobs))
            + f" | {x['psnr_mean']:.2f} ({x['psnr_min']:.2f}) | {x['ssim_mean']:.4f} ({x['ssim_min']:.4f}) | "
            f"{x['latent_error_mean']:.4f} ({x['latent_error_max']:.4f}) | {x['flicker_mean']:.2f} "
            f"({x['flicker_delta_mean']:+.2f}) | {adh} | {x['flops_P']:.4g} | {x['speedup_estimate']:.2f}x | "
            f"{x['latency_s']:.2f} |"
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


def write(report: dict, out: Path) -> Path:
    figs = [
        fig_psnr(report["summary"], out / "eval_psnr.png").name,
        fig_frame_psnr(report["summary"], report["request"], out / "eval_frame_psnr.png").name,
    ]
    path = out / "eval.md"
    path.write_text(markdown(report, figs))
    return path
