"""A tiny language model, its tokenizer and a corpus it can learn, built locally (no
downloads): the model the tests, the benchmarks and the worked example of splicing and
evaluating SAEs (fastsae.model, fastsae.evaluate) run on.

    texts = grammar_corpus(2000)
    tok = word_tokenizer(texts)
    lm = tiny_lm("gpt2", len(tok), d_model=64)
    train_lm(lm, tok, texts, steps=300)

The corpus is sentences of a small grammar with number agreement (the cat sees / the cats
see) and word pairs that recur, so a model that learns it has structure an SAE can find and a
splice can break.
"""

from __future__ import annotations

import importlib
import random

import torch

FAMILIES = ("gpt2", "llama", "gpt_neox", "bert")

_NOUNS = ("cat", "dog", "bird", "fox", "mouse", "horse", "teacher", "child", "robot", "farmer")
_ADJECTIVES = ("red", "small", "old", "quick", "quiet", "happy", "green", "tall")
_VERBS = (("sees", "see"), ("likes", "like"), ("chases", "chase"), ("finds", "find"), ("helps", "help"))
_PLACES = ("in the park", "on the hill", "near the river", "at home", "in the barn")


def grammar_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """`n_docs` sentences, each one to three clauses of `the [adj] noun(s) verb the [adj] noun(s)
    [place]`, the verb agreeing in number with its subject; reproducible by seed."""
    rng = random.Random(seed)

    def phrase():
        plural = rng.random() < 0.5
        noun = rng.choice(_NOUNS) + ("s" if plural else "")
        adj = rng.choice(_ADJECTIVES) + " " if rng.random() < 0.6 else ""
        return f"the {adj}{noun}", plural

    docs = []
    for _ in range(n_docs):
        clauses = []
        for _ in range(rng.randint(1, 3)):
            subject, plural = phrase()
            verb = rng.choice(_VERBS)[1 if plural else 0]
            obj = phrase()[0]
            place = " " + rng.choice(_PLACES) if rng.random() < 0.4 else ""
            clauses.append(f"{subject} {verb} {obj}{place}")
        docs.append(" and ".join(clauses))
    return docs


def word_tokenizer(texts, mlm: bool = False):
    """A word-level fast tokenizer over the words of `texts`: [UNK]=0, [PAD]=1, <bos>=2 (put
    before every text; also the eos token), and [MASK]=3 when mlm."""
    transformers = importlib.import_module("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = sorted({w for line in texts for w in line.split()})
    specials = ["[UNK]", "[PAD]", "<bos>"] + (["[MASK]"] if mlm else [])
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<bos>", eos_token="<bos>",
        **({"mask_token": "[MASK]"} if mlm else {}))


def tiny_lm(family: str, vocab_size: int, head: bool = True, seed: int = 0, layers: int = 2, d_model: int = 32,
            positions: int = 32, initializer_range: float = 0.2):
    """A randomly initialised `family` model (gpt2, llama, gpt_neox, bert) of `layers` blocks of
    width `d_model` (2 heads, MLP 2·d_model), with its LM head (causal; masked for bert) or bare
    (head=False), eager attention, in eval mode. The default initializer_range (0.2, against
    the usual 0.02) gives random logits far enough from uniform for CE and KL differences to
    stand well above rounding."""
    t = importlib.import_module("transformers")
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, initializer_range=initializer_range, pad_token_id=1, bos_token_id=2,
                  eos_token_id=2)
    blocks = dict(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=layers, num_attention_heads=2,
                  max_position_embeddings=positions, **common)
    if family == "gpt2":
        cfg = t.GPT2Config(n_layer=layers, n_embd=d_model, n_head=2, n_positions=positions, **common)
        cls = t.GPT2LMHeadModel if head else t.GPT2Model
    elif family == "llama":
        cfg = t.LlamaConfig(num_key_value_heads=2, **blocks)
        cls = t.LlamaForCausalLM if head else t.LlamaModel
    elif family == "gpt_neox":
        cfg = t.GPTNeoXConfig(**blocks)
        cls = t.GPTNeoXForCausalLM if head else t.GPTNeoXModel
    elif family == "bert":
        cfg = t.BertConfig(**blocks)
        cls = t.BertForMaskedLM if head else t.BertModel
    else:
        raise ValueError(f"family {family!r} is unknown: use one of {', '.join(FAMILIES)}")
    cfg._attn_implementation = "eager"
    return cls(cfg).eval()


def train_lm(model, tokenizer, texts, steps: int, batch_size: int = 32, context_length: int = 32, lr: float = 3e-3,
             seed: int = 0) -> list[float]:
    """Train a causal `model` on `texts` (next-token loss, padding ignored) with AdamW for
    `steps` steps of `batch_size` random documents; returns the losses. Leaves it in eval mode."""
    from ..model import token_batches

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        docs = [texts[rng.randrange(len(texts))] for _ in range(batch_size)]
        ids, am = next(token_batches(tokenizer, docs, batch_size, context_length))
        labels = ids.masked_fill(am == 0, -100)
        loss = model(input_ids=ids, attention_mask=am, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses
