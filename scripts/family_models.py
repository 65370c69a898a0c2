"""Tiny random checkpoints of common model families, from transformers' own config classes.

Not part of the installed package: benchmarks/families.py (the family matrix) and the tests
import it from scripts/. Each family is a transformers config class and the few sizes that
make it tiny (hidden 256, head_dim 64, 2 layers, 4-8 experts) while vLLM's CPU build can run
it; `build_family` writes config, random safetensors weights and a locally trained tokenizer
(`demo_models.build_tokenizer`). ``embedding`` adds a sentence-transformers pooling config
(``modules.json``, ``1_Pooling/config.json`` asking for mean pooling).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["FAMILIES", "POOLING", "build_family"]

_ATTN = {"hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2}
_LLAMA_LIKE = {
    **_ATTN,
    "intermediate_size": 512,
    "num_hidden_layers": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
_MOE = {"num_experts_per_tok": 2}

# family -> (config class, model class, config kwargs)
FAMILIES: dict[str, tuple[str, str, dict]] = {
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        {"n_embd": 256, "n_head": 4, "n_layer": 2, "n_positions": 512},
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _LLAMA_LIKE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {**_LLAMA_LIKE, "head_dim": 64}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {**_LLAMA_LIKE, "head_dim": 64}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {**_LLAMA_LIKE, "head_dim": 64, "sliding_window": 128, "tie_word_embeddings": True},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {**_LLAMA_LIKE, "head_dim": 64, "sliding_window": 128, "tie_word_embeddings": True},
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {**_LLAMA_LIKE, "pad_token_id": 2}),
    "gpt_neox": (
        "GPTNeoXConfig",
        "GPTNeoXForCausalLM",
        {
            "hidden_size": 256,
            "num_attention_heads": 4,
            "intermediate_size": 512,
            "num_hidden_layers": 2,
            "max_position_embeddings": 512,
        },
    ),
    "falcon": (
        "FalconConfig",
        "FalconForCausalLM",
        {
            "hidden_size": 256,
            "num_attention_heads": 4,
            "num_hidden_layers": 2,
            "new_decoder_architecture": True,
            "num_kv_heads": 2,
            "bias": False,
        },
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {**_LLAMA_LIKE, **_MOE, "head_dim": 64, "num_local_experts": 4},
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        {
            **_LLAMA_LIKE,
            **_MOE,
            "num_experts": 4,
            "moe_intermediate_size": 256,
            "shared_expert_intermediate_size": 256,
        },
    ),
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        {**_LLAMA_LIKE, **_MOE, "head_dim": 64, "num_experts": 4, "moe_intermediate_size": 256},
    ),
    "deepseek_v2": (
        "DeepseekV2Config",
        "DeepseekV2ForCausalLM",
        {
            "hidden_size": 256,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "intermediate_size": 512,
            "moe_intermediate_size": 256,
            "num_hidden_layers": 2,
            "first_k_dense_replace": 1,
            "n_routed_experts": 4,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            # MLA on vLLM's CPU build takes head sizes 320, 512, 576 (kv_lora_rank + rope)
            "kv_lora_rank": 512,
            "q_lora_rank": None,
            "qk_rope_head_dim": 64,
            "qk_nope_head_dim": 64,
            "v_head_dim": 64,
            "max_position_embeddings": 512,
            "topk_method": "greedy",
            "n_group": 1,
            "topk_group": 1,
            "tie_word_embeddings": False,
        },
    ),
    "gpt_oss": (
        "GptOssConfig",
        "GptOssForCausalLM",
        {
            **_LLAMA_LIKE,
            "head_dim": 64,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "sliding_window": 128,
            "layer_types": ["sliding_attention", "full_attention"],
        },
    ),
    "llama4": (
        "Llama4TextConfig",
        "Llama4ForCausalLM",
        {
            **_LLAMA_LIKE,
            "head_dim": 64,
            "intermediate_size_mlp": 512,
            "num_local_experts": 4,
            "num_experts_per_tok": 1,
            "interleave_moe_layer_step": 1,
            "no_rope_layers": [1, 1],
        },
    ),
    # state-space layers: vLLM's mixer loads ``A`` as ``-exp(A_log)``, in place after the copy
    "mamba2": (
        "Mamba2Config",
        "Mamba2ForCausalLM",
        {
            "hidden_size": 256,
            "num_hidden_layers": 2,
            "num_heads": 8,
            "head_dim": 64,
            "expand": 2,
            "n_groups": 1,
            "state_size": 16,
            "tie_word_embeddings": False,
        },
    ),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig",
        "GraniteMoeHybridForCausalLM",
        {
            **_LLAMA_LIKE,
            **_MOE,
            "num_local_experts": 4,
            "shared_intermediate_size": 256,
            "layer_types": ["mamba", "attention"],
            "mamba_n_heads": 8,
            "mamba_d_head": 64,
            "mamba_expand": 2,
            "mamba_n_groups": 1,
            "mamba_d_state": 16,
        },
    ),
    # an embedding model: a Qwen3 decoder with a sentence-transformers mean-pooling config
    "embedding": ("Qwen3Config", "Qwen3ForCausalLM", {**_LLAMA_LIKE, "head_dim": 64}),
}

POOLING = {
    "modules.json": [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ],
    "1_Pooling/config.json": {
        "word_embedding_dimension": 256,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_lasttoken": False,
    },
    "sentence_bert_config.json": {"max_seq_length": 256, "do_lower_case": False},
}


def build_family(
    path: str | os.PathLike, family: str, *, seed: int = 0, layers: int | None = None
) -> Path:
    """Write a tiny random `family` checkpoint (bfloat16 safetensors) to `path`; with
    `layers`, of that many decoder layers (per-layer lists repeated to that length)."""
    import torch
    import transformers
    from demo_models import build_tokenizer

    config_class, model_class, kwargs = FAMILIES[family]
    if layers is not None:
        kwargs = _with_layers(kwargs, layers)
    path = Path(path)
    tokenizer = build_tokenizer(path)
    config = getattr(transformers, config_class)(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).to(torch.bfloat16)
    with torch.no_grad():  # larger weights than the default init: greedy tokens that differ
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    if family == "embedding":
        for name, content in POOLING.items():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_text(json.dumps(content, indent=2))
    return path


def _with_layers(kwargs: dict, layers: int) -> dict:
    """`kwargs` of a family for `layers` decoder layers."""
    changed = dict(kwargs)
    for key in ("num_hidden_layers", "n_layer"):
        if key in changed:
            changed[key] = layers
    for key in ("layer_types", "no_rope_layers"):
        if key in changed:
            cycle = changed[key]
            changed[key] = [cycle[i % len(cycle)] for i in range(layers)]
    return changed
