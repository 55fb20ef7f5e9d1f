"""LDM song metrics: FID variants, n-grams, SSM/SRS, truncation, diversity, length, memorisation."""

import copy
import math
import random

import numpy as np
import pytest

from phraseldm_jax import phrases
from phraseldm_jax.metrics import ldm
from phraseldm_jax.remiz import MultiTrack


def _anisotropic(rng, n, d=16, scales=None):
    scales = np.logspace(-2, 0.5, d) if scales is None else scales
    rotation = np.linalg.qr(np.random.default_rng(99).standard_normal((d, d)))[0]
    return ((rng.standard_normal((n, d)) * scales) @ rotation).astype(np.float32)


def _songs_from_bars(*bar_vectors):
    """Phrase latents [4 * B, D] whose 4 phrases per bar all equal the given bar vector."""
    return np.repeat(np.asarray(bar_vectors, np.float64), 4, axis=0)


# ----------------------------------------------------------------------------- FID


def test_fid_of_a_set_with_itself():
    x = _anisotropic(np.random.default_rng(0), 3000, d=64)
    assert abs(ldm.frechet_distance(x, x)) < 1e-6
    # The original's lower-triangle float32 variant is only approximately 0.
    assert abs(ldm.frechet_distance(x, x, reference_variant=True)) < 0.05


def test_fid_closed_form_for_commuting_covariances():
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1.0 + 4.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = ldm.frechet_distance_from_stats(mu_a, np.diag(a), mu_b, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-12)


def test_trace_sqrt_product_equals_sum_of_sqrt_eigenvalues_of_the_product():
    rng = np.random.default_rng(1)
    cov_a = np.cov(_anisotropic(rng, 400, d=8), rowvar=False)
    cov_b = np.cov(rng.standard_normal((400, 8)) @ rng.standard_normal((8, 8)), rowvar=False)
    product = cov_a @ cov_b
    assert not np.allclose(product, product.T)  # a genuinely non-symmetric product
    expected = np.sqrt(np.linalg.eigvals(product).real.clip(0)).sum()
    assert ldm.trace_sqrt_product(cov_a, cov_b) == pytest.approx(expected, rel=1e-9)


def test_reference_variant_reads_only_the_lower_triangle():
    cov_a = np.array([[2.0, 1.0], [1.0, 2.0]])
    cov_b = np.array([[1.0, 0.0], [0.0, 3.0]])
    # A B = [[2, 3], [1, 6]]: eigh sees [[2, 1], [1, 6]] (eigenvalues 4 +- sqrt 5), while the
    # true product has eigenvalues 4 +- sqrt 7.
    lower = math.sqrt(4 + math.sqrt(5)) + math.sqrt(4 - math.sqrt(5))
    true = math.sqrt(4 + math.sqrt(7)) + math.sqrt(4 - math.sqrt(7))
    assert ldm.reference_trace_sqrt_product(cov_a, cov_b) == pytest.approx(lower, rel=1e-6)
    assert ldm.trace_sqrt_product(cov_a, cov_b) == pytest.approx(true, rel=1e-12)
    # And the 1e-12 eigenvalue clamp: a zero covariance contributes sqrt(1e-12) per dim.
    assert ldm.reference_trace_sqrt_product(np.zeros((3, 3)), np.eye(3)) == pytest.approx(3e-6)


def test_reference_variant_matches_the_original_torch_computation():
    torch = pytest.importorskip("torch", reason="compares with the original's torch code path")
    rng = np.random.default_rng(2)
    a, b = _anisotropic(rng, 600), _anisotropic(rng, 500, scales=np.linspace(0.2, 2.0, 16))

    def torch_fid(x, y):  # FACTS 2.2, step by step
        x, y = torch.from_numpy(x), torch.from_numpy(y)
        mx, my = x.mean(0), y.mean(0)
        cx = (x - mx).T @ (x - mx) / (len(x) - 1)
        cy = (y - my).T @ (y - my) / (len(y) - 1)
        vals, vecs = torch.linalg.eigh(cx @ cy)
        root = (vecs * vals.clamp(min=1e-12).sqrt().unsqueeze(0)) @ vecs.T
        return (torch.sum((mx - my) ** 2) + torch.trace(cx + cy - 2 * root)).item()

    expected = torch_fid(a, b)
    assert ldm.frechet_distance(a, b, reference_variant=True) == pytest.approx(expected, rel=2e-4)
    assert ldm.frechet_distance(a, b) != pytest.approx(expected, rel=1e-3)  # the bug matters


def test_fid_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2 feature rows"):
        ldm.frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))


def test_ngram_vectors_are_consecutive_windows_in_time_order():
    song = np.arange(10, dtype=np.float32).reshape(5, 2)  # rows [0,1], [2,3], ...
    grams = ldm.ngram_vectors([song, song[:2]], n=3)  # the 2-row song is too short
    np.testing.assert_array_equal(grams[0], [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(grams[-1], [4, 5, 6, 7, 8, 9])
    assert grams.shape == (3, 6)
    with pytest.raises(ValueError, match="at least 4 phrases"):
        ldm.ngram_vectors([song[:3]], n=4)


def test_phrase_fid_and_all_ngram_fids():
    rng = np.random.default_rng(3)
    real = [_anisotropic(rng, 40) for _ in range(6)]
    fake = [_anisotropic(rng, 36) + 0.3 for _ in range(5)]
    fids = ldm.all_ngram_fids(real, fake, ns=(1, 2, 4))
    assert set(fids) == {"fid_1gram", "fid_2gram", "fid_4gram"}
    assert fids["fid_1gram"] == pytest.approx(ldm.phrase_fid(real, fake))
    assert fids["fid_1gram"] > 16 * 0.3**2 * 0.9  # at least about the mean shift


def test_song_latents_slices_by_bars_and_drops_empty_songs():
    latents = np.zeros((3, 16, 2))
    songs = ldm.song_latents(latents, [2, 0, 10])
    assert [s.shape for s in songs] == [(8, 2), (16, 2)]  # 40 rows capped at 16
    with pytest.raises(ValueError, match="do not match"):
        ldm.song_latents(latents, [1, 2])


# ----------------------------------------------------------------------------- SSM and SRS


def test_bar_ssm_is_cosine_of_bar_means():
    z = np.array(
        [
            [1, 0],
            [1, 0],
            [1, 2],
            [1, -2],
            [0, 3],
            [0, 3],
            [0, 3],
            [0, 3],
            [0, 0],
            [0, 0],
            [0, 0],
            [0, 0],
        ],
        float,
    )
    ssm = ldm.bar_ssm(z)
    np.testing.assert_allclose(ssm, [[1, 0, 0], [0, 1, 0], [0, 0, 0]], atol=1e-12)
    with pytest.raises(ValueError, match="multiple of 4"):
        ldm.bar_ssm(np.zeros((6, 2)))


def test_srs_verified_examples():
    e = np.eye(8)
    repeat = _songs_from_bars(e[0], e[1], e[2], e[3], e[0], e[1], e[2], e[3])
    assert ldm.section_recurrence_score(repeat) == 0.5  # one clean 4-bar repeat at offset 4
    assert ldm.section_recurrence_score(_songs_from_bars(*[e[0]] * 8)) == 0.0  # all-ones SSM
    assert ldm.section_recurrence_score(_songs_from_bars(e[0])) == 0.0  # B = 1
    assert ldm.mean_section_recurrence_score([repeat, _songs_from_bars(e[0])]) == 0.25


def test_srs_cancel_rule_on_hand_made_ssm():
    ssm = np.eye(8)
    for i in range(4):
        ssm[i, i + 4] = 0.9
    assert ldm.recurrence_score_from_ssm(ssm) == 0.5
    below = ssm.copy()
    below[1, 1 + 3] = 0.9  # a bright cell on diagonal k - 1 does not cancel
    assert ldm.recurrence_score_from_ssm(below) == 0.5
    above = ssm.copy()
    above[2, 2 + 5] = 0.9  # one on diagonal k + 1 within the run's rows does
    assert ldm.recurrence_score_from_ssm(above) == 0.0
    assert ldm.recurrence_score_from_ssm(ssm, min_run_length=5) == 0.0
    assert ldm.recurrence_score_from_ssm(ssm, threshold=0.95) == 0.0


def _srs_loop(ssm, threshold, min_run):
    """FACTS 2.5 written as plain loops."""
    n = len(ssm)
    total = 0
    for k in range(1, n):
        diag = [ssm[i, i + k] > threshold for i in range(n - k)]
        i = 0
        while i < len(diag):
            if not diag[i]:
                i += 1
                continue
            start = i
            while i < len(diag) and diag[i]:
                i += 1
            if i - start < min_run:
                continue
            if k < n - 1:
                above = [ssm[j, j + k + 1] > threshold for j in range(start, min(i, n - k - 1))]
                if any(above):
                    continue
            total += i - start
    return total / n if n else 0.0


def test_srs_matches_the_plain_loop_on_random_ssms():
    rng = np.random.default_rng(4)
    for _ in range(60):
        n = int(rng.integers(1, 24))
        ssm = rng.random((n, n)) ** 0.3
        ssm = (ssm + ssm.T) / 2
        thr, run = float(rng.choice([0.5, 0.7, 0.8])), int(rng.integers(1, 5))
        assert ldm.recurrence_score_from_ssm(ssm, thr, run) == pytest.approx(
            _srs_loop(ssm, thr, run)
        )


def test_bright_ratio_of_constant_latents():
    assert ldm.bright_ratio(np.ones((32, 4))) == 28 / 8


# ----------------------------------------------------------------------------- truncation


def test_truncate_by_self_similarity_fixed_and_reference():
    e = np.eye(12)
    pad = e[11]
    real = [e[k] for k in range(10)]
    no_padding = _songs_from_bars(*real)
    z, bars = ldm.truncate_by_self_similarity(no_padding)
    assert bars == 10 and z.shape == (40, 12)
    assert ldm.truncate_by_self_similarity(no_padding, reference_behaviour=True)[1] == 9

    padded = _songs_from_bars(*real[:6], pad, pad, pad, pad)
    assert ldm.truncate_by_self_similarity(padded)[1] == 6
    assert ldm.truncate_by_self_similarity(padded, reference_behaviour=True)[1] == 6

    # An early bar that looks like the padding cuts the original short.
    early = _songs_from_bars(real[0], pad, *real[2:6], pad, pad)
    assert ldm.truncate_by_self_similarity(early)[1] == 6
    assert ldm.truncate_by_self_similarity(early, reference_behaviour=True)[1] == 4

    short = _songs_from_bars(real[0], real[1])
    z, bars = ldm.truncate_by_self_similarity(short)
    assert bars == 2 and len(z) == 8
    z, bars = ldm.truncate_by_self_similarity(short, reference_behaviour=True)
    assert bars == 4 and len(z) == 8  # reports 4 bars, returns what there is


# ----------------------------------------------------------------------------- diversity, length


def test_diversity():
    assert ldm.diversity([np.array([[0.0, 0.0], [3.0, 4.0]])]) == pytest.approx(5.0)
    a, b = [1.0, 2.0], [4.0, 6.0]
    assert ldm.diversity([np.array([a, a]), np.array([b])]) == pytest.approx(10 / 3)
    assert ldm.diversity([np.array([a, a]), np.array([b])], exclude_zero=True) == pytest.approx(5)
    assert ldm.diversity([np.array([a])]) == 0.0 and ldm.diversity([]) == 0.0


def test_diversity_matches_brute_force_across_chunks():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1300, 6)) * 3
    x[100:150] = x[0]  # duplicates, which must contribute exactly zero
    i, j = np.triu_indices(len(x), k=1)
    dist = np.linalg.norm(x[i] - x[j], axis=1)
    songs = [x[:700], x[700:]]
    assert ldm.diversity(songs) == pytest.approx(dist.mean(), rel=1e-9)
    assert ldm.diversity(songs, exclude_zero=True) == pytest.approx(dist[dist > 0].mean(), rel=1e-9)


def test_length_accuracy():
    assert phrases.length_bucket_range(64) == (60, 70)
    assert phrases.length_bucket_range(128) == (120, 130)
    assert ldm.length_accuracy([59, 60, 64, 69, 70]) == pytest.approx(3 / 5)
    assert ldm.length_accuracy([31, 35], target_bars=32) == 1.0 and ldm.length_accuracy([]) == 0.0


# ----------------------------------------------------------------------------- memorisation


def test_word_error_rate_small_examples():
    assert ldm.word_error_rate("a b c d", "a x c") == 0.5  # one substitution, one deletion
    assert ldm.word_error_rate("a b", "a b c d") == 1.0  # two insertions
    assert ldm.word_error_rate("a", "b c d") == 3.0  # WER can exceed 1
    assert ldm.word_error_rate("i-13 o-0 p-60 d-12 b-1", "i-13 o-0 p-60 d-12 b-1") == 0.0
    with pytest.raises(ValueError, match="no tokens"):
        ldm.word_error_rate("", "a")


def test_packed_edit_distances_match_the_dp_at_word_boundaries():
    rng = random.Random(6)
    for _ in range(40):
        alphabet = list("abcd")[: rng.randint(1, 4)]
        refs = {
            f"s{k}": " ".join(rng.choice(alphabet) for _ in range(rng.choice([1, 63, 64, 65, 130])))
            for k in range(rng.randint(1, 5))
        }
        hyp = [rng.choice(alphabet + ["z"]) for _ in range(rng.randint(0, 140))]
        got = ldm.MelodyReference.build(refs).edit_distances(" ".join(hyp))
        expected = [ldm.edit_distance(r.split(), hyp) for r in refs.values()]
        assert list(got) == expected


def _melody(rng, n_bars):
    tokens = []
    for _ in range(n_bars):
        if rng.random() < 0.9:
            tokens.append("i-13")
            for onset in sorted(rng.sample(range(0, 48, 3), rng.randint(2, 5))):
                tokens += [f"o-{onset}", f"p-{rng.randint(60, 84)}", f"d-{rng.choice([3, 6, 12])}"]
        tokens.append("b-1")
    return " ".join(tokens)


def test_memorisation_finds_the_copied_song():
    rng = random.Random(7)
    songs = {f"pop909/{k:03d}": _melody(rng, rng.randint(8, 20)) for k in range(30)}
    reference = ldm.MelodyReference.build(songs)
    copied = songs["pop909/017"].split()
    for k in (3, 10, 25):
        copied[k] = "p-99"  # three substitutions
    novel = _melody(rng, 12)
    result = ldm.memorisation_metrics([" ".join(copied), novel], reference)

    assert result["nearest_song_ids"][0] == "pop909/017"
    wers = [ldm.word_error_rate(s, novel) for s in songs.values()]
    w1, w2 = sorted(wers)[:2]
    assert result["mem_rates"] == pytest.approx([1 - 3 / len(copied), 1 - w1])
    assert result["top2_ratios"][1] == pytest.approx(w1 / w2)
    assert result["top2_ratios"][0] < 1 / 3 < result["top2_ratios"][1]
    assert result["new_sample_flags"] == [0, 1]
    assert result["avg_new_sample_rate"] == 0.5
    assert result["avg_mem_rate"] == pytest.approx(np.mean(result["mem_rates"]))


def test_memorisation_with_a_single_reference_and_bad_references():
    reference = ldm.MelodyReference.build({"only": "i-13 o-0 p-60 d-12 b-1"})
    result = ldm.memorisation_metrics(["b-1"], reference)
    assert result["top2_ratios"] == [0.0] and result["mem_rates"] == [1 - 4 / 5]
    with pytest.raises(ValueError, match="'empty' has no tokens"):
        ldm.MelodyReference.build({"fine": "b-1", "empty": "  "})


def test_melody_string_does_not_mutate_the_multitrack():
    text = (
        "i-0 o-0 p-48 d-12 i-13 o-0 p-72 d-6 o-12 p-74 d-6 b-1 "
        "i-25 o-0 p-55 d-24 b-1 "
        "i-13 o-24 p-76 d-12 i-0 o-0 p-40 d-48 b-1"
    )
    multitrack = MultiTrack.from_remiz_str(text, verbose=False)
    before = multitrack.to_remiz_str()
    melody = ldm.melody_string(multitrack)
    assert melody == "i-13 o-0 p-72 d-6 o-12 p-74 d-6 b-1 b-1 i-13 o-24 p-76 d-12 b-1"
    assert multitrack.to_remiz_str() == before
    # What the original computes, by filtering a copy in place.
    original = copy.deepcopy(multitrack)
    original.filter_tracks(insts=[13])
    assert melody == original.to_remiz_str()
    assert ldm.melody_strings_from_texts([text]) == [melody]
