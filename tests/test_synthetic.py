import numpy as np

from unetops.synthetic import synthetic_dataset


def test_same_seed_same_bytes_other_seed_different():
    first = [image.tobytes() for _, image, _, _ in synthetic_dataset(2, 64, seed=3)]
    again = [image.tobytes() for _, image, _, _ in synthetic_dataset(2, 64, seed=3)]
    other = [image.tobytes() for _, image, _, _ in synthetic_dataset(2, 64, seed=4)]
    assert first == again
    assert first != other


def test_cases_are_fundus_like():
    cases = list(synthetic_dataset(3, 96, seed=0))
    assert [case for case, *_ in cases] == ["syn000", "syn001", "syn002"]
    for _, image, mask, fov in cases:
        assert image.shape == (96, 96, 3) and image.dtype == np.uint8
        assert mask.dtype == bool and fov.dtype == bool
        assert 0.5 < fov.mean() < 0.75                      # a circle of radius ~0.46·size
        assert 0.005 < mask.mean() < 0.3                     # thin structures, but present
        assert not (mask & ~fov).any()                       # vessels only inside the FOV
        assert image[~fov].max() == 0
        green = image[..., 1].astype(float)
        assert green[mask].mean() < green[fov & ~mask].mean()  # vessels darker than background
