"""Small randomly initialised models of every supported architecture, with a word tokenizer.

Pretrained GPT-2, BART, T5 and BERT-base weights are not available offline, so the unit
tests run the real code paths on tiny random configs of each architecture. The post-norm
models (BERT, BART) get a larger initialisation: with the default 0.02 every input's
last-FFN input is nearly the same vector (cosine 0.99997), unlike in a trained model, and no
neuron could then tell an edit from the memory.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    BertConfig,
    BertForSequenceClassification,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

WORDS = (
    "the a of in is was to and capital city country river mountain france paris germany "
    "berlin italy rome spain madrid japan tokyo china beijing who what where when which wrote "
    "plays novel author composer painter born died language speaks president king queen "
    "river flows through largest smallest famous known for red blue green cat dog bird fish "
    "tree house car book music film song apple water fire earth sky moon sun star day night "
    "one two three four five six seven eight nine ten answer question true false yes no "
    "weather today tomorrow good bad happy sad old new big small eats runs sleeps sings"
).split()
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "[CLS]", "[SEP]"]
ARCHITECTURES = ("llama", "gemma3", "gpt2", "bert", "t5", "t5-gated", "bart")


def make_tokenizer(kind: str) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if kind == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 4), ("[SEP]", 5)]
        )
    elif kind in ("t5", "t5-gated", "bart"):
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", 3)]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 2)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )


def make_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    vocab = len(SPECIALS) + len(WORDS)
    common = dict(vocab_size=vocab, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if kind == "llama":
        config = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
        model = LlamaForCausalLM(config)
    elif kind == "gemma3":
        config = Gemma3TextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=128,
            sliding_window=32,
            **common,
        )
        model = Gemma3ForCausalLM(config)
    elif kind == "gpt2":
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)
        model = GPT2LMHeadModel(config)
    elif kind == "bert":
        config = BertConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            num_labels=3,
            vocab_size=vocab,
            pad_token_id=0,
            initializer_range=0.2,
        )
        model = BertForSequenceClassification(config)
    elif kind in ("t5", "t5-gated"):
        config = T5Config(
            d_model=64,
            d_ff=128,
            d_kv=16,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu" if kind == "t5-gated" else "relu",
            decoder_start_token_id=0,
            vocab_size=vocab,
            pad_token_id=0,
            eos_token_id=3,
        )
        model = T5ForConditionalGeneration(config)
    elif kind == "bart":
        config = BartConfig(
            d_model=64,
            encoder_ffn_dim=128,
            decoder_ffn_dim=128,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=4,
            decoder_attention_heads=4,
            max_position_embeddings=128,
            decoder_start_token_id=3,
            forced_eos_token_id=None,
            init_std=0.2,
            **common,
        )
        model = BartForConditionalGeneration(config)
    else:
        raise ValueError(kind)
    return model.eval()


MEMORY_TEXTS = [
    "the weather today is good",
    "the cat sleeps in the house",
    "a dog runs in the park of the city",
    "the sun and the moon and the stars",
    "who wrote the famous novel",
    "the bird sings a happy song",
    "the river flows through the old city",
    "one two three four five",
    "the red car is new",
    "what is the largest country",
    "the apple tree is big and green",
    "music and film and book",
]


def wide_llama(seed: int = 0) -> LlamaForCausalLM:
    """The tiny llama initialised with std 0.2, so that late-FFN inputs of different texts
    differ as in a trained model (the default 0.02 makes them nearly identical)."""
    config = make_model("llama").config
    config.initializer_range = 0.2
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def logits_of(model, tok, texts: list[str]) -> torch.Tensor:
    """Logits of a right-padded batch of texts."""
    tok.padding_side = "right"
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits
