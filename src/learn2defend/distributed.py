"""Data-parallel training across processes (torchrun): one process per GPU, or several
CPU processes with gloo.

No DistributedDataParallel wrapper: the classifier is called several times per step
(the gradient query with `autograd.grad`, the clean forward, the adversarial forward)
and the L2L methods take one backward through classifier and attacker together, which
DDP's reducer hooks handle badly. Instead every optimizer gets a step pre-hook
(`sync_gradients`) that averages the gradients of its parameters across processes in
one flattened all-reduce right before it steps. Every `.step()` the training methods
take (the joint update, the alternating update, the extra attacker steps) goes through
it, so classifier and attacker stay identical on every rank as long as they start
identical (`broadcast_modules` at the start).

Buffers (batch-norm running statistics) are local: each rank normalizes with its own
batch statistics and updates its own running averages. They are broadcast from rank 0
before every validation and checkpoint (`broadcast_buffers`), so rank 0's statistics
are the ones validated and saved, and all ranks continue from the same ones.
"""

from __future__ import annotations

import atexit
import datetime
import os

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .errors import UserError

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")


def launched() -> bool:
    """True when this process was started by torchrun (or a launcher setting its variables)
    with more than one process."""
    return all(k in os.environ for k in TORCHRUN_ENV) and int(os.environ["WORLD_SIZE"]) > 1


def active() -> bool:
    """True inside a process group, of any size: its collectives then run, trivially with one
    process (`learn2defend doctor` trains that way to check nccl)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def init_from_env(device: str = "auto") -> bool:
    """Join the process group torchrun describes (nccl on CUDA, gloo on the CPU); return
    True when this call created it (the caller then calls `shutdown`)."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise UserError("this PyTorch build has no torch.distributed; run without torchrun")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise UserError(f"--device {device} under torchrun, but CUDA is not available; use --device cpu")
        if local_rank() >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank()} but this machine has {torch.cuda.device_count()} GPU(s); "
                            "use --nproc_per_node <= the number of GPUs")
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank()))
    else:
        dist.init_process_group("gloo")
    atexit.register(shutdown)
    return True


SHUTDOWN_WAIT_SECONDS = 30  # how long a rank waits at exit for the others (gloo) before leaving anyway


def shutdown() -> None:
    """Leave the process group (at exit: `init_from_env` registers it).

    Under gloo the ranks first wait for each other, up to SHUTDOWN_WAIT_SECONDS: a rank that
    tore its group down while another still worked (rank 0 writing a checkpoint or loading
    the run) was aborted at exit now and then ("terminate called without an active
    exception", SIGABRT, after Python had finished), which torchrun reports as a failed run:
    4 of 50 two-rank fgsm-pgi runs (stopped by SIGTERM, then resumed) on a loaded 2-core CPU
    without the wait, none of 50 with it. A rank that leaves because of an error waits as
    long before torchrun learns of it."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_backend() == "gloo" and dist.get_world_size() > 1:
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=SHUTDOWN_WAIT_SECONDS))
        except RuntimeError:  # a rank did not come: leave anyway
            pass
    dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """Under a process group, a CUDA device means this process's GPU (cuda:LOCAL_RANK)."""
    if active() and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


def _comm_device() -> torch.device:
    """Where collectives' tensors must live: the GPU for nccl, anywhere for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _allreduce_mean(tensors: list[torch.Tensor]) -> None:
    if not tensors:
        return
    flat = _flatten_dense_tensors(tensors)
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    for t, synced in zip(tensors, _unflatten_dense_tensors(flat, tensors), strict=True):
        t.copy_(synced)


def sync_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Average the gradients of `optimizer`'s parameters across ranks, in one bucket per dtype.

    Every parameter takes part, so the bucket's layout is the same on every rank without
    asking the others (no extra collective, no host sync). A parameter without a gradient
    takes part as zeros. Every method's step gives every parameter of its optimizers a
    gradient at every step (tests/test_distributed.py checks this), so that case does not
    arise here; were a parameter unused on every rank, it would get a zero gradient where a
    single process leaves it at None, which momentum or weight decay would then act on."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        _allreduce_mean(grads)


def install_gradient_sync(optimizers: list[torch.optim.Optimizer | None]) -> None:
    """Every later `optimizer.step()` first averages its gradients across ranks."""
    if not active():
        return
    for opt in optimizers:
        if opt is not None:
            opt.register_step_pre_hook(lambda o, args, kwargs: sync_gradients(o))


def _broadcast(tensors: list[torch.Tensor]) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = _flatten_dense_tensors([t.detach() for t in group])
        dist.broadcast(flat, src=0)
        with torch.no_grad():
            for t, v in zip(group, _unflatten_dense_tensors(flat, group), strict=True):
                t.copy_(v)


def broadcast_modules(modules: list[nn.Module | None]) -> None:
    """Rank 0's parameters and buffers on every rank."""
    if active():
        _broadcast([t for m in modules if m is not None for t in (*m.parameters(), *m.buffers())])


def broadcast_tensors(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values of `tensors` on every rank, in place (a method's shared state, such as
    LIET's class-wise starts); nothing without a process group."""
    if active():
        _broadcast(tensors)


def broadcast_buffers(modules: list[nn.Module | None]) -> None:
    """Rank 0's buffers (batch-norm running statistics) on every rank."""
    if active():
        _broadcast([b for m in modules if m is not None for b in m.buffers()])


SUM_KEYS = ("loss", "correct", "attack_success", "n", "skipped")


def reduce_sums(sums: dict) -> dict:
    """The training loop's metric sums added over ranks (a new dict; floats for all)."""
    if not active():
        return dict(sums)
    values = [float(sums[k]) if k in sums else 0.0 for k in SUM_KEYS]
    present = [1.0 if k in sums else 0.0 for k in SUM_KEYS]
    t = torch.tensor(values + present, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    out = {}
    for i, k in enumerate(SUM_KEYS):
        if t[len(SUM_KEYS) + i] > 0:
            v = t[i].item()
            out[k] = int(v) if k in ("n", "skipped") else torch.tensor(v, dtype=torch.float64)
    return out


def any_rank(flag: bool) -> bool:
    """True when `flag` is true on at least one rank."""
    if not active():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_comm_device())
    dist.all_reduce(t)
    return bool(t.item() > 0)


def sum_counts(counts: list[int]) -> list[int]:
    """Integer counts added over ranks."""
    if not active():
        return counts
    t = torch.tensor(counts, dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()


def barrier() -> None:
    if active():
        dist.barrier()


class Ranks:
    """This process's place among the training processes, and what the training loop asks
    of the others. In a single process (no process group) every method does nothing and
    returns its argument.

    `agree_stop` and `reduce_sums` communicate only with more than one process: in a group
    of one (`learn2defend doctor`'s torchrun check) the flag and the sums are already the
    agreed ones. The broadcasts, barriers and `any` run in any process group, so that a
    group of one calls them as a larger one does."""

    def __init__(self, rank: int = 0, world: int = 1) -> None:
        self.rank, self.world = rank, world

    @classmethod
    def current(cls) -> Ranks:
        """This process's rank and the number of processes (0 and 1 without a process group)."""
        return cls(rank(), world_size())

    @property
    def is_main(self) -> bool:
        """Rank 0, the one that validates, writes the run folder and logs."""
        return self.rank == 0

    def agree_stop(self, flag: bool, due: bool = True) -> bool:
        """Whether any rank has `flag` (a stop was asked for). With several processes, that
        costs a collective and a host sync, so they agree only where `due` (the same on every
        rank) and answer False elsewhere; a single process answers `flag` at once."""
        if self.world == 1:
            return flag
        return due and any_rank(flag)

    def reduce_sums(self, sums: dict) -> dict:
        """The metric sums of all ranks together (`reduce_sums`); `sums` itself with one process."""
        return reduce_sums(sums) if self.world > 1 else sums

    def any(self, flag: bool) -> bool:
        """True when `flag` is true on at least one rank."""
        return any_rank(flag)

    def broadcast_buffers(self, modules: list[nn.Module | None]) -> None:
        """Rank 0's buffers (batch-norm running statistics) on every rank."""
        broadcast_buffers(modules)

    def barrier(self) -> None:
        barrier()
