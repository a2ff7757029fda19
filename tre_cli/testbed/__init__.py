"""Building the built-in `testbed` model: a small Qwen2 with a compact tokenizer, made here with no download.

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
rises for every method, so a smoke run shows learning (tests/test_learning.py). Exploration
beyond that (finding sign patterns the model rarely samples) is what the slower, real-model runs
are for.

The recipe's numbers and the shipped copy live in tre_cli/models/testbed.py (what `--model
testbed` loads needs nothing of this package). Here, by concern:

    data.py        the Countdown warm-start data (signed-sum solutions, the slip) and prompts
    tokenizer.py   the byte-level BPE tokenizer and its chat template
    warm_start.py  the Qwen2 config and the supervised warm start
    reward.py      the reward and slip rate of a build (samples with rollout.hf.HFEngine)
    build.py       a build into a directory (its card, testbed.json) and the cached build
    cli.py         `tre testbed ...`
"""
