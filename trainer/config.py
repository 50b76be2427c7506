"""The training configuration: the reference defaults (COSETTLE_METHOD.md section 5) and their checks."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .losses import REG_LOSSES
from .projection import FUSIONS

# Settings that change what a run computes; a resumed run must match them exactly. The others
# (paths, device, I/O threads, checkpoint cadence, stop step) may differ between sessions.
RESULT_KEYS = ("objective", "epochs", "batch_size", "accum_iter", "blr", "min_lr", "warmup_epochs",
               "weight_decay", "temp", "lambda_reg", "reg_loss", "fusion", "seed", "shuffle_chunks")


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
    temp: float = 0.03
    lambda_reg: float = 3.0
    reg_loss: str = "kl"
    fusion: str = "linear"
    seed: int = 0
    device: str = "auto"
    shuffle_chunks: int = 4  # chunks mixed by one in-memory shuffle window
    io_threads: int = 4
    checkpoint_every: int = 100  # optimizer steps; every epoch end is checkpointed too
    max_steps: int | None = None  # stop (checkpointed, resumable) after this many optimizer steps
    resume: bool = False
    overwrite: bool = False

    def as_dict(self) -> dict:
        d = asdict(self)
        d["features"] = list(self.features)
        return d

    def result_settings(self) -> dict:
        return {k: getattr(self, k) for k in RESULT_KEYS}

    def validate(self) -> None:
        """Raise ValueError naming the first bad option."""
        from .objectives import OBJECTIVES

        checks = [
            (bool(self.features), "--features: give at least one feature store"),
            (bool(self.out), "--out: give the run directory"),
            (self.objective in OBJECTIVES, f"--objective: unknown '{self.objective}' (known: {', '.join(OBJECTIVES)})"),
            (self.epochs >= 1, f"--epochs: must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size: must be at least 1, got {self.batch_size}"),
            (self.accum_iter >= 1, f"--accum-iter: must be at least 1, got {self.accum_iter}"),
            (self.blr > 0, f"--blr: must be positive, got {self.blr}"),
            (self.min_lr >= 0, f"--min-lr: must be non-negative, got {self.min_lr}"),
            (0 <= self.warmup_epochs <= self.epochs, f"--warmup-epochs: must lie in [0, epochs], got {self.warmup_epochs}"),
            (self.weight_decay >= 0, f"--weight-decay: must be non-negative, got {self.weight_decay}"),
            (self.temp > 0, f"--temp: must be positive, got {self.temp}"),
            (self.reg_loss in REG_LOSSES, f"--reg-loss: unknown '{self.reg_loss}' (choose {', '.join(REG_LOSSES)})"),
            (self.fusion in FUSIONS, f"--fusion: unknown '{self.fusion}' (choose {', '.join(FUSIONS)})"),
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
