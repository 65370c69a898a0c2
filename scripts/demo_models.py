"""Small random-weight Hugging Face models with a locally trained tokenizer, built offline.

Not part of the installed package: examples/quickstart.py (its fallback when the real demo
model cannot be fetched), examples/s3_workflow.py, the tests (tests/support/__init__.py puts
scripts/ on sys.path) and the benchmarks import it from scripts/, next to smollm2.py. They
need real model directories (config, safetensors weights, tokenizer) that vLLM can start on,
without downloading anything from a model hub. `build_model` writes one: a Llama-like or OPT-like architecture with random
weights, and a byte-level BPE tokenizer trained in about a second on a built-in text.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = [
    "ARCHITECTURES",
    "MAX_TOKENS",
    "PROMPTS",
    "build_model",
    "build_moe_skeleton",
    "build_tokenizer",
    "build_lora_adapter",
]

ARCHITECTURES = ("llama", "opt", "qwen3_moe")

# The prompts (and greedy tokens per prompt) that the tests and benchmarks compare outputs on.
PROMPTS = [
    "Hello, my name is",
    "The capital of France is",
    "Once upon a time there was",
    "The future of computing is",
]
MAX_TOKENS = 16

# A few hundred words of plain English to train the tokenizer on: enough for a vocabulary
# of a few hundred tokens and for prompts that do not fall back to single bytes.
_CORPUS = """
The quick brown fox jumps over the lazy dog. A model is a set of weights and a program that
turns text into numbers and numbers into text. The weights of a large language model are
stored in files, and loading them fast decides how quickly a server can answer its first
request. Object storage keeps the files safe, a network carries them, and the memory of a
graphics card holds them while the model runs. Once upon a time there was a small town by
the sea where people told stories about ships, storms, lighthouses and the stars. The capital
of France is Paris. The capital of Japan is Tokyo. The largest planet in the solar system is
Jupiter. Water boils at one hundred degrees at the level of the sea. Hello, my name is Ada and
I like to read books about history, science, music and mathematics. The future of computing
is parallel: many cores, many cards and many machines working on one problem together.
"""


def build_tokenizer(path: str | os.PathLike, *, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on a built-in text and save it to `path`.

    Args:
        path: directory to save `tokenizer.json` and its companion files into.
        vocab_size: target vocabulary size (the trained vocabulary may be smaller).

    Returns:
        The `transformers.PreTrainedTokenizerFast`, already saved.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.save_pretrained(os.fspath(path))
    return fast


def build_model(
    path: str | os.PathLike,
    *,
    architecture: str = "llama",
    hidden_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    vocab_size: int = 512,
    max_position_embeddings: int = 512,
    dtype: str = "bfloat16",
    seed: int = 0,
    num_experts: int = 8,
) -> Path:
    """Write a random-weight model, its config and a tokenizer into directory `path`.

    vLLM's CPU attention needs a head dimension of 64 or more (hidden_size / num_heads).

    Args:
        path: the directory to create (parents too); existing files are overwritten.
        architecture: "llama" (LlamaForCausalLM), "opt" (OPTForCausalLM) or "qwen3_moe"
            (Qwen3MoeForCausalLM: `num_experts` experts of `intermediate_size` each, 8 of
            them (at most) routed per token, two KV heads; transformers saves each expert
            as its own tensors).
        hidden_size, num_layers, num_heads, intermediate_size, vocab_size,
        max_position_embeddings: the architecture's sizes; the vocabulary is padded up to
            at least the tokenizer's.
        dtype: the weights' dtype ("bfloat16", "float16" or "float32").
        seed: the random seed of the weights, so a given call always writes the same model.

    Returns:
        The directory, as a `Path`.

    Example:
        >>> build_model("/tmp/tiny-llama")  # doctest: +SKIP
        PosixPath('/tmp/tiny-llama')
    """
    import torch

    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture {architecture!r}; choose one of {', '.join(ARCHITECTURES)}"
        )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path, vocab_size=vocab_size)
    sizes = {
        "hidden_size": hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "vocab_size": max(vocab_size, len(tokenizer)),
        "max_position_embeddings": max_position_embeddings,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if architecture == "qwen3_moe":
        sizes["num_experts"] = num_experts
    config, model_cls = _hf_config(architecture, sizes, intermediate_size or 2 * hidden_size)
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    config.dtype = torch_dtype
    model = model_cls(config).to(torch_dtype)
    # Larger than the usual 0.02 so that greedy decoding of random weights varies from
    # token to token instead of repeating one token.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    model.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    return path


def _hf_config(architecture: str, sizes: dict, intermediate_size: int):
    """The transformers config and model class of `architecture` with these sizes."""
    import transformers

    if architecture == "llama":
        config = transformers.LlamaConfig(
            **sizes,
            intermediate_size=intermediate_size,
            num_key_value_heads=sizes["num_attention_heads"],
            tie_word_embeddings=False,
        )
        return config, transformers.LlamaForCausalLM
    if architecture == "qwen3_moe":
        experts = sizes.pop("num_experts")
        config = transformers.Qwen3MoeConfig(
            **sizes,
            head_dim=sizes["hidden_size"] // sizes["num_attention_heads"],
            num_key_value_heads=min(2, sizes["num_attention_heads"]),
            intermediate_size=intermediate_size,
            moe_intermediate_size=intermediate_size,
            num_experts=experts,
            num_experts_per_tok=min(8, experts),
            tie_word_embeddings=False,
        )
        return config, transformers.Qwen3MoeForCausalLM
    config = transformers.OPTConfig(
        **sizes, ffn_dim=intermediate_size, word_embed_proj_dim=sizes["hidden_size"]
    )
    return config, transformers.OPTForCausalLM


def build_lora_adapter(
    path: str | os.PathLike,
    base_model: str | os.PathLike,
    *,
    rank: int = 8,
    target_modules: tuple[str, ...] = ("q_proj", "v_proj"),
    scale: float = 0.5,
    seed: int = 1,
) -> Path:
    """Write a random LoRA adapter for Llama-like `base_model` as a PEFT directory.

    Both LoRA matrices are random (PEFT starts B at zero, which would change nothing), so
    the adapter visibly changes what the model generates.

    Returns:
        The directory (``adapter_config.json`` and ``adapter_model.safetensors``).
    """
    import json

    import torch
    from safetensors.torch import save_file

    config = json.loads((Path(base_model) / "config.json").read_text())
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    shapes = {  # (in_features, out_features) of each Llama projection
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, config["intermediate_size"]),
        "up_proj": (hidden, config["intermediate_size"]),
        "down_proj": (config["intermediate_size"], hidden),
    }
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in target_modules:
            block = "mlp" if module in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            n_in, n_out = shapes[module]
            tensors[f"{prefix}.lora_A.weight"] = (
                torch.randn(rank, n_in, generator=generator) * scale
            )
            tensors[f"{prefix}.lora_B.weight"] = (
                torch.randn(n_out, rank, generator=generator) * scale
            )
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": 2 * rank,
                "lora_dropout": 0.0,
                "bias": "none",
                "target_modules": list(target_modules),
                "base_model_name_or_path": str(base_model),
                "fan_in_fan_out": False,
                "inference_mode": True,
                "modules_to_save": None,
            },
            indent=2,
        )
    )
    return path


def build_moe_skeleton(
    path: str | os.PathLike,
    *,
    num_layers: int = 48,
    num_experts: int = 128,
    hidden_size: int = 128,
    num_heads: int = 2,
    intermediate_size: int = 32,
    vocab_size: int = 512,
    dtype: str = "bfloat16",
    seed: int = 0,
) -> Path:
    """Write a Qwen3-MoE checkpoint of random weights, its config (transformers'
    ``Qwen3MoeConfig``) and a tokenizer into `path`, without building the transformers
    model: the tensors transformers 5.19 saves for that config (each expert's
    gate/up/down projections as tensors of their own; 48 layers x 128 experts, the shape of
    Qwen3-30B-A3B, give 18,867 tensors), written with safetensors in a second or two. The
    defaults (hidden 128, two heads of 64, experts of 32) run on vLLM's CPU build.
    """
    import torch
    import transformers
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path, vocab_size=vocab_size)
    head_dim = hidden_size // num_heads
    config = transformers.Qwen3MoeConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=min(2, num_heads),
        head_dim=head_dim,
        intermediate_size=intermediate_size,
        moe_intermediate_size=intermediate_size,
        num_experts=num_experts,
        num_experts_per_tok=min(8, num_experts),
        vocab_size=max(vocab_size, len(tokenizer)),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config.dtype = getattr(torch, dtype)
    config.architectures = ["Qwen3MoeForCausalLM"]
    kv = config.num_key_value_heads * head_dim
    shapes = {
        "model.embed_tokens.weight": (config.vocab_size, hidden_size),
        "model.norm.weight": (hidden_size,),
        "lm_head.weight": (config.vocab_size, hidden_size),
    }
    for i in range(num_layers):
        layer = f"model.layers.{i}"
        shapes.update(
            {
                f"{layer}.input_layernorm.weight": (hidden_size,),
                f"{layer}.post_attention_layernorm.weight": (hidden_size,),
                f"{layer}.self_attn.q_proj.weight": (num_heads * head_dim, hidden_size),
                f"{layer}.self_attn.k_proj.weight": (kv, hidden_size),
                f"{layer}.self_attn.v_proj.weight": (kv, hidden_size),
                f"{layer}.self_attn.o_proj.weight": (hidden_size, num_heads * head_dim),
                f"{layer}.self_attn.q_norm.weight": (head_dim,),
                f"{layer}.self_attn.k_norm.weight": (head_dim,),
                f"{layer}.mlp.gate.weight": (num_experts, hidden_size),
            }
        )
        for e in range(num_experts):
            expert = f"{layer}.mlp.experts.{e}"
            shapes[f"{expert}.gate_proj.weight"] = (intermediate_size, hidden_size)
            shapes[f"{expert}.up_proj.weight"] = (intermediate_size, hidden_size)
            shapes[f"{expert}.down_proj.weight"] = (hidden_size, intermediate_size)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # norms: around 1, as trained ones are
            tensors[name] = torch.ones(shape).to(config.dtype)
        else:  # 0.2 as build_model: greedy tokens vary from token to token
            tensors[name] = (torch.randn(shape, generator=generator) * 0.2).to(config.dtype)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(path)
    transformers.GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id
    ).save_pretrained(path)
    return path
