"""Whether a model can be split at a tensor/pipeline-parallel layout, from its
``config.json`` alone (vLLM 0.32's rules: attention heads divisible by the TP size, KV heads
divisible by it or dividing it, at least one layer per pipeline stage), so that a layout
the model does not allow is refused before an engine starts, naming the numbers."""

from __future__ import annotations

from ..core.errors import LayoutError

__all__ = ["check_layout_fits"]


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


def check_layout_fits(
    config: dict, tensor_parallel_size: int, pipeline_parallel_size: int, *, source: str
) -> None:
    """Raise LayoutError when the model of `config` cannot be split this way.

    Args:
        config: the model's ``config.json``.
        source: what to name in the message (the model directory).
    """
    config = _text_config(config)
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    heads = config.get("num_attention_heads") or config.get("n_head")
    kv_heads = config.get("num_key_value_heads") or heads
    layers = config.get("num_hidden_layers") or config.get("n_layer")
    problems = []
    if heads and heads % tp:
        problems.append(
            f"its {heads} attention heads are not divisible by --tensor-parallel-size {tp}"
        )
    elif kv_heads and kv_heads % tp and tp % kv_heads:
        problems.append(
            f"its {kv_heads} key/value heads neither divide nor are divisible by "
            f"--tensor-parallel-size {tp}"
        )
    if layers and pp > layers:
        problems.append(f"its {layers} layers cannot fill --pipeline-parallel-size {pp} stages")
    if problems:
        raise LayoutError(
            f"the model in {source} cannot be loaded at TP={tp} x PP={pp}: " + "; ".join(problems)
        )
