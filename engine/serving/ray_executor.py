"""Everything that touches Ray: worker actors in placement groups, the Serve deployment, and batch
rendering across groups. Kept in one module so the rest of the engine imports without Ray.

A worker group is one model replica of N ranks: a STRICT_PACK placement group of N bundles (one GPU each,
or one CPU each with no GPUs), one actor per bundle. Each actor sets torchrun's environment variables and
loads the model once into the same Worker class torchrun uses, which forms the torch.distributed group
(NCCL on GPU, gloo on CPU) and splits each video over the ranks. A request goes to every rank; rank 0 (the
group's leader) returns the video.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import secrets
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
from ray import serve
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from engine.errors import Cancelled, GroupFailed, UserError, one_line
from engine.runtime.worker import WorkerConfig

from .api import create_app
from .config import ServeConfig
from .executor import GroupMember, ranks_of
from .jobs import JobStore
from .service import VideoService

# Replicas and workers import this repository; a checkout that is not pip-installed must still be found.
# (On a multi-node cluster the checkout, or the installed package, must be at the same path on every node.)
log = logging.getLogger("fis.serve")
ROOT = str(Path(__file__).resolve().parents[2])
RUNTIME_ENV = {"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p)}}


@ray.remote(max_concurrency=4)  # generate runs in one thread; progress, cancel and health answer meanwhile
class WorkerActor:
    def address(self) -> tuple[str, int]:
        """Rank 0's node address and a free port: the group's MASTER_ADDR / MASTER_PORT."""
        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def start(self, cfg: WorkerConfig, rank: int, world: int, addr: str, port: int):
        # torchrun's variables: the Worker sets up torch.distributed from them. Ray gives each actor its own
        # GPU as cuda:0 (CUDA_VISIBLE_DEVICES), so LOCAL_RANK is 0.
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0", MASTER_ADDR=addr, MASTER_PORT=str(port)
        )
        self.member = GroupMember(cfg)
        return self.member.worker.info, self.member.worker.describe()

    def generate(self, req, job: str | None, fps: int | None = None):
        return self.member.run(req, job, fps=fps)

    def progress(self) -> tuple[int, int]:
        return self.member.progress

    def cancel(self, job: str) -> None:
        self.member.cancel(job)

    def health(self) -> dict:
        return {**self.member.health(), "node": ray.util.get_node_ip_address()}


def use_gpus(device: str) -> bool:
    """device 'auto': GPU bundles if the cluster has GPUs; 'cpu': CPU bundles (gloo); anything else: GPUs."""
    if device == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return device != "cpu"


class RayExecutor:
    """A worker group of N ranks on a Ray cluster (engine/serving/executor.py's Executor)."""

    GRACE_S = 30.0  # how long the other ranks may take to stop after one stopped a request (UserError, Cancelled)

    def __init__(self, cfg: WorkerConfig, gpus: bool, timeout_s: float = 900):
        ranks = ranks_of(cfg)
        cfg = dataclasses.replace(cfg, ulysses=cfg.ulysses or 1, dp=1)  # the group is a world of its own
        self.tag = secrets.token_hex(4)
        self.names = [f"fis-worker-{self.tag}-r{i}" for i in range(ranks)]
        self.actors = []
        bundle = {"GPU": 1, "CPU": 1} if gpus else {"CPU": 1}
        self.pg = placement_group(  # on the caller's node when it has room: a replica drives workers beside it
            [bundle] * ranks,
            strategy="STRICT_PACK",
            name=f"fis-group-{self.tag}",
            _soft_target_node_id=ray.get_runtime_context().get_node_id(),
        )
        try:
            try:
                ray.get(self.pg.ready(), timeout=timeout_s)
            except GetTimeoutError:
                kind = "GPU" if gpus else "CPU"
                raise GroupFailed(
                    f"no node had {ranks} free {kind}s for a worker group within {timeout_s:.0f} s"
                ) from None
            self.actors = [
                WorkerActor.options(
                    name=name,
                    num_cpus=1,
                    num_gpus=int(gpus),
                    scheduling_strategy=(PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=i)),
                ).remote()
                for i, name in enumerate(self.names)
            ]
            addr, port = ray.get(self.actors[0].address.remote())
            started = ray.get([a.start.remote(cfg, i, ranks, addr, port) for i, a in enumerate(self.actors)])
        except RayTaskError as e:
            self.shutdown()
            raise e.cause if isinstance(e.cause, UserError) else GroupFailed(_first_line(e)) from None
        except RayActorError as e:  # an actor died while starting: the group failed, not the driver
            self.shutdown()
            raise GroupFailed(_first_line(e)) from None
        except BaseException:
            self.shutdown()
            raise
        self.info, self.describe = started[0]

    def run(self, req, on_poll=None, fps: int | None = None, poll_s: float = 0.2) -> dict:
        """Run `req` on every rank; the leader's result. on_poll(step, steps) -> True cancels (Cancelled).
        Raises UserError / Cancelled as the ranks do, once all have stopped; GroupFailed if a rank died or
        failed otherwise: the group is then unusable (ranks may wait in a collective) and must be shut down."""
        job = secrets.token_hex(8)
        refs = [a.generate.remote(req, job, fps) for a in self.actors]
        pending, cancelling, stopped = list(refs), False, None
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_s)
                for ref in done:
                    if self._check(refs.index(ref), ref) and stopped is None:
                        stopped = time.monotonic()
                if pending and stopped is not None and time.monotonic() - stopped > self.GRACE_S:
                    raise GroupFailed(  # ranks that did not stop alike may wait for the others forever
                        f"worker rank {refs.index(pending[0])} went on after another rank stopped the request"
                    )
                if pending and on_poll is not None:
                    try:
                        step = ray.get(self.actors[0].progress.remote(), timeout=30)
                    except (RayActorError, GetTimeoutError) as e:
                        raise GroupFailed(self._lost(0, e)) from None
                    if on_poll(*step) and not cancelling:
                        cancelling = True
                        self.actors[0].cancel.remote(job)  # the leader decides for all ranks at the next step
        except GroupFailed:
            raise
        except Exception as e:  # e.g. on_poll failed mid-job: the ranks' state is unknown
            raise GroupFailed(f"{type(e).__name__}: {e}") from e
        try:
            return ray.get(refs[0])
        except RayTaskError as e:
            raise e.cause from None  # Cancelled or UserError: _check let only those through

    def _check(self, rank: int, ref) -> bool:
        """GroupFailed if this rank's task failed other than by Cancelled or UserError, which every rank
        raises alike (the others are left to finish, for GRACE_S); True if it stopped by one of those."""
        try:
            ray.get(ref)
        except RayTaskError as e:
            if not isinstance(e.cause, (Cancelled, UserError)):
                raise GroupFailed(self._lost(rank, e)) from None
            return True
        except RayActorError as e:
            raise GroupFailed(self._lost(rank, e)) from None
        return False

    def _lost(self, rank: int, error: Exception) -> str:
        """Why the group broke, naming a dead rank if there is one (a survivor's error is often only the
        collective that lost its peer). What clients see: the rank and the kind of failure; the rest is logged."""
        log.error("worker group %s, rank %d: %s", self.tag, rank, _first_line(error))
        for h in self.health():
            if not h["alive"]:
                return f"worker rank {h['rank']} died mid-job"
        kind = type(error.cause if isinstance(error, RayTaskError) and error.cause is not None else error).__name__
        return f"worker rank {rank} failed ({kind}); see the replica's log"

    def health(self) -> list[dict]:
        refs = [a.health.remote() for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5)
        out = []
        for i, ref in enumerate(refs):
            try:
                h = {**ray.get(ref, timeout=0), "alive": True} if ref in ready else {"alive": False, "error": "silent"}
            except Exception as e:
                h = {"alive": False, "error": _first_line(e)}
            out.append({"rank": i, "actor": self.names[i], **h})
        return out

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        try:
            remove_placement_group(self.pg)
        except Exception:  # already gone with its owner
            pass


def _first_line(e: Exception) -> str:
    """A one-line reason: a task's own exception rather than Ray's traceback wrapper."""
    return one_line(e.cause if isinstance(e, RayTaskError) and e.cause is not None else e)


# ---- Serve ------------------------------------------------------------------------------------------------
class RemoteStore:
    """The JobStore interface, answered by the cluster's one store actor: replicas on any node share one queue,
    one set of records and one output directory (on the head node), and never touch a shared filesystem."""

    def __init__(self, actor):
        self._actor = actor

    def __getattr__(self, name):
        method = getattr(self._actor, name)

        def call(*args, **kwargs):
            try:
                return ray.get(method.remote(*args, **kwargs))
            except RayTaskError as e:  # QueueFull and friends arrive as themselves
                raise (e.cause if e.cause is not None else e) from None

        return call


def shared_store(output_dir: str, retention_s: float | None = None) -> RemoteStore:
    """The store actor of `output_dir`, started on the head node on first use and found by name after that.
    Detached: it outlives replicas (a crashed replica's jobs stay listed) and app restarts reuse it."""
    name = "fis-jobs-" + hashlib.sha1(output_dir.encode()).hexdigest()[:12]
    actor = (
        ray.remote(JobStore)
        .options(
            name=name,
            namespace="fis",
            get_if_exists=True,
            lifetime="detached",
            num_cpus=0,
            max_concurrency=16,
            resources={"node:__internal_head__": 0.001},
            runtime_env=RUNTIME_ENV,
        )
        .remote(output_dir, retention_s)
    )
    return RemoteStore(actor)


@serve.ingress()
class VideoDeployment:
    """One Serve replica = one worker group + the HTTP API over the shared job store."""

    def __init__(self, config: ServeConfig):
        gpus = use_gpus(config.model.device)
        self.service = VideoService(
            config,
            lambda: RayExecutor(config.model, gpus),
            store=shared_store(config.serve.output_dir, config.serve.retention_hours * 3600),
        )

    def __serve_build_asgi_app__(self):
        return create_app(self.service)

    def __del__(self):
        if hasattr(self, "service"):  # Serve calls this even when __init__ failed
            self.service.close()


def serve_app(config: ServeConfig):
    """The Serve application (serve.run / `serve run`): config.serve.replicas replicas, each spanning
    cfg x ulysses x ring GPUs. The replica itself only routes and queues, so it reserves no CPU."""
    spread = {"max_replicas_per_node": config.serve.max_replicas_per_node} if config.serve.max_replicas_per_node else {}
    return serve.deployment(
        VideoDeployment,
        name="fis-video",
        num_replicas=config.serve.replicas,
        max_ongoing_requests=256,
        ray_actor_options={"num_cpus": 0, "runtime_env": RUNTIME_ENV},
        **spread,
    ).bind(config)


# ---- batch rendering ----------------------------------------------------------------------------------------
def render_on_ray(batch, cfg: WorkerConfig, groups: int | None, address: str | None) -> int:
    """Data parallel over worker groups on a Ray cluster (`address`; None starts a local one): each group takes
    the next line as soon as it is free. A group that fails is rebuilt and its line reported failed.
    `groups` None: as many as the cluster's GPUs allow (1 without GPUs). `batch` is an engine.serving.batch.Batch.
    Returns the number of groups."""
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, runtime_env=RUNTIME_ENV)
    gpus = use_gpus(cfg.device)
    kind, ranks = ("GPU" if gpus else "CPU"), ranks_of(cfg)
    fit = int(ray.cluster_resources().get(kind, 0)) // ranks
    groups = groups or (max(1, fit) if gpus else 1)
    if groups > fit:  # else the extra groups would wait for resources that never come
        raise UserError(f"the Ray cluster has room for {fit} render group(s) of {ranks} {kind}(s), not {groups}")

    def drive(_):
        group = RayExecutor(cfg, gpus)
        try:
            while (item := batch.next_item()) is not None:
                try:
                    req = batch.request(item, group.info)
                    batch.done(item, group.run(req))
                except UserError as e:
                    batch.failed(item, str(e))
                except Exception as e:  # GroupFailed, a write error: the line fails, the batch goes on
                    batch.failed(item, str(e) or type(e).__name__)
                    if isinstance(e, GroupFailed):
                        group.shutdown()
                        group = None
                        group = RayExecutor(cfg, gpus)  # if this fails, the other groups take the rest
        except Exception:  # the group cannot be rebuilt: its lines stay queued ('not_run' in the summary)
            return
        finally:
            if group is not None:
                group.shutdown()

    with ThreadPoolExecutor(groups) as pool:
        list(pool.map(drive, range(groups)))
    return groups
