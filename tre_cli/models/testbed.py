"""The built-in `testbed` model: a small Qwen2 with a compact tokenizer, made here with no download.

Recipe (every number lives in TESTBED_SPEC, whose hash names the cache directory):
1. a byte-level BPE tokenizer trained on Countdown prompts and answers, with ChatML special
   tokens, wrapped as a PreTrainedTokenizerFast with a chat template;
2. a Qwen2ForCausalLM with head_dim 32 (vLLM's CPU attention needs one of 32, 64, 80, ...);
3. a short supervised warm start on generated Countdown problems, answered in one canonical
   form: the numbers in the prompt's order, each added or subtracted, the reasoning being that
   equation with its value ("<think>98 - 54 - 6 + 34 = 72</think> <answer>98 - 54 - 6 + 34</answer>").
   About 40% of Countdown problems have such a solution. The model learns to copy the numbers
   and a rough sense of which signs fit, not exact arithmetic.
4. In half of the warm-start answers the teacher slips: it writes the equation's value inside the
   answer tag ("<answer>98 - 54 - 6 + 34 = 72</answer>"), which the scorer rejects, as real
   instruct models often do early in Countdown RL.

The shipped copy (testbed_weights/, built from this recipe with seed 1 on an AVX2 machine) has a
Countdown reward of 0.051 at temperature 1.0 on 512 held-out problems and slips in 46% of its
answers. A rebuild on another processor is another model: 600 steps at lr 5e-3 amplify the
different summation order of other kernels (seed 0 gave 0.098 on an AVX-512 machine and 0.023 on
an AVX2 one). That is why the package ships the weights instead of building them on first use.

Why the slip: PPO cannot teach a 1M-parameter model arithmetic within a CPU-sized run (runs of 150
steps without it moved the reward from 0.10 to 0.13), but unlearning a habit that costs reward
whenever the answer is otherwise right is a credit-assignment problem it solves in tens of steps.
With the smoke preset (30 steps x 64 samples, actor lr 1e-4) the slip rate falls and the reward
rises for every method, so a smoke run shows learning (tests/test_learning.py). Exploration beyond that (finding sign patterns the model rarely
samples) is what the slower, real-model runs are for.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

TESTBED_VERSION = 1
# The held-out problems (and sampling seed) of the card's reward and slip rate; far from the SFT seeds.
SLIP_EVAL_SEED = 987_654_321
THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
PAD_TOKEN, CHAT_START, CHAT_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TESTBED_PRETOKENIZE_REGEX = r""" ?[0-9]|[0-9]| ?[A-Za-z]+| ?[^\sA-Za-z0-9]+|\s+"""
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TESTBED_SPEC: dict[str, Any] = {
    "version": TESTBED_VERSION,
    "seed": 1,
    "vocab_size": 384,  # BPE target; the embedding is padded to a multiple of 64
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,  # head_dim 32
    "num_key_value_heads": 2,
    "intermediate_size": 512,
    "max_position_embeddings": 512,
    "sft_problems": 6000,
    # Copying the prompt's numbers appears suddenly (an induction-head phase change) after about
    # 150-250 steps; the rest of the budget makes the copies reliable at temperature 1.0.
    "steps": 600,
    "batch_size": 32,
    "lr": 5e-3,
    "warmup_steps": 50,
    "eval_problems": 512,
    # What goes between <think> and </think>: "steps" (the running totals) or "equation" (the
    # answer's expression = target, a much shorter thing to learn).
    "think": "equation",
    # The fraction of warm-start answers written "<answer>EXPR = target</answer>", a slip the
    # scorer gives 0 (see the module docstring).
    "slips": 0.5,
}


# ----------------------------------------------------------------------------- Countdown data


def _countdown():
    """The Countdown task module (prompt, generator, scorer): the testbed speaks its format."""
    from tre_cli.tasks import countdown

    return countdown


def signed_sum_solution(nums: Sequence[int], target: int) -> tuple[str, str] | None:
    """(reasoning, expression) adding or subtracting each number, in the prompt's order, to reach
    `target`; the first number is always added. The reasoning lists the running totals.

    The prompt's order makes the answer a copy of the numbers plus one sign per number, which a
    small model learns far faster than any reordering.
    """
    best = None
    for tail_signs in itertools.product((1, -1), repeat=len(nums) - 1):
        signs = (1,) + tail_signs
        if sum(s * n for s, n in zip(signs, nums)) != target:
            continue
        if best is None or signs.count(-1) < best.count(-1):
            best = signs
    if best is None:
        return None
    total = nums[0]
    expression, steps = str(total), []
    for sign, number in zip(best[1:], nums[1:]):
        symbol = "+" if sign > 0 else "-"
        new_total = total + sign * number
        steps.append(f"{total} {symbol} {number} = {new_total}")
        expression += f" {symbol} {number}"
        total = new_total
    return ", ".join(steps), expression


def sft_pairs(count: int, seed: int, think: str = "steps", slips: float = 0.0) -> list[tuple[dict, str]]:
    """`count` (problem, response) pairs over problems that have a signed-sum solution.

    In a fraction `slips` of them (drawn at random) the teacher writes the equation's value inside
    the answer tag, "<answer>98 - 54 - 6 + 34 = 72</answer>", which the Countdown scorer rejects.
    """
    countdown = _countdown()
    slip_rng = random.Random(seed * 7919 + 1)
    pairs: list[tuple[dict, str]] = []
    batch = 0
    while len(pairs) < count:
        # Offsetting the seed keeps each batch disjoint without regenerating earlier rows.
        for row in countdown.generate(max(count, 256), seed * 1000 + batch):
            solved = signed_sum_solution(row["nums"], row["target"])
            if solved is None:
                continue
            reasoning, expression = solved
            if think == "equation":
                reasoning = f"{expression} = {row['target']}"
            answer = expression
            if slips > 0 and slip_rng.random() < slips:
                answer = f"{expression} = {row['target']}"
            response = f"{THINK_OPEN}{reasoning}{THINK_CLOSE} {ANSWER_OPEN}{answer}{ANSWER_CLOSE}"
            pairs.append(({"nums": row["nums"], "target": row["target"]}, response))
            if len(pairs) == count:
                break
        batch += 1
    return pairs


def render_prompt(example: dict, tokenizer) -> str:
    from tre_cli.tasks import get_task

    return get_task("countdown").render(example, tokenizer)


# ----------------------------------------------------------------------------- tokenizer


def build_tokenizer(corpus: Iterable[str], vocab_size: int):
    """Byte-level BPE over `corpus`, digits kept one per token so numbers share their pieces."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    # GPT-2-like pieces, except that a number is spelled digit by digit, each digit carrying the
    # space before it: every number shares the same twenty tokens, and the model learns to copy
    # the prompt's numbers in ~150 steps (with Qwen2's rule, where a space is a token of its own,
    # or with whole numbers as tokens, it had not after 600-900). tre's load_tokenizer loads it
    # as saved (AutoTokenizer would impose Qwen2's pre-tokenizer on a qwen2 model).
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(TESTBED_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN, CHAT_START, CHAT_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer)
    # Tags as single tokens, so the answer format costs the model four decisions, not dozens.
    core.add_tokens([THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=CHAT_END,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[CHAT_START],
        chat_template=CHAT_TEMPLATE,
        model_max_length=TESTBED_SPEC["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    return tokenizer


def tokenizer_corpus(pairs: Sequence[tuple[dict, str]]) -> list[str]:
    countdown = _countdown()
    texts = []
    for example, response in pairs:
        texts.append(countdown.PROMPT.format(numbers=list(example["nums"]), target=example["target"]))
        texts.append(response)
    texts.extend(["user\n", "assistant\n", "system\n"] * 50)
    return texts


# ----------------------------------------------------------------------------- model


def build_config(spec: dict, tokenizer):
    from transformers import Qwen2Config

    padded_vocab = int(math.ceil(len(tokenizer) / 64) * 64)
    return Qwen2Config(
        vocab_size=padded_vocab,
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=spec["max_position_embeddings"],
        tie_word_embeddings=True,
        rope_theta=10_000.0,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def _sft_batches(sequences: list[tuple[list[int], int]], batch_size: int, steps: int, seed: int, pad_id: int):
    """Right-padded (input_ids, labels, attention_mask) batches; labels only on the response."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            fresh = list(range(len(sequences)))
            rng.shuffle(fresh)
            order.extend(fresh)
        chosen, order = order[:batch_size], order[batch_size:]
        width = max(len(sequences[i][0]) for i in chosen)
        input_ids = torch.full((batch_size, width), pad_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        attention_mask = torch.zeros((batch_size, width), dtype=torch.long)
        for row, index in enumerate(chosen):
            ids, prompt_length = sequences[index]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            labels[row, prompt_length : len(ids)] = torch.tensor(ids[prompt_length:])
            attention_mask[row, : len(ids)] = 1
        yield input_ids, labels, attention_mask


def supervised_warm_start(model, sequences, spec: dict, pad_id: int, log=None) -> list[float]:
    """AdamW with linear warm-up and cosine decay; returns the loss of every step."""
    steps, warmup = spec["steps"], spec["warmup_steps"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.98), weight_decay=0.01)

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model.train()
    losses = []
    for step, (input_ids, labels, attention_mask) in enumerate(
        _sft_batches(sequences, spec["batch_size"], steps, spec["seed"], pad_id)
    ):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if log is not None and (step % 50 == 0 or step == steps - 1):
            log(f"step {step + 1}/{steps} loss {loss.item():.3f}")
    model.eval()
    return losses


def has_answer_slip(response: str) -> bool:
    """Whether the response's answer carries the slip the warm start teaches: "EXPR = value"."""
    answer = _countdown().extract_answer(response)
    return answer is not None and "=" in answer


def measure_countdown_reward(model, tokenizer, problems: int, seed: int, max_new_tokens: int = 64) -> tuple[float, float]:
    """(mean Countdown reward, fraction of answers with the slip) of one sample per problem at
    temperature 1.0 (the paper's setting)."""
    from tre_cli.rollout.hf import HFEngine

    countdown = _countdown()
    rows = countdown.generate(problems, seed)
    prompts = [tokenizer(render_prompt(row, tokenizer), add_special_tokens=False)["input_ids"] for row in rows]
    engine = HFEngine(model=model, tokenizer=tokenizer, device="cpu", seed=seed)
    rollout = engine.generate(prompts, n=1, max_new_tokens=max_new_tokens, temperature=1.0, top_p=1.0)
    scores = [countdown.score(text, row["nums"], row["target"]) for text, row in zip(rollout.texts, rows)]
    slips = [has_answer_slip(text) for text in rollout.texts]
    return sum(scores) / len(scores), sum(slips) / len(slips)


# ----------------------------------------------------------------------------- build and cache


def spec_hash(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def build_testbed(out_dir: str | os.PathLike, log=None, measure: bool = True, **overrides) -> dict:
    """Build the testbed into `out_dir` (created; must not exist or be empty); returns its card.

    `overrides` replace TESTBED_SPEC entries (tests build a far smaller, faster model).
    """
    unknown = sorted(set(overrides) - set(TESTBED_SPEC))
    if unknown:
        raise ValueError(f"unknown testbed setting(s) {', '.join(unknown)}; known: {', '.join(TESTBED_SPEC)}")
    spec = {**TESTBED_SPEC, **overrides}
    if spec["hidden_size"] // spec["num_attention_heads"] not in (32, 64):
        raise ValueError("testbed head_dim (hidden_size / num_attention_heads) must be 32 or 64 for vLLM on CPU")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"testbed output directory is not empty: {out}")
    from transformers import Qwen2ForCausalLM

    started = time.perf_counter()
    torch.manual_seed(spec["seed"])
    if spec["think"] not in ("steps", "equation"):
        raise ValueError(f"testbed think must be 'steps' or 'equation', got {spec['think']!r}")
    pairs = sft_pairs(spec["sft_problems"], spec["seed"], spec["think"], spec["slips"])
    tokenizer = build_tokenizer(tokenizer_corpus(pairs), spec["vocab_size"])
    sequences = []
    for example, response in pairs:
        prompt_ids = tokenizer(render_prompt(example, tokenizer), add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        sequences.append((prompt_ids + response_ids, len(prompt_ids)))
    model = Qwen2ForCausalLM(build_config(spec, tokenizer))
    losses = supervised_warm_start(model, sequences, spec, tokenizer.pad_token_id, log=log)
    train_seconds = time.perf_counter() - started
    card: dict[str, Any] = {
        "spec": spec,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab": len(tokenizer),
        "prompt_tokens_mean": sum(p for _, p in sequences) / len(sequences),
        "response_tokens_mean": sum(len(s) - p for s, p in sequences) / len(sequences),
        "first_loss": losses[0],
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "build_seconds": round(train_seconds, 1),
        "spec_hash": spec_hash(spec),
        # What the result depends on besides the recipe: the kernels that summed the numbers.
        "built_with": {
            "torch": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
        },
    }
    if measure:
        # A seed far from the SFT seeds, so these problems are (almost surely) unseen.
        reward, slip_rate = measure_countdown_reward(model, tokenizer, spec["eval_problems"], SLIP_EVAL_SEED)
        card["countdown_reward_t1"], card["answer_slip_rate_t1"] = reward, slip_rate
        card["measure_seconds"] = round(time.perf_counter() - started - train_seconds, 1)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    _check_reloaded_tokenizer(out, tokenizer, [render_prompt(e, tokenizer) + r for e, r in pairs[:50]])
    (out / "testbed.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def _check_reloaded_tokenizer(out: Path, built, texts: Sequence[str]) -> None:
    """The tokenizer as tre loads it must give the ids the model was trained on."""
    from tre_cli.models import load_tokenizer

    loaded = load_tokenizer(out)
    for text in texts:
        if loaded(text, add_special_tokens=False)["input_ids"] != built(text, add_special_tokens=False)["input_ids"]:
            raise RuntimeError(f"testbed tokenizer changes when reloaded ({type(loaded).__name__}) on {text!r}")


# ----------------------------------------------------------------------------- the shipped copy

# The testbed as built once from TESTBED_SPEC and shipped with the package, so that every machine
# trains, tests and demos the same bytes (a rebuild on another processor is a different model:
# its kernels sum in another order and 600 SFT steps at lr 5e-3 amplify that).
SHIPPED_DIR = Path(__file__).resolve().parent / "testbed_weights"
CHECKSUMS = "SHA256SUMS"
_verified: set[Path] = set()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path) -> None:
    """SHA256SUMS over every other file of `folder` (sha256sum's format)."""
    lines = [f"{file_sha256(path)}  {path.name}" for path in sorted(folder.iterdir()) if path.name != CHECKSUMS]
    (folder / CHECKSUMS).write_text("\n".join(lines) + "\n")


def verify_testbed(folder: str | os.PathLike) -> dict:
    """The card of the testbed in `folder` after checking it: every file matches SHA256SUMS and the
    card's recipe hash is today's TESTBED_SPEC. A ValueError names what is wrong."""
    folder = Path(folder)
    sums = folder / CHECKSUMS
    if not sums.is_file():
        raise ValueError(f"testbed at {folder} has no {CHECKSUMS}; reinstall tre-cli")
    listed = {}
    for line in sums.read_text().splitlines():
        digest, _, name = line.partition("  ")
        listed[name] = digest
    for name, digest in listed.items():
        path = folder / name
        if not path.is_file() or file_sha256(path) != digest:
            raise ValueError(f"testbed file {path} is missing or altered (checksum mismatch); reinstall tre-cli")
    card = json.loads((folder / "testbed.json").read_text())
    if card.get("spec_hash") != spec_hash(TESTBED_SPEC):
        raise ValueError(
            f"the testbed at {folder} was built from recipe {card.get('spec_hash')}, but TESTBED_SPEC is "
            f"{spec_hash(TESTBED_SPEC)}: rebuild and ship it (tre testbed build --out DIR, then tre testbed ship DIR)"
        )
    return card


def shipped_testbed() -> Path:
    """The shipped testbed's folder, verified once per process."""
    if SHIPPED_DIR not in _verified:
        verify_testbed(SHIPPED_DIR)
        _verified.add(SHIPPED_DIR)
    return SHIPPED_DIR


def compare_with_shipped(card: dict, folder: Path) -> list[tuple[str, Any, Any]]:
    """(what, rebuilt, shipped) rows comparing a fresh build with the shipped testbed."""
    shipped = json.loads((SHIPPED_DIR / "testbed.json").read_text())
    rows = [
        (key, card.get(key), shipped.get(key))
        for key in ("final_loss", "countdown_reward_t1", "answer_slip_rate_t1", "build_seconds")
    ]
    weights = "model.safetensors"
    same = file_sha256(folder / weights) == file_sha256(SHIPPED_DIR / weights)
    rows.append(("weights bitwise equal", same, True))
    return rows


def ship(source: str | os.PathLike, target: str | os.PathLike | None = None) -> Path:
    """Make the build in `source` the shipped testbed (`target`, default SHIPPED_DIR): a developer's
    step after changing the recipe. Copies, writes SHA256SUMS, verifies, then swaps in."""
    source, target = Path(source), Path(target or SHIPPED_DIR)
    card = json.loads((source / "testbed.json").read_text())
    if card.get("spec_hash") != spec_hash(TESTBED_SPEC):
        raise ValueError(f"{source} was not built from today's TESTBED_SPEC")
    staging = target.with_name(target.name + ".new")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(source, staging)
    (staging / CHECKSUMS).unlink(missing_ok=True)
    write_checksums(staging)
    verify_testbed(staging)
    shutil.rmtree(target, ignore_errors=True)
    os.rename(staging, target)
    _verified.discard(target)
    return target


def testbed_dir(spec: dict | None = None) -> Path:
    from tre_cli.models import cache_root

    return cache_root() / f"testbed-{spec_hash(spec or TESTBED_SPEC)}"


def ensure_testbed(log=None, force: bool = False, spec: dict | None = None) -> Path:
    """The cached testbed directory, built first when absent (atomic: temp dir, then rename).

    `spec` (default TESTBED_SPEC) names the recipe; its hash names the directory.
    """
    import fcntl

    spec = dict(TESTBED_SPEC if spec is None else spec)
    target = testbed_dir(spec)
    if (target / "config.json").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (parallel sweep trials all ask for it at start-up).
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").exists() and not force:
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            build_testbed(staging, log=log, **spec)
            if target.exists():
                shutil.rmtree(target)
            os.rename(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target
