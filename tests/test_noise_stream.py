"""Issue 22 item 3: noise stream 2 (one counter-based draw per batch) and the Γ job's on-device sums.

Truth used here: a pure-Python SplitMix64 and ``math``'s log/cos/sin (the stream's definition,
computed independently of the torch code), scipy's KS test for N(0, 1), and the host-side
``GammaFile.add`` (the accumulation the Γ job used before) for the device sums.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats

from adpm_dist.diffusion import noise
from adpm_dist.diffusion.schedule import make_schedule
from adpm_dist.gamma import GammaFile, read_gamma
from adpm_dist.gamma.accumulate import DeviceSums
from adpm_dist.gamma.moments import pair_errors, pair_errors_device
from adpm_dist.stages import estimate, sample
from tests.estimate_helpers import save_tiny_model, tiny_job_inputs

pytestmark = pytest.mark.timeout(300)
M64 = (1 << 64) - 1


def _mix(z: int) -> int:
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _reference_row(key: int, stream: int, numel: int) -> list[float]:
    """The module doc's definition, in Python integers and ``math`` (float64)."""
    a = _mix(key ^ _mix(stream + 0xD1B54A32D192ED03))
    b = _mix(a ^ 0x8CB92BA72F3D8DD7)
    out = []
    for j in range((numel + 1) // 2):
        h = _mix(_mix(a + (j + 1) * 0x9E3779B97F4A7C15) ^ b)
        u = ((h >> 32) + 0.5) * 2.0 ** -32
        theta = 2 * math.pi * ((h & 0xFFFFFFFF) + 0.5) * 2.0 ** -32
        r = math.sqrt(-2 * math.log(u))
        out += [r * math.cos(theta), r * math.sin(theta)]
    return out[:numel]


def test_stream_2_is_its_definition():
    keys = [0, 1, 12345, (1 << 63) - 1, -1, -(1 << 63)]
    streams = [0, 1, 7, 1000, 3, 2]
    got = noise.counter_normal(keys, streams, (3, 5), torch.float64)  # 15 numbers: odd, last pair cut
    want = torch.tensor([_reference_row(k & M64, s, 15) for k, s in zip(keys, streams)], dtype=torch.float64)
    assert got.shape == (6, 3, 5)
    torch.testing.assert_close(got.reshape(6, -1), want, rtol=0, atol=1e-13)
    words = noise.row_words(torch.tensor(keys), torch.tensor(streams), 2)
    assert [w & M64 for w in words[:, 0].tolist()] == [
        _mix(_mix(_mix(k ^ _mix(s + 0xD1B54A32D192ED03)) + 0x9E3779B97F4A7C15)
             ^ _mix(_mix(k ^ _mix(s + 0xD1B54A32D192ED03)) ^ 0x8CB92BA72F3D8DD7)) for k, s in
        zip((k & M64 for k in keys), streams)]


def test_a_row_is_the_same_bits_in_any_batch_order_or_thread_count():
    keys, shape = noise.image_keys(range(100, 111)), (3, 17, 19)  # odd numel: vector tails everywhere
    whole = noise.counter_normal(keys, 4, shape, torch.float64)
    threads = torch.get_num_threads()
    try:
        for size, nthreads in ((3, 1), (5, 2), (1, 1)):
            torch.set_num_threads(nthreads)
            parts = [noise.counter_normal(keys[i:i + size], 4, shape, torch.float64)
                     for i in range(0, 11, size)]
            assert torch.equal(torch.cat(parts), whole)
    finally:
        torch.set_num_threads(threads)
    flipped = noise.counter_normal(keys.flip(0), 4, shape, torch.float64)
    assert torch.equal(flipped.flip(0), whole)
    assert torch.equal(noise.counter_normal(keys, 4, shape, torch.float32), whole.float())
    assert torch.equal(noise.CounterNoise(range(100, 111)).normal(shape, torch.float64, "cpu", 4), whole)


def test_normals_are_standard_and_independent_across_images_steps_and_elements():
    n_img, d = 1200, 256
    z = noise.CounterNoise(range(n_img))
    a, b = z.normal((d,), torch.float64, "cpu", 1).numpy(), z.normal((d,), torch.float64, "cpu", 2).numpy()
    flat = a.ravel()
    assert stats.kstest(flat, "norm").pvalue > 1e-3 and stats.kstest(b.ravel(), "norm").pvalue > 1e-3
    n = flat.size
    assert abs(flat.mean()) < 5 / math.sqrt(n) and abs(flat.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.kurtosis(flat)) < 5 * math.sqrt(24 / n)
    bound = 5 / math.sqrt(n)
    for x, y in ((a, b),  # steps
                 (a[:-1], a[1:]),  # neighbouring images (seeds i, i+1)
                 (a[:, :-1], a[:, 1:]),  # neighbouring elements (incl. each Box–Muller pair)
                 (a ** 2, b ** 2)):  # not merely uncorrelated: squares too
        r = np.corrcoef(x.ravel(), y.ravel())[0, 1]
        assert abs(r) < bound, r
    gamma_rows = noise.counter_normal(noise.pair_keys(0, torch.arange(n_img)), 1, (d,), torch.float64)
    assert abs(np.corrcoef(gamma_rows.numpy().ravel(), flat)[0, 1]) < bound  # Γ and sampling keys apart


def _batches(rng, n, count=6, size=13):
    sched = make_schedule("linear", n)
    for _ in range(count):
        t = torch.from_numpy(rng.integers(1, n + 1, size))
        t[0] = 1  # the decoder rows
        x0 = torch.from_numpy(rng.uniform(-1, 1, (size, 2, 3)))
        eps_true, eps_hat = torch.from_numpy(rng.normal(size=(size, 2, 3))), torch.from_numpy(
            rng.normal(size=(size, 2, 3)))
        values = torch.from_numpy(rng.uniform(0, 2, size))
        half = torch.from_numpy(rng.integers(0, 2, size))
        yield sched, t, x0, eps_true, eps_hat, values, half


def test_device_sums_equal_the_host_accumulation():
    """Γ's sums, counts and per-t moments (totals and half A) bit for bit; the three scalar
    statistics to float64 rounding (summed pair by pair instead of per batch)."""
    rng, n = np.random.default_rng(3), 10
    sched = make_schedule("linear", n)
    host = GammaFile.empty(sched, {"digest": "x"}, moments=True, halves=True)
    dev_file = GammaFile.empty(sched, {"digest": "x"}, moments=True, halves=True)
    first = pair_errors(sched, torch.zeros(2, 1), torch.tensor([1, 3]), torch.zeros(2, 1), torch.ones(2, 1))
    for gf in (host, dev_file):
        gf.add(np.array([1, 3]), np.array([0.5, 0.25]), first, half=np.array([0, 1]))
    acc = DeviceSums(dev_file, "cpu")  # starts from sums already there (a resumed job)
    for sched, t, x0, e, eh, v, half in _batches(rng, n):
        host.add(t.numpy(), v.numpy(), pair_errors(sched, x0, t, e, eh), half=half.numpy())
        acc.add(t, v, pair_errors_device(sched, x0, t, e, eh, t.numpy()), half=half)
    acc.sync()
    for got, want in ((dev_file, host), (dev_file.half, host.half)):
        for key in ("sum", "sum_sq", "count"):
            assert np.array_equal(getattr(got, key), getattr(want, key)), key
        assert got.count.dtype == np.int64
        assert np.array_equal(got.moments.per_t, want.moments.per_t)
        np.testing.assert_allclose(got.moments.scalars, want.moments.scalars, rtol=1e-14, atol=0)
        assert np.array_equal(got.moments.scalars[:, 2], want.moments.scalars[:, 2])


def test_pair_errors_on_the_device_are_the_host_numbers():
    rng = np.random.default_rng(4)
    for sched, t, x0, e, eh, _, _ in _batches(rng, 10, count=2):
        host = pair_errors(sched, x0.float(), t, e.float(), eh.float())
        dev = pair_errors_device(sched, x0.float(), t, e.float(), eh.float(), t.numpy())
        for key, v in host.items():
            np.testing.assert_array_equal(dev[key].numpy(), v)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_job_inputs(tmp_path_factory.mktemp("stream"))


def _est(setup, out, *extra):
    return ["--checkpoint", setup["model"], "--data", setup["data"], "--out", str(out), "--num-workers", "0",
            "--no-progress", "--timesteps", "1-3", "--flush-every", "1", "--data-batch", "8", *extra]


def test_gamma_job_records_its_stream_and_never_resumes_a_stream_1_partial_as_stream_2(
        setup, tmp_path, capsys, monkeypatch, one_thread):
    from adpm_dist.stages import job

    whole = tmp_path / "whole.json"
    assert estimate.main(_est(setup, whole, "--noise-stream", "1")) == 0
    assert read_gamma(str(whole), require_complete=False).extra["fingerprint"]["noise_stream"] == 1
    out = tmp_path / "g.json"
    monkeypatch.setenv(job.FAIL_RANK_ENV, "0:2")
    with pytest.raises(RuntimeError, match="injected failure"):
        estimate.main(_est(setup, out, "--noise-stream", "1"))
    monkeypatch.delenv(job.FAIL_RANK_ENV)
    state_file = tmp_path / "g.json.partial" / "rank-00000-of-00001.json"
    state = json.loads(state_file.read_text())
    del state["fingerprint"]["noise_stream"]  # as the version before stream 2 wrote it
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    assert estimate.main(_est(setup, out)) == 2  # the default, stream 2: a different job
    assert "noise_stream: 1 → 2" in capsys.readouterr().err
    assert estimate.main(_est(setup, out, "--noise-stream", "1")) == 0  # resumed as stream 1
    a, b = read_gamma(str(out), require_complete=False), read_gamma(str(whole), require_complete=False)
    for key in ("sum", "sum_sq", "count"):
        assert np.array_equal(getattr(a, key), getattr(b, key))
    other = tmp_path / "two.json"
    assert estimate.main(_est(setup, other)) == 0
    g2 = read_gamma(str(other), require_complete=False)
    assert g2.extra["fingerprint"]["noise_stream"] == 2 and not np.array_equal(g2.sum, b.sum)
    np.testing.assert_array_equal(g2.count, b.count)  # same pairs, other noise


def test_compile_flag_compiles_the_network_and_is_not_part_of_the_job(setup, tmp_path, monkeypatch,
                                                                     one_thread):
    calls = []

    def fake_compile(model, **kw):
        calls.append(type(model).__name__)
        return model

    monkeypatch.setattr(torch, "compile", fake_compile)
    out = tmp_path / "g.json"
    assert estimate.main(_est(setup, out, "--compile")) == 0
    assert len(calls) == 1
    assert "compile" not in read_gamma(str(out), require_complete=False).extra["fingerprint"]
    assert estimate.main(_est(setup, out)) == 0  # the same job: a no-op
    model = str(tmp_path / "tiny.safetensors")
    save_tiny_model(model, num_timesteps=20)
    argv = ["--checkpoint", model, "--method", "ddim", "--steps", "2", "--num-samples", "2", "--no-progress"]
    assert sample.main([*argv, "--out", str(tmp_path / "s"), "--compile"]) == 0 and len(calls) == 2
    job = json.loads((tmp_path / "s" / "job.json").read_text())
    assert job["noise_stream"] == 2 and "compile" not in job
    del job["noise_stream"]  # a folder written before stream 2 holds stream-1 images
    (tmp_path / "s" / "job.json").write_text(json.dumps(job))
    assert sample.main([*argv, "--out", str(tmp_path / "s")]) == 2
    assert sample.main([*argv, "--out", str(tmp_path / "s"), "--noise-stream", "1"]) == 0
