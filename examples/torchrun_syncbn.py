"""Data-parallel training on CPU processes with fusedgrad's SyncBatchNorm, and a
vocabulary-parallel cross-entropy.

Run (2 processes, gloo over loopback; no GPU needed)::

    OMP_WAIT_POLICY=PASSIVE torchrun --nproc_per_node=2 examples/torchrun_syncbn.py

(``OMP_WAIT_POLICY=PASSIVE`` keeps idle OpenMP threads of one process from spinning on the
cores the other processes need.)

1. A small CNN whose ``nn.BatchNorm2d`` is converted to ``SyncBatchNorm`` trains under DDP with
   UNEVEN batch sizes per rank (8 and 12 samples): every rank normalises with the statistics of
   the whole global batch, and the running statistics come out identical on all ranks.
2. Each rank holds a different-sized slice of the classes of the same logits;
   ``vocab_parallel_softmax_cross_entropy`` gives the cross-entropy over all classes (and each
   rank its slice of the gradient), checked against ``F.cross_entropy`` on the full logits.
"""
from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fusedgrad.distributed as fgd


def train_with_sync_batch_norm(rank: int, world: int) -> None:
    torch.manual_seed(0)  # the same initial parameters on every rank
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    model = fgd.convert_sync_batchnorm(model)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    data = torch.Generator().manual_seed(100 + rank)
    batch = 8 + 4 * rank  # uneven: SyncBatchNorm normalises over the sum of all batches
    x = torch.randn(batch, 3, 16, 16, generator=data)  # one fixed batch per rank, learnt by
    y = torch.randint(0, 10, (batch,), generator=data)  # heart: the loss must go down
    for step in range(5):
        loss = F.cross_entropy(ddp(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0:
            print(f"step {step}: loss on rank 0 = {loss.item():.4f}")
    running_var = model[1].running_var
    gathered = [torch.empty_like(running_var) for _ in range(world)]
    dist.all_gather(gathered, running_var)
    if rank == 0:
        same = all(torch.equal(g, gathered[0]) for g in gathered)
        print(f"SyncBatchNorm running_var identical on all {world} ranks: {same}")


def vocab_parallel_cross_entropy(rank: int, world: int) -> None:
    n_rows, widths = 6, [3 + 2 * r for r in range(world)]  # uneven class shards: 3, 5, ...
    full = torch.Generator().manual_seed(7)  # every rank builds the same full logits
    logits = torch.randn(n_rows, sum(widths), generator=full, dtype=torch.float64)
    target = torch.randint(0, sum(widths), (n_rows,), generator=full)
    lo = sum(widths[:rank])
    shard = logits[:, lo:lo + widths[rank]].clone().requires_grad_()
    loss = fgd.vocab_parallel_softmax_cross_entropy(shard, target, label_smoothing=0.1)
    loss.backward()
    full_logits = logits.clone().requires_grad_()
    expected = F.cross_entropy(full_logits, target, label_smoothing=0.1)
    expected.backward()
    grad_error = (shard.grad - full_logits.grad[:, lo:lo + widths[rank]]).abs().max().item()
    print(f"rank {rank}: classes [{lo}, {lo + widths[rank]}) of {sum(widths)}; vocab-parallel "
          f"loss {loss.item():.12f}, full F.cross_entropy {expected.item():.12f}, "
          f"max |grad difference| {grad_error:.1e}")


def main() -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    train_with_sync_batch_norm(rank, world)
    vocab_parallel_cross_entropy(rank, world)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
