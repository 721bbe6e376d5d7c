"""Reranking: N candidates per image, each scored, the best kept (`--candidates N`).

Owns the candidates' keys (`candidate_keys`: candidate 0 of (seed, idx, sample) is the plain row's
key, candidate j > 0 a key derived from it, so the kept image is a function of (seed, idx, sample)
and N alone, whatever the batch), the model's own score (`likelihood_score`: the mean per-token
log-likelihood ratio of the image codes under the caption versus the null caption, from one full
forward of 2B rows; the conditional mean log-likelihood for a model trained without caption
dropout), `best_of` (the argmax per row, the first candidate on ties) and user-supplied
image-text scorers (`ImageTextScorer`, `load_scorer`).

Scorer files follow `painter.evaluation.metrics.load_feature_extractor`'s loading and trust rules (a
`torch.export` .pt2 or a TorchScript file; loading runs code from it: trusted files only), with
this contract: called as `scorer(images, text_ids)`, images float32 (B, 3, S, S) RGB in [-1, 1] at
the model's image size S, text_ids int64 (B, text_len) ids of the model's own tokenizer; returns a
(B,) or (B, 1) tensor, higher is better. Pure torch; the caller passes the file's bytes.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from painter.errors import InputError
from painter.models.gpt import GPT
from painter.inference.sampling import row_key


def candidate_keys(seed: int, idxs: Sequence[str], samples: Sequence[int], n: int, device=None) -> torch.Tensor:
    """(B * n,) int64 keys, row-major (row, candidate): candidate 0 is `row_key(seed, idx, sample)`."""
    keys = [row_key(seed, idx if j == 0 else f"{idx}\x1ecandidate\x1e{j}", s)
            for idx, s in zip(idxs, samples) for j in range(n)]
    return torch.tensor(keys, dtype=torch.int64, device=device)


@torch.inference_mode()
def token_log_likelihood(gpt: GPT, text_ids: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(B,) mean log p(code_t | text, codes_<t) over the image codes (B, img_len), in fp32."""
    logits = gpt.image_logits(text_ids, codes).float()  # (B, Ti, V_img)
    nll = F.cross_entropy(logits.flatten(0, 1), codes.reshape(-1).long(), reduction="none")  # (B*Ti,)
    return -nll.view(codes.shape).mean(-1)  # (B,)


@torch.inference_mode()
def likelihood_score(gpt: GPT, text_ids: torch.Tensor, codes: torch.Tensor,
                     null_ids: torch.Tensor | None) -> torch.Tensor:
    """(B,) the model's own score of codes (B, img_len) for text_ids (B, Tt).

    With null_ids: mean per-token log p(codes | caption) - log p(codes | null caption), both halves
    in one forward of 2B rows. Without (no caption dropout in training): the conditional mean.
    """
    if null_ids is None:
        return token_log_likelihood(gpt, text_ids, codes)
    both = token_log_likelihood(gpt, torch.cat([text_ids, null_ids]), torch.cat([codes, codes]))  # (2B,)
    conditional, null = both.chunk(2)
    return conditional - null


def best_of(scores: torch.Tensor, n: int) -> torch.Tensor:
    """(B,) index of the best of each row's n candidates; scores (B * n,) row-major; first on ties."""
    return scores.view(-1, n).argmax(dim=1)


@dataclass
class ImageTextScorer:
    """A user's image-text model: `fn(images (B, 3, S, S) in [-1, 1], text_ids (B, Tt)) -> (B,)` scores."""
    fn: Callable
    source: str = "callable"

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, text_ids: torch.Tensor) -> torch.Tensor:
        out = self.fn(images.float(), text_ids.long())
        if not isinstance(out, torch.Tensor) or out.reshape(-1).numel() != images.size(0) or out.ndim > 2:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise InputError(f"scorer ({self.source}) must return ({images.size(0)},) scores, got {shape}")
        out = out.reshape(-1).float()
        if not torch.isfinite(out).all():
            raise InputError(f"scorer ({self.source}) returned NaN or infinity")
        return out


def load_scorer(data: bytes, device="cpu", source: str = "file") -> ImageTextScorer:
    """An `ImageTextScorer` from the bytes of a torch.export .pt2 or TorchScript file (TRUSTED FILES ONLY)."""
    from painter.evaluation.metrics import archive_kind

    kind = archive_kind(data, "scorer")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit.* and export serialisation warn on every load
            if kind == "export":
                program = torch.export.load(io.BytesIO(data))
                if torch.device(device).type != "cpu":
                    from torch.export.passes import move_to_device_pass
                    program = move_to_device_pass(program, torch.device(device))
                fn = program.module()
            else:
                fn = torch.jit.load(io.BytesIO(data), map_location=device)
                fn.eval()
    except Exception as e:  # torch raises many kinds of errors for damaged or incompatible archives
        raise InputError(f"scorer {source}: cannot load it ({type(e).__name__}: {str(e)[:300]})") from None
    return ImageTextScorer(fn, f"{kind} {source}")

