"""The distributed contrastive loss against the full-matrix reference, in one and in two processes."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import common as C


def test_local_loss_matches_reference():
    torch.manual_seed(0)
    img, txt = F.normalize(torch.randn(8, 16), dim=-1), F.normalize(torch.randn(8, 16), dim=-1)
    scale = torch.tensor(10.0)
    torch.testing.assert_close(C.contrastive_loss(img, txt, scale), C.contrastive_loss_reference(img, txt, scale))
    # perfect alignment gives a small loss, a shuffled pairing a large one
    assert C.contrastive_loss(img, img, torch.tensor(50.0)) < 0.01
    assert C.contrastive_loss(img, img.roll(1, 0), torch.tensor(50.0)) > 10


class Towers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.img, self.txt = torch.nn.Linear(6, 4), torch.nn.Linear(5, 4)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x, t):
        return F.normalize(self.img(x), dim=-1), F.normalize(self.txt(t), dim=-1), self.logit_scale.exp()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(Towers())
    x, t = _data()
    B = len(x) // world
    loss = C.contrastive_loss(*model(x[rank * B:(rank + 1) * B], t[rank * B:(rank + 1) * B]))
    loss.backward()  # DDP averages the gradients over ranks
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    torch.save({"loss": mean_loss / world, "grads": {n: p.grad for n, p in model.module.named_parameters()}},
               f"{out}/rank{rank}.pt")
    dist.barrier()  # both ranks done with every collective before the group goes
    dist.destroy_process_group()


def test_two_process_gloo_matches_single_process(tmp_path, free_port):
    mp.spawn(_worker, args=(2, free_port, str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    model = Towers()
    loss = C.contrastive_loss_reference(*model(*_data()))
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        torch.testing.assert_close(got["loss"], loss.detach(), atol=1e-6, rtol=1e-5)
        for n, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][n], p.grad, atol=1e-6, rtol=1e-5)
