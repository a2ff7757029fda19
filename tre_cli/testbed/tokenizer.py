"""The testbed's tokenizer: byte-level BPE trained on Countdown prompts and answers, digits one per
token, the answer tags and ChatML's special tokens as single tokens, and a chat template."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tre_cli.models.testbed import TESTBED_SPEC
from tre_cli.testbed.data import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, countdown_task

PAD_TOKEN, CHAT_START, CHAT_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TESTBED_PRETOKENIZE_REGEX = r""" ?[0-9]|[0-9]| ?[A-Za-z]+| ?[^\sA-Za-z0-9]+|\s+"""
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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
    countdown = countdown_task()
    texts = []
    for example, response in pairs:
        texts.append(countdown.PROMPT.format(numbers=list(example["nums"]), target=example["target"]))
        texts.append(response)
    texts.extend(["user\n", "assistant\n", "system\n"] * 50)
    return texts
