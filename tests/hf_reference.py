"""The reference: Hugging Face transformers' LlamaForCausalLM on PyTorch CPU, random weights."""

import numpy as np
import torch
import transformers

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


def save_random_llama(path, *, vocab=512, dim=64, mlp=160, layers=2, heads=4, kv_heads=2, head_dim=16,
                      rope_theta=500000.0, rope=LLAMA3_ROPE, tied=False, seed=0, std=0.08, shards=False):
    torch.manual_seed(seed)
    kw = {"rope_scaling": dict(rope, rope_theta=rope_theta)} if rope else {}
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=dim, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, rope_theta=rope_theta,
        rms_norm_eps=1e-5, tie_word_embeddings=tied, max_position_embeddings=131072, **kw)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights than HF's init give peaked logits: greedy tokens without ties
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, std)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path, max_shard_size="100KB" if shards else "5GB")
    return model


def logits(model, tokens, positions=None):
    with torch.no_grad():
        pos = None if positions is None else torch.tensor(np.asarray(positions), dtype=torch.long)
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long), position_ids=pos).logits.numpy()


def greedy(model, tokens, n):
    toks = torch.tensor(np.asarray(tokens), dtype=torch.long)
    with torch.no_grad():  # an explicit mask: generate would otherwise mask prompt tokens equal to pad_token_id (0)
        out = model.generate(toks, attention_mask=torch.ones_like(toks), max_new_tokens=n, do_sample=False)
    return out[:, np.asarray(tokens).shape[1]:].numpy()
