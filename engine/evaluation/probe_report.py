"""The paper's figures from a profile (engine/evaluation/probe.py): PNGs, raw JSON and a one-page report."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from fis import anchor_frames  # noqa: E402


def fig_relative_change(prof: dict, path: Path) -> Path:
    """Fig. 1: adjacent-frame relative change (Eq. 3) per frame, one line per prompt."""
    L, T = prof["num_blocks"], prof["steps"]
    blocks = sorted({0, L // 3, (2 * L) // 3, L - 1})
    fig, axes = plt.subplots(T, len(blocks), figsize=(3.2 * len(blocks), 2.2 * T), squeeze=False, sharex=True)
    for t in range(T):
        for j, b in enumerate(blocks):
            ax = axes[t][j]
            for p, curves in enumerate(prof["curves"]):
                ax.plot(curves[t][b], lw=1, label=f"prompt {p}")
            ax.set_title(f"step {t}, block {b}", fontsize=8)
    axes[-1][0].set_xlabel("frame f")
    axes[0][0].set_ylabel("r_f (Eq. 3)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def fig_cv_heatmap(prof: dict, path: Path) -> Path:
    """Fig. 2: coefficient of variation (Eq. 4-5), blocks x steps, averaged over prompts."""
    cv = [list(col) for col in zip(*prof["cv"])]  # [L, T]
    fig, ax = plt.subplots(figsize=(2 + prof["steps"] * 0.8, 1.5 + prof["num_blocks"] * 0.18))
    im = ax.imshow(cv, aspect="auto", cmap="viridis")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("block")
    fig.colorbar(im, ax=ax, label="CV of r_f")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def fig_frame_error(prof: dict, path: Path, block: int | None = None, step: int = 0) -> Path:
    """Fig. 3: per-frame relative error vs full computation (Eq. 6), anchors marked, both operators.
    Top: the operator alone, fed exact anchor outputs. Bottom: the sparse evaluation FIS runs."""
    L, F, s = prof["num_blocks"], prof["num_frames"], prof["stride"]
    b = L // 2 if block is None else block
    anchors = anchor_frames(F, s, b % s)
    fig, axes = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    for ax, key, title in (
        (axes[0], "interp_error", "reconstruction from exact anchors (block-scope operators)"),
        (axes[1], "frame_error", "sparse evaluation (anchors attend to anchors only)"),
    ):
        width = 0.8 / len(prof[key])
        for k, (op, err) in enumerate(prof[key].items()):
            mean = [sum(e[step][b][f] for e in err) / len(err) for f in range(F)]
            ax.bar([f + (k - (len(prof[key]) - 1) / 2) * width for f in range(F)], mean, width, label=op)
        for a in anchors:
            ax.axvline(a, color="k", lw=0.5, ls=":")
        ax.set_ylabel("rel. error (Eq. 6)")
        ax.set_title(f"block {b}, step {step}: {title}", fontsize=9)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    axes[1].set_xlabel(f"frame (dotted: anchors, stride {s})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def report(prof: dict, block_err: dict, out: Path) -> Path:
    """A one-page Markdown report linking the figures, with the per-block numbers."""
    figs = [
        fig_relative_change(prof, out / "fig1_relative_change.png").name,
        fig_cv_heatmap(prof, out / "fig2_cv_heatmap.png").name,
        fig_frame_error(prof, out / "fig3_frame_error.png").name,
    ]
    lines = [
        f"# FIS profile: {prof['model']['model']}",
        "",
        f"{len(prof['prompts'])} prompts, {prof['steps']} steps, {prof['num_frames']} latent frames, "
        f"stride {prof['stride']}. Raw numbers: `profile.json`.",
        "",
    ]
    lines += [f"![{f}]({f})" for f in figs]
    ops = list(block_err)
    inner = range(1, prof["num_blocks"] - 1)  # the default presets' sparse blocks: one protected at each end
    lines += [
        "",
        "Mean Eq. 6 error over blocks 1-{} (the presets' sparse blocks) and steps 0-{}: ".format(
            prof["num_blocks"] - 2, prof["steps"] - 2
        )
        + ", ".join(f"{o} {sum(block_err[o][b] for b in inner) / max(1, len(inner)):.4f}" for o in ops)
        + " (paper, Wan 2.2 A14B, linear: 0.098).",
    ]
    lines += [
        "",
        "| block | mean CV (Eq. 5) | " + " | ".join(f"Eq. 6 error, {o}" for o in ops) + " |",
        "|---|---|" + "---|" * len(ops),
    ]
    for b in range(prof["num_blocks"]):
        cv = sum(prof["cv"][t][b] for t in range(prof["steps"])) / prof["steps"]
        lines.append(f"| {b} | {cv:.3f} | " + " | ".join(f"{block_err[o][b]:.4f}" for o in ops) + " |")
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
