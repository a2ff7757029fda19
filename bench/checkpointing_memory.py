"""Peak memory of one update pass with and without gradient checkpointing, side by side.

The pass is the trainer's: `tre_cli.models.load_policy` (fp32 masters, optional bf16 compute),
training mode as the trainer sets it for its updates (`tre_cli.models.modes.set_training`), a
forward under `autocast_for` with the LM head on the response positions only, `token_stats`
(log-prob, entropy, TRE-P region) in float32 from the logits, a dual-clip-sized scalar, backward.
Each configuration runs in a fresh subprocess, so its peak is its own: on CPU the peak resident
set size (ru_maxrss) over the pass minus the resident size before it; on CUDA
torch.cuda.max_memory_allocated minus the allocation before it. The model is a random Qwen2 of
the given shape, built in memory (no download).

    python bench/checkpointing_memory.py                          # CPU default: 8 layers, 4 x 1,024 tokens
    python bench/checkpointing_memory.py --device cuda --layers 28 --hidden 1536 --heads 12 --kv-heads 2 \\
        --intermediate 8960 --vocab 151936 --batch 8 --seq 1024 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(args) -> dict:
    import tempfile

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tre_cli.losses import RegionSpec, token_stats
    from tre_cli.models import load_policy
    from tre_cli.models import resolve_dtype as torch_dtype_of
    from tre_cli.models.modes import set_training
    from tre_cli.models.precision import autocast_for, training_precision

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                         max_position_embeddings=max(4096, args.seq), tie_word_embeddings=True)
    with tempfile.TemporaryDirectory() as tmp:
        Qwen2ForCausalLM(config).save_pretrained(tmp)
        precision = training_precision(torch_dtype_of(args.dtype, args.device), args.device)
        policy = load_policy(tmp, device=args.device, gradient_checkpointing=args.checkpointing, precision=precision)
    set_training(True, policy)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)
    response = args.seq // 2
    keep = torch.arange(args.seq - response - 1, args.seq - 1, device=args.device)
    on_cuda = args.device == "cuda"
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before_rss = _rss_mib()
    started = time.perf_counter()
    with autocast_for(policy):
        logits = policy(input_ids=ids, logits_to_keep=keep, use_cache=False).logits
    stats = token_stats(logits, ids[:, -response:], RegionSpec.top_p(0.99))
    loss = -(stats.logprob.mean() + 0.001 * stats.region_entropy.mean())
    del logits
    loss.backward()
    if on_cuda:
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        # ru_maxrss is the process's peak so far (KiB on Linux): model loading peaks lower than a pass.
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before_rss
    seconds = time.perf_counter() - started
    return {"checkpointing": args.checkpointing, "peak_extra_mib": peak, "seconds": seconds,
            "tokens": args.batch * args.seq}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", help="compute dtype: fp32 or bf16 (masters are fp32)")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--json", default=None, help="also write the summary here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    rows = []
    for checkpointing in (False, True):
        command = [sys.executable, os.path.abspath(__file__), "--child"] + (["--checkpointing"] if checkpointing else [])
        for key in ("device", "dtype", "layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "batch", "seq"):
            command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    off, on = rows
    summary = {"device": args.device, "dtype": args.dtype, "shape": {k: getattr(args, k) for k in
               ("layers", "hidden", "heads", "kv_heads", "intermediate", "vocab", "batch", "seq")},
               "without": off, "with": on,
               "memory_ratio": on["peak_extra_mib"] / off["peak_extra_mib"] if off["peak_extra_mib"] > 0 else None,
               "time_ratio": on["seconds"] / off["seconds"] if off["seconds"] > 0 else None}
    print(f"one update pass, {args.layers} layers x hidden {args.hidden}, {args.batch} x {args.seq} tokens, "
          f"{args.dtype} compute on {args.device}")
    print(f"{'checkpointing':>14} {'peak extra MiB':>15} {'seconds':>9}")
    for row in rows:
        print(f"{str(row['checkpointing']):>14} {row['peak_extra_mib']:15.0f} {row['seconds']:9.2f}")
    if summary["memory_ratio"] is not None:
        print(f"with / without: memory {summary['memory_ratio']:.2f}x, time {summary['time_ratio']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
