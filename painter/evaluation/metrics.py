"""Quality metrics of generated images: FID and Inception Score through a user-supplied feature network,
and the diversity of the samples of one caption.

No Ray, and no I/O beyond what the caller passes in (bytes of an extractor, a loaded model, images).
`painter.stages.evaluate` (`painter evaluate`) reads files and wires these together, with the synthetic
judge (`painter.evaluation.judge`) and VQGAN reconstruction (`painter.evaluation.reconstruction`).

**FID** (`frechet_distance`, `feature_statistics`): ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)), in
float64. Tr((S1 S2)^(1/2)) is computed as the sum of the square roots of the eigenvalues of
sqrt(S1) S2 sqrt(S1), which has the same eigenvalues as S1 S2 but is symmetric positive
semi-definite, so a symmetric eigendecomposition (`numpy.linalg.eigh`) suffices: no scipy, no complex
parts to discard, and no epsilon added to the diagonal; eigenvalues that rounding makes slightly
negative (singular or near-singular covariances, e.g. fewer images than feature dimensions) are
clipped to 0. FID from few images is biased upward: compare only runs with the same image counts.

**Inception Score** (`inception_score`): exp(mean over images of KL(p(y|x) || p(y))), p(y) the mean
prediction of the split; the mean and standard deviation over `splits` equal parts.

**Feature extractors** (`FeatureExtractor`, `load_feature_extractor`). Nothing is downloaded: the user
supplies the network. From Python, any callable works (`FeatureExtractor(fn, size)`). From a file,
`load_feature_extractor(data)` takes the bytes of either
  * a `torch.export` program saved with `torch.export.save` (`.pt2`, what PyTorch now recommends), or
  * a TorchScript module saved with `torch.jit.save` (deprecated by PyTorch, still accepted because
    many published FID networks are TorchScript),
with this contract:
  * input: one float32 tensor (B, 3, S, S), RGB scaled to [-1, 1] exactly like the model's input
    (`painter.io.images.to_model_input`); images are resized (shorter side, bicubic) and center-cropped
    to S first. Wrap a network that wants other scaling (ImageNet mean/std, 0..255) in a module that
    converts, then export that. S is what the file declares - the static H = W of an exported
    program's input, or an integer attribute `input_size` of a TorchScript module - or the `size`
    given by the caller (`--feature-size`); both given and different is an error, neither is an error.
    An exported program whose batch dimension is static gets exactly that many images per call (the
    last call is padded by repeating its last image; padded outputs are dropped).
  * output: a tensor (B, D) of features (FID only); or a tuple (features (B, D), logits (B, K)); or a
    dict with "features" (B, D) and/or "logits" (B, K). Logits give the Inception Score (softmax is
    applied here). Anything else, or non-finite values, is an `InputError`.
  * it runs under `torch.inference_mode()`, in eval mode, on the device asked for (CPU by default).
**Trust**: loading such a file runs code from it. `torch.export.load` unpickles the file's tensors with
`weights_only=False` (arbitrary Python can run while loading), and a TorchScript file is a program.
Treat `--feature-extractor` exactly like a script you are about to execute: only files you built or
vetted, from storage only trusted people can write to.
"""
from __future__ import annotations

import io
import math
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from painter.errors import InputError

# --- FID and IS ----------------------------------------------------------------------------------


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of features (N, D), float64, covariance with N - 1 (as FID uses)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {x.shape[0]}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinity")
    mu = x.mean(axis=0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _as_stats(mu, sigma, name: str) -> tuple[np.ndarray, np.ndarray]:
    mu = np.atleast_1d(np.asarray(mu, dtype=np.float64))
    sigma = np.atleast_2d(np.asarray(sigma, dtype=np.float64))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: mean of shape {mu.shape} needs a ({mu.shape[0]}, {mu.shape[0]}) covariance, "
                         f"got {sigma.shape}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{name}: statistics contain NaN or infinity")
    return mu, (sigma + sigma.T) / 2


def sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues,
    which rounding makes of zero ones, are clipped to 0)."""
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for PSD S1, S2: the eigenvalues of S1 S2 are those of the PSD matrix
    sqrt(S1) S2 sqrt(S1) (AB and BA share their non-zero eigenvalues)."""
    root = sqrt_psd(sigma1)
    values = np.linalg.eigvalsh(root @ ((sigma2 + sigma2.T) / 2) @ root)
    return float(np.sqrt(np.clip(values, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (FID on feature statistics).

    Float64 throughout; symmetric in its two Gaussians up to rounding; never negative (rounding
    below 0 is clipped). See the module docstring for how the matrix square root is taken.
    """
    mu1, sigma1 = _as_stats(mu1, sigma1, "first")
    mu2, sigma2 = _as_stats(mu2, sigma2, "second")
    if mu1.shape != mu2.shape:
        raise ValueError(f"feature dimensions differ: {mu1.shape[0]} != {mu2.shape[0]}")
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    return float(max(value, 0.0))


def fid_from_features(features1, features2) -> float:
    """FID between two sets of features (N1, D) and (N2, D)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def softmax(logits) -> np.ndarray:
    """Row-wise softmax of (N, K) logits in float64."""
    x = np.asarray(logits, dtype=np.float64)
    x = np.exp(x - x.max(axis=-1, keepdims=True))
    return x / x.sum(axis=-1, keepdims=True)


def inception_score(probs, splits: int = 1) -> tuple[float, float]:
    """(mean, standard deviation over splits) of exp(mean KL(p(y|x) || p(y))) for class
    probabilities (N, K) whose rows sum to 1; 0 log 0 counts as 0. Uniform predictions give 1;
    confident predictions spread evenly over K classes give K."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1 or p.shape[1] < 1:
        raise ValueError(f"probabilities must be (N, K), got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("each row of probabilities must be finite, non-negative and sum to 1 (apply softmax to logits)")
    if not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits must be between 1 and the number of images ({p.shape[0]}), got {splits}")
    scores = []
    for part in np.array_split(p, splits):
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            kl = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


# --- feature extractors --------------------------------------------------------------------------


@dataclass
class FeatureExtractor:
    """A network (B, 3, size, size) floats in [-1, 1] -> features and/or logits (see the module docstring).

    `fn` is any callable; `fixed_batch` makes every call exactly that many images (padded);
    `batch_size` bounds the images per call otherwise.
    """
    fn: Callable
    size: int
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    batch_size: int = 64
    fixed_batch: int | None = None
    source: str = "callable"

    def __post_init__(self):
        self.device = torch.device(self.device)
        if self.size < 1 or self.batch_size < 1 or (self.fixed_batch or 1) < 1:
            raise ValueError(f"size, batch_size and fixed_batch must be >= 1 (got {self.size}, "
                             f"{self.batch_size}, {self.fixed_batch})")

    def _outputs(self, out, n: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if isinstance(out, torch.Tensor):
            features, logits = out, None
        elif isinstance(out, (tuple, list)) and len(out) == 2:
            features, logits = out
        elif isinstance(out, dict) and out.keys() & {"features", "logits"} and out.keys() <= {"features", "logits"}:
            features, logits = out.get("features"), out.get("logits")
        else:
            raise InputError(f"feature extractor ({self.source}) returned {type(out).__name__}; expected a tensor "
                             "(B, D), a tuple (features, logits) or a dict with 'features' and/or 'logits'")
        for name, value in (("features", features), ("logits", logits)):
            if value is None:
                continue
            if not isinstance(value, torch.Tensor) or value.ndim != 2 or value.shape[0] != n:
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise InputError(f"feature extractor ({self.source}): {name} must be a ({n}, D) tensor "
                                 f"for {n} images, got {shape}")
            if not torch.isfinite(value).all():
                raise InputError(f"feature extractor ({self.source}): {name} contain NaN or infinity")
        return features, logits

    @torch.inference_mode()
    def __call__(self, images) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(features (N, D) or None, logits (N, K) or None) as float64 for images (N, 3, size, size) in [-1, 1]."""
        x = torch.as_tensor(np.asarray(images, dtype=np.float32))
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != self.size or x.shape[3] != self.size:
            raise ValueError(f"expected images (N, 3, {self.size}, {self.size}), got {tuple(x.shape)}")
        step = self.fixed_batch or self.batch_size
        parts: dict[str, list[np.ndarray]] = {"features": [], "logits": []}
        kinds = None
        for start in range(0, len(x), step):
            chunk = x[start:start + step]
            n = len(chunk)
            if self.fixed_batch and n < self.fixed_batch:
                chunk = torch.cat([chunk, chunk[-1:].expand(self.fixed_batch - n, -1, -1, -1)])
            outs = self._outputs(self.fn(chunk.to(self.device)), len(chunk))
            got = tuple(o is not None for o in outs)
            if kinds is not None and got != kinds:
                raise InputError(f"feature extractor ({self.source}) returned different outputs for different batches")
            kinds = got
            for name, value in zip(("features", "logits"), outs):
                if value is not None:
                    parts[name].append(value[:n].double().cpu().numpy())
        if kinds is None:
            return None, None
        return tuple(np.concatenate(parts[k]) if parts[k] else None for k in ("features", "logits"))


def _placeholder_shape(program) -> tuple:
    """Shape of the one user input of an exported program (ints where static, else None)."""
    user_inputs = list(program.graph_signature.user_inputs)
    nodes = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    if len(user_inputs) != 1 or user_inputs[0] not in nodes:
        raise InputError(f"an exported feature extractor must take exactly one tensor, it takes {len(user_inputs)} inputs")
    value = nodes[user_inputs[0]].meta.get("val")
    shape = getattr(value, "shape", None)
    if shape is None or len(shape) != 4:
        raise InputError(f"an exported feature extractor must take a (B, 3, S, S) tensor, its input is {shape}")
    return tuple(int(d) if isinstance(d, int) else None for d in shape)


def archive_kind(data: bytes, what: str = "feature extractor") -> str:
    """"export" (torch.export.save) or "torchscript" (torch.jit.save) for a file's bytes; else InputError naming `what`."""
    try:
        names = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except zipfile.BadZipFile:
        raise InputError(f"{what}: not a torch.export (.pt2) or TorchScript file (not a zip archive)") from None
    if any(n.endswith("archive_format") or "/models/" in n for n in names):
        return "export"
    if any(n.endswith("/data.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    raise InputError(f"{what}: a zip archive, but neither a torch.export program (torch.export.save) "
                     "nor a TorchScript module (torch.jit.save)")


def load_feature_extractor(data: bytes, size: int | None = None, device="cpu", batch_size: int = 64,
                           source: str = "file") -> FeatureExtractor:
    """A `FeatureExtractor` from the bytes of a torch.export `.pt2` or TorchScript file.

    TRUSTED INPUT ONLY: loading runs code from the file (see the module docstring). `size` is the
    input side when the file does not declare one (InputError if it declares another).
    """
    device = torch.device(device)
    kind = archive_kind(data)
    fixed_batch = declared = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.* and export serialisation warn on every load
            if kind == "export":
                program = torch.export.load(io.BytesIO(data))
                batch, channels, height, width = _placeholder_shape(program)
                if channels not in (3, None):
                    raise InputError(f"feature extractor {source}: takes {channels} channels, not 3 (RGB)")
                if height is not None and height != width:
                    raise InputError(f"feature extractor {source}: takes {height}x{width} images; only square inputs are supported")
                declared, fixed_batch = height, batch
                if device.type != "cpu":
                    from torch.export.passes import move_to_device_pass
                    program = move_to_device_pass(program, device)
                fn = program.module()
            else:
                fn = torch.jit.load(io.BytesIO(data), map_location=device)
                fn.eval()
                declared = getattr(fn, "input_size", None)
                if declared is not None and not isinstance(declared, int):
                    raise InputError(f"feature extractor {source}: input_size must be an int, got {declared!r}")
    except InputError:
        raise
    except Exception as e:  # torch raises many kinds of errors for damaged or incompatible archives
        raise InputError(f"feature extractor {source}: cannot load it ({type(e).__name__}: {str(e)[:300]})") from None
    if declared is not None and size is not None and declared != size:
        raise InputError(f"feature extractor {source} takes {declared}x{declared} images, but --feature-size is {size}")
    if declared is None and size is None:
        raise InputError(f"feature extractor {source} declares no input size: pass --feature-size "
                         "(or give the TorchScript module an int attribute input_size)")
    return FeatureExtractor(fn, declared or size, device, batch_size, fixed_batch, f"{kind} {source}")


def diversity(groups: Iterable[Sequence]) -> dict:
    """How different the samples of one caption are, over groups (one per caption) of >= 2 images
    (PIL or uint8 (H, W, 3)): mean number of distinct images per group (pixel-identical ones count
    once), the share of groups whose samples are all one picture, and the mean pairwise pixel
    distance (mean |a - b| over all values, in 0..1 of the 0..255 range)."""
    distinct, collapsed, distances = [], 0, []
    for group in groups:
        pixels = [np.asarray(image, dtype=np.uint8) for image in group]
        if len(pixels) < 2:
            continue
        unique = len({p.tobytes() for p in pixels})
        distinct.append(unique)
        collapsed += unique == 1
        distances += [float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean()) / 255.0
                      for i, a in enumerate(pixels) for b in pixels[i + 1:]]
    if not distinct:
        raise ValueError("diversity needs at least one group of two or more images")
    return {"groups": len(distinct), "distinct_per_group": float(np.mean(distinct)), "collapsed_groups": collapsed,
            "mean_pairwise_distance": float(np.mean(distances))}
