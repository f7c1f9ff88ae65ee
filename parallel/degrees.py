"""How one video is spread over the processes: CFG branches x ring x Ulysses, checked before any work."""

from __future__ import annotations

from dataclasses import dataclass

# mesh axis names, outermost first: Ulysses ranks are neighbours (fast links). 'dp' replicas render different
# videos (batch rendering); the other three spread one video.
AXES = ("dp", "cfg", "ring", "ulysses")


@dataclass(frozen=True)
class Degrees:
    """dp: independent replicas, each rendering its own videos (data parallel over requests).
    cfg: 2 runs the cond and uncond branches on two rank groups at once (1 = serial CFG).
    ring, ulysses: sequence-parallel degrees inside one CFG group (diffusers ring / Ulysses attention).
    """

    cfg: int = 1
    ulysses: int = 1
    ring: int = 1
    dp: int = 1

    def __post_init__(self):
        for name in AXES:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"parallel degree {name} must be an integer >= 1, got {v!r}")
        if self.cfg > 2:
            raise ValueError(f"cfg degree must be 1 or 2 (there are two CFG branches), got {self.cfg}")

    @property
    def sp(self) -> int:
        """Sequence-parallel degree: ranks sharing the tokens of one video."""
        return self.ring * self.ulysses

    @property
    def replica(self) -> int:
        """Ranks that work on one video together."""
        return self.cfg * self.sp

    @property
    def world_size(self) -> int:
        return self.dp * self.replica

    def shape(self) -> tuple[int, ...]:
        return tuple(getattr(self, name) for name in AXES)

    def validate(self, world_size: int, num_heads: int | None = None) -> Degrees:
        """Raise ValueError (one line) if these degrees cannot run on `world_size` processes or this model."""
        if self.world_size != world_size:
            raise ValueError(
                f"parallel degrees dp={self.dp} x cfg={self.cfg} x ring={self.ring} x ulysses={self.ulysses} = "
                f"{self.world_size} "
                f"must equal the number of processes ({world_size})"
            )
        if num_heads is not None and num_heads % self.ulysses != 0:
            raise ValueError(
                f"ulysses degree {self.ulysses} must divide the model's {num_heads} attention heads "
                f"(Ulysses gives each rank whole heads); use a divisor of {num_heads} or ring attention"
            )
        return self
