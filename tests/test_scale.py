"""``benchmarks.scale``'s model: its memory formula against XLA's own count of a build's temporaries, the exponent
fit on exact power laws, and the projection's search for the largest n that fits."""

from __future__ import annotations

import pytest

from benchmarks import scale


@pytest.mark.parametrize("n, c, d", [(512, 32, 16), (256, 64, 16)])
def test_the_whole_gram_memory_model_matches_the_compiled_build(n, c, d):
  # Shapes where the Grams dominate (at a few MB the other buffers weigh in and the model reads 30% high).
  compiled = scale.compiled_temp_bytes(n, c, d)
  assert scale.build_bytes(n, c, d, scale.Q, inputs=False) == pytest.approx(compiled, rel=0.25)


def test_streamed_builds_stay_within_the_budget_plus_the_output_gram():
  n, c, d = 2048, 64, 16  # c n^2 floats = 1 GiB > the 256 MiB budget: streamed
  assert c * n * n * 4 > scale.hj.problem.DEFAULT_BLOCK_BYTES
  assert scale.compiled_temp_bytes(n, c, d) <= scale.build_bytes(n, c, d, scale.Q, inputs=False)


def test_exponent_fit_recovers_power_laws():
  ns = [64, 128, 256, 512]
  assert scale.fit_exponent(ns, [3.0 * n**2 for n in ns]) == pytest.approx(2.0)
  assert scale.fit_exponent(ns, [0.5 * n**1.5 for n in ns]) == pytest.approx(1.5)


def test_largest_n_is_the_last_multiple_of_64_that_fits():
  layers = [("a", 64, 49, 100)]
  per_image = 1e6
  n = scale.largest_n(2e9, per_image, layers)
  need = lambda m: m * per_image + scale.build_bytes(m, 64, 49, 100, inputs=False)  # noqa: E731
  assert n % 64 == 0 and need(n) <= 2e9 < need(n + 64)
  assert scale.largest_n(1e6, per_image, layers) == 0  # not even 64 images


def test_channel_split_intensity_by_hand():
  # 2 c n^2 (d + c) / D FLOPs over 4 n c d (D - 1) / D bytes = n (c + d) / (2 d (D - 1)).
  assert scale.intensity(1024, 512, 49, 8) == pytest.approx(1024 * (512 + 49) / (2 * 49 * 7))
