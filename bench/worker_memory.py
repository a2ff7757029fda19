"""Host memory of one worker while a run.workers=2 run builds its models (issue 20, item 5).

Each of 2 workers (torch.multiprocessing + gloo, as tests/workers_harness.py starts them) calls
trainer.build on a random Qwen2 of the given shape with a KL loss (policy, critic and reference)
and the hf engine, and reports the growth of its resident set over the build: the peak of the
whole (ru_maxrss) and of its anonymous part (RssAnon, sampled every 5 ms), against one model's
fp32 weights M. On CPU `from_pretrained` maps the safetensors file and its pages stay file-backed
until read, so a whole model is never copied into anonymous memory: what the build holds for
good is the three models' shards (3 M / 2 a worker) and the hf engine's own copy (M in fp32).
The GPU's side (a whole model copied to the device before sharding, the bug this bench was
written for) needs a device: there each model now loads into host memory and fully_shard moves
one unit at a time to the GPU.

    python bench/worker_memory.py                       # 8 layers, hidden 768
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _anon_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _worker(rank: int, world: int, port: int, model_dir: str, out_dir: str, queue) -> None:
    import resource

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from tre_cli import trainer
    from tre_cli.config import resolve

    overlay = {"task": {"options": {"train_size": 16, "test_size": 4}}, "rollout": {"max_new_tokens": 16}}
    config = resolve(task="countdown", method="tre-p", model=model_dir, preset="smoke", task_overlay=overlay,
                     overrides=[f"run.out={out_dir}", "ppo.kl_coef=0.01", "run.workers=2", "run.device=cpu",
                                "run.wandb.mode=disabled", "model.dtype=fp32"])
    before, anon_before = _rss_mb(), _anon_mb()
    anon_peak = [anon_before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            anon_peak[0] = max(anon_peak[0], _anon_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    parts = trainer.build(config)
    done.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"rank": rank, "rss_peak_growth_mb": round(peak - before),
               "rss_after_growth_mb": round(_rss_mb() - before),
               "anon_peak_growth_mb": round(anon_peak[0] - anon_before),
               "anon_after_growth_mb": round(_anon_mb() - anon_before)})
    del parts
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=3072)
    args = parser.parse_args()

    import torch
    import torch.multiprocessing as mp
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tre_cli.models import resolve_model

    testbed = resolve_model("testbed")
    work = tempfile.mkdtemp(prefix="worker-memory-")
    model_dir = os.path.join(work, "model")
    torch.manual_seed(0)
    shape = Qwen2Config.from_pretrained(str(testbed))
    shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers = args.hidden, args.intermediate, args.layers
    shape.num_attention_heads, shape.num_key_value_heads = args.hidden // 64, max(1, args.hidden // 256)
    shape.layer_types = ["full_attention"] * args.layers
    model = Qwen2ForCausalLM(shape)
    model.save_pretrained(model_dir)
    for name in os.listdir(testbed):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            shutil.copy(os.path.join(testbed, name), model_dir)
    model_mb = sum(p.numel() for p in model.parameters()) * 4 / 2**20
    del model
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(2, port, model_dir, os.path.join(work, "run"), queue), nprocs=2)
    results = sorted((queue.get() for _ in range(2)), key=lambda r: r["rank"])
    print(json.dumps({"model_fp32_mb": round(model_mb), "workers": results}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
