"""A script in the shape of pytorch/examples' ddp-tutorial-series ``multinode.py`` (written here,
not copied), converted to ``CheckpointManager`` the way the README teaches: a ``Trainer`` class,
``MyTrainDataset`` built from the global RNG, a peek at the batch size at the top of every epoch,
``sampler.set_epoch`` after it, saves every few steps, and its own ``destroy_process_group``.

    python tutorial_multinode.py TOTAL_EPOCHS SAVE_EVERY_STEPS --batch_size B --snapshot_path DIR
        --loss_log FILE [--die_at_step N]
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch.distributed import destroy_process_group, init_process_group
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from elastic_resume import EXIT_PREEMPTED, CheckpointManager, ResumableDistributedSampler, RNGState


class MyTrainDataset(Dataset):
    def __init__(self, size):
        self.size = size
        self.data = [(torch.rand(20), torch.rand(1)) for _ in range(size)]

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return self.data[index]


class Trainer:
    def __init__(self, model, train_data, optimizer, save_every, snapshot_path, loss_log, die_at_step):
        self.local_rank = int(os.environ["LOCAL_RANK"])
        self.global_rank = int(os.environ["RANK"])
        self.model = model
        self.train_data = train_data
        self.optimizer = optimizer
        self.save_every = save_every
        self.die_at_step = die_at_step
        self.loss_log = loss_log
        self.progress = {"epoch": 0, "step": 0}
        self.state = {"model": model, "optimizer": optimizer, "sampler": train_data.sampler, "rng": RNGState(),
                      "progress": self.progress}
        self.snapshots = CheckpointManager(snapshot_path)
        if self.snapshots.restore(self.state) is not None:
            print(f"Resuming training from snapshot at Epoch {self.progress['epoch']}", flush=True)
        self.model = DDP(self.model)

    def _run_batch(self, source, targets):
        self.optimizer.zero_grad()
        output = self.model(source)
        loss = F.mse_loss(output, targets)  # (the tutorial's cross_entropy over one logit is always 0)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def _run_epoch(self, epoch):
        b_sz = len(next(iter(self.train_data))[0])
        print(f"[GPU{self.global_rank}] Epoch {epoch} | Batchsize: {b_sz} | Steps: {len(self.train_data)}", flush=True)
        self.train_data.sampler.set_epoch(epoch)
        for source, targets in self.train_data:
            loss = self._run_batch(source, targets)
            self.progress["step"] += 1
            self.progress["epoch"] = epoch  # every field current at every step: a preemption saves any step
            step = self.progress["step"]
            with open(self.loss_log, "a") as f:
                f.write(json.dumps({"rank": self.global_rank, "epoch": epoch, "step": step, "loss": loss}) + "\n")
            time.sleep(float(os.environ.get("STEP_SECONDS", "0")))
            if step % self.save_every == 0:
                self.snapshots.save(step, self.state)
            elif self.snapshots.save_if_preempted(step, self.state):
                sys.exit(EXIT_PREEMPTED)  # saved this step on every rank; the launcher requeues
            if step == self.die_at_step and self.global_rank == 1 and not os.path.exists(self.loss_log + ".died"):
                open(self.loss_log + ".died", "w").close()
                os._exit(9)  # a crash: the launcher restarts the group from the last snapshot

    def train(self, max_epochs):
        for epoch in range(self.progress["epoch"], max_epochs):
            self._run_epoch(epoch)
            self.progress["epoch"] = epoch + 1  # this epoch is done: a resume starts the next
        self.snapshots.close()


def main(total_epochs, save_every, batch_size, snapshot_path, loss_log, die_at_step):
    init_process_group(backend="gloo")
    torch.manual_seed(0)  # before the data: exact resume needs the same MyTrainDataset in every run
    dataset = MyTrainDataset(256)
    model = torch.nn.Linear(20, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    train_data = DataLoader(dataset, batch_size=batch_size, pin_memory=False, shuffle=False,
                            sampler=ResumableDistributedSampler(dataset))
    trainer = Trainer(model, train_data, optimizer, save_every, snapshot_path, loss_log, die_at_step)
    trainer.train(total_epochs)
    destroy_process_group()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="simple distributed training job")
    parser.add_argument("total_epochs", type=int)
    parser.add_argument("save_every", type=int)
    parser.add_argument("--batch_size", default=32, type=int)
    parser.add_argument("--snapshot_path", required=True)
    parser.add_argument("--loss_log", required=True)
    parser.add_argument("--die_at_step", type=int, default=0)
    args = parser.parse_args()
    main(args.total_epochs, args.save_every, args.batch_size, args.snapshot_path, args.loss_log, args.die_at_step)
