"""Tiny random GPT-2 and Llama (grouped-query) teachers for the slicer and the importance pass."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=4, n_head=4, n_inner=48,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=40, num_hidden_layers=4, num_attention_heads=6,
                         num_key_value_heads=3, max_position_embeddings=32, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms, so that hidden channels differ in scale
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture(params=["gpt2", "llama"])
def model(request):
    return request.getfixturevalue(request.param)
