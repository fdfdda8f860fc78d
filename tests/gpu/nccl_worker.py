"""torchrun --nproc_per_node W tests/gpu/nccl_worker.py CKPT OUT: FSDP2 + tensor-parallel greedy decoding on NCCL;
each rank saves its rows' tokens to OUT.<rank> (test_gpu.test_fsdp_tp_greedy_on_nccl compares them)."""
import sys

import torch

from parallel import load, setup
from tp import make_decoder
from test_gpu import prompts


def main(ckpt, out):
    ctx = setup(dtype="fp32")
    model = load(ckpt, ctx, train="all").eval()
    decoder = make_decoder(model, torch.float32)
    ids, mask = prompts(model.config, ctx.device)
    mine = slice(ctx.rank * 2, ctx.rank * 2 + 2)
    seq = model.generate(ids[mine], attention_mask=mask[mine], max_new_tokens=16, eos_token_id=-1, decoder=decoder)
    torch.save(seq.cpu(), f"{out}.{ctx.rank}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
