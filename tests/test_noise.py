import torch

from lightning_modules.noise import annealed_strength, pyramid_noise


def test_shape_dtype_unit_std():
    x = pyramid_noise((2, 4, 48, 64), 0.9, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 4, 48, 64) and x.dtype == torch.float32
    assert abs(x.std().item() - 1.0) < 1e-5
    assert torch.isfinite(x).all()
    y = pyramid_noise((1, 4, 8, 8), 0.9, dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16


def test_deterministic_with_generator():
    a = pyramid_noise((2, 4, 32, 32), 0.9, generator=torch.Generator().manual_seed(7))
    b = pyramid_noise((2, 4, 32, 32), 0.9, generator=torch.Generator().manual_seed(7))
    c = pyramid_noise((2, 4, 32, 32), 0.9, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_pyramid_adds_low_frequency_correlation():
    x = pyramid_noise((8, 4, 64, 64), 0.9, generator=torch.Generator().manual_seed(0))
    g = torch.randn(8, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    neighbour_corr = lambda t: torch.corrcoef(torch.stack([t[..., :-1].flatten(), t[..., 1:].flatten()]))[0, 1]
    assert neighbour_corr(x) > 0.15 and abs(neighbour_corr(g)) < 0.05


def test_annealed_strength_zero_is_normalised_gaussian_pair():
    t = torch.tensor([0, 500, 999])
    s = annealed_strength(t)
    assert torch.allclose(s, torch.tensor([0.0, 0.45, 0.8991]))
    shape = (1, 4, 16, 16)
    x = pyramid_noise(shape, annealed_strength(torch.zeros(1)), generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(shape, generator=gen)
    torch.rand((), generator=gen)  # level-0 ratio draw
    expected = base + torch.randn(shape, generator=gen)  # level 0: second full-res Gaussian, weight s**0 = 1
    assert torch.allclose(x, expected / expected.std(), atol=1e-6)


def test_per_sample_strength():
    shape = (2, 4, 32, 32)
    x = pyramid_noise(shape, torch.tensor([0.0, 0.9]), generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(shape, generator=gen)
    torch.rand((), generator=gen)
    plain = base + torch.randn(shape, generator=gen)
    # sample 0 has strength 0: equal to the plain pair up to the shared global normalisation
    ratio = x[0] / plain[0]
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio), rtol=1e-4)
    assert not torch.allclose(x[1] / plain[1], (x[1] / plain[1]).flatten()[0].expand_as(x[1]), rtol=1e-2)
