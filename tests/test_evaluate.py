"""`painter.evaluation.metrics` (FID, IS, extractors), `painter.evaluation.judge` (caption accuracy), VQGAN reconstruction, and
`painter evaluate`."""
from __future__ import annotations

import io
import json
import os
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch

from painter.cli import main as cli
from painter.evaluation import synthetic
from painter.evaluation import judge
from painter.evaluation import metrics as ev
from painter.evaluation import reconstruction
from painter.checkpoint.model_dir import load_model
from painter.errors import ErrorRateExceeded, InputError
from painter.io.output_table import OutputTable
from painter.io.images import encode_image, open_image
from painter.stages import evaluate as stage
from painter.stages.evaluate import Options


def _random_psd(rng, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.normal(size=(d, rank or d))
    return a @ a.T / (rank or d)


def _fid_by_eigvals(mu1, s1, mu2, s2) -> float:
    """An independent FID: eigenvalues of the (non-symmetric) product S1 S2, by numpy and by torch."""
    values = np.linalg.eigvals(s1 @ s2)
    by_torch = torch.linalg.eigvals(torch.from_numpy(s1 @ s2)).numpy()
    np.testing.assert_allclose(np.sort(values.real), np.sort(by_torch.real), rtol=1e-6, atol=1e-9)
    assert np.abs(values.imag).max() < 1e-6 * max(1.0, np.abs(values).max())
    tr_sqrt = np.sqrt(np.clip(values.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


# --- FID and IS math -----------------------------------------------------------------------------


def test_fid_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    for d in (1, 3, 64):
        mu, sigma = rng.normal(size=d), _random_psd(rng, d)
        assert ev.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9 * max(1.0, np.trace(sigma)))
    features = rng.normal(size=(40, 8)) * 3 + 5
    assert ev.fid_from_features(features, features) == pytest.approx(0.0, abs=1e-9)


def test_fid_diagonal_and_one_dimensional_closed_form():
    # 1-D: (mu1 - mu2)^2 + (s1 - s2)^2 with s the standard deviations
    assert ev.frechet_distance(1.0, 4.0, -2.0, 9.0) == pytest.approx(9.0 + 1.0)
    assert ev.frechet_distance([0.5], [[0.25]], [0.5], [[0.0]]) == pytest.approx(0.25)
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    std1, std2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    std2[0] = 0.0  # a degenerate dimension
    expected = ((mu1 - mu2) ** 2).sum() + ((std1 - std2) ** 2).sum()
    got = ev.frechet_distance(mu1, np.diag(std1 ** 2), mu2, np.diag(std2 ** 2))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fid_full_covariance_matches_an_independent_computation_and_is_symmetric():
    rng = np.random.default_rng(2)
    for d in (2, 5, 32):
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        s1, s2 = _random_psd(rng, d), _random_psd(rng, d) * 2
        got = ev.frechet_distance(mu1, s1, mu2, s2)
        assert got == pytest.approx(_fid_by_eigvals(mu1, s1, mu2, s2), rel=1e-8)
        assert got == pytest.approx(ev.frechet_distance(mu2, s2, mu1, s1), rel=1e-10)
        assert got > 0
    # a commuting pair (same eigenvectors): Tr((S1 S2)^1/2) = sum sqrt(l1 * l2)
    q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    l1, l2 = rng.uniform(0.1, 2, 4), rng.uniform(0.1, 2, 4)
    s1, s2 = (q * l1) @ q.T, (q * l2) @ q.T
    assert ev.frechet_distance(np.zeros(4), s1, np.zeros(4), s2) == pytest.approx(((np.sqrt(l1) - np.sqrt(l2)) ** 2).sum())


def test_fid_with_singular_covariances_stays_finite_and_correct():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 20)), rng.normal(size=(7, 20)) + 0.3  # fewer samples than dimensions
    mu1, s1 = ev.feature_statistics(a)
    mu2, s2 = ev.feature_statistics(b)
    assert np.linalg.matrix_rank(s1) == 4
    got = ev.frechet_distance(mu1, s1, mu2, s2)
    assert np.isfinite(got) and got == pytest.approx(_fid_by_eigvals(mu1, s1, mu2, s2), rel=1e-6)
    assert ev.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)
    assert ev.frechet_distance(np.zeros(3), np.zeros((3, 3)), np.ones(3), np.zeros((3, 3))) == pytest.approx(3.0)


def test_fid_rejects_malformed_statistics():
    with pytest.raises(ValueError, match="dimensions differ"):
        ev.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="covariance"):
        ev.frechet_distance(np.zeros(2), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="NaN"):
        ev.frechet_distance(np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2))


def test_feature_statistics():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(50, 6)).astype(np.float32)
    mu, sigma = ev.feature_statistics(x)
    assert mu.dtype == sigma.dtype == np.float64 and sigma.shape == (6, 6)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(axis=0))
    np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False))
    with pytest.raises(ValueError, match="at least 2"):
        ev.feature_statistics(x[:1])
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        ev.feature_statistics(x[0])


def test_inception_score_on_known_inputs():
    assert ev.inception_score(np.full((20, 7), 1 / 7)) == pytest.approx((1.0, 0.0))
    for k in (1, 5, 10):
        mean, std = ev.inception_score(np.eye(k))
        assert mean == pytest.approx(k) and std == pytest.approx(0.0)
    mean, std = ev.inception_score(np.tile(np.eye(4), (3, 1)), splits=3)  # each split holds the 4 classes
    assert mean == pytest.approx(4.0) and std == pytest.approx(0.0, abs=1e-12)
    mean, std = ev.inception_score(ev.softmax(np.array([[50.0, 0, 0], [0, 50.0, 0], [0, 0, 0]])))
    assert 1.0 < mean < 3.0  # two confident predictions and one uniform
    with pytest.raises(ValueError, match="sum to 1"):
        ev.inception_score(np.ones((3, 3)))
    with pytest.raises(ValueError, match="splits"):
        ev.inception_score(np.eye(3), splits=4)


# --- feature extractors --------------------------------------------------------------------------


class PoolFeatures(torch.nn.Module):
    """A toy FID network: 2x2 average-pooled pixels as features (12), and 3 'class' logits."""

    def forward(self, x):
        features = torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return {"features": features, "logits": 4 * features[:, :3]}


class ScriptedPool(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.input_size = 16

    def forward(self, x):
        return x.mean(dim=(2, 3))


def _export(module, size: int = 16, dynamic: bool = True) -> bytes:
    example = (torch.zeros(2, 3, size, size),)
    shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic else None
    buffer = io.BytesIO()
    torch.export.save(torch.export.export(module, example, dynamic_shapes=shapes), buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def extractor_file(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("extractor") / "pool.pt2"
    path.write_bytes(_export(PoolFeatures()))
    return str(path)


def test_exported_extractor_contract(extractor_file):
    with open(extractor_file, "rb") as f:
        extractor = ev.load_feature_extractor(f.read(), batch_size=3)
    assert extractor.size == 16 and extractor.fixed_batch is None
    images = np.random.default_rng(5).uniform(-1, 1, (7, 3, 16, 16)).astype(np.float32)
    features, logits = extractor(images)
    assert features.shape == (7, 12) and logits.shape == (7, 3) and features.dtype == np.float64
    np.testing.assert_allclose(features, PoolFeatures()(torch.from_numpy(images))["features"].numpy(), rtol=1e-5)
    with pytest.raises(InputError, match="--feature-size is 8"):
        ev.load_feature_extractor(open(extractor_file, "rb").read(), size=8)
    with pytest.raises(ValueError, match=r"\(N, 3, 16, 16\)"):
        extractor(images[:, :, :8, :8])

    fixed = ev.load_feature_extractor(_export(PoolFeatures(), dynamic=False))  # batch of exactly 2
    assert fixed.fixed_batch == 2
    np.testing.assert_allclose(fixed(images)[0], features, rtol=1e-6)  # 7 images: last call padded


def test_torchscript_extractor_and_bad_files():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        buffer = io.BytesIO()
        torch.jit.save(torch.jit.script(ScriptedPool()), buffer)
    extractor = ev.load_feature_extractor(buffer.getvalue())
    assert extractor.size == 16 and extractor.source.startswith("torchscript")
    features, logits = extractor(np.zeros((3, 3, 16, 16), np.float32))
    assert features.shape == (3, 3) and logits is None
    with pytest.raises(InputError, match="not a zip"):
        ev.load_feature_extractor(b"import os; os.system('boom')")
    with pytest.raises(InputError, match="declares no input size"):
        ev.load_feature_extractor(_export_without_size())
    bad = ev.FeatureExtractor(lambda x: x.mean(dim=1), size=4)  # (B, H, W): not (B, D)
    with pytest.raises(InputError, match=r"features must be a \(2, D\) tensor"):
        bad(np.zeros((2, 3, 4, 4), np.float32))
    nan = ev.FeatureExtractor(lambda x: x.flatten(1) * float("nan"), size=4)
    with pytest.raises(InputError, match="NaN"):
        nan(np.zeros((2, 3, 4, 4), np.float32))


def _export_without_size() -> bytes:
    """An exported program whose spatial size is dynamic: it declares none."""
    class Mean(torch.nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))
    side = torch.export.Dim("side", min=4, max=512)
    buffer = io.BytesIO()
    program = torch.export.export(Mean(), (torch.zeros(2, 3, 16, 16),),
                                  dynamic_shapes=({0: torch.export.Dim("b", min=1, max=64), 2: side, 3: side},))
    torch.export.save(program, buffer)
    return buffer.getvalue()


# --- caption accuracy and reconstruction (pure) --------------------------------------------------


def test_oracle_images_score_about_one_and_match_synthetic_score():
    captions = synthetic.captions_for_eval(40, seed=7)
    images = [synthetic.render(synthetic.parse_caption(c), 32, rng=i) for i, c in enumerate(captions)]
    encoded = [encode_image(np.asarray(im)) for im in images]
    summary, verdicts = judge.judge_images(captions, encoded)
    assert summary["colour_shape"] >= 0.95 and summary["all"] >= 0.9 and summary["unread"] <= 0.05
    assert summary == judge.score(captions, images)  # PNG bytes and the drawn pictures read the same
    assert len(verdicts) == 40 and all(v.right["colour"] for v in verdicts)
    assert verdicts[0].label() in ("ok",) or verdicts[0].label().startswith("miss: ")
    wrong = judge.verdict(captions[0], images[1] if captions[1] != captions[0] else images[2])
    assert not wrong.all and stage.sheet_label(wrong).startswith("错:")


def test_reconstruction_error_and_codebook_usage(tiny_model_dir):
    assert reconstruction.codebook_usage([0, 1, 2, 3, 0, 1, 2, 3], 8) == {
        "codes_used": 4, "codebook_size": 8, "codebook_usage": 0.5, "perplexity": pytest.approx(4.0), "tokens": 8}
    assert reconstruction.codebook_usage([5] * 10, 8)["perplexity"] == pytest.approx(1.0)
    vqgan = load_model(tiny_model_dir, parts=("vqgan",)).vqgan
    images = np.random.default_rng(8).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
    result = reconstruction.reconstruction_error(vqgan, images, batch_size=2)
    assert result["images"] == 3 and result["tokens"] == 3 * 64
    assert all(np.isfinite(result[k]) for k in ("l1", "l2", "psnr", "perplexity"))
    assert 0 < result["codebook_usage"] <= 1 and 1 <= result["perplexity"] <= result["codes_used"]
    recon = vqgan.decode(vqgan.encode(torch.from_numpy(images)))
    mse = (recon - torch.from_numpy(images)).square().mean().item()
    assert result["l2"] == pytest.approx(mse, rel=1e-5)
    assert result["l1"] == pytest.approx((recon - torch.from_numpy(images)).abs().mean().item(), rel=1e-5)


# --- the command ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("corpora")
    synthetic.write_corpus(str(root / "a"), 30, shards=2, size=32, seed=1)
    synthetic.write_corpus(str(root / "b"), 30, shards=1, size=32, seed=2)
    return {"a": str(root / "a"), "b": str(root / "b"), "root": root}


def test_fid_end_to_end_through_the_cli(ray_session, corpora, extractor_file, tmp_path, capsys):
    """The same images score FID ~0 against themselves and > 0 against another set; the images of a
    corpus are renderings of their captions, so the judge calls them ~all right."""
    summaries = {}
    for ref in ("a", "b"):
        args = ["evaluate", "--generated", corpora["a"], "--reference", corpora[ref],
                "--feature-extractor", extractor_file, "--output", str(tmp_path / ref)]
        assert cli.main(args) == 0
        summaries[ref] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    same, other = summaries["a"], summaries["b"]
    assert same["status"] == "succeeded" and same["job"] == "evaluate" and same["ran_on"] == "this process"
    assert same["fid"]["fid"] == pytest.approx(0.0, abs=1e-6) and same["fid"]["images"] == 30
    assert other["fid"]["fid"] > 1e-3 and other["fid"]["reference_images"] == 30
    assert same["fid"]["inception_score"]["mean"] == pytest.approx(same["fid"]["reference_inception_score"]["mean"])
    accuracy = same["caption_accuracy"]
    assert accuracy["n"] == 30 and accuracy["colour_shape"] >= 0.95 and accuracy["all"] >= 0.9
    assert accuracy["chance"]["colour_shape"] == pytest.approx(1 / 36)
    assert os.path.getsize(same["contact_sheet"]) > 1000
    assert json.loads(open(same["summary_file"], encoding="utf-8").read())["fid"]["fid"] == same["fid"]["fid"]


def test_random_tiny_model_is_near_chance_and_vqgan_reconstruction(tiny_model_dir, corpora, tmp_path):
    summary = stage.run(Options(model=tiny_model_dir, captions=24, caption_seed=3, corpus=[corpora["a"]],
                                output=str(tmp_path), micro_batch=8))
    accuracy = summary["caption_accuracy"]
    assert accuracy["n"] == 24 and accuracy["source"] == "model" and accuracy["micro_batch"] == 8
    assert accuracy["colour_shape"] < 0.15 and accuracy["all"] < 0.1
    assert set(accuracy["chance"]) == {"colour_shape", "all", *synthetic.ATTRIBUTES}
    recon = summary["reconstruction"]
    assert recon["images"] == 30 and 0 < recon["codebook_usage"] <= 1 and recon["codebook_size"] == 256
    assert all(np.isfinite(recon[k]) for k in ("l1", "l2", "psnr", "perplexity"))
    assert summary["rows_rejected"] == 0 and summary["rows_read"] == 30
    sheet = open_image(open(summary["contact_sheet"], "rb").read())
    assert sheet.width > 8 * 32


def _commit(root: str, date: str, rows: list[tuple[str, str, bytes]]) -> None:
    """Rows committed to a generate output table as the generate job does (data files, then a Delta commit)."""
    table = OutputTable(root)
    n = len(rows)
    data = pa.table({"idx": [r[0] for r in rows], "text": [r[1] for r in rows], "sample": [0] * n, "seed": [0] * n,
                     "image": pa.array([r[2] for r in rows], pa.binary()), "model": ["m"] * n, "run_date": [date] * n})
    table.ensure(data.schema, ["run_date"])
    table.commit(table.write_files(data, ["run_date"], f"b-{date}"), date, data.schema, ["run_date"], "run1")


def test_scores_a_generate_output_table(tmp_path):
    captions = synthetic.captions_for_eval(12, seed=9)
    right = [encode_image(np.asarray(synthetic.render(synthetic.parse_caption(c), 32, rng=i)))
             for i, c in enumerate(captions)]
    root = str(tmp_path / "night")
    _commit(root, "2024-05-01", [(f"p{i}", c, im) for i, (c, im) in enumerate(zip(captions, right))])
    wrong = right[1:] + right[:1]  # every image under another caption
    _commit(root, "2024-05-02", [(f"p{i}", c, im) for i, (c, im) in enumerate(zip(captions, wrong))]
            + [("extra", "宽松T恤", right[0])])  # not a synthetic caption: not judged
    latest = stage.run(Options(generated=[root]))["caption_accuracy"]
    assert latest["run_date"] == "2024-05-02" and latest["n"] == 12 and latest["texts_not_captions"] == 1
    assert latest["all"] < 0.5
    first = stage.run(Options(generated=[root], generated_date="2024-05-01"))["caption_accuracy"]
    assert first["n"] == 12 and first["all"] >= 0.9
    folder = stage.run(Options(generated=[root + "/run_date=2024-05-01"], limit=5))["caption_accuracy"]
    assert folder["n"] == 5 and folder["run_date"] == "2024-05-01"


def test_bad_rows_are_counted_and_fail_the_run_above_the_error_rate(corpora, tmp_path):
    bad = tmp_path / "bad.tsv"
    lines = open(os.path.join(corpora["b"], "part-00000.tsv"), encoding="utf-8").read().splitlines()[:4]
    bad.write_text("\n".join(lines + ["x1\t红色\tnot-base64!", "x2\tonly two fields"]) + "\n", encoding="utf-8")
    with pytest.raises(ErrorRateExceeded, match="2 of 6 rows rejected .*above --max-error-rate.*bad base64") as e:
        stage.run(Options(generated=[str(bad)], output=str(tmp_path / "o")))
    summary = e.value.summary  # raised after everything was written, with the summary
    assert summary["rows_read"] == 6 and summary["rows_rejected"] == 2 and summary["caption_accuracy"]["n"] == 4
    rejected = pa.parquet.read_table(summary["errors"]).to_pylist()
    assert [r["idx"] for r in rejected] == ["x1", None] and {r["stage"] for r in rejected} == {"evaluate"}


def test_held_out_captions_and_option_errors(corpora, extractor_file, tiny_model_dir):
    from painter.stages import make_corpus

    root = str(corpora["root"] / "held")
    made = make_corpus.run(make_corpus.Options(output=root, rows=20, shards=1, hold_out_pairs=2, seed=4))
    held = set(open(made["held_out"], encoding="utf-8").read().split())
    captions = stage.read_captions(Options(model="m", captions=30, held_out=made["held_out"]), {})
    assert len(captions) == 30 and set(captions) <= held
    with pytest.raises(InputError, match="nothing to evaluate"):
        stage.run(Options())
    with pytest.raises(InputError, match="both --feature-extractor and --reference"):
        stage.run(Options(generated=[corpora["a"]], feature_extractor=extractor_file))
    with pytest.raises(InputError, match="--corpus .* needs --model"):
        stage.run(Options(captions=0, corpus=[corpora["a"]]))
    with pytest.raises(InputError, match="not a zip"):
        stage.run(Options(generated=[corpora["a"]], reference=[corpora["b"]], feature_extractor=made["files"][0]))
    with pytest.raises(InputError, match="no such file"):
        stage.run(Options(generated=[corpora["a"] + "/missing"]))
    with pytest.raises(InputError, match="line 1: not a synthetic caption"):
        stage.read_captions(Options(model="m", held_out=made["files"][0]), {})


def test_runs_as_a_ray_task_and_brings_back_painter_errors(ray_session, corpora):
    summary = stage.run_as_task(Options(generated=[corpora["b"]], limit=3), {"num_cpus": 0.25})
    assert summary["caption_accuracy"]["n"] == 3
    with pytest.raises(InputError, match="no such file"):
        stage.run_as_task(Options(generated=[corpora["b"] + "/missing"]), {"num_cpus": 0.25})
