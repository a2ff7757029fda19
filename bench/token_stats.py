"""All per-token statistics together (log-prob, entropy, P_max, TRE-P local entropy at P = 0.99),
forward and forward+backward, time and peak memory, side by side:

- fused:     tre_cli.kernels (Triton; on CPU only under TRITON_INTERPRET=1, timings meaningless)
- reference: tre_cli.losses.token_stats on the torch path (TRE_KERNELS=0)
- released:  the released code's approach (bench/losses.py: full softmax, top-256, float32 mass)
- floor:     copy bandwidth measured in the same run: forward = read the logits once
             (copy time / 2), forward+backward = read them once and write their gradient once
             (copy time)

Each measurement runs in a fresh subprocess so its peak memory is its own; "extra MiB" is the
peak beyond the logits (and, with a backward, one gradient-sized buffer). Logits are synthetic
LM-like rows (bench/losses.make_logits) at V = 151,936, and, with --real, those of a real model
on its own sampled answers, so that nucleus sizes and ties are real (the GGUF needs the `gguf`
package next to transformers).

    python bench/token_stats.py                       # CUDA: N in {4096, 16384, 65536}
    python bench/token_stats.py --real ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
    python bench/token_stats.py --quick               # CPU smoke test under the interpreter

--vs-model (CPU, issue 13): the torch path against the model it serves. In one run, interleaved
round by round: a bare forward+backward of a SmolLM2-135M-shaped Llama (random weights, built
locally from LlamaConfig: hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1,536,
V = 49,152, tied embeddings) on B x T tokens with a plain log-prob loss; token_stats
forward+backward (every statistic, with TRE-P 0.99, with TRE-K 2 and with no region) on the B x T
rows of logits, as committed at --old-ref (read with git; '' for none) and as in this checkout;
the straightforward version (full softmax, full stable sort, cumsum, autograd; --no-sort skips
it); and the floor, one copy of the logits into a touched buffer (read once, gradient written
once). Ratios are of medians: x bare, x floor, x straightforward. The logits are
bench/losses.smollm_like_logits, or with --real-model an HF folder's own sampled answers to
Countdown prompts (temperature 1, full distribution; sampled once and cached, the bare step then
sees those very tokens). ../shared/models/to_hf.py makes such a folder from the SmolLM2 GGUF.

    python bench/token_stats.py --vs-model --rounds 3
    OMP_NUM_THREADS=1 python bench/token_stats.py --vs-model --threads 1 --old-ref main --real-model MODEL_DIR
"""

from __future__ import annotations

import argparse
import inspect
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
_spec = importlib.util.spec_from_file_location("bench_losses", os.path.join(HERE, "losses.py"))
L = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(L)

P = 0.99
IMPLS = ("fused", "reference", "released")


def all_stats(impl: str, logits, tokens):
    """The scalar whose gradient every implementation computes: every statistic at once."""
    from tre_cli.losses import RegionSpec

    if impl == "released":
        return L.released_approach(logits, tokens, "tre-p", p=P)
    region = RegionSpec.top_p(P)
    if impl == "fused":
        from tre_cli.kernels import fused_token_stats

        s = fused_token_stats(logits, tokens, region)
    else:
        from tre_cli.losses import token_stats

        s = token_stats(logits, tokens, region)
    return s[5] + s[1] + s[2] + s[0]


def load_logits(source: str, n: int, vocab: int, device: str, dtype: torch.dtype):
    if source == "synthetic":
        return L.make_logits(n, vocab, device, dtype)
    saved = torch.load(source)
    return saved["logits"][:n].to(device, dtype), saved["tokens"][:n].to(device)


def measure_one(impl, source, n, vocab, device, dtype, repeats, backward) -> dict:
    dt = getattr(torch, dtype)
    logits, tokens = load_logits(source, n, vocab, device, dt)
    vocab = logits.shape[-1]
    cuda = device.startswith("cuda")
    logit_bytes = logits.numel() * logits.element_size()
    if impl == "floor":
        grad = torch.empty_like(logits)
        fn = lambda: grad.copy_(logits)  # noqa: E731
    elif backward:
        leaf = logits.requires_grad_(True)

        def fn():
            leaf.grad = None
            all_stats(impl, leaf, tokens).float().sum().backward()
    else:
        def fn():
            with torch.no_grad():
                all_stats(impl, logits, tokens)
    try:
        # One warm-up call (and compilation); its gradient would count in the base: drop it.
        seconds, grown = L.time_and_peak(fn, repeats, cuda, after_warmup=lambda: setattr(logits, "grad", None))
        times = [seconds]
        grad_buf = logit_bytes if (backward and impl != "floor") else 0
        extra, status = max(0, grown - grad_buf) / 2**20, "ok"
    except torch.OutOfMemoryError:
        times, extra, status = [math.nan], math.nan, "oom"
    row = {"impl": impl, "source": source, "n": n, "vocab": vocab, "device": device, "dtype": dtype,
           "backward": backward, "status": status, "seconds": min(times), "extra_mib": extra,
           "logits_mib": logit_bytes / 2**20}
    if impl == "fused" and not backward and status == "ok":
        row["check"] = agreement(logits.detach(), tokens)
    return row


def agreement(logits, tokens) -> dict:
    """The fused outputs against the torch reference on these very logits."""
    from tre_cli.kernels import ENV_SWITCH, fused_token_stats
    from tre_cli.losses import RegionSpec, TokenStats, token_stats

    with torch.no_grad():
        fused = TokenStats(*fused_token_stats(logits, tokens, RegionSpec.top_p(P)))
        os.environ[ENV_SWITCH] = "0"
        ref = token_stats(logits, tokens, RegionSpec.top_p(P))
        del os.environ[ENV_SWITCH]
    diff = {f: (getattr(fused, f) - getattr(ref, f)).abs().max().item()
            for f in ("logprob", "entropy", "p_max", "region_entropy")}
    return {"size_mismatches": int((fused.region_size != ref.region_size).sum()), "max_abs_diff": diff}


def run_child(args: list, interpret: bool) -> dict:
    env = dict(os.environ)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if args[0] == "reference":
        env["TRE_KERNELS"] = "0"
    out = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        return {"impl": args[0], "status": "failed: " + (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def real_logits(path: str, n_prompts: int, new_tokens: int, device: str, out_file: str) -> dict:
    """Sample answers from a real model at temperature 1 (full distribution: no top-k/top-p) and
    keep the raw next-token logits of every generated position up to its end of sequence."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = (os.path.dirname(path), os.path.basename(path)) if path.endswith(".gguf") else (path, None)
    kw = {"gguf_file": name} if name else {}
    tok = AutoTokenizer.from_pretrained(folder, **kw)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.bfloat16, **kw).to(device).eval()
    topics = ["Solve 17 * 23 step by step.", "Write a short poem about rivers.",
              "Explain why the sky is blue.", "Use 3, 7, 25 and 50 to make 100 with + - * /.",
              "List three uses of a paperclip.", "What is the capital of Australia? Explain.",
              "Translate 'good morning' into French and Spanish.", "Give advice for a job interview."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": topics[i % len(topics)]}],
                                       tokenize=False, add_generation_prompt=True) for i in range(n_prompts)]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    batch = tok(prompts, return_tensors="pt", padding=True).to(device)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=new_tokens, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id)
    steps = torch.stack(out.logits, 1)  # [B, T, V]
    gen = out.sequences[:, batch["input_ids"].shape[1]:]
    ended = (gen == tok.eos_token_id).cumsum(1) - (gen == tok.eos_token_id).long()  # EOS itself kept
    keep = ended == 0
    logits, tokens = steps[keep].to(torch.bfloat16).cpu(), gen[keep].cpu()
    torch.save({"logits": logits, "tokens": tokens}, out_file)
    # Nucleus sizes and ties of these very distributions (the reference, in chunks).
    from tre_cli.losses import RegionSpec, token_stats

    sizes = torch.cat([token_stats(logits[i:i + 512].float(), region=RegionSpec.top_p(P)).region_size
                       for i in range(0, len(logits), 512)])
    top32 = torch.topk(logits.float(), 32, -1).values
    tied = (top32[:, 1:] == top32[:, :-1]).any(-1).float().mean().item()
    q = torch.quantile(sizes, torch.tensor([0.5, 0.9, 0.99])).tolist()
    return {"rows": len(sizes), "vocab": logits.shape[-1], "nucleus_median": q[0], "nucleus_p90": q[1],
            "nucleus_p99": q[2], "nucleus_max": sizes.max().item(), "over_256": (sizes > 256).float().mean().item(),
            "one_token": (sizes == 1).float().mean().item(), "rows_with_ties_in_top32": tied}


def table(title, rows, floor_row):
    from rich.table import Table

    t = Table(title=title)
    for col in ("impl", "pass", "us/token", "x floor", "extra MiB", "status"):
        t.add_column(col, justify="left" if col in ("impl", "pass", "status") else "right")
    for r in rows:
        if r.get("status") != "ok":
            t.add_row(r.get("impl", "?"), "", "-", "-", "-", r.get("status", "?"))
            continue
        floor_s = floor_row["seconds"] * (1.0 if r["backward"] else 0.5)
        t.add_row(r["impl"], "fwd+bwd" if r["backward"] else "fwd", f"{r['seconds'] / r['n'] * 1e6:.3f}",
                  f"{r['seconds'] / floor_s:.1f}", f"{r['extra_mib']:.0f}", "ok")
    return t


# ---------------------------------------------------------------------------------------------
# --vs-model: the CPU torch path against a bare forward+backward of the model it serves.

SMOLLM2_135M = dict(vocab_size=49_152, hidden_size=576, intermediate_size=1_536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                    max_position_embeddings=2_048, rms_norm_eps=1e-5, rope_theta=100_000.0)


def smollm_shaped_model(seed: int = 0):
    """SmolLM2-135M's architecture with random weights (no download), float32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).float()


def stats_module_at(ref: str) -> types.ModuleType:
    """tre_cli/losses/stats.py as committed at `ref`, imported under its own name."""
    root = os.path.join(HERE, "..")
    source = subprocess.run(["git", "-C", root, "show", f"{ref}:tre_cli/losses/stats.py"], check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"stats_at_{ref}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{ref}:tre_cli/losses/stats.py", "exec"), module.__dict__)
    return module


COUNTDOWN_PROMPTS = [f"Using the numbers {a}, {b} and {c}, create an equation that equals {t}. You can use basic "
                     "arithmetic operations (+, -, *, /) and each number can only be used once. Show your work in "
                     "<think> </think> tags. And return the final answer in <answer> </answer> tags."
                     for a, b, c, t in ((3, 7, 25, 46), (19, 36, 55, 20), (8, 12, 40, 60), (95, 21, 3, 71),
                                        (6, 9, 13, 41), (44, 2, 17, 71), (5, 50, 75, 30), (11, 23, 4, 81))]


def sampled_logits(model_dir: str, batch: int, seq: int, cache: str):
    """A real model's raw next-token logits [batch * seq, V] (float32) on its own answers to
    Countdown prompts, sampled at temperature 1 from the full distribution, `seq` tokens each (EOS
    suppressed, so every row is a real response position), and the sampled tokens. Cached in
    `cache` (they take a minute or two to sample on a CPU); a cache of more sequences of the same
    length serves its first `batch`."""
    if os.path.exists(cache):
        saved = torch.load(cache)
        if saved.get("seq") == seq and saved["logits"].shape[0] >= batch * seq:
            return saved["logits"][:batch * seq].float().contiguous(), saved["tokens"][:batch * seq]
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompts = [tok.apply_chat_template([{"role": "user", "content": COUNTDOWN_PROMPTS[i % len(COUNTDOWN_PROMPTS)]}],
                                       tokenize=False, add_generation_prompt=True) for i in range(batch)]
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    inputs = tok(prompts, return_tensors="pt", padding=True)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, min_new_tokens=seq,
                             max_new_tokens=seq, output_logits=True, return_dict_in_generate=True,
                             pad_token_id=tok.pad_token_id)
    # The raw logits (before min_new_tokens masks EOS), as the policy computes them in training.
    logits = torch.stack(out.logits, 1).reshape(batch * seq, -1).float()
    tokens = out.sequences[:, inputs["input_ids"].shape[1]:].reshape(-1)
    torch.save({"logits": logits, "tokens": tokens, "seq": seq}, cache)
    return logits, tokens


def distribution(logits, p: float = P) -> dict:
    """What the statistics see: P_max and the TRE-P nucleus sizes of these rows."""
    from tre_cli.losses import RegionSpec, token_stats

    with torch.no_grad():
        s = token_stats(logits, region=RegionSpec.top_p(p))
    sizes = s.region_size.double()
    q = torch.quantile(sizes, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
    return {
        "rows": len(sizes),
        "p_max_mean": round(s.p_max.mean().item(), 3),
        "nucleus_mean": round(sizes.mean().item()),
        "nucleus_median": q[0],
        "nucleus_p90": q[1],
        "nucleus_p99": q[2],
        "nucleus_max": sizes.max().item(),
        "one_token": round((sizes == 1).double().mean().item(), 3),
        "over_256": round((sizes > 256).double().mean().item(), 3),
    }


def agreement_old_new(old, logits, tokens) -> dict:
    """The two implementations' outputs on these very logits (they must agree)."""
    from tre_cli.losses import stats as new

    out = {}
    with torch.no_grad():
        for name, spec in (("tre-p", (P,)), ("tre-k", (2,))):
            a = old.token_stats(
                logits, tokens, (old.RegionSpec.top_p if name == "tre-p" else old.RegionSpec.top_k)(*spec)
            )
            b = new.token_stats(
                logits, tokens, (new.RegionSpec.top_p if name == "tre-p" else new.RegionSpec.top_k)(*spec)
            )
            out[name] = {"size_mismatches": int((a.region_size != b.region_size).sum()),
                         "max_abs_diff": max((x - y).abs().max().item() for x, y in zip(a, b))}
    return out


def _timed(fn) -> tuple:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def vs_model(args, console) -> list:
    from rich.table import Table

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.batch * args.seq
    model = smollm_shaped_model()
    if args.real_model:
        cache = args.real_cache or os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                f"tre_sampled_{args.batch}x{args.seq}.pt")
        logits, tokens = sampled_logits(args.real_model, args.batch, args.seq, cache)
        source = f"{args.real_model}'s own answers (cache {cache})"
    else:
        logits, tokens = L.smollm_like_logits(n, SMOLLM2_135M["vocab_size"])
        source = "bench/losses.smollm_like_logits"
    ids = tokens.reshape(args.batch, args.seq)  # the bare step sees the very tokens the statistics score
    console.print(f"SmolLM2-135M shape, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
                  f"{args.batch} x {args.seq} tokens, {torch.get_num_threads()} threads")
    console.print(f"logits from {source}: {distribution(logits)}")
    from tre_cli.losses import stats as new

    impls = {"new": new}
    if args.old_ref:
        try:
            impls["old"] = stats_module_at(args.old_ref)
            console.print(f"old = tre_cli/losses/stats.py at {args.old_ref}; agreement with new: "
                          f"{agreement_old_new(impls['old'], logits, tokens)}")
        except (subprocess.CalledProcessError, FileNotFoundError) as err:
            console.print(f"no old implementation ({args.old_ref}: {err}); measuring the new one only")

    def bare():
        out = model(input_ids=ids).logits
        torch.log_softmax(out.float(), -1).gather(-1, ids[..., None]).sum().backward()
        model.zero_grad(set_to_none=True)

    leaf = logits.requires_grad_(True)

    def stats(module, region):
        # What the trainer computes: with the tail mass (metrics.tail_k 20) where the module has it.
        extra = {"tail_k": 20} if "tail_k" in inspect.signature(module.token_stats).parameters else {}

        def run():
            leaf.grad = None
            s = module.token_stats(leaf, tokens, region, **extra)
            (s.logprob + s.entropy + s.p_max + s.min_entropy + s.region_entropy).sum().backward()
        return run

    def straightforward():  # plain torch: full softmax, full stable sort, cumsum, autograd
        leaf.grad = None
        L.sort_based(leaf, tokens, "all", p=P).sum().backward()

    gradient = torch.empty_like(logits).copy_(logits.detach())  # pages touched before timing

    def floor():  # the logits read once and their gradient written once
        gradient.copy_(logits.detach())

    tasks = {"bare forward+backward": bare, "floor (one copy of the logits)": floor}
    for name in ("old", "new"):
        if name in impls:
            spec = impls[name].RegionSpec
            tasks[f"{name}: all stats + TRE-P {P}"] = stats(impls[name], spec.top_p(P))
            tasks[f"{name}: all stats + TRE-K 2"] = stats(impls[name], spec.top_k(2))
            tasks[f"{name}: all stats, no region"] = stats(impls[name], None)
    if not args.no_sort:
        tasks[f"straightforward: all stats + TRE-P {P} (sort + cumsum)"] = straightforward
    times = {name: [] for name in tasks}
    for r in range(args.warmup + args.rounds):
        for name, fn in tasks.items():  # interleaved: every round sees the same machine load
            t = _timed(fn)
            if r >= args.warmup:
                times[name].append(t)
        console.print(f"round {r + 1}/{args.warmup + args.rounds}" + (" (warm-up)" if r < args.warmup else "")
                      + ": " + ", ".join(f"{k} {v[-1][0]:.2f}s" for k, v in times.items() if v))
    leaf.grad = None
    med = {name: statistics.median(w for w, _ in ts) for name, ts in times.items()}
    low = {name: min(w for w, _ in ts) for name, ts in times.items()}
    sort_name = next((k for k in times if k.startswith("straightforward")), None)
    table = Table(title=f"CPU, {n:,} tokens x V = {SMOLLM2_135M['vocab_size']:,}, {torch.get_num_threads()} threads, "
                        f"{args.rounds} rounds: median (min-max); shared machine: ranges, not points")
    cols = ["task", "wall s", "cpu s", "x bare", "x floor"] + (["x straightforward"] if sort_name else [])
    for col in cols:
        table.add_column(col, justify="left" if col == "task" else "right")
    rows = []
    bare_name, floor_name = "bare forward+backward", "floor (one copy of the logits)"
    for name, ts in times.items():
        wall = [w for w, _ in ts]
        row = {"task": name, "wall": wall, "cpu": [c for _, c in ts], "x_bare": med[name] / med[bare_name],
               "x_floor": med[name] / med[floor_name]}
        if sort_name:
            row["x_straightforward"] = med[name] / med[sort_name]
        rows.append(row)
        cells = [name, f"{med[name]:.2f} ({low[name]:.2f}-{max(wall):.2f})", f"{statistics.median(row['cpu']):.2f}",
                 f"{row['x_bare']:.3f} ({low[name] / max(w for w, _ in times[bare_name]):.3f}-"
                 f"{max(wall) / low[bare_name]:.3f})", f"{row['x_floor']:.1f}"]
        if sort_name:
            cells.append(f"{row['x_straightforward']:.2f}")
        table.add_row(*cells)
    console.print(table)
    console.print(f"copy bandwidth: {2 * logits.numel() * 4 / med[floor_name] / 2**30:.1f} GiB/s (read + write); "
                  "x bare range = (min / slowest bare) - (max / fastest bare)")
    for kind in ("TRE-P", "TRE-K", "no region"):
        old_row = next((r for r in rows if r["task"].startswith("old") and kind in r["task"]), None)
        new_row = next((r for r in rows if r["task"].startswith("new") and kind in r["task"]), None)
        if old_row and new_row:
            console.print(
                f"{kind}: old / new = {statistics.median(old_row['wall']) / statistics.median(new_row['wall']):.2f}x "
                f"(wall, median)"
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="*")
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--impl", nargs="*", default=list(IMPLS), choices=IMPLS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--real", help="a GGUF file or HF model folder whose sampled answers give real logits")
    ap.add_argument("--real-prompts", type=int, default=64)
    ap.add_argument("--real-tokens", type=int, default=256)
    ap.add_argument("--quick", action="store_true", help="tiny sizes on the CPU under the interpreter")
    ap.add_argument("--json", help="also write all rows to this JSON file")
    ap.add_argument("--vs-model", action="store_true", help="CPU: the torch path against a SmolLM2-135M-shaped "
                    "forward+backward, old vs new (see above)")
    ap.add_argument("--rounds", type=int, default=3, help="--vs-model: timed rounds")
    ap.add_argument("--warmup", type=int, default=1, help="--vs-model: untimed rounds first")
    ap.add_argument("--batch", type=int, default=8, help="--vs-model: sequences")
    ap.add_argument("--seq", type=int, default=256, help="--vs-model: tokens per sequence")
    ap.add_argument("--old-ref", default="c51f083", help="--vs-model: the git commit of the old implementation "
                    "('' for none)")
    ap.add_argument("--threads", type=int, help="--vs-model: torch threads (default: torch's)")
    ap.add_argument("--real-model", help="--vs-model: an HF model folder (e.g. from ../shared/models/to_hf.py) whose "
                    "sampled Countdown answers give the logits (instead of smollm_like_logits)")
    ap.add_argument("--real-cache", help="--vs-model: where the sampled logits are cached (default: $TMPDIR)")
    ap.add_argument("--no-sort", action="store_true", help="--vs-model: skip the straightforward sort-based version")
    ap.add_argument("--child", nargs=8, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.vs_model:
        from rich.console import Console

        rows = vs_model(args, Console(width=max(Console().width, 150)))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)
        return
    if args.child:
        impl, source, n, vocab, device, dtype, repeats, backward = args.child
        print(json.dumps(measure_one(impl, source, int(n), int(vocab), device, dtype, int(repeats),
                                     backward == "1")))
        return
    from rich.console import Console

    console = Console()
    cuda = args.device.startswith("cuda")
    if args.quick:
        args.n, args.vocab, args.repeats = [8], 4096, 1
        args.real_prompts, args.real_tokens = 2, 8
    sizes = args.n or ([4096, 16384, 65536] if cuda else [16])
    interpret = not cuda
    if interpret:
        console.print("CPU: the fused kernels run under Triton's interpreter; timings are meaningless.")
    runs = [("synthetic", n, args.vocab) for n in sizes]
    all_rows = []
    if args.real:
        real_file = os.path.join(os.environ.get("TMPDIR", "/tmp"), "tre_real_logits.pt")
        summary = real_logits(args.real, args.real_prompts, args.real_tokens, args.device, real_file)
        console.print(f"real logits from {args.real}: {summary}")
        all_rows.append({"real_summary": summary})
        runs.append((real_file, summary["rows"], summary["vocab"]))
    for source, n, vocab in runs:
        floor = run_child(["floor", source, n, vocab, args.device, args.dtype, args.repeats, 1], interpret)
        rows = [floor]
        if floor.get("status") == "ok":
            for backward in (0, 1):
                for impl in args.impl:
                    rows.append(run_child([impl, source, n, vocab, args.device, args.dtype, args.repeats,
                                           backward], interpret))
            name = "synthetic" if source == "synthetic" else "real"
            checks = [r["check"] for r in rows if "check" in r]
            if checks:
                console.print(f"fused vs reference: {checks[0]}")
            console.print(table(f"{name}: N = {n:,} x V = {vocab:,} ({args.dtype}, {args.device}); copy "
                                f"{2 * floor['logits_mib'] / 1024 / floor['seconds']:.0f} GiB/s",
                                rows[1:], floor))
        else:
            console.print(f"floor failed: {floor.get('status')}")
        all_rows += rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=1)


if __name__ == "__main__":
    main()
