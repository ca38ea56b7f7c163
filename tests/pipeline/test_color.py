import math

import torch
import torchvision.transforms.v2.functional as TF

from pipeline.color import IDENTITY, apply_color, gaussian_blur


def _params(n, **changes):
    names = ["brightness", "contrast", "saturation", "hue", "gray", "sigma", "solarize"]
    p = torch.tensor([IDENTITY] * n)
    for name, value in changes.items():
        p[:, names.index(name)] = torch.as_tensor(value, dtype=p.dtype)
    return p


def _images(n=4, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 0.8 + 0.1


def test_identity_params_leave_images_unchanged():
    x = _images()
    assert torch.equal(apply_color(x, _params(4)), x)


def test_brightness_contrast_saturation_match_torchvision():
    x = _images()
    assert torch.allclose(apply_color(x, _params(4, brightness=0.7)), TF.adjust_brightness(x, 0.7), atol=1e-6)
    assert torch.allclose(apply_color(x, _params(4, contrast=1.3)), TF.adjust_contrast(x, 1.3), atol=1e-5)
    assert torch.allclose(apply_color(x, _params(4, saturation=0.6)), TF.adjust_saturation(x, 0.6), atol=1e-5)


def test_per_image_parameters_apply_to_their_own_image():
    x = _images(3)
    out = apply_color(x, _params(3, brightness=[0.5, 1.0, 0.25]))
    assert torch.allclose(out, x * torch.tensor([0.5, 1.0, 0.25]).view(3, 1, 1, 1))


def test_hue_matches_torchvision_per_image():
    x = _images()
    x[0, :, :4] = 0.5                                # grey pixels: hue undefined, left unchanged
    x[1, 0, :4], x[1, 1, :4] = 0.9, 0.9              # ties between the maximal channels
    shifts = [0.05, -0.1, 0.5, 0.0]
    out = apply_color(x, _params(4, hue=shifts))
    for n, shift in enumerate(shifts):
        assert torch.allclose(out[n], TF.adjust_hue(x[n], shift), atol=1e-5)


def test_grayscale_blur_and_solarize():
    x = _images()
    gray = apply_color(x, _params(4, gray=1.0))
    assert torch.allclose(gray, TF.rgb_to_grayscale(x, 3), atol=1e-6)
    solar = apply_color(x, _params(4, solarize=1.0))
    assert torch.equal(solar, torch.where(x >= 0.5, 1 - x, x))
    # only the flagged images are blurred, each with its own sigma
    blurred = apply_color(x, _params(4, sigma=[0.0, 1.0, 0.0, 2.0]))
    assert torch.equal(blurred[[0, 2]], x[[0, 2]])
    assert blurred[3].std() < blurred[1].std() < x[1].std()


def test_gaussian_blur_is_a_normalised_gaussian():
    impulse = torch.zeros(2, 1, 21, 21)
    impulse[:, :, 10, 10] = 1
    out = gaussian_blur(impulse, torch.tensor([1.0, 2.0]))
    taps = torch.arange(-6, 7, dtype=torch.float32)
    for k, sigma in enumerate([1.0, 2.0]):
        g = torch.exp(-taps ** 2 / (2 * sigma ** 2))
        g /= g.sum()
        assert torch.allclose(out[k, 0, 4:17, 4:17], g[:, None] * g[None, :], atol=1e-6)
    flat = torch.full((1, 3, 9, 9), 0.3)
    assert torch.allclose(gaussian_blur(flat, torch.tensor([1.5])), flat)
    assert math.isclose(out.sum().item(), 2.0, rel_tol=1e-5)
