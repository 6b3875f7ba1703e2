"""A script in the shape of Lightning's ``examples/pytorch/basics/autoencoder.py`` (written here,
not copied): ``import pytorch_lightning``, a ``LightningCLI`` over an autoencoder and a datamodule
with ``run=False``, then ``cli.trainer.fit``. Converted to elastic-resume: the plugin comes as a
``lazy_instance`` in ``trainer_defaults``, the callbacks (``ElasticResume`` with its detectors and
policy, ``ModelCheckpoint``) from the YAML config given with ``--config``, and the loader is a
``ResumableDataLoader``.

Test hooks through the environment: ``LOSS_LOG`` (a JSON line per step and rank), ``DIE_AT_STEP``
with ``FAULT_DIR`` (rank 1 dies once at that step).
"""

import json
import os

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from jsonargparse import lazy_instance
from pytorch_lightning.cli import LightningCLI
from torch import nn
from torch.utils.data import TensorDataset

from elastic_resume.lightning import ElasticCheckpointIO, ResumableDataLoader


class LitAutoEncoder(pl.LightningModule):
    def __init__(self, hidden_dim: int = 16, learning_rate: float = 1e-3):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(nn.Linear(32, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 4))
        self.decoder = nn.Sequential(nn.Linear(4, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 32))

    def forward(self, x):
        return self.decoder(self.encoder(x))

    def training_step(self, batch, batch_idx):
        (x,) = batch
        loss = F.mse_loss(self(x), x)
        step = self.trainer.global_step + 1
        if os.environ.get("LOSS_LOG"):
            with open(os.environ["LOSS_LOG"], "a") as f:
                f.write(json.dumps({"rank": self.global_rank, "step": step, "loss": loss.item()}) + "\n")
        marker = os.path.join(os.environ.get("FAULT_DIR", "."), ".died")
        if step == int(os.environ.get("DIE_AT_STEP", "0")) and self.global_rank == 1 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(9)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.learning_rate)


class MyDataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int = 8):
        super().__init__()
        self.batch_size = batch_size
        self.dataset = TensorDataset(torch.randn(256, 32, generator=torch.Generator().manual_seed(0)))

    def train_dataloader(self):
        return ResumableDataLoader(self.dataset, batch_size=self.batch_size, shuffle=True)


def cli_main():
    cli = LightningCLI(
        LitAutoEncoder, MyDataModule, seed_everything_default=1234, run=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={"max_epochs": 2, "accelerator": "cpu", "strategy": "ddp", "use_distributed_sampler": False,
                          "plugins": lazy_instance(ElasticCheckpointIO), "enable_progress_bar": False,
                          "logger": False},
    )
    ckpt_io = cli.trainer.strategy.checkpoint_io
    ckpt_path = ckpt_io.resume_path(cli.trainer.checkpoint_callback.dirpath)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)


if __name__ == "__main__":
    cli_main()
