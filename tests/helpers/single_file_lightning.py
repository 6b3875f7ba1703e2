"""A Lightning user's script, in whichever namespace imports here: ModelCheckpoint (top-k by a
monitored loss, ``save_last``) with ElasticCheckpointIO, then the lines users write with what it
saved: ``Model.load_from_checkpoint(best_model_path)``, ``torch.load(path, weights_only=True)``,
both from an http URL too, and ``fit(ckpt_path=url)``.

``single_file_lightning.py DIR NAMESPACE train|resume``; prints what it found, one fact a line."""

from __future__ import annotations

import functools
import http.server
import importlib
import os
import sys
import threading

import torch
from torch.utils.data import DataLoader, TensorDataset

from elastic_resume.lightning import ElasticCheckpointIO

root, namespace, mode = sys.argv[1], sys.argv[2], sys.argv[3]
pl = importlib.import_module("lightning.pytorch" if namespace == "lightning" else namespace)


class Tiny(pl.LightningModule):
    def __init__(self, width: int = 4, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(width, 1)

    def training_step(self, batch, _):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.layer(x), y)
        self.log("train_loss", loss)
        return loss

    def on_train_start(self) -> None:
        print("started at step", self.trainer.global_step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


torch.manual_seed(0)
data = DataLoader(TensorDataset(torch.randn(32, 4), torch.randn(32, 1)), batch_size=4)


def fit(steps: int, ckpt_path: str | None = None, io: ElasticCheckpointIO | None = None):
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=root, monitor="train_loss", mode="min", save_top_k=2,
                                        every_n_train_steps=2, save_last=True)
    trainer = pl.Trainer(max_steps=steps, plugins=[io or ElasticCheckpointIO()], logger=False, callbacks=[ckpt],
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(Tiny(width=4, lr=0.05), data, ckpt_path=ckpt_path)
    return trainer


def same(model, state: dict) -> bool:
    return all(torch.equal(model.state_dict()[k], v) for k, v in state.items())


if mode == "train":
    trainer = fit(6)
    best, last = trainer.checkpoint_callback.best_model_path, trainer.checkpoint_callback.last_model_path
    raw = torch.load(best, weights_only=True)
    model = Tiny.load_from_checkpoint(best)
    print("best is a file:", os.path.isfile(best))
    print("best loads:", same(model, raw["state_dict"]), "step", raw["global_step"], "lr", model.hparams.lr)
    print("last loads: step", torch.load(last, weights_only=True)["global_step"])
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=root))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{os.path.basename(best)}"
        print("url loads:", same(Tiny.load_from_checkpoint(url), raw["state_dict"]))
        resumed = fit(8, ckpt_path=url)  # through the plugin: downloaded and verified
        print("url resumed: ended at", resumed.global_step)
    finally:
        server.shutdown()
        server.server_close()
else:
    io = ElasticCheckpointIO()
    path = io.resume_path(root)  # the newest; when it cannot be loaded, the next older one
    trainer = fit(10, ckpt_path=path, io=io)
    print("asked", os.path.basename(path), "ended at", trainer.global_step)
