"""The network: config, layers, attention, Llama, KV cache, LoRA and quantization. No file I/O."""
