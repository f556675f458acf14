"""One training run of tests/test_checkpoint.py in a process of its own, so that it can be killed.

    python checkpoint_worker.py OUT MAX_EPOCHS [--checkpoint-dir D] [--resume] [--kill-at-step K]
                                [--slow] [--devices N]

Trains a small seeded SCVI (dropout, BatchNorm, early stopping, LR schedule and KL warm-up all
active, so every piece of state a checkpoint holds matters) and writes its final weights and
history to OUT with ``torch.save``. ``--kill-at-step K`` sends SIGKILL to this process just before
optimiser step K (counted from 0 in this process); ``--slow`` sleeps 20 ms per step so that a parent
can kill it from outside mid-run; ``--devices N`` trains data-parallel under torchrun.
"""

import argparse
import os
import signal
import time

import torch

torch.set_num_threads(1)

import pyro_scvi.infer.training as training  # noqa: E402
from pyro_scvi import SCVI, settings  # noqa: E402
from pyro_scvi.data import synthetic_iid  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("max_epochs", type=int)
parser.add_argument("--checkpoint-dir")
parser.add_argument("--resume", action="store_true")
parser.add_argument("--kill-at-step", type=int)
parser.add_argument("--slow", action="store_true")
parser.add_argument("--devices", type=int, default=1)
args = parser.parse_args()

if args.kill_at_step is not None or args.slow:
    step, taken = training._svi_step, [0]

    def watched_step(*step_args, **step_kwargs):
        if taken[0] == args.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.slow:
            time.sleep(0.02)
        taken[0] += 1
        return step(*step_args, **step_kwargs)

    training._svi_step = watched_step

settings.seed = 0
adata = synthetic_iid(batch_size=150, n_genes=60, n_batches=2, n_labels=3, seed=1)  # 300 cells
SCVI.setup_anndata(adata, batch_key="batch")
model = SCVI(adata, n_hidden=16, n_latent=4)
parallel = {"devices": args.devices, "strategy": "ddp", "accelerator": "cpu"} if args.devices > 1 else {}
model.train(max_epochs=args.max_epochs, batch_size=64, early_stopping=True, early_stopping_patience=4,
            check_val_every_n_epoch=1, enable_progress_bar=False, checkpoint_dir=args.checkpoint_dir,
            resume=args.resume, **parallel,
            plan_kwargs={"lr": 5e-3, "n_epochs_kl_warmup": 4, "reduce_lr_on_plateau": True, "lr_patience": 1})
rank = int(os.environ.get("RANK", "0"))
torch.save({"weights": model.module.state_dict(),
            "history": {key: frame.iloc[:, 0].tolist() for key, frame in model.history.items()},
            "epochs": [int(e) for e in model.history["train_loss"].index]},
           args.out.replace("RANK", str(rank)))
