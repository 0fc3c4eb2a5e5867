import pytest
import torch

from multitoken.devices import resolve_device
from multitoken.errors import UserError


def test_auto_is_the_gpu_when_there_is_one():
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device(None) == resolve_device("auto")


def test_devices_this_machine_has_pass_through():
    assert resolve_device("cpu") == "cpu"
    if torch.cuda.is_available():
        assert resolve_device("cuda:0") == "cuda:0"


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("gpu", "unknown device 'gpu'"),
        ("meta", "unknown device 'meta'"),
        ("cuda:99", "device 'cuda:99' is not available here"),
    ],
)
def test_other_devices_are_one_line_errors(device, message):
    with pytest.raises(UserError, match=message):
        resolve_device(device)
