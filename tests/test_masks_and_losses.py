import pytest
import torch
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1

from nnunet_diffusion.core.losses import DiceFocalLoss
from nnunet_diffusion.core.masks import MaskCodec, noisy_mask_to_input


def test_labels_become_one_hot_including_background_in_minus_one_one():
    target = torch.tensor([0, 1, 2, 1]).reshape(1, 1, 4)
    x0 = MaskCodec(3).encode(target)
    assert x0.shape == (1, 3, 4)
    assert torch.equal(x0[0, :, 1], torch.tensor([-1.0, 1.0, -1.0]))
    assert torch.equal((x0 > 0).sum(1), torch.ones(1, 4, dtype=torch.long))


def test_masks_are_contiguous_so_noise_and_network_input_keep_nnunets_layout():
    """A channels-last x0 (one_hot(...).movedim) made randn_like and the first convolution ~4% slower on CPU."""
    target = torch.randint(0, 3, (2, 1, 5, 6, 7)).float()
    x0 = MaskCodec(3).encode(target)
    assert x0.is_contiguous() and x0.dtype == torch.float32
    assert torch.randn_like(x0).is_contiguous()


def test_ignored_voxels_are_background_in_mask_space():
    target = torch.tensor([0, 3, 2]).reshape(1, 1, 3)
    x0 = MaskCodec(3, ignore_label=3).encode(target)
    assert torch.equal(x0[0, :, 1], torch.tensor([1.0, -1.0, -1.0]))


def test_regions_drop_nnunets_ignore_channel():
    target = torch.tensor([[1, 0], [1, 1], [0, 1]]).reshape(1, 3, 2)  # 2 regions + ignore channel
    x0 = MaskCodec(2, "sigmoid").encode(target)
    assert torch.equal(x0, torch.tensor([[[1.0, -1.0], [1.0, 1.0]]]))


def test_label_outside_the_output_channels_is_a_clear_error():
    with pytest.raises(ValueError, match="label 4 but the network has 3 output channels"):
        MaskCodec(3).encode(torch.tensor([0, 4]).reshape(1, 1, 2))


@pytest.mark.parametrize("activation", ["softmax", "sigmoid"])
def test_decode_gives_soft_masks_in_minus_one_one(activation):
    logits = torch.randn(2, 3, 5, 5) * 5
    x0 = MaskCodec(3, activation).decode(logits)
    assert x0.min() >= -1 and x0.max() <= 1
    assert not torch.all(x0.abs() == 1)  # soft, not argmax
    if activation == "softmax":
        assert torch.allclose(((x0 + 1) / 2).sum(1), torch.ones(2, 5, 5))


def test_network_sees_noisy_masks_clipped_to_zero_one():
    assert torch.equal(noisy_mask_to_input(torch.tensor([-3.0, -1.0, 0.0, 2.0])), torch.tensor([0.0, 0.0, 0.5, 1.0]))


def _dice(regions: bool) -> MemoryEfficientSoftDiceLoss:
    return MemoryEfficientSoftDiceLoss(apply_nonlin=torch.sigmoid if regions else softmax_helper_dim1,
                                       batch_dice=False, do_bg=regions, smooth=1e-5)


def test_focal_loss_is_small_for_confident_right_and_large_for_confident_wrong_predictions():
    target = torch.randint(0, 3, (2, 1, 6, 6))
    onehot = torch.nn.functional.one_hot(target[:, 0], 3).movedim(-1, 1).float()
    loss = DiceFocalLoss(_dice(False), "softmax", focal_weight=20)
    right, wrong = loss(onehot * 20 - 10, target), loss(-onehot * 20 + 10, target)
    assert right < 0.05 and wrong > 100


def test_focal_loss_ignores_ignored_voxels():
    target = torch.tensor([[[[0, 1], [2, 2]]]])
    logits = torch.nn.functional.one_hot(torch.tensor([[[0, 1], [0, 0]]]), 3).movedim(-1, 1).float() * 20 - 10
    loss = DiceFocalLoss(_dice(False), "softmax", focal_weight=1, ignore_label=2)
    assert loss(logits, target) < 0.05  # the wrong voxels all carry the ignore label


def test_focal_loss_with_regions_and_ignore_channel():
    regions = torch.tensor([[[[1, 0], [0, 0]]], [[[1, 1], [1, 1]]]]).reshape(1, 2, 2, 2)  # region + ignore
    logits = torch.tensor([[[[10.0, -10.0], [-10.0, -10.0]]]])
    loss = DiceFocalLoss(_dice(True), "sigmoid", focal_weight=1, has_ignore_channel=True)
    assert torch.isfinite(loss(logits, regions))
    unmasked = DiceFocalLoss(_dice(True), "sigmoid", focal_weight=1)
    assert loss(logits, regions) < unmasked(-logits, regions[:, :1])
