"""Resume a Lightning fit from a bundle written by elastic-resume 0.2.0 (the fixture of
tests/fixtures/written-by-0.2.0, made by its make_fixtures.py), in whichever Lightning namespace
imports here; print the step it resumed at and whether the weights are the bundle's."""

from __future__ import annotations

import importlib
import sys

import torch
from torch.utils.data import DataLoader, TensorDataset

from elastic_resume.lightning import ElasticCheckpointIO, load_checkpoint

namespace = sys.argv[2]
pl = importlib.import_module("lightning.pytorch" if namespace == "lightning" else namespace)


class Tiny(pl.LightningModule):  # the fixture's module
    def __init__(self, width: int = 4):
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(width, 1)
        self.seen: list[int] = []

    def training_step(self, batch, _):
        if not self.seen:  # the first step after the resume: the weights are the bundle's
            saved = load_checkpoint(sys.argv[1])["state_dict"]
            same = all(torch.equal(saved[k], v) for k, v in self.state_dict().items())
            print("weights from the bundle:", same)
        self.seen.append(self.trainer.global_step)
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


data = DataLoader(TensorDataset(torch.randn(16, 4), torch.randn(16, 1)), batch_size=4)
trainer = pl.Trainer(max_epochs=2, plugins=[ElasticCheckpointIO()], logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
module = Tiny()
trainer.fit(module, data, ckpt_path=sys.argv[1])
print("resumed at step", module.seen[0], "ended at", trainer.global_step)
