"""Two gloo processes (as torchrun starts them) train exactly what one process replaying both ranks' batches trains."""
import os
import socket
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file

from cosettle.pipeline.store import open_store
from cosettle.trainer.data import batches_per_epoch, chunk_table, epoch_plan
from cosettle.trainer.losses import cosettle_loss
from cosettle.trainer.projection import build_projection
from cosettle.trainer.schedule import lr_at
from cosettle.trainer.synthetic import write_synthetic_store
from cosettle.trainer.trained import load_trained


def test_two_process_run_averages_gradients_over_distinct_chunks(tmp_path):
    path = tmp_path / "s.zarr"
    write_synthetic_store(path, num_videos=30, views=2, grid=4, dim=16, chunk_videos=5, invalid=(4,))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cosettle.trainer.cli", "--features", str(path), "--out", str(out), "--epochs", "2",
           "--batch-size", "3", "--blr", "2.0", "--device", "cpu", "--shuffle-chunks", "2"]
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The environment torchrun gives its workers; launching them directly saves a process start.
    ranks = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    for p in ranks:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    trained, cfg = load_trained(out)
    assert cfg["world_size"] == 2 and cfg["effective_batch"] == 6

    # Replay: each step's loss is the mean of the two ranks' batch losses (DDP averages gradients).
    store = open_store(path)
    chunks = chunk_table([store])
    n = batches_per_epoch(chunks, 2, 0, 2, 3)
    assert cfg["steps_per_epoch"] == n
    proj = build_projection(16, "linear", seed=0)
    decay = [p for p in proj.parameters() if p.ndim == 2]
    no_decay = [p for p in proj.parameters() if p.ndim == 1]
    peak = 2.0 * 6 / 256
    opt = torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.05}],
                            lr=peak, betas=(0.9, 0.95))
    for epoch in range(2):
        tokens = {k: store.array(k)[epoch] for k in ("a", "b", "a_asy")}
        plans = [epoch_plan(chunks, epoch, 0, r, 2, 3, 2)[:n] for r in range(2)]
        assert not set(plans[0][:, :, 0].ravel()) & set(plans[1][:, :, 0].ravel())  # ranks share no chunk
        for i in range(n):
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch + i / n, peak, 0.0, 1.0, 2)
            losses = []
            for plan in plans:
                rows = np.array([chunks[c].block * 5 + r for c, r in plan[i].tolist()])
                batch = {k: torch.from_numpy(v[rows]) for k, v in tokens.items()}
                losses.append(cosettle_loss(proj, batch["a"], batch["b"], batch["a_asy"])["loss"])
            opt.zero_grad()
            (sum(losses) / 2).backward()
            opt.step()
    got = load_file(str(out / "projection.safetensors"))
    for k, v in proj.state_dict().items():
        assert torch.allclose(got[k], v, atol=1e-5), k
    assert not torch.allclose(trained[0].weight, build_projection(16, "linear", seed=0)[0].weight)
