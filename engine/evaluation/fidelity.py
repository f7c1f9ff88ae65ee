"""The fidelity harness: dense vs each FIS configuration on a fixed prompt set and seeds.

Every number is weight-free: PSNR/SSIM of the decoded videos, a flicker score and the speckle ratio
(video_metrics.py), the relative error of the final latents, and prompt adherence read back from the frames
(shapes.py). The first configuration is the reference every other one is compared with (Dense). Each configuration
also gets the paper's Eq. 6 error of its operator and stride (the §3.2 probe, probe.py, on a few of the prompts) and
its FLOPs-estimated speedup on the real-size Wan 2.2 A14B (40 blocks, 4 steps, 81 frames) at 480p and 720p, the x
axis of the speed-quality frontier. Report and plots: fidelity_report.py.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np
import torch

from engine.bench.rows import ROWS, Row
from engine.errors import UserError
from engine.runtime.io import to_uint8, write_mp4
from engine.runtime.request import GenerationRequest
from engine.testbed.shapes_data import COLOURS, DIRECTIONS, adherence, parse_prompt, sample_spec
from fis import FISConfig, FISConfigError, generation_flops

from .video_metrics import flicker, psnr, speckle_ratio, ssim

# The real-size model the frontier's speed axis is estimated on (the paper's Wan 2.2 A14B setting).
A14B_VIDEO = {"480p": (81, 480, 832), "720p": (81, 720, 1280)}  # frames, height, width
A14B_STEPS = 4

DENSE = "Dense"
# Identical videos have infinite PSNR; they count as this so means stay finite (one pixel one grey level off
# in a 49x64x64 clip is already ~106 dB). Rows also say `identical`.
PSNR_CAP = 100.0

# The configurations, as the speed benchmark defines its rows (the Table 3 and operator ablations are its own).
CONFIGS = (
    ROWS["FIS-Balanced"],
    ROWS["FIS-Fast"],
    Row("FIS-Balanced-fixed", "balanced", (("interleave", False),)),  # Table 2: the same anchors in every block
    Row("FIS-Fast-fixed", "fast", (("interleave", False),)),
    ROWS["FIS-no-block-protection"],  # Table 3
    ROWS["FIS-no-step-protection"],
    ROWS["FIS-no-protection"],
    ROWS["FIS-linear"],  # operator: FIS-Balanced is 'residual'
    Row("FIS-first-step", "balanced", (("dense_steps", 3),)),  # stride 3 on step 0 of 4 only: the gentlest setting
)
# The operators x strides of the speed-quality frontier (fis/operators.py; Balanced / Fast / FIS-linear are the
# residual and linear points at s = 3 / 5 / 3): `--configs operators`, or `all` for both groups.
OPERATOR_CONFIGS = (
    Row("FIS-residual-s2", "balanced", (("stride", 2),)),
    Row("FIS-linear-s5", "balanced", (("operator", "linear"), ("stride", 5))),
    *(
        Row(f"FIS-{op}" + ("" if s == 3 else f"-s{s}"), "balanced", (("operator", op), ("stride", s)))
        for op, strides in (("attn", (2, 3, 4, 5)), ("kv", (2, 3, 4, 5)))
        for s in strides
    ),
)
GROUPS = {"paper": CONFIGS, "operators": OPERATOR_CONFIGS, "all": CONFIGS + OPERATOR_CONFIGS}
# The paper's orderings, as (claim, better, worse) by mean PSNR vs dense.
ORDERINGS = (
    ("Table 2: interleaved beats fixed anchors (Balanced stride)", "FIS-Balanced", "FIS-Balanced-fixed"),
    ("Table 2: interleaved beats fixed anchors (Fast stride)", "FIS-Fast", "FIS-Fast-fixed"),
    ("Table 3: removing block protection costs fidelity", "FIS-Balanced", "FIS-no-block-protection"),
    ("Table 3: removing step protection costs fidelity", "FIS-Balanced", "FIS-no-step-protection"),
    ("Table 3: removing both costs more than block protection alone", "FIS-no-block-protection", "FIS-no-protection"),
    ("Table 3: removing both costs more than step protection alone", "FIS-no-step-protection", "FIS-no-protection"),
)


def configurations(family: str, names: list[str] | None = None) -> list[tuple[str, FISConfig | None]]:
    """Dense first (the reference), then the named configurations or groups (GROUPS; default: the paper's CONFIGS)
    in table order."""
    every = CONFIGS + OPERATOR_CONFIGS
    known = {r.name.lower(): r.name for r in every}
    want = None if names is None else {n.strip().lower() for n in names if n.strip()} - {DENSE.lower()}
    for group in set(want or ()) & set(GROUPS):
        want = (want - {group}) | {r.name.lower() for r in GROUPS[group]}
    if want is not None and want - set(known):
        raise UserError(
            f"unknown configuration(s) {sorted(want - set(known))}; valid: {', '.join(GROUPS)}, "
            f"{', '.join(known.values())}"
        )
    rows = [(DENSE, None)]
    for r in every:
        if (r in CONFIGS and want is None) or (want is not None and r.name.lower() in want):
            rows.append((r.name, r.fis(family)))
    return rows


def prompt_set(n: int, seed: int = 0) -> list[str]:
    """n grammar prompts, deterministic. Colour i % 6 with direction (i + i // 6) % 4 walks all 24
    (colour, direction) pairs in 24 prompts, every colour within 6 and every direction within 4; shape,
    speed and background come from sample_spec (which keeps the colour visible on its background)."""
    colours, dirs = list(COLOURS), list(DIRECTIONS)
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        c, d = colours[i % len(colours)], dirs[(i + i // len(colours)) % len(dirs)]
        while (spec := sample_spec(rng)).colour != c or spec.direction != d:
            pass
        out.append(spec.prompt())
    return out


def check(worker, base: GenerationRequest, configs) -> GenerationRequest:
    """Every configuration against the model and request before any work: one line naming the culprit."""
    req = worker.validate(base)
    for name, fis in configs:
        try:
            worker.validate(dataclasses.replace(req, fis=fis))
        except (UserError, FISConfigError) as e:
            raise UserError(f"configuration {name}: {e} (change the request or leave it out with --configs)") from None
    return req


def evaluate(worker, prompts, seeds, base: GenerationRequest, configs, progress=None, video_dir=None) -> list[dict]:
    """One row per (prompt, seed, configuration), each against that prompt and seed's first configuration."""
    rows, vae_t = [], worker.info.vae_t
    for p, prompt in enumerate(prompts):
        spec = parse_prompt(prompt)  # None: not a grammar prompt, adherence is not measured
        for seed in seeds:
            ref = None
            for name, fis in configs:
                out = worker.generate(dataclasses.replace(base, prompt=prompt, seed=seed, fis=fis))
                video, z = to_uint8(out["frames"]), out["latents"].detach().to("cpu", torch.float64)
                if ref is None:
                    ref = (video, z, flicker(video))
                rows.append(
                    {
                        "config": name,
                        "prompt": prompt,
                        "prompt_index": p,
                        "seed": seed,
                        **compare(video, z, ref, vae_t),
                        **adhere(video, spec),
                        **cost(out["metrics"]),
                    }
                )
                if video_dir is not None:
                    write_mp4(video, video_dir / f"p{p:02d}-s{seed}-{name}.mp4")
                if progress is not None:
                    progress()
    return rows


def compare(video: np.ndarray, z: torch.Tensor, ref, vae_t: int = 4) -> dict:
    ref_video, ref_z, ref_flicker = ref
    fl = flicker(video)
    return {
        "psnr": min(PSNR_CAP, psnr(video, ref_video)),
        "identical": bool(np.array_equal(video, ref_video)),
        "ssim": ssim(video, ref_video),
        "speckle": speckle_ratio(video, ref_video, vae_t),
        "frame_psnr": [min(PSNR_CAP, psnr(video[f : f + 1], ref_video[f : f + 1])) for f in range(len(video))],
        "latent_error": float((z - ref_z).norm() / ref_z.norm()),
        "flicker": fl,
        "flicker_delta": fl - ref_flicker,
    }


def adhere(video: np.ndarray, spec) -> dict:
    if spec is None:
        return {"adherence": None}
    a = adherence(video, spec)
    return {"adherence": {**a, "both": a["colour"] and a["direction"]}}


def cost(m: dict) -> dict:
    return {
        "flops_P": m["flops_P"],
        "flops_dense_P": m["flops_dense_P"],
        "speedup_estimate": m["speedup_estimate"],
        "latency_s": m["latency_s"],
    }


def summarise(rows: list[dict], configs) -> dict:
    """Per configuration: means/extremes over samples, adherence in %, mean per-frame PSNR."""
    out = {}
    dense = [r for r in rows if r["config"] == configs[0][0]]
    for name, fis in configs:
        rs = [r for r in rows if r["config"] == name]
        judged = [r for r in rs if r["adherence"] is not None]
        agree = [r["adherence"]["both"] == d["adherence"]["both"] for r, d in zip(rs, dense) if r["adherence"]]

        def pct(k, judged=judged):
            return 100.0 * float(np.mean([r["adherence"][k] for r in judged])) if judged else None

        def mean(k, rs=rs):
            return float(np.mean([r[k] for r in rs]))

        out[name] = {
            "fis": None if fis is None else fis.to_dict(),
            "samples": len(rs),
            "psnr_mean": mean("psnr"),
            "psnr_min": min(r["psnr"] for r in rs),
            "ssim_mean": mean("ssim"),
            "ssim_min": min(r["ssim"] for r in rs),
            "latent_error_mean": mean("latent_error"),
            "latent_error_max": max(r["latent_error"] for r in rs),
            "speckle_mean": mean("speckle"),
            "speckle_max": max(r["speckle"] for r in rs),
            "flicker_mean": mean("flicker"),
            "flicker_delta_mean": mean("flicker_delta"),
            "adherence_colour_pct": pct("colour"),
            "adherence_direction_pct": pct("direction"),
            "adherence_both_pct": pct("both"),
            "adherence_samples": len(judged),
            "adherence_agreement_pct": 100.0 * float(np.mean(agree)) if agree else None,
            "flops_P": mean("flops_P"),
            "speedup_estimate": mean("speedup_estimate"),
            "latency_s": mean("latency_s"),
            "frame_psnr_mean": np.mean([r["frame_psnr"] for r in rs], axis=0).tolist(),
            "a14b_speedup_estimate": a14b_speedup(fis),
        }
    return out


def a14b_speedup(fis: FISConfig | None) -> dict[str, float]:
    """FLOPs-estimated speedup of this configuration on Wan 2.2 A14B (4 steps, 81 frames, no CFG: the Lightning
    setting), per resolution: the frontier's speed axis until the measured real-size block speedup is in."""
    from fis.flops import WAN_A14B

    out = {}
    for res, (frames, h, w) in A14B_VIDEO.items():
        dense = generation_flops(WAN_A14B, frames, h, w, A14B_STEPS)
        if fis is None:
            out[res] = 1.0
            continue
        plan = fis.resolve(WAN_A14B.num_layers, WAN_A14B.latent_grid(frames, h, w)[0], A14B_STEPS)
        out[res] = dense / generation_flops(WAN_A14B, frames, h, w, A14B_STEPS, plan)
    return out


def eq6(worker, prompts, base: GenerationRequest, configs, progress=None) -> dict:
    """The paper's Eq. 6 error of each configuration's operator at its stride: the §3.2 probe (probe.py) on `prompts`
    (seed of `base`), mean over the skipped frames of the configuration's sparse blocks at its sparse steps. One
    probe run per stride measures every operator; the probe replaces one block at a time on the dense trajectory
    (the paper's Fig. 3), so the number depends on the operator, the stride and the block set only.
    Returns {config name: error} (Dense: absent) and the profiles by stride."""
    from .probe import block_error, profile

    strides = sorted({fis.stride for _, fis in configs if fis is not None and fis.stride > 1})
    profiles = {}
    for k, s in enumerate(strides):
        profiles[s] = profile(worker, prompts, dataclasses.replace(base, fis=None), s)
        if progress is not None:
            progress(k + 1, len(strides))
    out = {}
    for name, fis in configs:
        if fis is None or fis.stride < 2:
            continue
        prof = profiles[fis.stride]
        errs = block_error(prof, fis.operator, fis.dense_steps)
        blocks = fis.sparse_blocks(prof["num_blocks"])
        out[name] = float(np.mean([errs[b] for b in blocks])) if blocks else 0.0
    return {"error": out, "prompts": prompts, "profiles": profiles}


def report(
    worker,
    base: GenerationRequest,
    prompts,
    seeds,
    configs,
    rows,
    command: str,
    elapsed_s: float,
    errors=None,
    measured: dict | None = None,
) -> dict:
    """Everything eval.json holds: the run (command, date, versions, model, request), summary, targets, samples.
    errors: eq6()'s result, or None (not measured)."""
    import skimage

    from engine.runtime.worker import versions

    from .probe import block_error

    summary = summarise(rows, configs)
    for name, x in summary.items():
        x["eq6"] = None if errors is None else errors["error"].get(name)
    eq6_info = None
    if errors is not None:
        eq6_info = {
            "prompts": errors["prompts"],
            "block_error": {  # per stride and operator: the mean Eq. 6 error of each block (steps 0..T-2)
                str(s): {op: block_error(prof, op, 1) for op in prof["frame_error"]}
                for s, prof in errors["profiles"].items()
            },
            "cv": {str(s): prof["cv"] for s, prof in errors["profiles"].items()},  # Eq. 5, [T, L]
        }
    return {
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": elapsed_s,
        "versions": {
            **versions(),
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "scikit-image": skimage.__version__,
        },
        "model": worker.describe(),
        "prompts": prompts,
        "seeds": seeds,
        "request": {
            "steps": base.steps,
            "num_frames": base.num_frames,
            "height": base.height,
            "width": base.width,
            "guidance": base.guidance,
            "vae_t": worker.info.vae_t,
            "latent_frames": worker.info.latent_frames(base.num_frames),
        },
        "summary": summary,
        "eq6": eq6_info,
        "targets": all_targets(summary, measured),
        **({"measured": measured} if measured is not None else {}),
        "samples": rows,
    }


def targets(s: dict) -> list[dict]:
    """Issue 6's targets and the paper's orderings. met: True/False with a signed margin; None = reported
    only, or a configuration the run left out."""

    def t(claim, value, threshold, unit, kind="at least"):  # kind: 'at least', 'above' (an ordering), 'report'
        margin = None if value is None or threshold is None else value - threshold
        met = None if margin is None or kind == "report" else (margin >= 0 if kind == "at least" else margin > 0)
        return {"target": claim, "value": value, "threshold": threshold, "margin": margin, "unit": unit, "met": met}

    def get(name, key):
        return s[name][key] if name in s else None

    out = [
        t("Dense: prompt adherence (colour and direction) >= 90%", get(DENSE, "adherence_both_pct"), 90.0, "%"),
        t("FIS-Balanced: mean PSNR vs dense >= 35 dB", get("FIS-Balanced", "psnr_mean"), 35.0, "dB"),
        t(
            "FIS-Balanced: adherence no lower than dense",
            get("FIS-Balanced", "adherence_both_pct"),
            get(DENSE, "adherence_both_pct"),
            "%",
        ),
        t("FIS-Fast: mean PSNR vs dense", get("FIS-Fast", "psnr_mean"), None, "dB", "report"),
    ]
    out += [
        t(f"{claim} ({better} > {worse})", get(better, "psnr_mean"), get(worse, "psnr_mean"), "dB", "above")
        for claim, better, worse in ORDERINGS
    ]
    out.append(
        t(
            "Operator: residual (FIS-Balanced) vs linear (FIS-linear); the margin says which wins",
            get("FIS-Balanced", "psnr_mean"),
            get("FIS-linear", "psnr_mean"),
            "dB",
            "report",
        )
    )
    return out


def _target(claim, value, threshold, unit, kind="at least") -> dict:
    margin = None if value is None or threshold is None else value - threshold
    met = None if margin is None or kind == "report" else margin >= 0
    return {"target": claim, "value": value, "threshold": threshold, "margin": margin, "unit": unit, "met": met}


def measured_speedup(measured: dict | None, fis: dict | None, resolution: str) -> float | None:
    """A configuration's (eval.json's summary form) speedup on the real-size A14B, composed from the block times of
    launch/bench_operators.py; None without them."""
    if measured is None:
        return None
    from engine.bench.operators import composed_speedup

    config = None if fis is None else FISConfig.from_dict({k: v for k, v in fis.items() if k != "name"})
    return composed_speedup(measured, config, resolution)


def all_targets(s: dict, measured: dict | None = None) -> list[dict]:
    """Every target of a run, from its summary (and the GPU-measured speedups, when given)."""
    return targets(s) + operator_targets(s, measured)


def operator_targets(s: dict, measured: dict | None = None) -> list[dict]:
    """Issue 16's targets on this model: a configuration at >= 1.6x real-size speedup (Wan 2.2 A14B at 720p: measured
    on the GPU when `measured` is given, else the FLOPs estimate) beats FIS-Balanced by >= 4 dB; FIS-Balanced's
    speckle ratio (v2: <= 1.2)."""

    def speedup(x: dict) -> float:
        got = measured_speedup(measured, x["fis"], "720p")
        return got if got is not None else (x.get("a14b_speedup_estimate") or {}).get("720p", 0)

    fast = {n: x for n, x in s.items() if x.get("fis") is not None and speedup(x) >= 1.6}
    best = max(fast, key=lambda n: fast[n]["psnr_mean"], default=None)
    balanced = s.get("FIS-Balanced", {}).get("psnr_mean")
    basis = "measured" if measured is not None else "FLOPs estimate"
    at = "" if best is None else f" at {speedup(fast[best]):.2f}x"
    return [
        _target(
            f"An operator at >= 1.6x (A14B 720p, {basis}) beats FIS-Balanced by >= 4 dB (best: {best}{at})",
            None if best is None else fast[best]["psnr_mean"],
            None if balanced is None else balanced + 4.0,
            "dB",
        ),
        _target(
            "FIS-Balanced: speckle ratio vs dense (v2 target <= 1.2)",
            s.get("FIS-Balanced", {}).get("speckle_mean"),
            None,
            "x",
            "report",
        ),
    ]
