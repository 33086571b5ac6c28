import pytest
import torch

from alignkit.models.tiny import tiny_model, tiny_tokenizer


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)


@pytest.fixture
def tok():
    return tiny_tokenizer()


@pytest.fixture
def model():
    return tiny_model(seed=0)
