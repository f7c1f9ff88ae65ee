"""Helpers shared by the test modules (imported as `helpers`; tests/ is on the path through pyproject's pythonpath
and pytest's rootdir conftest)."""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Ran:
    """What a launch script did: as subprocess.CompletedProcess."""

    returncode: int
    stdout: str
    stderr: str


def run_cli(script: str, *args, nproc: int | None = None, cwd=None, timeout=300, real: bool = False):
    """launch/<script> with these arguments. nproc: under torchrun with that many processes (gloo on CPU), a real
    launch. Otherwise, in this process through the script's main(argv) with stdout and stderr captured (a fresh
    interpreter costs 5-10 s of imports on the CI machine), unless real=True (a test about the process itself)."""
    argv = [str(a) for a in args]
    if nproc is None and not real and cwd is None:
        return _in_process(script, argv)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    torchrun = [] if nproc is None else ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return subprocess.run(
        [sys.executable, *torchrun, str(ROOT / "launch" / script), *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def _in_process(script: str, argv: list[str]) -> Ran:
    module = importlib.import_module("launch." + script.removesuffix(".py"))
    out, err = io.StringIO(), io.StringIO()
    saved_argv = sys.argv
    sys.argv = [str(ROOT / "launch" / script), *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = module.main(argv)
                code = rc if isinstance(rc, int) else 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved_argv
    return Ran(code, out.getvalue(), err.getvalue())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def diff(a, b) -> float:
    """Max absolute difference."""
    return (a - b).abs().max().item()


def tiny_hunyuan_transformer(heads: int = 2):
    """A tiny random HunyuanVideo15Transformer3DModel (5 dual-stream blocks), seed 0."""
    from diffusers import HunyuanVideo15Transformer3DModel

    torch.manual_seed(0)
    return HunyuanVideo15Transformer3DModel(
        in_channels=9,
        out_channels=4,
        num_attention_heads=heads,
        attention_head_dim=16,
        num_layers=5,
        num_refiner_layers=1,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=8,
        rope_axes_dim=(4, 6, 6),
        target_size=32,
    ).eval()


def bare_transformer(heads: int):
    """A tiny Wan transformer with `heads` heads (the tiny pipelines have 2: too few for ulysses=4)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=32 // heads,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=32,
        ffn_dim=64,
        num_layers=4,
        rope_max_seq_len=64,
    ).eval()


def hunyuan_inputs(shape, text: str):
    """Inputs of tiny_hunyuan_transformer on latents `shape` [F, H, W]. text: 'padded' (t2v: padded Qwen and ByT5
    tokens, zero image = 4 padded tokens: 5 of 12 valid), 'full' (i2v: every token valid, so no mask) or 'batch'
    (two padded prompts of different lengths: a key mask)."""
    g = torch.Generator().manual_seed(1)
    batch = 2 if text == "batch" else 1
    mask, mask_2 = torch.ones(batch, 5, dtype=torch.long), torch.ones(batch, 3, dtype=torch.long)
    if text != "full":
        mask[:, 3:], mask_2[:, 2:] = 0, 0
        mask[1:, 1:] = 0  # the second prompt is shorter
    image = torch.randn(batch, 4, 8, generator=g) * (text == "full")
    args = (
        torch.randn(batch, 9, *shape, generator=g),
        torch.tensor([600.0] * batch),
        torch.randn(batch, 5, 16, generator=g),
        mask,
    )
    return args, {
        "encoder_hidden_states_2": torch.randn(batch, 3, 8, generator=g),
        "encoder_attention_mask_2": mask_2,
        "image_embeds": image,
        "return_dict": False,
    }


@torch.no_grad()
def hunyuan_run(m, shape, text):
    args, kw = hunyuan_inputs(shape, text)
    return m(*args, **kw)[0]


def tiny_vaes() -> dict:
    """{kind: (VAE, latent channels)}: tiny random VAEs of each kind the engine decodes in parallel, seed 0 — Wan 2.1
    (16 channels, x8, as the tiny Wan pipelines), Wan 2.2 (48 channels, x16 with its 2x2 patchify, the TI2V-5B
    config at toy width) and HunyuanVideo 1.5 (x16, as the tiny HunyuanVideo pipelines)."""
    from diffusers import AutoencoderKLHunyuanVideo15, AutoencoderKLWan

    from engine.models import wan

    torch.manual_seed(0)
    wan21 = AutoencoderKLWan(
        base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    torch.manual_seed(0)
    toy = dict(base_dim=8, decoder_base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1)
    wan22 = AutoencoderKLWan(**{**wan.VAE_2_2, **toy})
    torch.manual_seed(0)
    hunyuan = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8,) * 5, layers_per_block=1)
    return {"wan2.1": (wan21.eval(), 16), "wan2.2": (wan22.eval(), 48), "hunyuan1.5": (hunyuan.eval(), 4)}


def fake_fa3():
    """A stand-in for fa3-fwd's `fa3_fwd_interface` on the CPU: its two entry points with its signatures and output
    layouts ([B, S, H, D] out, [B, H, S] fp32 log-sum-exp), computed by PyTorch's math. The engine's fa3 wiring
    (diffusers' _flash_3_hub backend, Ulysses included) runs on it exactly as on the real kernel."""
    import types

    def attend(q, k, v, scale):  # [B, S, H, D] -> out [B, S, H, D], lse [B, H, S]
        s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * (scale or q.shape[-1] ** -0.5)
        lse = torch.logsumexp(s, dim=-1)
        out = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, dim=-1), v.float()).to(q.dtype)
        return out, lse

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, *args, return_attn_probs=False, **kwargs):
        assert not causal
        out, lse = attend(q, k, v, softmax_scale)
        return (out, lse) if return_attn_probs else out

    def _flash_attn_forward(q, k, v, *args, causal=False, **kwargs):
        assert not causal and len(args) == 21  # k_new ... v_descale, softmax_scale: as fa3-fwd orders them
        out, lse = attend(q, k, v, args[-1])
        return out, lse, torch.empty(0), torch.empty(0)

    module = types.ModuleType("fa3_fwd_interface")
    module.flash_attn_func, module._flash_attn_forward = flash_attn_func, _flash_attn_forward
    return module


def chunked_body(kib: int = 100):
    """A JSON body streamed without Content-Length: a size limit must hold while it streams in."""
    yield b'{"prompt": "'
    for _ in range(kib):
        yield b"x" * 1024
    yield b'"}'


class LocalServer:
    """The real app over a VideoService with an in-process worker (LocalExecutor: no Ray), served by uvicorn on a
    thread at 127.0.0.1: what the API, client and page tests talk to over real HTTP, at the cost of one model load."""

    def __init__(self, config):
        import threading
        import time

        import uvicorn

        from engine.serving.api import create_app
        from engine.serving.executor import LocalExecutor
        from engine.serving.service import VideoService

        self.service = VideoService(config, lambda: LocalExecutor(config.model))
        self.store = self.service.store
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(
            uvicorn.Config(create_app(self.service), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.thread.start()
        end = time.time() + 30
        while not self.server.started:
            if time.time() > end or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.service.close()
