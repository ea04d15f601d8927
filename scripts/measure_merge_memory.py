"""Peak host memory of ``merged_state_dict`` (the gather + merge of ``MergeAdapters``) per rank, on 2 CPU processes
(gloo): a Llama (tied embeddings) with BOFT on all seven projections, FSDP2-sharded (``fully_shard`` per decoder
layer, then the root) and unsharded (DDP: every rank holds the whole model), against one full model copy.

Peak = the kernel's high-water mark of resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``) during
the call, minus the resident memory before it. Linux only.

    python scripts/measure_merge_memory.py [--hidden 1024 --layers 8 --vocab 32000]
"""

from __future__ import annotations

import argparse
import gc
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MB = 2**20


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(call):
    """(peak extra bytes during ``call()``, result)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = status_kb("VmRSS")
    result = call()
    return (status_kb("VmHWM") - before) * 1024, result


def worker(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_peft.adapters import BOFT, merged_state_dict

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=16,
                         tie_word_embeddings=True)
    for sharded in (True, False):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        unique = {id(t): t for t in model.state_dict(keep_vars=True).values()}
        copy_bytes = sum(t.numel() * t.element_size() for t in unique.values())
        BOFT(block_size=8, n_butterfly_factors=2, target_modules=PROJECTIONS).apply(model)
        if sharded:
            mesh = init_device_mesh("cpu", (world,))
            for layer in model.model.layers:
                fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
        peak, state = measure(lambda: merged_state_dict(model, keep=rank == 0))
        kept = sum(t.numel() * t.element_size() for t in {id(t): t for t in state.values()}.values())
        queue.put((sharded, rank, peak, kept, copy_bytes))
        del model, state
        dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    processes = [context.Process(target=worker, args=(r, 2, port, args, queue)) for r in range(2)]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    rows = sorted(queue.get() for _ in range(4))
    print(f"{'run':<16}{'rank':>5}{'peak extra MiB':>16}{'kept MiB':>10}{'one model copy MiB':>20}{'peak / copy':>13}")
    for sharded, rank, peak, kept, copy_bytes in sorted(rows, key=lambda r: (not r[0], r[1])):
        run = "FSDP2 (sharded)" if sharded else "DDP (unsharded)"
        print(f"{run:<16}{rank:>5}{peak / MB:>16.1f}{kept / MB:>10.1f}{copy_bytes / MB:>20.1f}"
              f"{peak / copy_bytes:>13.3f}")


if __name__ == "__main__":
    main()
