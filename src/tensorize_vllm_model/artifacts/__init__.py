"""What travels beside the tensors: model files (config, tokenizer), LoRA adapters
and vLLM's compile cache."""
