"""The sampling distribution μ (temperature, then top-k, then top-p) against transformers' logits warpers, the
trusted implementation whose order and tie rules distpg follows (HF generate, TRL, vLLM agree on them)."""

import pytest
import torch

from distpg.generate import SamplingParams, sampling_logprobs


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 5, 1.0), (0.7, 0, 0.9), (1.3, 10, 0.8), (0.5, 3, 0.5), (1.0, 0, 0.3), (2.0, 40, 0.95), (1.0, 50, 1.0),
])
def test_sampling_logprobs_are_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(top_k)) * 3
    x = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(None, x)
    theirs = torch.log_softmax(x, -1)
    ours = sampling_logprobs(logits, SamplingParams(max_new_tokens=1, temperature=temperature, top_k=top_k,
                                                    top_p=top_p))
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))  # the same tokens kept
    torch.testing.assert_close(ours.exp(), theirs.exp(), rtol=0, atol=1e-6)
