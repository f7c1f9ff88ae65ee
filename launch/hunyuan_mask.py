"""HunyuanVideo 1.5: what diffusers' dense [B, 1, S, S] text mask costs in one joint-attention call.

One real-size attention layer (HunyuanVideo15TransformerBlock.attn of the 8B model: 16 heads x 128, random
weights), 480p (848x480) 81 frames, per SDPA backend:
  dense    diffusers' HunyuanVideo15AttnProcessor2_0 on the padded text: builds the [B, 1, S, S] bool mask
  joint    engine.models.hunyuan15.JointAttention on the same padded text: padded keys left out, no mask
  trimmed  JointAttention on the valid text only (what engine.models.hunyuan15.drop_text_padding feeds every block)
Assumed (diffusers 0.42.1 transformer config and pipeline defaults): patch 1, VAE 16x spatial / 4x temporal ->
21 x 30 x 53 = 33390 video tokens; text padded to 1000 Qwen2.5-VL + 256 ByT5 + 729 SigLIP = 1985 tokens, of
which --valid-text Qwen tokens are valid (t2v: no ByT5 glyphs, the image tokens are padding); 54 blocks.

    python launch/hunyuan_mask.py --device cuda --json mask.json   # GPU: real sizes, bf16
    python launch/hunyuan_mask.py --device cpu --video 17x240x432 --repeat 2 --backends default,math   # CPU, small
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from launch.common import Parser  # noqa: E402


def parser() -> argparse.ArgumentParser:
    ap = Parser(prog="hunyuan_mask", description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--video", default="81x480x848", help="frames x height x width")
    ap.add_argument("--valid-text", type=int, default=120, help="valid Qwen tokens of the prompt")
    ap.add_argument("--text-len", type=int, default=1000 + 256 + 729, help="padded text tokens")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backends", default="default,cudnn,flash,efficient")
    ap.add_argument("--json", type=Path, help="also write the results here")
    return ap


def main(argv=None) -> None:
    from engine.bench.mask import run

    run(parser().parse_args(argv))


if __name__ == "__main__":
    main()
