"""``optimize_convolutions``: batch norms folded into the convolutions before them, weights laid out
channels-last, and the same output as the network as it was. (The loaded default image encoder is
checked in tests/inference/test_handler.py.)"""

from __future__ import annotations

import copy

import torch

from mmfeatures.encoders.convolutions import optimize_convolutions


def _network(seed: int = 0) -> torch.nn.Sequential:
    """Conv + batch norm twice, then a batch norm that follows no convolution; in eval mode, with
    running statistics and affine parameters far from the identity, so that folding shows."""
    torch.manual_seed(seed)
    network = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.BatchNorm2d(8),  # after a ReLU: not a convolution's, so never folded
    )
    with torch.no_grad():
        for module in network:
            if isinstance(module, torch.nn.BatchNorm2d):
                assert module.running_mean is not None and module.running_var is not None
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.weight.uniform_(0.5, 2)
                module.bias.uniform_(-1, 1)
    return network.eval().requires_grad_(False)


def test_batch_norms_after_convolutions_are_folded_and_the_output_kept() -> None:
    network = _network()
    reference = copy.deepcopy(network)
    inputs = torch.randn(2, 3, 16, 16)

    optimized = optimize_convolutions(network)
    assert isinstance(optimized, torch.nn.Sequential)  # still the Sequential it was given

    kinds = [type(module) for module in optimized]
    assert kinds == [
        torch.nn.Conv2d,
        torch.nn.Identity,
        torch.nn.ReLU,
        torch.nn.Conv2d,
        torch.nn.Identity,
        torch.nn.ReLU,
        torch.nn.BatchNorm2d,
    ]
    convolutions = [module for module in optimized if isinstance(module, torch.nn.Conv2d)]
    assert all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convolutions)
    with torch.inference_mode():
        expected = reference(inputs)
        torch.testing.assert_close(optimized(inputs), expected, rtol=1e-5, atol=1e-5)
        laid_out = inputs.contiguous(memory_format=torch.channels_last)  # as ImageEncoder.collate gives
        torch.testing.assert_close(optimized(laid_out), expected, rtol=1e-5, atol=1e-5)


def test_a_batch_norm_in_training_mode_is_not_folded() -> None:
    network = _network()
    network[1].train()  # its statistics still move: not a fixed scale and shift

    optimized = optimize_convolutions(network)
    assert isinstance(optimized, torch.nn.Sequential)  # still the Sequential it was given

    assert isinstance(optimized[1], torch.nn.BatchNorm2d)  # kept
    assert isinstance(optimized[4], torch.nn.Identity)  # the eval-mode one is still folded
