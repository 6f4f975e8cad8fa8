"""Each augmentation op against torchvision.transforms.v2.functional, and sampled parameters against torchvision's."""
import itertools

import pytest
import torch
import torchvision.transforms as T
from torchvision.transforms.v2 import functional as F

from augment import CIFAR10_MEAN, CIFAR10_STD, SimCLRAugment
from augment import ops
from augment.simclr import apply_jitter, sample_jitter

N = 48


@pytest.fixture
def images():
    x = torch.rand(N, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    x[:4] = x[:4, :1]  # some grey images: hue and saturation edge cases
    x[4] = 0.0
    return x


def max_err(mine, reference, images, params):
    out = mine(images, params)
    return max((reference(images[i], params[i].item()) - out[i]).abs().max().item() for i in range(len(images)))


def test_resized_crop_and_flip_match_torchvision(images):
    boxes = ops.sample_crop_boxes(N, 32, 32, generator=torch.Generator().manual_seed(1))
    flip = torch.arange(N) % 2 == 0
    out = ops.resized_crop(images, boxes, (32, 32), flip)
    for i in range(N):
        top, left, h, w = (int(v) for v in boxes[i])
        ref = F.resized_crop(images[i], top, left, h, w, [32, 32], antialias=True)
        ref = F.horizontal_flip(ref) if flip[i] else ref
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def test_resized_crop_of_a_tiny_box_and_the_full_image(images):
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0], [31.0, 31.0, 1.0, 1.0], [5.0, 0.0, 3.0, 32.0]])
    out = ops.resized_crop(images[:3], boxes, (32, 32))
    torch.testing.assert_close(out[0], images[0])
    assert torch.allclose(out[1], images[1, :, 31:, 31:].expand(3, 32, 32))
    torch.testing.assert_close(out[2], F.resized_crop(images[2], 5, 0, 3, 32, [32, 32], antialias=True), atol=1e-5,
                               rtol=0)


@pytest.mark.parametrize("op, name", [(0, "brightness"), (1, "contrast"), (2, "saturation")])
def test_blend_ops_match_torchvision(images, op, name):
    """The colour-jitter step SimCLRAugment runs (one blend per sample, op chosen per sample) against torchvision."""
    from augment.simclr import _blend_step

    factors = torch.rand(N, generator=torch.Generator().manual_seed(2)) * 2
    mine = lambda x, f: _blend_step(x, torch.full((x.shape[0],), op), f)  # noqa: E731
    assert max_err(mine, getattr(F, f"adjust_{name}"), images, factors) < 1e-6


def test_hue_matches_torchvision(images):
    factors = torch.rand(N, generator=torch.Generator().manual_seed(3)) - 0.5
    assert max_err(ops.adjust_hue, F.adjust_hue, images, factors) < 1e-5


def test_grayscale_solarize_blur_normalize_match_torchvision(images):
    torch.testing.assert_close(ops.grayscale(images), F.rgb_to_grayscale(images), atol=1e-6, rtol=0)
    torch.testing.assert_close(ops.solarize(images, 0.5), F.solarize(images, 0.5))
    sigma = torch.rand(N, generator=torch.Generator().manual_seed(4)) * 1.9 + 0.1
    out = ops.gaussian_blur(images, sigma, 3)
    for i in range(N):
        torch.testing.assert_close(out[i], F.gaussian_blur(images[i], [3, 3], [sigma[i].item()] * 2), atol=1e-6,
                                   rtol=0)
    torch.testing.assert_close(ops.normalize(images, CIFAR10_MEAN, CIFAR10_STD),
                               F.normalize(images, list(CIFAR10_MEAN), list(CIFAR10_STD)), atol=1e-6, rtol=0)


def test_jitter_in_each_sampled_order_equals_the_ops_applied_in_that_order(images):
    p = sample_jitter(N, strength=0.5, prob=1.0, g=torch.Generator().manual_seed(5))
    out = apply_jitter(images, p)
    names = ["brightness", "contrast", "saturation"]
    for i in range(N):
        order = [names[k] for k in p.blend_order[i].tolist()]
        order.insert(int(p.hue_position[i]), "hue")
        ref = images[i]
        for name in order:
            ref = getattr(F, f"adjust_{name}")(ref, getattr(p, name)[i].item())
        torch.testing.assert_close(out[i], ref, atol=1e-5, rtol=0)


def ks_statistic(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov distance between empirical distributions."""
    grid = torch.cat([a, b]).double().sort().values
    cdf = lambda x: torch.searchsorted(x.double().sort().values, grid, right=True) / len(x)
    return (cdf(a) - cdf(b)).abs().max().item()


def test_crop_parameters_follow_random_resized_crop():
    n = 4000
    torch.manual_seed(0)
    theirs = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(3, 32, 32), (0.08, 1.0), (3 / 4, 4 / 3))
                           for _ in range(n)], dtype=torch.float32)
    ours = ops.sample_crop_boxes(n, 32, 32, generator=torch.Generator().manual_seed(1))
    # 4,000 samples each: two-sample KS critical value at p = 0.001 is 1.95 x sqrt(2 / 4000) = 0.044
    for col, what in enumerate(["top", "left", "height", "width"]):
        assert ks_statistic(ours[:, col], theirs[:, col]) < 0.044, what
    area = lambda b: b[:, 2] * b[:, 3]
    assert ks_statistic(area(ours), area(theirs)) < 0.044
    inside = (ours[:, 0] + ours[:, 2] <= 32) & (ours[:, 1] + ours[:, 3] <= 32) & (ours[:, 2:] >= 1).all(dim=1)
    assert bool(inside.all())


def test_fallback_is_the_centre_crop():
    boxes = ops.sample_crop_boxes(64, 32, 32, scale=(2.0, 3.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(boxes, torch.tensor([[0.0, 0.0, 32.0, 32.0]]).expand(64, 4))


@pytest.mark.parametrize("s", [0.5, 1.0, 2.0, 2.5])  # above 1.25 the brightness range 0.8 s passes 1
def test_jitter_parameters_follow_color_jitter(s):
    n = 4000
    torch.manual_seed(0)
    jitter = T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
    draws = [jitter.get_params(jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) for _ in range(n)]
    ours = sample_jitter(n, s, prob=1.0, g=torch.Generator().manual_seed(1))
    for k, name in enumerate(["brightness", "contrast", "saturation", "hue"], start=1):
        theirs = torch.tensor([d[k] for d in draws])
        assert ks_statistic(getattr(ours, name), theirs) < 0.044, name
    # every one of the 24 orders of the four ops is about equally likely, as with torch.randperm(4)
    orders = [tuple(o.tolist()[:q] + [3] + o.tolist()[q:]) for o, q in zip(ours.blend_order, ours.hue_position)]
    counts = {perm: orders.count(perm) for perm in itertools.permutations(range(4))}
    chi2 = sum((c - n / 24) ** 2 / (n / 24) for c in counts.values())
    assert len(counts) == 24 and chi2 < 49.7  # chi-square, 23 degrees of freedom, p = 0.001


def test_application_probabilities():
    n = 20000
    p = sample_jitter(n, 0.5, prob=0.8, g=torch.Generator().manual_seed(0))
    assert abs(p.applied.float().mean().item() - 0.8) < 0.015
    assert bool((p.brightness[~p.applied] == 1).all() and (p.hue[~p.applied] == 0).all())


def test_pipeline_defaults_shapes_determinism_and_inputs_untouched():
    aug = SimCLRAugment()
    assert (aug.strength, aug.min_scale, aug.gray_prob, aug.blur_prob, aug.mean) == (0.5, 0.08, 0.2, 0.0, CIFAR10_MEAN)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    before = images.clone()
    v1, v2 = aug(images, torch.Generator().manual_seed(0))
    w1, w2 = aug(images, torch.Generator().manual_seed(0))
    assert v1.shape == (16, 3, 32, 32) and v1.dtype == torch.float32
    assert torch.equal(v1, w1) and torch.equal(v2, w2) and not torch.equal(v1, v2)
    assert torch.equal(images, before)
    assert torch.isfinite(v1).all()


def test_pipeline_normalizes_to_the_given_statistics():
    aug = SimCLRAugment(strength=0.0, min_scale=1.0, gray_prob=0.0, jitter_prob=0.0, mean=(0.5,) * 3, std=(0.25,) * 3)
    flat = torch.full((4, 3, 32, 32), 191, dtype=torch.uint8)
    v1, _ = aug(flat)
    torch.testing.assert_close(v1, torch.full_like(v1, (191 / 255 - 0.5) / 0.25))


def test_pipeline_with_blur_and_solarize_runs_and_stays_finite():
    aug = SimCLRAugment(strength=1.0, blur_prob=0.5, solarize_prob=0.2)
    v1, v2 = aug(torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8), torch.Generator().manual_seed(0))
    assert torch.isfinite(v1).all() and torch.isfinite(v2).all()


def test_strength_outside_hue_range_is_refused():
    with pytest.raises(ValueError):
        SimCLRAugment(strength=3.0)


def test_padded_crop_flip_matches_torchvision():
    images = torch.randint(0, 256, (N, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    offsets, flip = ops.sample_crop_flip(N, 4, torch.Generator().manual_seed(4))
    out = ops.padded_crop_flip(images, 4, offsets, flip)
    assert out.dtype == torch.uint8 and out.shape == images.shape
    for i in range(N):
        top, left = offsets[i].tolist()
        expected = F.crop(F.pad(images[i], [4]), top, left, 32, 32)  # RandomCrop(32, padding=4): zero padding
        expected = F.horizontal_flip(expected) if flip[i] else expected
        assert torch.equal(out[i], expected), i
    assert 0 <= offsets.min() and offsets.max() <= 8 and set(offsets.unique().tolist()) == set(range(9))
    assert 0 < flip.sum() < N


def test_sharded_views_equal_the_whole_batch():
    """N ranks augmenting their shards with the same seed make exactly the views of one process on the whole batch."""
    aug = SimCLRAugment(strength=1.0, blur_prob=0.5, solarize_prob=0.2)
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    whole = aug(images, torch.Generator().manual_seed(6))
    for world in (2, 3):
        shards = [aug(images[r * 12 // world:(r + 1) * 12 // world], torch.Generator().manual_seed(6), shard=(r, world))
                  for r in range(world)]
        for view in (0, 1):
            assert torch.equal(torch.cat([s[view] for s in shards]), whole[view])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_augmentation_equals_eager_on_the_gpu():
    """SimCLRAugment.compile() (used with train.compile) fuses the ops; the views must not change beyond rounding,
    and CUDA views must match the CPU ones."""
    images = torch.randint(0, 256, (256, 3, 32, 32), dtype=torch.uint8)
    augment = SimCLRAugment(blur_prob=0.5, solarize_prob=0.2)
    params = augment.sample(256, 32, 32, torch.Generator().manual_seed(0))
    x = images.float() / 255
    on_cpu = augment.apply(x, params)
    eager = augment.apply(x.cuda(), params.to("cuda"))
    compiled = SimCLRAugment(blur_prob=0.5, solarize_prob=0.2).compile().apply(x.cuda(), params.to("cuda"))
    assert (eager.cpu() - on_cpu).abs().max() < 1e-4
    assert (compiled - eager).abs().max() < 1e-4



def test_without_the_crop_each_view_is_the_whole_image_or_its_mirror():
    """aug.crop=false: no resampling at all; with colour off, every view is exactly the image or its flip, and both
    occur."""
    aug = SimCLRAugment(jitter_prob=0.0, gray_prob=0.0, mean=(0.0,) * 3, std=(1.0,) * 3, crop=False)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    x = images.float() / 255
    flipped = []
    for view in aug(images, torch.Generator().manual_seed(0)):
        same = (view == x).flatten(1).all(1)
        mirrored = (view == x.flip(-1)).flatten(1).all(1)
        assert bool((same | mirrored).all())
        flipped.append(mirrored.float().mean().item())
    assert all(0.25 < share < 0.75 for share in flipped)
    cropped = SimCLRAugment(jitter_prob=0.0, gray_prob=0.0, mean=(0.0,) * 3, std=(1.0,) * 3)(
        images, torch.Generator().manual_seed(0))[0]
    exact = ((cropped == x) | (cropped == x.flip(-1))).flatten(1).all(1)
    assert exact.float().mean() < 0.1  # the default crops (a whole-image box, the fallback, leaves a few intact)


def test_small_views_shapes_scales_and_shards():
    """Multi-crop: K views per image at local_size, crop-major, crops within the local scale range; N processes'
    shards are rows of one process's views of the whole batch, global and small views alike."""
    aug = SimCLRAugment(local_crops=3, local_size=16, local_scale=(0.05, 0.4))
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    v1, v2 = aug(images, g)
    small = aug.local(images, g)
    assert v1.shape == (8, 3, 32, 32) and small.shape == (24, 3, 16, 16) and torch.isfinite(small).all()
    boxes = aug.sample(10_000, 32, 32, torch.Generator().manual_seed(1), scale=aug.local_scale).boxes
    area = boxes[:, 2] * boxes[:, 3] / 32 ** 2
    assert 0.05 - 0.02 <= area.min() and area.max() <= 0.4 + 0.02 and area.mean() < 0.3  # sides are whole pixels
    for rank in range(2):
        g = torch.Generator().manual_seed(0)
        rows = slice(4 * rank, 4 * rank + 4)
        s1, s2 = aug(images[rows], g, shard=(rank, 2))
        shard_small = aug.local(images[rows], g, shard=(rank, 2))
        torch.testing.assert_close(s1, v1[rows], rtol=0, atol=0)
        torch.testing.assert_close(s2, v2[rows], rtol=0, atol=0)
        torch.testing.assert_close(shard_small, small.unflatten(0, (3, 8))[:, rows].flatten(0, 1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="local crops need the crop"):
        SimCLRAugment(local_crops=2, crop=False)
