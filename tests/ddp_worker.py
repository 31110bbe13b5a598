"""Run by test_train.py under torchrun: train a few iterations, then save this rank's weights."""

import os
import sys

import torch

from alphagan.config import make_config
from alphagan.train import train

out = sys.argv[1]
cfg = make_config("smoke", sys.argv[2], iters=3, device="cpu")
nets = train(cfg, "synth", out, progress=False).nets
rank = int(os.environ["RANK"])
torch.save({k: v.state_dict() for k, v in nets.items()}, os.path.join(out, f"weights_rank{rank}.pt"))
