"""The train-vq job's worker side: what every Ray Train worker runs (`train_loop`), DDP over decoded images.

`VQRun` is the VQGAN's hooks of the one runner (`painter.stages.train_session.TrainerRun`, which owns the
loop, the reporting and checkpoint cadence, the checkpoint layout (a full model directory plus
`train_state.pt`), the divergence stop and the fault switch): restoring the VQGAN (and discriminator) and Adam, the pixel batches
(uint8 (B, H, W, 3) rows from Ray Data, or for a run that keeps its images in memory this rank's share
of the decoded images by (file, row), turned into [-1, 1] floats on the worker's device), the
step (`painter.training.vqgan.train_step`: reconstruction + codebook loss, dead-code restarts, optional
GAN), the metrics (loss, L1, codebook usage and perplexity over the logging window, lr) and the
held-out reconstruction measurement (`painter.evaluation.reconstruction.ReconstructionMeter` on every rank's
part of the `eval` dataset, summed over ranks) before the first step and after the last.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from painter.checkpoint.model_dir import load_model, save_model
from painter.inference.encoder import PIXELS
from painter.io.rows import ROW, SOURCE, rank_share
from painter.models.vqgan import VQGAN
from painter.runtime import synchronize
from painter.evaluation.reconstruction import ReconstructionMeter
from painter.stages.train_session import STATE_FILE, SessionConfig, TrainerRun, copy_source_files, shuffled_batches
from painter.training.vqgan import CodeCounter, PatchDiscriminator, make_optimizers, train_step, usage_from_counts


@dataclass(frozen=True, kw_only=True)
class WorkerConfig(SessionConfig):
    """What every worker of the train-vq job needs, built once by the driver (`painter.stages.train_vq`);
    `train` is a `painter.training.vqgan.VQTrainConfig`."""
    from_scratch: bool  # a seeded random VQGAN of `model` (else `source`'s weights)
    has_eval: bool  # held-out images to measure reconstruction on, before the first step and after the last
    # when `in_memory`: Ray object refs of the decoded images' Arrow blocks, each worker taking its share
    train_blocks: list | None = None
    eval_blocks: list | None = None  # (None: the held-out images, if any, are the "eval" dataset)


def train_loop(loop_config: dict) -> None:
    """The Ray Train worker function: restore or start, train to `total_steps`, report and checkpoint
    (`loop_config`: {"config": WorkerConfig})."""
    VQRun(loop_config["config"]).run()


def _pixel_collate(size: int):
    """A Ray collate fn: an Arrow batch with a `pixels` binary column -> uint8 tensor (B, size, size, 3)."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    class PixelCollate(ArrowBatchCollateFn):
        def __call__(self, table: pa.Table) -> torch.Tensor:
            cells = table.column(PIXELS).to_pylist()
            data = np.frombuffer(b"".join(cells), dtype=np.uint8)
            return torch.from_numpy(data.reshape(len(cells), size, size, 3).copy())

    return PixelCollate()


def pixels_in_memory(blocks: list, size: int, rank: int, world: int, equal: bool) -> torch.Tensor:
    """This worker's share of decoded images held in Ray's object store (`blocks`: refs of Arrow tables with
    `pixels`, `_source`, `_row`), dealt by (file, row) (`painter.io.rows.rank_share`), in that order:
    uint8 (n, size, size, 3). `equal`: every rank the same count, as training steps need."""
    import ray

    table = pa.concat_tables(ray.get(list(blocks)))
    cells = table.column(PIXELS).take(rank_share(table, (SOURCE, ROW), rank, world, equal)).to_pylist()
    data = np.frombuffer(b"".join(cells), dtype=np.uint8)
    return torch.from_numpy(data.reshape(len(cells), size, size, 3).copy())


def to_images(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1] on `device`: x / 127.5 - 1, as
    `painter.io.images.to_model_input` (converted after the copy, so only bytes cross to a GPU)."""
    x = pixels.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    return (x / 127.5 - 1.0).contiguous()


class VQRun(TrainerRun):
    """One worker's session of train-vq: VQGAN, discriminator and optimizers (restored from the last checkpoint if any)."""
    label = "train-vq"
    cfg: WorkerConfig

    def setup(self, checkpoint) -> dict:
        import ray.train.torch

        self.size = self.config.vqgan.resolution
        self.vqgan, self.disc, state = self._restore(checkpoint)
        self.model = ray.train.torch.prepare_model(self.vqgan)  # DDP (gloo on CPU) when world > 1
        self.discriminator = None
        if self.disc is not None:
            self.discriminator = ray.train.torch.prepare_model(self.disc)
        self.optimizer, self.disc_optimizer = make_optimizers(self.vqgan, self.tc, self.disc)
        self.counter = CodeCounter(self.config.vqgan.n_embed, self.device)
        self.counter_state: dict | None = None  # the histograms summed over ranks at a checkpoint step
        self.memory: dict[str, torch.Tensor] = {}  # "train"/"eval": this rank's images, when the run keeps them
        saved = state.pop("saved", None)
        if saved:
            self.optimizer.load_state_dict(saved["optimizer"])
            if self.disc_optimizer is not None and saved.get("disc_optimizer"):
                self.disc_optimizer.load_state_dict(saved["disc_optimizer"])
            self.counter.load_state_dict(saved["counter"])
        return state

    def _restore(self, checkpoint) -> tuple[VQGAN, PatchDiscriminator | None, dict]:
        c = self.cfg
        disc = PatchDiscriminator.for_resolution(self.size) if self.tc.gan_weight > 0 else None
        if checkpoint is not None:
            with checkpoint.as_directory() as d:
                vqgan = load_model(d, parts=("vqgan",)).vqgan
                state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
            if disc is not None and state.get("discriminator"):
                disc.load_state_dict(state["discriminator"])
            state["saved"] = {k: state.pop(k) for k in ("optimizer", "disc_optimizer", "counter") if k in state}
            state.pop("discriminator", None)
            print(f"train-vq: rank {self.rank} resumes at step {state['step']} from {checkpoint.path}", flush=True)
            return vqgan.train(), disc, state
        if c.from_scratch:
            torch.manual_seed(c.seed)
            vqgan = VQGAN(self.config.vqgan)
        else:
            vqgan = load_model(c.source, parts=("vqgan",), storage=self.storage).vqgan
        if disc is not None:
            torch.manual_seed(c.seed + 1)
            disc = PatchDiscriminator.for_resolution(self.size)
        return vqgan.train(), disc, {"step": 0, "first_loss": None, "images": 0, "seconds": 0.0,
                                     "codes_restarted": 0, "start_eval": None, "metrics": {}}

    def before_training(self) -> None:
        if self.cfg.has_eval and self.state["start_eval"] is None:
            self.state["start_eval"] = self._evaluate()  # the starting weights, before any step

    def step(self, batches, epoch: int):
        result = train_step(self.model, self.optimizer, self.take(batches, epoch), self.tc, self.state["step"],
                            self.counter, discriminator=self.discriminator, disc_optimizer=self.disc_optimizer,
                            seed=self.cfg.seed)
        self.state["codes_restarted"] += result.restarted
        return result

    def _kept(self, part: str) -> torch.Tensor:
        """This rank's images of `part` ("train": an equal share; "eval": every rank's rows, all used)."""
        if part not in self.memory:
            self.memory[part] = pixels_in_memory(getattr(self.cfg, f"{part}_blocks"), self.size, self.rank, self.world,
                                                 equal=part == "train")
        return self.memory[part]

    def batches(self, shard, epoch: int, skip: int):
        """This worker's image batches of `epoch` (seeded shuffle: of all its images when kept in memory, else
        Ray Data's local shuffle buffer), those of the first `skip` steps left out."""
        c, buffer, batch = self.cfg, self.cfg.shuffle_buffer, self.cfg.micro_batch
        seed = (c.seed * 1009 + epoch) * 1009 + self.rank
        if shard is None:
            images = self._kept("train")
            batches = (images[rows] for rows in shuffled_batches(len(images), batch, seed))
        else:
            batches = shard.iter_torch_batches(
                batch_size=batch, drop_last=True, collate_fn=_pixel_collate(self.size), prefetch_batches=2,
                local_shuffle_buffer_size=max(buffer, batch) if buffer else None,
                local_shuffle_seed=seed if buffer else None)
        for i, pixels in enumerate(batches):
            if i >= skip:
                yield to_images(pixels, self.device)

    def validates(self, epoch_end: bool, final: bool) -> bool:
        return final and self.cfg.has_eval

    def validate(self) -> dict:
        return {"eval": self._evaluate()}

    def metrics(self, result, epoch: int) -> dict:
        """The step's losses averaged over ranks, codebook use over the window, throughput since the last report."""
        zero = torch.zeros((), device=self.device)
        values = torch.stack([result.loss, result.l1, result.l2, result.codebook, result.grad_norm,
                              zero if result.gan is None else result.gan,
                              zero if result.disc_loss is None else result.disc_loss]).float()
        if self.world > 1:
            dist.all_reduce(values)
            values /= self.world
        loss, l1, l2, codebook, grad_norm, gan, disc = values.tolist()
        usage = self.counter.window_usage()  # every rank: it all-reduces
        synchronize(self.device)  # logging steps only: the clock then counts the steps' device work, done
        seconds = time.perf_counter() - self.window_start
        images = self.window_rows * self.world
        self.state["images"] += images
        self.state["seconds"] += seconds
        if self.state["step"] == 1:
            self.state["first_loss"] = loss
        metrics = {"step": self.state["step"], "epoch": epoch, "time": round(time.time(), 3), "loss": loss,
                   "l1": l1, "l2": l2, "codebook_loss": codebook, "codebook_usage": usage["codebook_usage"],
                   "perplexity": usage["perplexity"], "codes_used": usage["codes_used"], "lr": result.lr,
                   "grad_norm": grad_norm, "codes_restarted": self.state["codes_restarted"],
                   "images_per_second": images / max(seconds, 1e-9),
                   "run_images_per_second": self.state["images"] / max(self.state["seconds"], 1e-9),
                   "first_loss": self.state["first_loss"], "start_eval": self.state["start_eval"]}
        if result.gan is not None:
            metrics |= {"gan_loss": gan, "disc_loss": disc}
        return metrics

    def _evaluate(self) -> dict:
        """Reconstruction L1/L2/PSNR and codebook use of the current VQGAN on the held-out images (all ranks)."""
        import ray.train

        meter, batch = ReconstructionMeter(self.config.vqgan.n_embed), self.cfg.micro_batch
        if self.cfg.eval_blocks is not None:
            kept = self._kept("eval")
            batches = (kept[i:i + batch] for i in range(0, len(kept), batch))
        else:
            batches = ray.train.get_dataset_shard("eval").iter_torch_batches(
                batch_size=batch, collate_fn=_pixel_collate(self.size))
        self.vqgan.eval()
        for pixels in batches:
            meter.update(self.vqgan, to_images(pixels, self.device))
        self.vqgan.train()
        sums = torch.tensor([meter.abs_sum, meter.sq_sum, meter.values, sum(meter.psnr), len(meter.psnr)],
                            dtype=torch.float64, device=self.device)
        counts = torch.as_tensor(meter.counts, device=self.device)
        if self.world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        abs_sum, sq_sum, values, psnr, images = sums.tolist()
        if not images:
            return {"images": 0}
        usage = usage_from_counts(counts)
        return {"images": int(images), "l1": abs_sum / values, "l2": sq_sum / values, "psnr": psnr / images,
                "codebook_usage": usage["codebook_usage"], "perplexity": usage["perplexity"],
                "codes_used": usage["codes_used"]}

    def checkpoint_metrics(self) -> dict:
        self.counter_state = self.counter.state_dict()  # every rank: it all-reduces; rank 0 saves it
        return {}

    def save(self, directory: str) -> None:
        """A full model directory (the source's config, vocab and GPT, the trained VQGAN) plus train_state.pt."""
        copy_source_files(self.cfg.source, directory, ("config.json", "gpt.safetensors"), self.storage)
        save_model(directory, self.config, self.tokenizer, vqgan=self.vqgan)
        state = dict(self.state) | {
            "optimizer": self.optimizer.state_dict(), "counter": self.counter_state,
            "epoch": self.state["step"] // self.cfg.steps_per_epoch}
        if self.disc is not None:
            state |= {"discriminator": self.disc.state_dict(), "disc_optimizer": self.disc_optimizer.state_dict()}
        torch.save(state, os.path.join(directory, STATE_FILE))
