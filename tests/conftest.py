import pytest
import torch

from adaptivedrag_core.models import tiny_sd_components


@pytest.fixture(scope="session")
def tiny():
    """One tiny random-weight SD1.x model for the whole session (tests must not modify its weights)."""
    return tiny_sd_components(seed=0)


@pytest.fixture(scope="session")
def empty_prompt(tiny):
    ids = tiny.tokenizer("", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return tiny.text_encoder(ids)[0]
