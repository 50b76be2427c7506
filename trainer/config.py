"""The training configuration: the reference defaults (COSETTLE_METHOD.md section 5) and their checks.

General settings (schedule, batch, seed, I/O) are fields of :class:`TrainConfig`; the objective's
own settings (for Co-Settle: ``temp``, ``lambda_reg``, ``reg_loss``, ``fusion``) live in
``options``, declared by the objective's module. Written out (``as_dict``, ``config.json``), both
stand side by side in one flat table, as on the command line.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from cosettle.core.provenance import field_types

from .objective import OBJECTIVES, all_options, discover

# General settings that change what a run computes; a resumed run must match them exactly, and
# the objective's options too. The others (paths, device, I/O threads, checkpoint cadence, stop
# step, compile) may differ between sessions.
RESULT_KEYS = ("objective", "epochs", "batch_size", "accum_iter", "blr", "min_lr", "warmup_epochs",
               "weight_decay", "seed", "shuffle_chunks")


def flag(name: str) -> str:
    """The command-line spelling of a setting."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Everything ``train`` needs; defaults are the release's (one process = its 4 GPUs x 128)."""

    features: tuple[str, ...] = ()
    out: str = ""
    objective: str = "cosettle"
    epochs: int = 5
    batch_size: int = 512  # per process; effective batch = batch_size * accum_iter * world size
    accum_iter: int = 1
    blr: float = 1e-4
    min_lr: float = 0.0
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    seed: int = 0
    device: str = "auto"
    shuffle_chunks: int = 4  # chunks mixed by one in-memory shuffle window
    io_threads: int = 4
    checkpoint_every: int = 100  # optimizer steps; every epoch end is checkpointed too
    max_steps: int | None = None  # stop (checkpointed, resumable) after this many optimizer steps
    resume: bool = False
    overwrite: bool = False
    compile: bool = False  # torch.compile the objective's forward; same results within float tolerance
    options: dict = field(default_factory=dict)  # the objective's settings; its defaults fill the rest

    def __post_init__(self) -> None:
        spec = discover().get(self.objective)
        if spec is not None:
            self.options = spec.defaults() | dict(self.options)

    @classmethod
    def from_flat(cls, **values) -> "TrainConfig":
        """A config from general settings and objective options given side by side."""
        general = {f.name for f in fields(cls)} - {"options"}
        return cls(**{k: v for k, v in values.items() if k in general},
                   options={k: v for k, v in values.items() if k not in general})

    def as_dict(self) -> dict:
        d = asdict(self)
        d["features"] = list(self.features)
        return d | d.pop("options")

    def result_settings(self) -> dict:
        return {k: getattr(self, k) for k in RESULT_KEYS} | self.options

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        checks = [
            (bool(self.features), "--features: give at least one feature store"),
            (bool(self.out), "--out: give the run directory"),
            (self.objective in discover(), f"--objective: unknown '{self.objective}' (known: {', '.join(OBJECTIVES)})"),
            (self.epochs >= 1, f"--epochs: must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size: must be at least 1, got {self.batch_size}"),
            (self.accum_iter >= 1, f"--accum-iter: must be at least 1, got {self.accum_iter}"),
            (self.blr > 0, f"--blr: must be positive, got {self.blr}"),
            (self.min_lr >= 0, f"--min-lr: must be non-negative, got {self.min_lr}"),
            (0 <= self.warmup_epochs <= self.epochs, f"--warmup-epochs: must lie in [0, epochs], got {self.warmup_epochs}"),
            (self.weight_decay >= 0, f"--weight-decay: must be non-negative, got {self.weight_decay}"),
            (self.device in ("auto", "cpu", "cuda"), f"--device: choose auto, cpu or cuda, got '{self.device}'"),
            (self.shuffle_chunks >= 1, f"--shuffle-chunks: must be at least 1, got {self.shuffle_chunks}"),
            (self.io_threads >= 1, f"--io-threads: must be at least 1, got {self.io_threads}"),
            (self.checkpoint_every >= 1, f"--checkpoint-every: must be at least 1, got {self.checkpoint_every}"),
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps: must be at least 1, got {self.max_steps}"),
            (not (self.resume and self.overwrite), "--resume and --overwrite exclude each other"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        spec = OBJECTIVES[self.objective]
        for name, value in self.options.items():
            if name not in spec.options:
                raise ValueError(f"{flag(name)}: not an option of objective '{self.objective}' "
                                 f"(its options: {', '.join(flag(n) for n in spec.options) or 'none'})")
            problem = spec.options[name].problem(value)
            if problem:
                raise ValueError(f"{flag(name)}: {problem}")


def option_types(exclude: set[str] = frozenset()) -> dict[str, tuple[type, ...]]:
    """Setting name -> accepted value types, general settings and every objective's options."""
    out = field_types(TrainConfig, exclude | {"options"})
    for name, declared in all_options().items():
        out[name] = tuple(dict.fromkeys(type(opt.default) for _, opt in declared))
    return out
