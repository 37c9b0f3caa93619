"""Stage 4's --shard (~210 lines): the UNets split over the torchrun processes with PyTorch's
FSDP2 (torch.distributed.fsdp.fully_shard). Full fine-tuning keeps 16 bytes per weight of the
policy (the fp32 weight, its gradient, AdamW's two moments), 42 GB for SDXL's 2.6 B-weight
UNet; sharded, each of N processes holds 1/N of them.

What it is not: a trainer. Stage 4's hand-written loop runs around it unchanged: the loss,
DFM, the B/(B + n_aug) rescale, clipping to a global norm, the schedule and uneven batch
splits act on sharded gradients as on whole ones. What changes is where the weights live and
what sums the gradients over processes:

  shard                  fully_shard on each down, mid and up block, then at the root
  lockstep, stand_in     every process runs the same forwards and backwards
  allreduce_gradients    FSDP's reduce-scatter in each backward is the sum over processes
  save/load_checkpoint   torch.distributed.checkpoint (DCP) for weights and Adam's moments
  full_weights           rank 0 reads the whole weights back for the stock diffusers folder
  bytes_per_process      each process's bytes of weights, gradients and optimizer state

The frozen reference ε_ref is sharded as the policy is. It holds no gradient and no optimizer
state, but whole it costs 2 bytes a weight in bf16 (4 in fp32) on every process, 5.2 GB for
SDXL: at N = 2 that alone puts SDXL's 26 GB over a 24-GB card. Sharding it costs one
all-gather of it per micro-batch's forward, which every process runs anyway (lockstep below).

Eq. 11 needs nothing gathered. common.augmentation_scores reads each sample's gradient over a
chosen layer's weights off that layer's input and the gradient at its output, both whole
activations on every process; of the weights it reads the shape alone, and a sharded
weight (a DTensor) has its whole shape.
"""
from __future__ import annotations

import math
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Shard

from lib import models as M
from lib import utils as U


def unet_of(net) -> torch.nn.Module:
    """The UNet module inside stage 4's policy or reference (SDXL's is wrapped, XLConditioned)."""
    return net.unet if isinstance(net, M.XLConditioned) else net


def is_sharded(net) -> bool:
    return isinstance(unet_of(net), FSDPModule)


def shard(on: bool, device: torch.device, *nets) -> None:
    """Shard each UNet of `nets` (None: skipped) in place over all processes, with the
    gradients summed rather than averaged over them, as stage 4's hand-written reduction sums
    gradients already weighted 1/B per pair.

    Blocks reshard after forward (FSDP's default for all but the root): a block's whole
    weights exist while it runs and again in its backward, so one block is whole at a time. The
    root keeps its own weights whole from forward to backward (FSDP's root default): conv_in,
    the time and added embeddings and the output layers, 0.3% of SDXL's, and backward starts
    with them. Each weight is cut along its first dimension that N divides: FSDP's default, its
    first dimension in chunks of ⌈d/N⌉, leaves the toy's small layers unevenly split (conv_out's
    4 output channels over 3 processes: 2, 2, 0)."""
    if not on:
        return
    if not dist.is_initialized():
        raise SystemExit("--shard splits the UNet over torchrun's processes: launch with "
                         "torchrun --nproc_per_node=N 04_train_spo.py ... (N >= 2)")
    if not any(p.requires_grad for p in unet_of(nets[0]).parameters()):
        raise SystemExit("--shard shards the trained UNet; this command trains none of its "
                         "weights (only a small adapter): run it without --shard")
    n = dist.get_world_size()
    mesh = init_device_mesh(device.type, (n,))

    def place(p):
        return Shard(next((d for d in range(p.dim()) if p.shape[d] % n == 0), 0))

    for k, net in enumerate(unet_of(x) for x in nets if x is not None):
        for block in filter(None, [*net.down_blocks, net.mid_block, *net.up_blocks]):
            fully_shard(block, mesh=mesh, reshard_after_forward=True, shard_placement_fn=place)
        # None: FSDP's root default; the reference has no backward to keep its weights for
        fully_shard(net, mesh=mesh, reshard_after_forward=None if k == 0 else True,
                    shard_placement_fn=place)
        for m in net.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(1.0)  # a sum (FSDP's default: the mean)
                m.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum


# ---------------------------------------------------------------------------------------
# Lockstep: FSDP all-gathers a block's weights in its forward and reduce-scatters its
# gradients in its backward, collectives that every process must enter. Stage 4's passes
# differ between processes: an uneven split gives one process a micro-batch more, and DFM's
# passes run where Eq. 10 flagged a pair. A process short of a pass runs it on a pair of its
# own with weight 0: the same forwards and backwards, gradients of exactly zero.
# ---------------------------------------------------------------------------------------

def lockstep(net, batch: int, micro_batch: int | None, n_mine: int, run) -> None:
    """After this process's micro-batches of its `n_mine` pairs: as many zero-weighted passes
    `run()` (per-pair losses) as the process with the most micro-batches (rank 0, holding
    ⌈B/N⌉ pairs) runs more. Stage 4 splits a process's pairs by --micro-batch, or not at all."""
    if not is_sharded(net):
        return
    passes = lambda n: math.ceil(n / (micro_batch or n))
    for _ in range(passes(math.ceil(batch / dist.get_world_size())) - passes(n_mine)):
        (0.0 * run().sum()).backward()


def stand_in(net, hard: list, first, any_hard: bool) -> tuple[list, float]:
    """Eq. 11's pairs on this process and the weight of their copies: its `hard` pairs and 1;
    sharded, when only other processes hold hard pairs, its `first` pair, weighted 0."""
    if hard or not any_hard or not is_sharded(net):
        return hard, 1.0
    return [first], 0.0


def allreduce_gradients(params) -> None:
    """The sum over processes of the gradients: a sharded weight's was summed by FSDP's
    reduce-scatter in each backward; the others by hand (utils.allreduce_gradients)."""
    U.allreduce_gradients([p for p in params if not isinstance(p, DTensor)])


# ---------------------------------------------------------------------------------------
# Checkpoints. The tensors (the trained weights and Adam's moments) go to a DCP folder that
# every process writes its shards into; the plain values (schedule, DFM queues, step, Adam's
# settings) to utils.Checkpoint's file, which rank 0 writes last and which names the folder:
# a run killed while saving resumes from the previous pair. DCP reshards on load, so a run
# may resume on another number of processes. (DCP's .metadata is a pickle: a checkpoint
# folder is trusted as the code is.)
# ---------------------------------------------------------------------------------------

def save_checkpoint(ckpt: U.Checkpoint, state: dict) -> None:
    """`state` as stage 4 builds it ("model", "opt", plain values), on every process: whole
    into ckpt's file by rank 0 when nothing is sharded."""
    if not any(isinstance(v, DTensor) for v in state["model"].values()):
        if U.is_main():
            ckpt.save(state)
        return
    folder = ckpt.path.parent / f"dcp-{state['step']:08d}"
    if dist.get_rank() == 0:
        shutil.rmtree(folder, ignore_errors=True)  # a save of this step that was killed
    dist.barrier()
    dcp.save({"model": state["model"], "opt": state["opt"]["state"]}, checkpoint_id=folder)
    if dist.get_rank() == 0:
        ckpt.save({**state, "model": None, "opt": {**state["opt"], "state": None},
                   "dcp": folder.name})
        for old in ckpt.path.parent.glob("dcp-*"):
            if old != folder:
                shutil.rmtree(old)


def load_checkpoint(ckpt: U.Checkpoint, opt: torch.optim.Optimizer, model_state) -> dict | None:
    """The saved state as save_checkpoint got it, or None. Sharded, its tensors are loaded in
    place into `model_state()` (the live weights, as stage 4's SPO.state gives them) and into
    the optimizer's moments, which a step of rate 0 on zero gradients first creates (as
    torch.distributed.checkpoint.state_dict does)."""
    state = ckpt.load()
    if not state or "dcp" not in state:
        return state
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    rates = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = 0.0
    opt.step()
    for group, lr in zip(opt.param_groups, rates):
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    tensors = {"model": model_state(), "opt": opt.state_dict()["state"]}
    dcp.load(tensors, checkpoint_id=ckpt.path.parent / state["dcp"])
    return {**state, "model": tensors["model"], "opt": {**state["opt"], "state": tensors["opt"]}}


def full_weights(ckpt: U.Checkpoint, weights: dict) -> dict:
    """The trained weights whole: `weights` itself unless sharded; sharded, read on this
    process alone (no collective: rank 0 saves the model while the others leave) from the
    checkpoint stage 4 writes at its last step."""
    if not any(isinstance(v, DTensor) for v in weights.values()):
        return weights
    whole = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in weights.items()}
    dcp.load({"model": whole}, checkpoint_id=ckpt.path.parent / ckpt.load()["dcp"], no_dist=True)
    return whole


# ---------------------------------------------------------------------------------------
# Memory: what sharding is for, measured
# ---------------------------------------------------------------------------------------

def local_bytes(net, opt: torch.optim.Optimizer, ref=None) -> dict[str, int]:
    """This process's bytes of the policy's weights (trained and frozen), their gradients and
    the optimizer's state, and of the reference's weights (0 without one): of its shards
    when sharded, of the whole tensors otherwise."""
    size = lambda t: (t.to_local() if isinstance(t, DTensor) else t).numel() * t.element_size()
    params = list(unet_of(net).parameters())
    return {"params": sum(size(p) for p in params),
            "grads": sum(size(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(size(v) for s in opt.state.values() for v in s.values()
                             if torch.is_tensor(v)),
            "reference": sum(size(p) for p in unet_of(ref).parameters()) if ref is not None else 0}


def bytes_per_process(net, opt: torch.optim.Optimizer, ref=None) -> dict:
    """Sharded: {"shard_bytes": [local_bytes of rank 0, 1, ...]}, for metrics.json; gathered
    from every process (a collective), after the last step, its gradients still held.
    Unsharded: {}."""
    if not is_sharded(net):
        return {}
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, local_bytes(net, opt, ref))
    return {"shard_bytes": every}
