"""A test's body on N gloo ranks, started the way torchrun starts them (one helper for every multi-rank test).

- The rendezvous store lives in the parent, on a port it binds itself and holds until every rank has exited, as
  torchrun's agent does (TORCHELASTIC_USE_AGENT_STORE: every rank joins it as a client). A port found free and
  handed to the children can be taken by another process during the seconds before rank 0 binds it, and a store
  on rank 0 dies with rank 0 while the other ranks may still be leaving.
- A rank leaves together with the others (a barrier, then the group is destroyed) and then ends with os._exit: a
  gloo worker thread that is still releasing a finished collective's tensors asks for the GIL, and asking for it
  while the interpreter finalizes aborts the process ("terminate called without an active exception",
  docs/notes.md). A rank that raises still reports its traceback through torch.multiprocessing."""
import multiprocessing
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
# imported once by the fork server (below), so each rank forks with them loaded
PRELOAD = ["torch", "torch.distributed", "checkpoint", "model", "parallel", "tp", "grpo", "sft"]


def spawn(fn, *args, world: int = WORLD, node: int = None):
    """fn(rank, *args) on `world` new processes with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
    LOCAL_WORLD_SIZE = `node` ranks a node, MASTER_*); fn joins the group itself (parallel.setup or
    init_process_group). The ranks come from a fork server: a process started once, single-threaded, that has
    imported torch and the project (PRELOAD) and forks each rank from itself. A spawned rank would re-import them
    (2-5 s a rank on a 2-core machine, most of a multi-rank test's time); a rank forked from pytest itself inherits
    locks held by pytest's other threads (the store's server thread among them) and can hang on one forever (seen:
    a rank stuck in glibc's resolver lock)."""
    multiprocessing.set_forkserver_preload(PRELOAD)  # (read when the server starts: the first call)
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, wait_for_workers=False)
    mp.start_processes(_rank, args=(world, node or world, store.port, fn, args), nprocs=world, join=True,
                       start_method="forkserver")


def _rank(rank: int, world: int, node: int, port: int, fn, args: tuple):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank % node), LOCAL_WORLD_SIZE=str(node),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    fn(rank, *args)
    if dist.is_initialized():
        dist.barrier()  # none tears down its connections while another is still in a collective
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
